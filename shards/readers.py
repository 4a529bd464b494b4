"""Fast readers of one patient from either format, given the file bytes.

Zarr's per-call machinery costs ~ms per chunk; a loader that must deliver >10k slices/s reads
each patient's storage shard in one go and decodes its chunks directly: the sharding codec's
index (offset, nbytes per chunk, then a crc32c) sits at the end of the shard file, and each chunk
is a blosc/zstd frame of one slice. Tested against zarr itself.
"""

from __future__ import annotations

import io
import json

import numpy as np

_EMPTY = 2**64 - 1


def _decoder(codecs: list[dict]):
    """decode(src, dest): decompress one chunk straight into the output slice `dest`."""
    comp = [c for c in codecs if c["name"] not in ("bytes",)]
    if len(comp) > 1:
        raise ValueError(f"unsupported codec chain {codecs}")
    name = comp[0]["name"] if comp else None
    if name is None:
        def copy(src, dest):
            dest[...] = np.frombuffer(src, dest.dtype, count=dest.size)
        return copy
    if name == "blosc":
        from numcodecs import blosc

        return blosc.decompress
    if name == "zstd":
        from numcodecs import Zstd

        z = Zstd()
        return lambda src, dest: z.decode(bytes(src), dest)
    raise ValueError(f"unsupported zarr codec {name!r}")


def decode_zarr_array(meta: dict, shard: bytes | None, per_slice: bool = False):
    """Decode a whole sharded array (one shard) from its zarr.json dict and shard file bytes.
    per_slice=True returns a list of independent (C, H, W) arrays instead of one (S, C, H, W)
    array, so a slice kept in a shuffle buffer does not pin its whole patient in memory."""
    shape = tuple(meta["shape"])
    dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    if shape[0] == 0 or shard is None:
        return [np.zeros(shape[1:], dtype) for _ in range(shape[0])] if per_slice else np.zeros(shape, dtype)
    out = [np.empty(shape[1:], dtype) for _ in range(shape[0])] if per_slice else np.empty(shape, dtype)
    (sharding,) = [c for c in meta["codecs"] if c["name"] == "sharding_indexed"]
    conf = sharding["configuration"]
    chunk = tuple(conf["chunk_shape"])
    if chunk[1:] != shape[1:] or conf.get("index_location", "end") != "end":
        raise ValueError("expected one chunk per slice and the shard index at the end")
    n = shape[0] // chunk[0]
    has_crc = any(c["name"] == "crc32c" for c in conf["index_codecs"])
    index_len = 16 * n + (4 if has_crc else 0)
    shard = memoryview(shard)
    index = np.frombuffer(shard, dtype="<u8", count=2 * n, offset=len(shard) - index_len).reshape(n, 2)
    decode = _decoder(conf["codecs"])
    flat = [a.reshape(-1) for a in out] if per_slice else out.reshape(n, -1)
    view = shard
    for i, (off, nb) in enumerate(index):
        if off == _EMPTY:
            flat[i][...] = 0  # chunk never written: the fill value
        else:
            decode(view[off: off + nb], flat[i])
    return out


def read_zarr_patient(read, prefix: str, per_slice: bool = False):
    """`read(relpath) -> bytes | None`; prefix `zarr/{split}/{pid}`. Returns (image, mask)."""
    arrays = []
    for name in ("image", "mask"):
        meta = json.loads(bytes(read(f"{prefix}/{name}/zarr.json")))
        nd = len(meta["shape"])
        shard = read(f"{prefix}/{name}/c/" + "/".join(["0"] * nd)) if meta["shape"][0] else None
        arrays.append(decode_zarr_array(meta, shard, per_slice))
    return arrays[0], arrays[1]


_NPY_HEADERS: dict[bytes, tuple] = {}


def npy_view(buf: memoryview) -> np.ndarray:
    """A read-only array viewing a .npy payload (no copy). Headers are parsed once and cached;
    object dtypes are refused (nothing is ever unpickled)."""
    if bytes(buf[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy payload")
    major = buf[6]
    hlen_size = 2 if major == 1 else 4
    hlen = int.from_bytes(buf[8: 8 + hlen_size], "little")
    start = 8 + hlen_size + hlen
    key = bytes(buf[:start])
    parsed = _NPY_HEADERS.get(key)
    if parsed is None:
        import ast

        d = ast.literal_eval(key[8 + hlen_size:].decode("latin1"))
        dtype = np.dtype(d["descr"])
        if dtype.hasobject:
            raise ValueError("refusing an object (pickled) .npy array")
        parsed = (dtype, tuple(d["shape"]), d["fortran_order"])
        _NPY_HEADERS[key] = parsed
    dtype, shape, fortran = parsed
    count = int(np.prod(shape))
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def iter_tar_members(data: bytes):
    """(name, payload memoryview) of the regular files of an uncompressed ustar/gnu tar."""
    view = memoryview(data)
    pos = 0
    while pos + 512 <= len(view):
        hdr = bytes(view[pos: pos + 512])
        if hdr.count(0) == 512:
            break
        name = hdr[0:100].split(b"\0", 1)[0].decode()
        prefix = hdr[345:500].split(b"\0", 1)[0].decode() if hdr[257:262] == b"ustar" else ""
        size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        kind = hdr[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            raise ValueError("pax/gnu extended headers: use the generic tar reader")
        pos += 512
        if kind in (b"0", b"\0"):
            yield (f"{prefix}/{name}" if prefix else name), view[pos: pos + size]
        pos += (size + 511) // 512 * 512


def read_wds_patient(data: bytes) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """All samples of one patient's tar: (images, masks, keys) in file order; each array owns
    its memory (one copy out of the tar bytes, which can then be freed)."""
    try:
        samples: dict[str, dict] = {}
        for name, payload in iter_tar_members(data):
            key, _, ext = name.partition(".")
            if ext in ("image.npy", "mask.npy"):
                samples.setdefault(key, {})[ext[:-4]] = npy_view(payload).copy()
    except ValueError:
        return _read_wds_generic(data)
    keys = list(samples)
    if not keys:
        raise ValueError("empty tar")
    return [samples[k]["image"] for k in keys], [samples[k]["mask"] for k in keys], keys


def _read_wds_generic(data: bytes):
    from shards.wds_io import iter_tar

    images, masks, keys = [], [], []
    for s in iter_tar(io.BytesIO(data)):
        images.append(s["image"])
        masks.append(s["mask"])
        keys.append(s["__key__"])
    if not images:
        raise ValueError("empty tar")
    return images, masks, keys
