"""Reference readers for the tests, written with the standard library and numpy alone (not the
project's readers): what a colleague's plain script would see in a shard file."""

import io
import json
import tarfile

import numpy as np


def tar_samples(fileobj) -> list[dict]:
    """A WebDataset tar's samples in file order: {'__key__', 'image', 'mask', 'meta'}, the .npy
    members read by numpy without pickles, the .json ones as JSON."""
    samples = []
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            data = tar.extractfile(m).read()
            if ext.endswith(".npy"):
                samples[-1][ext[:-4]] = np.load(io.BytesIO(data), allow_pickle=False)
            elif ext.endswith(".json"):
                samples[-1][ext[:-5]] = json.loads(data)
    return samples
