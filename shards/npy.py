""".npy payloads of the WebDataset side: written with numpy's own header, read by a bounded parser
that never unpickles and refuses a header promising more (or less) data than the payload holds."""

from __future__ import annotations

import ast
import io
import math

import numpy as np

from shards.contract import MAX_NPY_HEADER, ShardFormatError, short

def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_prefix(arr: np.ndarray) -> bytes:
    """The `.npy` header of an array like `arr` (`npy_bytes` minus the data)."""
    full = npy_bytes(arr)
    return full[:len(full) - arr.nbytes]


_NPY_HEADERS: dict[bytes, tuple] = {}


def parse_npy_header(buf: memoryview, where: str):
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
        raise ShardFormatError(f"{where}: unknown .npy dtype {short(descr)}") from None
    if dtype.hasobject:
        raise ShardFormatError(f"{where}: refusing an object (pickled) .npy array")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize == 0:
        raise ShardFormatError(f"{where}: refusing .npy dtype {short(descr)}")
    if not (isinstance(shape, tuple) and len(shape) <= 32 and all(type(v) is int and v >= 0 for v in shape)) \
            or type(fortran) is not bool:
        raise ShardFormatError(f"{where}: .npy shape {short(shape)} or fortran_order is invalid")
    return dtype, shape, fortran, math.prod(shape) * dtype.itemsize


def npy_view(buf: memoryview, where: str = ".npy payload") -> np.ndarray:
    """A read-only array viewing a .npy payload (no copy). Headers are parsed once and cached;
    object dtypes are refused (nothing is ever unpickled), and so is a payload whose size is not
    exactly what its header promises."""
    buf = memoryview(buf)
    dtype, shape, fortran, start = parse_npy_header(buf, where)
    arr = np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=start)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def read_npy(data: bytes, where: str = ".npy payload") -> np.ndarray:
    """A .npy payload as an array that owns its memory (`npy_view`, copied)."""
    return npy_view(memoryview(data), where).copy()
