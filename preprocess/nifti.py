"""The one module that touches nibabel: read and write NIfTI volumes.

`.nii.gz` inflate is the dominant cost of a build, so files are read as raw bytes once
(hashed on the way) and inflated with zlib-ng, about 2x faster than the standard zlib.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # zlib-ng is a declared dependency; the fallback only keeps odd installs working
    from zlib_ng import zlib_ng as _zlib
except ImportError:  # pragma: no cover
    import zlib as _zlib


@dataclass(frozen=True)
class RawVolume:
    """A volume as stored: its array in storage order, its affine, and its file's checksum."""

    data: np.ndarray  # (X, Y, Z) in storage order
    affine: np.ndarray  # (4, 4) voxel -> world (mm)
    sha256: str
    nbytes: int


def inflate(data: bytes) -> bytes:
    """Decompress gzip bytes (all members), as nibabel would, but with zlib-ng."""
    out = []
    while data:
        d = _zlib.decompressobj(wbits=31)
        out.append(d.decompress(data))
        out.append(d.flush())
        data = d.unused_data
    return b"".join(out)


def read_bytes(path: str | os.PathLike) -> tuple[bytes, str]:
    raw = Path(path).read_bytes()
    return raw, hashlib.sha256(raw).hexdigest()


def load_volume(path: str | os.PathLike) -> RawVolume:
    """Read one `.nii` / `.nii.gz` file; the array keeps the stored dtype (scaling applied)."""
    import nibabel as nib

    raw, digest = read_bytes(path)
    payload = inflate(raw) if str(path).endswith(".gz") else raw
    try:
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(payload[:540]))  # NIfTI-1 (348) or NIfTI-2 sizes
    except Exception:
        hdr = None
    if hdr is None or hdr.sizeof_hdr != 348:  # NIfTI-2 or odd files: let nibabel do everything
        img = nib.Nifti1Image.from_bytes(payload) if hdr is not None else nib.Nifti2Image.from_bytes(payload)
        return RawVolume(data=np.asarray(img.dataobj), affine=np.asarray(img.affine, dtype=np.float64),
                         sha256=digest, nbytes=len(raw))
    shape = hdr.get_data_shape()
    dtype = hdr.get_data_dtype()
    offset = max(int(hdr["vox_offset"]), 352)
    count = int(np.prod(shape))
    if len(payload) < offset + dtype.itemsize * count:
        raise ValueError(f"truncated: {len(payload)} bytes for {count} voxels of {dtype} at offset {offset}")
    # a zero-copy view of the inflated bytes (NIfTI stores voxels in Fortran order); int16 stays
    # int16, which keeps the normalisation statistics exact
    data = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if np.isfinite(slope) and slope != 0 and (slope != 1 or (np.isfinite(inter) and inter != 0)):
        data = data.astype(np.float32) * np.float32(slope) + np.float32(inter if np.isfinite(inter) else 0)
    return RawVolume(data=data, affine=np.asarray(hdr.get_best_affine(), dtype=np.float64), sha256=digest,
                     nbytes=len(raw))


def decode_only(path: str | os.PathLike, stdlib_zlib: bool = False) -> int:
    """The decode floor of a build: read and inflate one file, return the bytes produced.
    stdlib_zlib=True inflates with the standard zlib (what nibabel uses) for comparison."""
    raw, _ = read_bytes(path)
    if not str(path).endswith(".gz"):
        return len(raw)
    if stdlib_zlib:
        import gzip

        return len(gzip.decompress(raw))
    return len(inflate(raw))


def save_volume(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a volume atomically (temporary name, then rename)."""
    import nibabel as nib

    path = Path(path)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    nib.save(img, tmp)
    os.replace(tmp, path)
