"""Fast readers of one patient from either format, given the file bytes.

Zarr's per-call machinery costs ~ms per chunk; a loader that must deliver >10k slices/s reads
each patient's storage shard in one go and decodes its chunks directly: the sharding codec's
index (offset, nbytes per chunk, then a crc32c) sits at the end of the shard file, and each chunk
is a blosc/zstd frame of one slice. Tested against zarr itself.

Shard sets are shared between colleagues: every byte read here is untrusted. Each read is bounded
by what the caller (from the manifest) promises, `n_slices`, and by the contract: image float16
(S, M<=4, H, W), mask uint8 (S, K<=16, H, W) (M and K the set's, checked against its manifest by
`shards.source.ShardSource.read_patient`), H = W <= 1024, one chunk per slice, one storage shard
per array; a tar holds exactly `{key}.image.npy`, `{key}.mask.npy`, `{key}.meta.json` per slice,
in order. Metadata is checked once per patient, every chunk's size before it is decoded, so a
malformed file is a `ShardFormatError` (one line, naming the file) and never a memory blow-up,
an unpickled object or a decoder's traceback. Nothing is ever unpickled.
"""

from __future__ import annotations

import ast
import json
import math
import struct

import numpy as np

from shards import layout
from shards.errors import BratsShardsError

_EMPTY = 2**64 - 1
MAX_IMAGE_CHANNELS = 4  # the modalities T1, T1Gd, T2, FLAIR, or a subset (MEN-RT: T1Gd alone)
MAX_MASK_CHANNELS = 16
MAX_SIDE = 1024
MAX_META_BYTES = layout.MAX_META_BYTES
MAX_PATIENT_ARRAY_BYTES = 4 << 30  # one decoded array of one patient (BraTS at 240x240: 36 MB)
MAX_NPY_HEADER = 4096  # numpy writes 128-byte headers
ZARR_DTYPES = {"image": "float16", "mask": "uint8"}
NPY_DTYPES = {"image": np.dtype("<f2"), "mask": np.dtype("|u1")}


class ShardFormatError(BratsShardsError, ValueError):
    """Malformed shard content; the message is one line and names the file."""


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def slice_shape_problem(name: str, shape) -> str | None:
    """Why `shape` is not the contract's (C, H, W) of one `name` ('image' or 'mask') slice."""
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(type(v) is int for v in shape)):
        return f"shape {_short(shape)} is not three integers (channels, H, W)"
    c, h, w = shape
    if name == "image" and not 1 <= c <= MAX_IMAGE_CHANNELS:
        return f"{name} has {c} channels; the contract has 1 to {MAX_IMAGE_CHANNELS}"
    if name == "mask" and not 1 <= c <= MAX_MASK_CHANNELS:
        return f"{name} has {c} channels; the contract has 1 to {MAX_MASK_CHANNELS}"
    if h != w or not 1 <= h <= MAX_SIDE:
        return f"{name} slices are {h}x{w}; the contract has square slices of at most {MAX_SIDE}x{MAX_SIDE}"
    return None


# -- Zarr --------------------------------------------------------------------------------------------

def _blosc_decoder():
    from numcodecs import blosc

    def decode(src, dest):
        if len(src) < 16:
            raise ShardFormatError("blosc frame shorter than its header")
        nbytes, _, cbytes = struct.unpack_from("<III", src, 4)
        if nbytes != dest.nbytes or cbytes != len(src):
            raise ShardFormatError(f"blosc frame of {cbytes} bytes (chunk {len(src)}) decodes to {nbytes} bytes, "
                                   f"a slice is {dest.nbytes}")
        blosc.decompress(src, dest)
    return decode


def _zstd_content_size(src) -> int | None:
    """The frame content size a zstd frame header declares (None: absent or not a zstd frame)."""
    if len(src) < 6 or bytes(src[:4]) != b"\x28\xb5\x2f\xfd":
        return None
    fhd = src[4]
    single = (fhd >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    size = ((1 if single else 0), 2, 4, 8)[fhd >> 6]
    if not size or len(src) < pos + size:
        return None
    v = int.from_bytes(bytes(src[pos: pos + size]), "little")
    return v + 256 if size == 2 else v


def _zstd_decoder():
    from numcodecs import Zstd

    z = Zstd()

    def decode(src, dest):
        n = _zstd_content_size(src)
        if n != dest.nbytes:
            raise ShardFormatError(f"zstd frame declares {n} bytes, a slice is {dest.nbytes}")
        z.decode(bytes(src), dest)
    return decode


def _copy(src, dest):
    if len(src) != dest.nbytes:
        raise ShardFormatError(f"uncompressed chunk of {len(src)} bytes, a slice is {dest.nbytes}")
    dest[...] = np.frombuffer(src, dest.dtype, count=dest.size)


def zarr_array_spec(meta, where: str, name: str, n_slices: int | None = None):
    """Check a parsed `zarr.json` of the patient array `name` against the contract; returns
    (shape, decode, has_crc) where decode(src, dest) decodes one chunk (None for 0 slices)."""
    def bad(why):
        return ShardFormatError(f"{where}: {why}")

    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise bad("not the metadata of a zarr v3 array")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(v) is int and v >= 0 for v in shape)):
        raise bad(f"shape {_short(shape)} is not four non-negative integers (slices, channels, H, W)")
    if (why := slice_shape_problem(name, shape[1:])) is not None:
        raise bad(why)
    if n_slices is not None and shape[0] != n_slices:
        raise bad(f"claims {shape[0]} slices, the manifest says {n_slices}")
    if meta.get("data_type") != ZARR_DTYPES[name]:
        raise bad(f"data type {_short(meta.get('data_type'))}; the contract's {name} is {ZARR_DTYPES[name]}")
    nbytes = math.prod(shape) * np.dtype(ZARR_DTYPES[name]).itemsize
    if nbytes > MAX_PATIENT_ARRAY_BYTES:
        raise bad(f"{shape} would take {nbytes >> 20} MiB; at most {MAX_PATIENT_ARRAY_BYTES >> 20} MiB "
                  f"per array and patient are read")
    if meta.get("storage_transformers", []) != []:
        raise bad("storage transformers are not part of the contract")
    fill = meta.get("fill_value")
    if type(fill) not in (int, float) or fill != 0:
        raise bad(f"fill value {_short(fill)}; the contract's is 0")
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
        raise bad(f"inner chunk shape {_short(conf.get('chunk_shape'))} is not one slice {[1] + shape[1:]}")
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
    decode = {None: lambda: _copy, "blosc": _blosc_decoder, "zstd": _zstd_decoder}.get(comp)
    if decode is None:
        raise bad(f"unsupported zarr codec {_short(comp)}")
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
    empty = off == _EMPTY
    written = ~empty
    if np.any(empty != (nb == _EMPTY)) or np.any(nb[written] > end) or np.any(off[written] > end - nb[written]):
        raise ShardFormatError(f"{where}: the shard index points outside the shard's {end} data bytes")
    slice_shape = shape[1:]
    out = None if per_slice else np.empty(shape, dtype)
    slices = []
    for i, (o, b) in enumerate(zip(off.tolist(), nb.tolist())):
        if o == _EMPTY:
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


# -- .npy ----------------------------------------------------------------------------------------------

_NPY_HEADERS: dict[bytes, tuple] = {}


def _npy_header(buf: memoryview, where: str):
    """(dtype, shape, fortran_order, data offset) of a .npy payload; the payload must hold exactly
    the data its header promises. Parsed headers are cached (a set has a couple of distinct ones)."""
    if len(buf) < 10 or bytes(buf[:6]) != b"\x93NUMPY":
        raise ShardFormatError(f"{where}: not a .npy payload")
    major = buf[6]
    if major not in (1, 2, 3) or buf[7] != 0:
        raise ShardFormatError(f"{where}: unknown .npy format version {major}.{buf[7]}")
    hl_size = 2 if major == 1 else 4
    hlen = int.from_bytes(bytes(buf[8: 8 + hl_size]), "little")
    start = 8 + hl_size + hlen
    if hlen > MAX_NPY_HEADER or start > len(buf):
        raise ShardFormatError(f"{where}: .npy header of {hlen} bytes is too long or runs past the payload")
    key = bytes(buf[:start])
    parsed = _NPY_HEADERS.get(key)
    if parsed is None:
        parsed = _parse_npy_header(key[8 + hl_size:], major, where)
        if len(_NPY_HEADERS) >= 64:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[key] = parsed
    dtype, shape, fortran, nbytes = parsed
    if len(buf) - start != nbytes:
        raise ShardFormatError(f"{where}: .npy data is {len(buf) - start} bytes, its header {shape} {dtype.str} "
                               f"says {nbytes}")
    return dtype, shape, fortran, start


def _parse_npy_header(text: bytes, major: int, where: str):
    try:
        d = ast.literal_eval(text.decode("utf8" if major == 3 else "latin1"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError):
        raise ShardFormatError(f"{where}: unreadable .npy header") from None
    if not (isinstance(d, dict) and set(d) == {"descr", "fortran_order", "shape"}):
        raise ShardFormatError(f"{where}: .npy header is not {{descr, fortran_order, shape}}")
    descr, shape, fortran = d["descr"], d["shape"], d["fortran_order"]
    if not isinstance(descr, str):
        raise ShardFormatError(f"{where}: refusing a structured or object (pickled) .npy array")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError, SyntaxError):
        raise ShardFormatError(f"{where}: unknown .npy dtype {_short(descr)}") from None
    if dtype.hasobject:
        raise ShardFormatError(f"{where}: refusing an object (pickled) .npy array")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize == 0:
        raise ShardFormatError(f"{where}: refusing .npy dtype {_short(descr)}")
    if not (isinstance(shape, tuple) and len(shape) <= 32 and all(type(v) is int and v >= 0 for v in shape)) \
            or type(fortran) is not bool:
        raise ShardFormatError(f"{where}: .npy shape {_short(shape)} or fortran_order is invalid")
    return dtype, shape, fortran, math.prod(shape) * dtype.itemsize


def npy_view(buf: memoryview, where: str = ".npy payload") -> np.ndarray:
    """A read-only array viewing a .npy payload (no copy). Headers are parsed once and cached;
    object dtypes are refused (nothing is ever unpickled), and so is a payload whose size is not
    exactly what its header promises."""
    buf = memoryview(buf)
    dtype, shape, fortran, start = _npy_header(buf, where)
    arr = np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=start)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


# -- tar (WebDataset) --------------------------------------------------------------------------------

_OCTAL = b"01234567"


def _octal(field: bytes) -> int | None:
    v = field.strip(b" \0")
    if not v:
        return 0
    if v.translate(None, _OCTAL):  # int(.., 8) would take '0o', '_', signs and spaces
        return None
    return int(v, 8)


def iter_tar_members(data, where: str = "tar", checksums: bool = False):
    """(name, payload memoryview) of each member of an uncompressed ustar tar, in file order.
    Anything but a regular file, a header that does not parse or a member running past the end
    is refused; `checksums` also checks each header's checksum."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    pos, total = 0, len(view)
    while pos + 512 <= total:
        hdr = bytes(view[pos: pos + 512])
        if not any(hdr):
            return  # end-of-archive marker
        name = hdr[0:100].split(b"\0", 1)[0]
        if hdr[257:263] == b"ustar\0" and hdr[345] != 0:  # POSIX ustar's name prefix (not old GNU's)
            name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
        size = _octal(hdr[124:136])
        if size is None:
            raise ShardFormatError(f"{where}: member {_short(name)} at byte {pos} has an invalid size field")
        if checksums and _octal(hdr[148:156]) != sum(hdr) - sum(hdr[148:156]) + 256:
            raise ShardFormatError(f"{where}: member {_short(name)} at byte {pos}: header checksum mismatch")
        kind = hdr[156:157]
        if kind not in (b"0", b"\0"):
            raise ShardFormatError(f"{where}: member {_short(name)} at byte {pos} is not a regular file "
                                   f"(type {_short(kind)})")
        pos += 512
        if pos + size > total:
            raise ShardFormatError(f"{where}: member {_short(name)} runs past the end of the file (truncated?)")
        yield name, view[pos: pos + size]
        pos += (size + 511) // 512 * 512
    if pos != total:
        raise ShardFormatError(f"{where}: ends inside a tar header (truncated?)")


def scan_tar(data, where: str = "tar", n_slices: int | None = None, pid: str | None = None, *,
             strict: bool = False, copy: bool = True):
    """Walk one patient's tar as the contract has it; returns (images, masks, keys).

    Members must be exactly `{key}.image.npy`, `{key}.mask.npy`, `{key}.meta.json` for keys
    `sample_key(pid, 0), sample_key(pid, 1), ...` in that order (pid None: the key prefix comes
    from the first member), with the contract's npy dtypes and shapes. With `n_slices`, a tar
    holding more samples is refused before the rest is decoded, and one holding fewer at its end.
    strict=True (verify) also checks header checksums and that each meta.json is a JSON object
    naming its patient and slice. copy=False returns views into `data` (nothing allocated)."""
    from shards.wds_io import sample_key

    base = pid.replace(".", "_") if pid is not None else None
    images, masks, keys = [], [], []
    shapes = {}
    i, stage, key = 0, 0, None
    expected = None
    for name, payload in iter_tar_members(data, where, checksums=strict):
        if stage == 0:
            if n_slices is not None and i >= n_slices:
                raise ShardFormatError(f"{where}: holds more than the manifest's {n_slices} samples")
            if base is None:
                if not name.endswith(b"_s000.image.npy"):
                    raise ShardFormatError(f"{where}: first member {_short(name)} is not '<patient>_s000.image.npy'")
                try:
                    base = name[: -len(b"_s000.image.npy")].decode("ascii")
                except UnicodeDecodeError:
                    raise ShardFormatError(f"{where}: first member {_short(name)} is not ASCII") from None
            key = sample_key(base, i) if pid is None else sample_key(pid, i)
            expected = [f"{key}.{ext}".encode() for ext in ("image.npy", "mask.npy", "meta.json")]
        if name != expected[stage]:
            raise ShardFormatError(f"{where}: member {_short(name)} where the contract has "
                                   f"{expected[stage].decode()!r}")
        if stage < 2:
            kind = ("image", "mask")[stage]
            dtype, shape, fortran, start = _npy_header(payload, f"{where}: {expected[stage].decode()}")
            if shape != shapes.get(kind):
                if kind in shapes:
                    raise ShardFormatError(f"{where}: {expected[stage].decode()} is {shape}, earlier slices "
                                           f"{shapes[kind]}")
                why = slice_shape_problem(kind, shape)
                if why is None and kind == "mask" and shape[1:] != shapes["image"][1:]:
                    why = f"mask slices {shape} do not match image slices {shapes['image']}"
                if why is not None:
                    raise ShardFormatError(f"{where}: {expected[stage].decode()}: {why}")
                shapes[kind] = shape
            if dtype != NPY_DTYPES[kind] or fortran:
                raise ShardFormatError(f"{where}: {expected[stage].decode()} is {dtype.str}"
                                       f"{' Fortran-ordered' if fortran else ''}; the contract has "
                                       f"{NPY_DTYPES[kind].str} in C order")
            arr = np.frombuffer(payload, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)
            (images if stage == 0 else masks).append(arr.copy() if copy else arr)
        elif strict:
            try:
                meta = json.loads(bytes(payload))
            except (ValueError, RecursionError):
                raise ShardFormatError(f"{where}: {expected[2].decode()} is not valid JSON") from None
            if not isinstance(meta, dict) or type(meta.get("slice")) is not int or meta["slice"] != i \
                    or (pid is not None and meta.get("patient") != pid):
                raise ShardFormatError(f"{where}: {expected[2].decode()} does not name patient {pid} slice {i}")
        stage += 1
        if stage == 3:
            keys.append(key)
            stage, i = 0, i + 1
    if stage:
        raise ShardFormatError(f"{where}: ends inside sample {key} (truncated?)")
    if n_slices is not None and i != n_slices:
        raise ShardFormatError(f"{where}: {i} samples, the manifest says {n_slices}")
    if n_slices is None and not keys:
        raise ShardFormatError(f"{where}: no samples (empty tar)")
    return images, masks, keys


def read_wds_patient(data, n_slices: int | None = None, *, pid: str | None = None,
                     where: str = "tar") -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """All samples of one patient's tar: (images, masks, keys) in file order; each array owns
    its memory (one copy out of the tar bytes, which can then be freed). n_slices/pid: what the
    manifest promises (count, patient of the keys); `where` names the file in messages."""
    return scan_tar(data, where, n_slices, pid)
