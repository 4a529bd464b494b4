"""The one module that touches nibabel: read and write NIfTI volumes.

`.nii.gz` inflate is the dominant cost of a build, so files are read as raw bytes once
(hashed on the way) and inflated with zlib-ng, about 2x faster than the standard zlib.

Input files are untrusted, so every read is bounded by what the NIfTI header promises:
  * only regular files are read (after following symlinks): a FIFO would hang the build and
    `/dev/zero` would be read until memory runs out;
  * a header may promise at most MAX_DIM voxels along any axis and MAX_VOXELS in all (about
    30 times a 240x240x155 BraTS volume), with its data at most MAX_VOX_OFFSET bytes in;
  * the file, and for `.nii.gz` the inflated bytes, may not exceed vox_offset + data + SLACK:
    inflating stops there (a 4 MB gzip bomb is refused after SLACK extra bytes, not at 8 GB);
  * complex and RGB voxel types are refused (their imaginary part / colour would be dropped);
  * a patient, all its files together, may promise at most `max_patient_bytes()` of voxels and
    working copies (`patient_footprint`), checked from the headers before anything is inflated:
    five volumes each legal alone (2**28 float64 voxels, 2 GiB) would otherwise take ~11 GB.
Each refusal is an InputError naming the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocess.errors import InputError
from shards.atomic import NotRegularFile, atomic_path, open_regular

try:  # zlib-ng is a declared dependency; the fallback only keeps odd installs working
    from zlib_ng import zlib_ng as _zlib
except ImportError:  # pragma: no cover
    import zlib as _zlib

MAX_DIM = 4096
MAX_VOXELS = 2**28
MAX_VOX_OFFSET = 2**24  # header + extensions
SLACK = 2**16  # bytes tolerated past the promised data (padding some writers add)
_HEAD = 540  # bytes that hold a NIfTI-1 (348) or NIfTI-2 (540) header
# One patient's voxels and working copies (`patient_footprint`). A BraTS patient (5 x 240x240x155,
# even float64) needs ~0.5 GB and a MEN-RT native-space one (2 x 512x512x300 float64) ~1.9 GB;
# five such 512x512x300 float64 volumes (~4.7 GB) still pass. Raise it with the variable below.
MAX_PATIENT_BYTES = 6 * 2**30
PATIENT_BYTES_ENV = "BRATS_SHARDS_MAX_PATIENT_BYTES"
WORKING_BYTES_PER_VOXEL = 4  # the float32 copy the recipe may make of each volume


@dataclass(frozen=True)
class RawVolume:
    """A volume as stored: its array in storage order, its affine, and its file's checksum."""

    data: np.ndarray  # (X, Y, Z) in storage order
    affine: np.ndarray  # (4, 4) voxel -> world (mm)
    sha256: str
    nbytes: int


def _describe(path: Path) -> str:
    """The file's name, and where it leads when it is a symlink."""
    return f"{path.name} (-> {os.path.realpath(path)})" if path.is_symlink() else path.name


def _open_regular(path: Path) -> tuple[int, int]:
    """Open `path` if it is a regular file: (fd, size); InputError naming it otherwise."""
    try:
        fd, st = open_regular(path)
    except NotRegularFile as e:
        raise InputError(f"{_describe(path)} {e.strerror}") from None
    except OSError as e:
        raise InputError(f"cannot open {path.name}: {e.strerror}") from None
    return fd, st.st_size


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (InputError naming it otherwise)."""
    path = Path(path)
    fd, size = _open_regular(path)
    if size > max_bytes:
        os.close(fd)
        raise InputError(f"{path.name} is {size} bytes, more than the {max_bytes} supported: refused")
    with open(fd, "rb") as f:
        data = f.read(size + 1)
    if len(data) > max_bytes:  # it grew after fstat
        raise InputError(f"{path.name} grew past the {max_bytes} bytes supported while being read: refused")
    return data


def inflate(data: bytes, limit: int, name: str = "file") -> bytes:
    """Decompress gzip bytes (all members), as nibabel would, but with zlib-ng; refuses (InputError)
    output beyond `limit` bytes without producing more than limit + 1, and a stream cut short
    (even only its CRC trailer: the voxels could not be trusted)."""
    out, total = [], 0
    while data:
        d = _zlib.decompressobj(wbits=31)
        chunk = d.decompress(data, limit + 1 - total)  # max_length >= 1: 0 would mean unbounded
        out.append(chunk)
        total += len(chunk)
        if total > limit:
            raise InputError(f"{name} inflates to more than the {limit} bytes its header promises "
                             f"(with {SLACK} bytes of slack): refused")
        if not d.eof:  # input ran out before the member's end (the output limit was not reached)
            raise InputError(f"{name} is a truncated gzip stream")
        data = d.unused_data
    return out[0] if len(out) == 1 else b"".join(out)  # one member (the usual case): no copy


def _parse_header(head: bytes):
    """NIfTI-1 or NIfTI-2 header (told apart by sizeof_hdr, either byte order) from the first
    bytes; ValueError (a 'cannot read' failure for the caller) when it is neither."""
    import nibabel as nib
    from nibabel.spatialimages import HeaderDataError
    from nibabel.wrapstruct import WrapStructError

    v2 = len(head) >= 4 and 540 in (struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0])
    cls, size = (nib.Nifti2Header, 540) if v2 else (nib.Nifti1Header, 348)
    try:
        return cls.from_fileobj(io.BytesIO(head[:size]))
    except (HeaderDataError, WrapStructError, ValueError) as e:
        raise ValueError(f"not a NIfTI-{2 if v2 else 1} header: {e}") from None


def _promised_bytes(hdr, name: str) -> tuple[int, int]:
    """(data offset, data bytes) the header promises, refusing absurd or unusable promises."""
    shape, dtype = hdr.get_data_shape(), hdr.get_data_dtype()
    if not shape or any(n < 1 or n > MAX_DIM for n in shape):
        raise InputError(f"{name}: header shape {shape} has a dimension outside 1..{MAX_DIM}: refused")
    count = int(np.prod(shape, dtype=np.int64))
    if count > MAX_VOXELS:
        raise InputError(f"{name}: header promises {count} voxels {shape}, more than the {MAX_VOXELS} "
                         f"supported: refused")
    if dtype.kind not in "biuf":
        raise InputError(f"{name} holds {dtype} voxels (complex or RGB); only real-valued images are "
                         f"supported")
    vox = float(hdr["vox_offset"])
    if not 0 <= vox <= MAX_VOX_OFFSET:
        raise InputError(f"{name}: header data offset {vox} is outside 0..{MAX_VOX_OFFSET}: refused")
    offset = max(int(vox), 352 if hdr.sizeof_hdr == 348 else 544)
    return offset, count * dtype.itemsize


def max_patient_bytes() -> int:
    """The per-patient limit: BRATS_SHARDS_MAX_PATIENT_BYTES (bytes, a positive integer) or the
    default; ValueError naming the variable for any other value."""
    text = os.environ.get(PATIENT_BYTES_ENV, "").strip()
    if not text:
        return MAX_PATIENT_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{PATIENT_BYTES_ENV}={text[:40]!r} must be a positive number of bytes "
                         f"(default {MAX_PATIENT_BYTES})")
    return value


def _header_of(path: Path):
    """The header of `path` from its first bytes only (nothing more is read or inflated)."""
    fd, _ = _open_regular(path)
    with open(fd, "rb") as f:
        first = f.read(2**16)
    try:
        head = _zlib.decompressobj(wbits=31).decompress(first, _HEAD) if path.name.endswith(".gz") else first[:_HEAD]
    except _zlib.error as e:
        raise ValueError(f"not a gzip stream: {e}") from None
    return _parse_header(head)


def patient_footprint(paths) -> tuple[int, str]:
    """(bytes, the file promising the most) that a patient's files will take in memory, from their
    headers: each volume's stored voxels plus a float32 working copy of them. A file whose header
    cannot be read counts 0 here: `load_volume` names it when it gets there."""
    total, worst, worst_bytes = 0, "", -1
    for path in map(Path, paths):
        try:
            hdr = _header_of(path)
        except (InputError, ValueError):
            continue
        _, nbytes = _promised_bytes(hdr, path.name)
        need = nbytes + int(np.prod(hdr.get_data_shape(), dtype=np.int64)) * WORKING_BYTES_PER_VOXEL
        total += need
        if need > worst_bytes:
            worst, worst_bytes = path.name, need
    return total, worst


def check_patient_footprint(paths) -> None:
    """Refuse (InputError naming its largest file; the caller names the patient) a patient whose headers promise
    more than `max_patient_bytes()`, before any of its files is inflated."""
    limit = max_patient_bytes()
    total, worst = patient_footprint(paths)
    if total > limit:
        raise InputError(f"the headers of its files promise {total / 2**30:.1f} GiB of voxels and working copies "
                         f"({worst} the most), more than the {limit / 2**30:.1f} GiB one patient may take: "
                         f"refused before reading (raise {PATIENT_BYTES_ENV} if these volumes are real)")


def read_payload(path: str | os.PathLike):
    """(header, data offset, inflated file bytes, file size, sha256 of the file), every read
    bounded by the header's promise."""
    path = Path(path)
    gz = path.name.endswith(".gz")
    fd, size = _open_regular(path)
    with open(fd, "rb") as f:
        first = f.read(2**16)
        head = _zlib.decompressobj(wbits=31).decompress(first, _HEAD) if gz else first[:_HEAD]
        hdr = _parse_header(head)
        offset, nbytes = _promised_bytes(hdr, path.name)
        limit = offset + nbytes + SLACK
        # gzip never grows data by more than ~0.1% (stored blocks): a larger file is not this volume
        file_limit = limit + limit // 256 + SLACK if gz else limit
        if size > file_limit:
            raise InputError(f"{path.name} is {size} bytes, more than the {file_limit} its header "
                             f"({hdr.get_data_shape()} {hdr.get_data_dtype()}) allows: refused")
        raw = first + f.read(size + 1 - len(first))  # one byte more than fstat said tells a growing file
    if len(raw) != size:
        raise InputError(f"{path.name} changed size while being read (fstat: {size} bytes, read: {len(raw)})")
    payload = inflate(raw, limit, path.name) if gz else raw
    return hdr, offset, payload, len(raw), hashlib.sha256(raw).hexdigest()


def load_volume(path: str | os.PathLike) -> RawVolume:
    """Read one `.nii` / `.nii.gz` file; the array keeps the stored dtype (scaling applied).
    Raises InputError (naming the file) for inputs refused by policy, ValueError for damaged ones."""
    import nibabel as nib

    hdr, offset, payload, size, digest = read_payload(path)
    if hdr.sizeof_hdr != 348:  # NIfTI-2: let nibabel do everything (on bytes already bounded)
        img = nib.Nifti2Image.from_bytes(payload)
        return RawVolume(data=np.asarray(img.dataobj), affine=np.asarray(img.affine, dtype=np.float64),
                         sha256=digest, nbytes=size)
    shape = hdr.get_data_shape()
    dtype = hdr.get_data_dtype()
    count = int(np.prod(shape))
    if len(payload) < offset + dtype.itemsize * count:
        raise ValueError(f"truncated: {len(payload)} bytes for {count} voxels of {dtype} at offset {offset}")
    # a zero-copy view of the inflated bytes (NIfTI stores voxels in Fortran order); int16 stays
    # int16, which keeps the normalisation statistics exact
    data = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if np.isfinite(slope) and slope != 0 and (slope != 1 or (np.isfinite(inter) and inter != 0)):
        with np.errstate(over="ignore"):  # an overflow to Inf is counted, or fails the patient (pipeline)
            data = data.astype(np.float32) * np.float32(slope) + np.float32(inter if np.isfinite(inter) else 0)
    return RawVolume(data=data, affine=np.asarray(hdr.get_best_affine(), dtype=np.float64), sha256=digest,
                     nbytes=size)


def decode_only(path: str | os.PathLike, stdlib_zlib: bool = False) -> int:
    """The decode floor of a build: read and inflate one file, return the bytes produced.
    stdlib_zlib=True inflates with the standard zlib (what nibabel uses) for comparison
    (benchmarks only: that path is not bounded)."""
    if stdlib_zlib and str(path).endswith(".gz"):
        import gzip

        fd, _ = _open_regular(Path(path))
        with open(fd, "rb") as f:
            return len(gzip.decompress(f.read()))
    return len(read_payload(path)[2])


def save_volume(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a volume atomically (temporary name, then rename)."""
    import nibabel as nib

    path = Path(path)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"  # nibabel picks the format by it
    with atomic_path(path, suffix) as tmp:
        nib.save(img, tmp)
