"""WebDataset side of the contract: uncompressed tars of whole patients, nothing pickled.

Sample key `{patient}_s{slice:03d}` (dots replaced, webdataset splits keys at the first dot),
members `image.npy` float16 (M,H,W), `mask.npy` uint8 (K,H,W), `meta.json`. Tar headers carry
fixed mtime/owner/mode so the same samples give the same bytes on any machine. The reader walks
one patient's tar bytes as the contract has them (`scan_tar`): exactly `{key}.image.npy`,
`{key}.mask.npy`, `{key}.meta.json` per slice, in order, each checked before it is decoded;
nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
from pathlib import Path

import numpy as np

from shards.atomic import write_bytes
from shards.contract import NPY_DTYPES, ShardFormatError, short, slice_shape_problem
from shards.npy import npy_prefix, parse_npy_header


def sample_key(pid: str, i: int) -> str:
    return f"{pid.replace('.', '_')}_s{i:03d}"


def _tar_header(name: str, size: int) -> bytes:
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
    heads = [_tar_header(name, _size(bufs)) for name, bufs in members]
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
                  slice_index: list[int], sync: bool = True, plane: str = "axial") -> tuple[Path, str]:
    """Write one patient's slices as one tar, atomically; returns (path, sha256). The tar is
    assembled in memory (one patient) in one buffer -- each slice's bytes copied once, after the
    `.npy` header that all its slices share -- so it is hashed without reading the file back.
    `sync=False`: renamed into place without waiting for the disk (`shards.atomic.atomic_path`)."""
    image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
    members = []
    if len(slice_index):
        img_head, mask_head = npy_prefix(image[0]), npy_prefix(mask[0])
    for i, z in enumerate(slice_index):
        key = sample_key(pid, i)
        meta = {"patient": pid, "slice": i, "source_slice": int(z), "split": split}
        if plane != "axial":  # `source_slice` counts along this plane's axis (an axial tar's meta as ever)
            meta["plane"] = plane
        members += [(f"{key}.image.npy", [img_head, image[i]]), (f"{key}.mask.npy", [mask_head, mask[i]]),
                    (f"{key}.meta.json", [json.dumps(meta, sort_keys=True).encode()])]
    data = tar_bytes(members)
    write_bytes(path, data, sync=sync)
    return path, hashlib.sha256(data).hexdigest()


# -- reading

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
            raise ShardFormatError(f"{where}: member {short(name)} at byte {pos} has an invalid size field")
        if checksums and _octal(hdr[148:156]) != sum(hdr) - sum(hdr[148:156]) + 256:
            raise ShardFormatError(f"{where}: member {short(name)} at byte {pos}: header checksum mismatch")
        kind = hdr[156:157]
        if kind not in (b"0", b"\0"):
            raise ShardFormatError(f"{where}: member {short(name)} at byte {pos} is not a regular file "
                                   f"(type {short(kind)})")
        pos += 512
        if pos + size > total:
            raise ShardFormatError(f"{where}: member {short(name)} runs past the end of the file (truncated?)")
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
    base = pid.replace(".", "_") if pid is not None else None
    images, masks, keys, shapes = [], [], [], {}
    i, stage, key, expected = 0, 0, None, None
    for name, payload in iter_tar_members(data, where, checksums=strict):
        if stage == 0:  # a new sample: its three member names
            if n_slices is not None and i >= n_slices:
                raise ShardFormatError(f"{where}: holds more than the manifest's {n_slices} samples")
            base = base if base is not None else _key_base(name, where)
            key = sample_key(base, i) if pid is None else sample_key(pid, i)
            expected = [f"{key}.{ext}".encode() for ext in ("image.npy", "mask.npy", "meta.json")]
        if name != expected[stage]:
            raise ShardFormatError(f"{where}: member {short(name)} where the contract has "
                                   f"{expected[stage].decode()!r}")
        member = f"{where}: {expected[stage].decode()}"
        if stage < 2:
            arr = _npy_member(payload, ("image", "mask")[stage], shapes, member)
            (images if stage == 0 else masks).append(arr.copy() if copy else arr)
        elif strict:
            _check_meta(payload, i, pid, member)
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


def _key_base(name: bytes, where: str) -> str:
    """The key prefix (the patient id, dots replaced) of a tar's first member name."""
    if not name.endswith(b"_s000.image.npy"):
        raise ShardFormatError(f"{where}: first member {short(name)} is not '<patient>_s000.image.npy'")
    try:
        return name[: -len(b"_s000.image.npy")].decode("ascii")
    except UnicodeDecodeError:
        raise ShardFormatError(f"{where}: first member {short(name)} is not ASCII") from None


def _npy_member(payload, kind: str, shapes: dict, where: str) -> np.ndarray:
    """The `kind` ('image' or 'mask') slice of one member, a view into `payload`: its header, its
    shape (the contract's, and the same as the earlier slices') and its data type checked first."""
    dtype, shape, fortran, start = parse_npy_header(payload, where)
    if shape != shapes.get(kind):
        if kind in shapes:
            raise ShardFormatError(f"{where} is {shape}, earlier slices {shapes[kind]}")
        why = slice_shape_problem(kind, shape)
        if why is None and kind == "mask" and shape[1:] != shapes["image"][1:]:
            why = f"mask slices {shape} do not match image slices {shapes['image']}"
        if why is not None:
            raise ShardFormatError(f"{where}: {why}")
        shapes[kind] = shape
    if dtype != NPY_DTYPES[kind] or fortran:
        raise ShardFormatError(f"{where} is {dtype.str}{' Fortran-ordered' if fortran else ''}; the contract has "
                               f"{NPY_DTYPES[kind].str} in C order")
    return np.frombuffer(payload, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)


def _check_meta(payload, i: int, pid: str | None, where: str) -> None:
    """A meta.json member: a JSON object naming slice `i` (and patient `pid`, when known)."""
    try:
        meta = json.loads(bytes(payload))
    except (ValueError, RecursionError):
        raise ShardFormatError(f"{where} is not valid JSON") from None
    if not isinstance(meta, dict) or type(meta.get("slice")) is not int or meta["slice"] != i \
            or (pid is not None and meta.get("patient") != pid):
        raise ShardFormatError(f"{where} does not name patient {pid} slice {i}")


def read_wds_patient(data, n_slices: int | None = None, *, pid: str | None = None,
                     where: str = "tar") -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """All samples of one patient's tar: (images, masks, keys) in file order; each array owns
    its memory (one copy out of the tar bytes, which can then be freed). n_slices/pid: what the
    manifest promises (count, patient of the keys); `where` names the file in messages."""
    return scan_tar(data, where, n_slices, pid)
