"""The chunk codecs of the Zarr side: `--codec` parsed into zarr's compressors (writing), and
each chunk decoded with a bounded decoder that checks the frame's declared size first (reading)."""

from __future__ import annotations

import re
import struct
from typing import Literal, get_args

import numpy as np

from shards.contract import ShardFormatError

CodecName = Literal["blosc-lz4", "blosc-zstd", "zstd", "none"]
CODECS = get_args(CodecName)
LEVELS = {"blosc-lz4": range(0, 10), "blosc-zstd": range(0, 10), "zstd": range(-(1 << 17), 23), "none": range(0)}
DEFAULT_LEVELS = {"blosc-lz4": 5, "blosc-zstd": 5, "zstd": 3}
_LEVEL = re.compile(r"^-?[0-9]{1,7}$")


def parse_codec_spec(spec) -> tuple[CodecName, int | None]:
    """'blosc-lz4:5' -> ('blosc-lz4', 5); the level after ':' is optional (None). Checks the name
    and the level's range (blosc 0-9, zstd -131072-22, none takes none) without importing zarr."""
    if not isinstance(spec, str):
        raise ValueError(f"codec must be a string like 'blosc-lz4:5', not {spec!r}")
    name, colon, level = spec.partition(":")
    if name not in CODECS:
        raise ValueError(f"unknown codec {spec!r}; choose one of {', '.join(CODECS)} (optionally ':LEVEL')")
    if not colon:
        return name, None
    if not _LEVEL.match(level) or int(level) not in LEVELS[name]:
        allowed = LEVELS[name]
        what = f"from {allowed.start} to {allowed.stop - 1}" if allowed else "no level"
        raise ValueError(f"codec {spec!r}: {name} takes {what}")
    return name, int(level)


def parse_codec(spec: str):
    """'blosc-lz4:5' -> zarr compressor list (None: uncompressed)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    name, level = parse_codec_spec(spec)
    if name == "none":
        return None
    level = DEFAULT_LEVELS[name] if level is None else level
    if name.startswith("blosc-"):
        return [BloscCodec(cname=name[6:], clevel=level, shuffle="shuffle")]
    return [ZstdCodec(level=level)]


# -- decoding (untrusted chunks)

def blosc_decoder():
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


def zstd_decoder():
    from numcodecs import Zstd

    z = Zstd()

    def decode(src, dest):
        n = _zstd_content_size(src)
        if n != dest.nbytes:
            raise ShardFormatError(f"zstd frame declares {n} bytes, a slice is {dest.nbytes}")
        z.decode(bytes(src), dest)
    return decode


def copy_chunk(src, dest):
    if len(src) != dest.nbytes:
        raise ShardFormatError(f"uncompressed chunk of {len(src)} bytes, a slice is {dest.nbytes}")
    dest[...] = np.frombuffer(src, dest.dtype, count=dest.size)
