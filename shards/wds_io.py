"""WebDataset side of the contract: uncompressed tars of whole patients, nothing pickled.

Sample key `{patient}_s{slice:03d}` (dots replaced, webdataset splits keys at the first dot),
members `image.npy` float16 (4,H,W), `mask.npy` uint8 (3,H,W), `meta.json`. Tar headers carry
fixed mtime/owner/mode so the same samples give the same bytes on any machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from shards.atomic import write_bytes


def sample_key(pid: str, i: int) -> str:
    return f"{pid.replace('.', '_')}_s{i:03d}"


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_patient(path: Path, pid: str, split: str, image: np.ndarray, mask: np.ndarray,
                  slice_index: list[int]) -> tuple[Path, str]:
    """Write one patient's slices as one tar, atomically; returns (path, sha256). The tar is
    assembled in memory (one patient) so it is hashed without reading the file back."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, z in enumerate(slice_index):
            key = sample_key(pid, i)
            meta = {"patient": pid, "slice": i, "source_slice": int(z), "split": split}
            _add(tar, f"{key}.image.npy", npy_bytes(image[i]))
            _add(tar, f"{key}.mask.npy", npy_bytes(mask[i]))
            _add(tar, f"{key}.meta.json", json.dumps(meta, sort_keys=True).encode())
    data = buf.getbuffer()
    write_bytes(path, data)
    return path, hashlib.sha256(data).hexdigest()


def read_npy(data: bytes, where: str = ".npy payload") -> np.ndarray:
    """A .npy payload as an array that owns its memory. Nothing is unpickled, and a header
    promising more (or less) data than the payload holds is refused, never allocated."""
    from shards.readers import npy_view

    return npy_view(memoryview(data), where).copy()


def iter_tar(fileobj, where: str | None = None) -> Iterator[dict]:
    """Plain-tar reader: yields {'__key__', 'image', 'mask', 'meta'} per sample, in file order.
    Only `.npy` (never pickled) and `.json` members are decoded; other members are skipped. A tar,
    npy or JSON that does not parse is a `ShardFormatError` naming the file."""
    from shards.readers import ShardFormatError

    where = where or str(getattr(fileobj, "name", "tar"))
    sample, key = {}, None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, _, ext = m.name.partition(".")
                if not (ext.endswith(".npy") or ext.endswith(".json")):
                    continue
                if k != key and sample:
                    yield sample
                    sample = {}
                key = k
                data = tar.extractfile(m).read()
                sample["__key__"] = k
                if ext.endswith(".npy"):
                    sample[ext[:-4]] = read_npy(data, f"{where}: {m.name}")
                else:
                    try:
                        sample[ext[:-5]] = json.loads(data)
                    except (ValueError, RecursionError):
                        raise ShardFormatError(f"{where}: {m.name} is not valid JSON") from None
    except (tarfile.TarError, EOFError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"{where}: not a readable tar ({type(e).__name__}: {str(e)[:100]})") from None
    if sample:
        yield sample
