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


def _header(name: str, size: int) -> bytes:
    """A member's ustar header: fixed mtime/owner/mode, so the bytes depend on the name and size only."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


def tar_bytes(members: list[tuple[str, list]]) -> bytearray:
    """An uncompressed ustar archive of `members` (name, payload buffers) in one buffer, laid out
    as `tarfile` writes it: per member a 512-byte header, the payload, NULs to a 512-byte boundary;
    then two zero blocks, and NULs to a multiple of tarfile's 10240-byte record."""
    heads = [_header(name, _size(bufs)) for name, bufs in members]
    total = sum(len(h) + _padded(_size(bufs)) for h, (_, bufs) in zip(heads, members)) + 2 * tarfile.BLOCKSIZE
    total += -total % tarfile.RECORDSIZE
    out = bytearray(total)  # zeros: the padding and the end blocks come free
    view, pos = memoryview(out), 0
    for h, (_, bufs) in zip(heads, members):
        view[pos:pos + len(h)] = h
        pos += len(h)
        start = pos
        for b in bufs:
            b = memoryview(b).cast("B")
            view[pos:pos + b.nbytes] = b
            pos += b.nbytes
        pos = start + _padded(pos - start)
    return out


def _size(bufs) -> int:
    return sum(memoryview(b).nbytes for b in bufs)


def _padded(n: int) -> int:
    return n + (-n % tarfile.BLOCKSIZE)


def write_patient(path: Path, pid: str, split: str, image: np.ndarray, mask: np.ndarray,
                  slice_index: list[int], sync: bool = True) -> tuple[Path, str]:
    """Write one patient's slices as one tar, atomically; returns (path, sha256). The tar is
    assembled in memory (one patient) in one buffer -- each slice's bytes copied once, after the
    `.npy` header that all its slices share -- so it is hashed without reading the file back.
    `sync=False`: renamed into place without waiting for the disk (`shards.atomic.atomic_path`)."""
    image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
    members = []
    if len(slice_index):
        img_head, mask_head = _npy_header(image[0]), _npy_header(mask[0])
    for i, z in enumerate(slice_index):
        key = sample_key(pid, i)
        meta = {"patient": pid, "slice": i, "source_slice": int(z), "split": split}
        members += [(f"{key}.image.npy", [img_head, image[i]]), (f"{key}.mask.npy", [mask_head, mask[i]]),
                    (f"{key}.meta.json", [json.dumps(meta, sort_keys=True).encode()])]
    data = tar_bytes(members)
    write_bytes(path, data, sync=sync)
    return path, hashlib.sha256(data).hexdigest()


def _npy_header(arr: np.ndarray) -> bytes:
    """The `.npy` header of an array like `arr` (`npy_bytes` minus the data)."""
    full = npy_bytes(arr)
    return full[:len(full) - arr.nbytes]


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
