"""Zarr v3 side of the contract: zarr/{split}/{patient}/image (S,M,H,W) float16, mask (S,K,H,W) uint8
(M the release's modalities, K its mask channels; paths: `shards.layout`).

One chunk per slice, one storage shard per array per patient: each patient's group has
exactly one writer (zarr 3 loses data when two tasks write chunks of one shard).
A patient is written into a hidden temporary folder and renamed into place when complete.

Reading: zarr's per-call machinery costs ~ms per chunk; a loader that must deliver >10k slices/s
reads each patient's storage shard in one go and decodes its chunks directly: the sharding
codec's index (offset, nbytes per chunk, then a crc32c) sits at the end of the shard file, and
each chunk is a blosc/zstd frame of one slice (tested against zarr itself). Metadata is checked
against the contract once per patient (`zarr_array_spec`), every chunk's size before it is decoded.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np

from shards import layout
from shards.atomic import tmp_name
from shards.codecs import blosc_decoder, copy_chunk, parse_codec, zstd_decoder
from shards.contract import (MAX_META_BYTES, MAX_PATIENT_ARRAY_BYTES, ZARR_DTYPES, ShardFormatError, short,
                             slice_shape_problem)

def write_group_meta(out: Path, splits) -> list[Path]:
    """The root's and per-split group metadata of the set at `out` (written by the driver, before
    any patient); returns those files."""
    import zarr

    zarr.open_group(str(out / layout.ZARR_ROOT), mode="a", zarr_format=3)
    for s in splits:
        zarr.open_group(str(out / layout.zarr_split(s)), mode="a", zarr_format=3)
    return [out / rel for rel in layout.zarr_group_meta(splits)]


def write_patient(group_dir: Path, image: np.ndarray, mask: np.ndarray, attrs: dict, codec: str,
                  planes: dict | None = None) -> list[Path]:
    """Write one patient's group atomically; returns the files written (final paths). `planes`:
    name -> (image, mask, attrs) of further slicing planes, each a group inside the patient's
    (`layout.zarr_plane_group`), written with it in the same one rename."""
    tmp = tmp_name(group_dir)  # a folder, renamed into place as a whole
    if tmp.exists():
        shutil.rmtree(tmp)
    direct = _direct_ok()
    _write_group(tmp, image, mask, attrs, codec, direct=direct)
    for name, (p_image, p_mask, p_attrs) in (planes or {}).items():
        _write_group(tmp / name, p_image, p_mask, p_attrs, codec, direct=direct)
    if group_dir.exists():
        shutil.rmtree(group_dir)
    tmp.replace(group_dir)
    return sorted(p for p in group_dir.rglob("*") if p.is_file())


def _write_group(tmp: Path, image: np.ndarray, mask: np.ndarray, attrs: dict, codec: str, direct: bool) -> None:
    """zarr writes the metadata; the one storage shard per array is zarr's own write, or (direct)
    `shard_bytes` written as one file: the same bytes (`_direct_ok`), ~5x faster for a patient."""
    import zarr

    compressors = parse_codec(codec)
    g = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes=attrs)
    for name, arr in (("image", image), ("mask", mask)):
        s = arr.shape
        a = g.create_array(name, shape=s, dtype=arr.dtype, chunks=(1,) + s[1:], shards=s if s[0] else None,
                           compressors=compressors, fill_value=0, dimension_names=("slice", "channel", "x", "y"))
        if not s[0]:
            continue
        encoder = _chunk_encoder(a) if direct else None
        if encoder is None:
            a[:] = arr
            continue
        data = shard_bytes(arr, encoder)
        if data is not None:  # zarr stores no shard when every chunk is empty
            path = tmp / name / a.metadata.encode_chunk_key((0,) * len(s))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


_NO_CHUNK = 2**64 - 1  # zarr's index entry (offset, length) for a chunk not stored (written and read)


def shard_bytes(arr: np.ndarray, encode) -> bytes | None:
    """One storage shard of (S, ...) chunks of one slice each, as zarr 3's `sharding_indexed`
    codec lays it out: the encoded non-empty chunks in slice order, then the index of (offset,
    length) uint64 little-endian pairs per chunk (2**64-1 for an empty one), then the index's
    crc32c (little-endian uint32). A chunk is empty when all its bytes are 0 (the fill value 0;
    zarr compares float bit patterns, so -0.0 is stored). None when every chunk is empty."""
    import google_crc32c

    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    index = np.full((arr.shape[0], 2), _NO_CHUNK, np.uint64)
    parts, pos = [], 0
    for i in range(arr.shape[0]):
        raw = arr[i].reshape(-1).view(np.uint8)
        if not raw.any():
            continue
        enc = encode(raw)
        index[i] = pos, len(enc)
        pos += len(enc)
        parts.append(enc)
    if not parts:
        return None
    idx = index.astype("<u8").tobytes()
    return b"".join(parts + [idx, google_crc32c.value(idx).to_bytes(4, "little")])


def _chunk_encoder(a):
    """The chunk codecs of array `a` (after zarr chose typesize and shuffle) as one function of a
    chunk's little-endian bytes; None when they are not plain bytes (+ blosc) inside one shard."""
    from numcodecs import Blosc

    (sharding,) = a.metadata.codecs
    if type(sharding).__name__ != "ShardingCodec" or tuple(a.metadata.chunk_grid.chunk_shape) != a.shape:
        return None
    inner = [c.to_dict() for c in sharding.codecs]
    index = [c.to_dict()["name"] for c in sharding.index_codecs]
    if inner[0]["name"] != "bytes" or index != ["bytes", "crc32c"] or sharding.index_location.value != "end":
        return None
    if len(inner) == 1:
        return bytes
    if len(inner) != 2 or inner[1]["name"] != "blosc":
        return None
    c = inner[1]["configuration"]
    shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}[c["shuffle"]]
    blosc = Blosc(cname=c["cname"], clevel=c["clevel"], shuffle=shuffle, blocksize=c["blocksize"],
                  typesize=c["typesize"])
    return lambda raw: bytes(blosc.encode(raw))


@functools.cache
def _direct_ok() -> bool:
    """Does `shard_bytes` give zarr's bytes with the installed zarr, numcodecs and crc32c? Checked
    once per process on a small group (a chunk of +0.0, which zarr skips, one of -0.0, which it
    keeps, an all-zero array, which gets no shard); when anything differs, zarr writes."""
    import tempfile

    try:
        rng = np.random.default_rng(0)
        image = rng.normal(size=(4, 2, 5, 3)).astype(np.float16)
        image[1], image[2] = 0.0, -0.0
        mask = (rng.random((3, 3, 5, 3)) < 0.3).astype(np.uint8)
        mask[1] = 0
        with tempfile.TemporaryDirectory(prefix="brats-shards-zarr-check-") as d:
            for codec in ("blosc-lz4:5", "none"):
                for m in (mask, np.zeros_like(mask)):
                    a, b = Path(d) / "zarr", Path(d) / "direct"
                    _write_group(a, image, m, {"x": 1}, codec, direct=False)
                    _write_group(b, image, m, {"x": 1}, codec, direct=True)
                    if _tree(a) != _tree(b):
                        return False
                    shutil.rmtree(a), shutil.rmtree(b)
        return True
    except Exception:  # noqa: BLE001 -- any surprise means: let zarr write
        return False


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- reading


def zarr_array_spec(meta, where: str, name: str, n_slices: int | None = None):
    """Check a parsed `zarr.json` of the patient array `name` against the contract; returns
    (shape, decode, has_crc) where decode(src, dest) decodes one chunk (None for 0 slices)."""
    def bad(why):
        return ShardFormatError(f"{where}: {why}")

    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise bad("not the metadata of a zarr v3 array")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(v) is int and v >= 0 for v in shape)):
        raise bad(f"shape {short(shape)} is not four non-negative integers (slices, channels, H, W)")
    if (why := slice_shape_problem(name, shape[1:])) is not None:
        raise bad(why)
    if n_slices is not None and shape[0] != n_slices:
        raise bad(f"claims {shape[0]} slices, the manifest says {n_slices}")
    if meta.get("data_type") != ZARR_DTYPES[name]:
        raise bad(f"data type {short(meta.get('data_type'))}; the contract's {name} is {ZARR_DTYPES[name]}")
    nbytes = math.prod(shape) * np.dtype(ZARR_DTYPES[name]).itemsize
    if nbytes > MAX_PATIENT_ARRAY_BYTES:
        raise bad(f"{shape} would take {nbytes >> 20} MiB; at most {MAX_PATIENT_ARRAY_BYTES >> 20} MiB "
                  f"per array and patient are read")
    if meta.get("storage_transformers", []) != []:
        raise bad("storage transformers are not part of the contract")
    fill = meta.get("fill_value")
    if type(fill) not in (int, float) or fill != 0:
        raise bad(f"fill value {short(fill)}; the contract's is 0")
    kenc = meta.get("chunk_key_encoding")
    if not (isinstance(kenc, dict) and kenc.get("name") == "default"
            and kenc.get("configuration", {"separator": "/"}) == {"separator": "/"}):
        raise bad("chunk key encoding is not zarr v3's default with '/' separators")
    if shape[0] == 0:
        return tuple(shape), None, False
    grid = meta.get("chunk_grid")
    if grid != {"name": "regular", "configuration": {"chunk_shape": shape}}:
        raise bad("the chunk grid is not one storage shard holding the whole array")
    codecs = meta.get("codecs")
    if not (isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict)
            and codecs[0].get("name") == "sharding_indexed" and isinstance(codecs[0].get("configuration"), dict)):
        raise bad("codecs are not one sharding_indexed codec")
    conf = codecs[0]["configuration"]
    if conf.get("chunk_shape") != [1] + shape[1:]:
        raise bad(f"inner chunk shape {short(conf.get('chunk_shape'))} is not one slice {[1] + shape[1:]}")
    if conf.get("index_location", "end") != "end":
        raise bad("the shard index is not at the end")
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    index_codecs = conf.get("index_codecs")
    if index_codecs not in ([little], [little, {"name": "crc32c"}]):
        raise bad("shard index codecs are not little-endian bytes (+ crc32c)")
    inner = conf.get("codecs")
    if not (isinstance(inner, list) and 1 <= len(inner) <= 2 and all(isinstance(c, dict) for c in inner)):
        raise bad("chunk codecs are not bytes (+ one compressor)")
    if not (inner[0] == little or (name == "mask" and inner[0] == {"name": "bytes"})):
        raise bad("chunk codecs do not start with little-endian bytes")
    comp = inner[1].get("name") if len(inner) == 2 else None
    if comp is not None and not isinstance(inner[1].get("configuration", {}), dict):
        raise bad("compressor configuration is not an object")
    decode = {None: lambda: copy_chunk, "blosc": blosc_decoder, "zstd": zstd_decoder}.get(comp)
    if decode is None:
        raise bad(f"unsupported zarr codec {short(comp)}")
    return tuple(shape), decode(), len(index_codecs) == 2


def decode_zarr_array(meta: dict, shard: bytes | None, per_slice: bool = False, *, where: str = "zarr array",
                      name: str | None = None, n_slices: int | None = None):
    """Decode a whole sharded array (one shard) from its zarr.json dict and shard file bytes.
    per_slice=True returns a list of independent (C, H, W) arrays instead of one (S, C, H, W)
    array, so a slice kept in a shuffle buffer does not pin its whole patient in memory.
    `name` ('image'/'mask', default: from the data type) selects the contract's checks; `where`
    names the array's folder in messages (its files: `{where}/zarr.json`, `{where}/c/0/0/0/0`)."""
    if name is None:
        name = "mask" if isinstance(meta, dict) and meta.get("data_type") == "uint8" else "image"
    shape, decode, has_crc = zarr_array_spec(meta, f"{where}/{layout.ZARR_META}", name, n_slices)
    return _decode_shard(shape, np.dtype(ZARR_DTYPES[name]), decode, has_crc, shard, f"{where}/{layout.ZARR_SHARD}",
                         per_slice)


def _decode_shard(shape, dtype, decode, has_crc, shard, where, per_slice):
    n = shape[0]
    if n == 0 or shard is None:  # no slices, or no chunk ever written: the fill value
        return [np.zeros(shape[1:], dtype) for _ in range(n)] if per_slice else np.zeros(shape, dtype)
    shard = memoryview(shard)
    if shard.format != "B" or shard.ndim != 1:
        shard = shard.cast("B")
    index_len = 16 * n + (4 if has_crc else 0)
    if len(shard) < index_len:
        raise ShardFormatError(f"{where}: {len(shard)} bytes, shorter than the index of {n} chunks")
    end = len(shard) - index_len
    if has_crc:
        import google_crc32c

        stored = int.from_bytes(shard[len(shard) - 4:], "little")
        if google_crc32c.value(bytes(shard[end: len(shard) - 4])) != stored:
            raise ShardFormatError(f"{where}: the shard index fails its crc32c checksum")
    index = np.frombuffer(shard, dtype="<u8", count=2 * n, offset=end).reshape(n, 2)
    off, nb = index[:, 0], index[:, 1]
    empty = off == _NO_CHUNK
    written = ~empty
    if np.any(empty != (nb == _NO_CHUNK)) or np.any(nb[written] > end) or np.any(off[written] > end - nb[written]):
        raise ShardFormatError(f"{where}: the shard index points outside the shard's {end} data bytes")
    slice_shape = shape[1:]
    out = None if per_slice else np.empty(shape, dtype)
    slices = []
    for i, (o, b) in enumerate(zip(off.tolist(), nb.tolist())):
        if o == _NO_CHUNK:
            dest = np.zeros(slice_shape, dtype) if per_slice else out[i]
            if not per_slice:
                dest[...] = 0  # chunk never written: the fill value
        else:
            dest = np.empty(slice_shape, dtype) if per_slice else out[i]
            try:
                decode(shard[o: o + b], dest.reshape(-1))
            except ShardFormatError as e:
                raise ShardFormatError(f"{where}: chunk {i}: {e}") from None
            except (ValueError, RuntimeError, TypeError, OverflowError, IndexError) as e:
                raise ShardFormatError(f"{where}: chunk {i} does not decode ({type(e).__name__}: "
                                       f"{str(e)[:100]})") from None
        if per_slice:
            slices.append(dest)
    return slices if per_slice else out


def _json_file(read, rel: str, where: str):
    raw = read(rel)
    if raw is None:
        raise ShardFormatError(f"{where}: missing (or not listed in the manifest)")
    if len(raw) > MAX_META_BYTES:
        raise ShardFormatError(f"{where}: {len(raw)} bytes; zarr metadata larger than {MAX_META_BYTES} is refused")
    try:
        return json.loads(bytes(raw))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, absurd nesting or integers
        raise ShardFormatError(f"{where}: not valid JSON ({str(e)[:100]})") from None


def read_zarr_patient(read, prefix: str, per_slice: bool = False, n_slices: int | None = None, *,
                      where: str | None = None):
    """`read(relpath) -> bytes | None`; prefix: the patient's group (`layout.zarr_group`). Returns (image, mask).
    n_slices: what the manifest promises; metadata claiming another count is refused before
    anything is allocated. `where`: how messages name the group (default `prefix`)."""
    where = prefix if where is None else where
    specs = []
    for name in layout.ARRAYS:
        meta = _json_file(read, layout.zarr_array_meta(prefix, name), layout.zarr_array_meta(where, name))
        specs.append(zarr_array_spec(meta, layout.zarr_array_meta(where, name), name, n_slices))
    (ishape, _, _), (mshape, _, _) = specs
    if ishape[0] != mshape[0] or ishape[2:] != mshape[2:]:
        raise ShardFormatError(f"{where}: image {list(ishape)} and mask {list(mshape)} differ in slices or H x W")
    arrays = []
    for name, (shape, decode, has_crc) in zip(layout.ARRAYS, specs):
        shard = read(layout.zarr_array_shard(prefix, name)) if shape[0] else None
        if shard is None and shape[0] and name == "image":  # images always hold brain: never all fill
            raise ShardFormatError(f"{layout.zarr_array_shard(where, name)}: missing (not in the manifest)")
        arrays.append(_decode_shard(shape, np.dtype(ZARR_DTYPES[name]), decode, has_crc, shard,
                                    layout.zarr_array_shard(where, name), per_slice))
    return arrays[0], arrays[1]
