"""Zarr v3 side of the contract: zarr/{split}/{patient}/image (S,4,H,W) float16, mask (S,3,H,W) uint8
(paths: `shards.layout`).

One chunk per slice, one storage shard per array per patient: each patient's group has
exactly one writer (zarr 3 loses data when two tasks write chunks of one shard).
A patient is written into a hidden temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from shards import layout
from shards.atomic import tmp_name

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


def write_group_meta(out: Path, splits) -> list[Path]:
    """The root's and per-split group metadata of the set at `out` (written by the driver, before
    any patient); returns those files."""
    import zarr

    zarr.open_group(str(out / layout.ZARR_ROOT), mode="a", zarr_format=3)
    for s in splits:
        zarr.open_group(str(out / layout.zarr_split(s)), mode="a", zarr_format=3)
    return [out / rel for rel in layout.zarr_group_meta(splits)]


def write_patient(group_dir: Path, image: np.ndarray, mask: np.ndarray, attrs: dict, codec: str) -> list[Path]:
    """Write one patient's group atomically; returns the files written (final paths)."""
    import zarr

    tmp = tmp_name(group_dir)  # a folder, renamed into place as a whole
    if tmp.exists():
        shutil.rmtree(tmp)
    compressors = parse_codec(codec)
    g = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes=attrs)
    for name, arr in (("image", image), ("mask", mask)):
        s = arr.shape
        a = g.create_array(name, shape=s, dtype=arr.dtype, chunks=(1,) + s[1:], shards=s if s[0] else None,
                           compressors=compressors, fill_value=0, dimension_names=("slice", "channel", "x", "y"))
        if s[0]:
            a[:] = arr
    if group_dir.exists():
        shutil.rmtree(group_dir)
    tmp.replace(group_dir)
    return sorted(p for p in group_dir.rglob("*") if p.is_file())


def read_patient(group_dir: str, store=None, n_slices: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Whole-patient read: one call per array (per-call overhead makes slice reads slow).
    zarr allocates what the metadata claims, so a local group's arrays are first checked
    against the contract (and `n_slices`, when given) by the reader's checks."""
    import zarr

    if store is None:
        from shards.readers import MAX_META_BYTES, _json_file, zarr_array_spec

        def read(path):
            p = Path(path)
            if not p.is_file():
                return None
            with open(p, "rb") as f:
                return f.read(MAX_META_BYTES + 1)

        for name in layout.ARRAYS:
            where = layout.zarr_array_meta(str(group_dir), name)
            zarr_array_spec(_json_file(read, where, where), where, name, n_slices)
    g = zarr.open_group(store if store is not None else str(group_dir), mode="r")
    return g["image"][:], g["mask"][:], dict(g.attrs)
