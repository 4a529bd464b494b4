"""Zarr v3 side of the contract: zarr/{split}/{patient}/image (S,4,H,W) float16, mask (S,3,H,W) uint8.

One chunk per slice, one storage shard per array per patient: each patient's group has
exactly one writer (zarr 3 loses data when two tasks write chunks of one shard).
A patient is written into a hidden temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

CODECS = ("blosc-lz4", "blosc-zstd", "zstd", "none")


def parse_codec(spec: str):
    """'blosc-lz4:5' -> zarr compressor list; the level after ':' is optional."""
    from zarr.codecs import BloscCodec, ZstdCodec

    name, _, level = spec.partition(":")
    if name not in CODECS:
        raise ValueError(f"unknown codec {spec!r}; choose one of {', '.join(CODECS)} (optionally ':LEVEL')")
    if name == "none":
        return None
    if name.startswith("blosc-"):
        return [BloscCodec(cname=name[6:], clevel=int(level or 5), shuffle="shuffle")]
    return [ZstdCodec(level=int(level or 3))]


def write_group_meta(root: Path, splits) -> list[Path]:
    """The root and per-split group metadata (written by the driver, before any patient)."""
    import zarr

    zarr.open_group(str(root), mode="a", zarr_format=3)
    for s in splits:
        zarr.open_group(str(root / s), mode="a", zarr_format=3)
    return [root / "zarr.json"] + [root / s / "zarr.json" for s in splits]


def write_patient(group_dir: Path, image: np.ndarray, mask: np.ndarray, attrs: dict, codec: str) -> list[Path]:
    """Write one patient's group atomically; returns the files written (final paths)."""
    import zarr

    tmp = group_dir.with_name(f".{group_dir.name}.{os.getpid()}.tmp")
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
    os.replace(tmp, group_dir)
    return sorted(p for p in group_dir.rglob("*") if p.is_file())


def read_patient(group_dir: str, store=None, n_slices: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Whole-patient read: one call per array (per-call overhead makes slice reads slow).
    zarr allocates what the metadata claims, so a local group's arrays are first checked
    against the contract (and `n_slices`, when given) by the reader's checks."""
    import zarr

    if store is None:
        from shards.readers import MAX_META_BYTES, _json_file, zarr_array_spec

        root = Path(group_dir)

        def read(rel):
            p = root / rel
            if not p.is_file():
                return None
            with open(p, "rb") as f:
                return f.read(MAX_META_BYTES + 1)

        for name in ("image", "mask"):
            where = f"{root}/{name}/zarr.json"
            zarr_array_spec(_json_file(read, f"{name}/zarr.json", where), where, name, n_slices)
    g = zarr.open_group(store if store is not None else str(group_dir), mode="r")
    return g["image"][:], g["mask"][:], dict(g.attrs)
