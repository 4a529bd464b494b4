"""The seed's per-slice HDF5 export of BraTS 2020 as an input: `volume_{N}_slice_{M}.h5`, each
with datasets `image` (H, W, 4: T1, T1Gd, T2, FLAIR) and `mask` (H, W, 3: NCR/NET, ED, ET).

Volumes become patients (`volume_{N}`), slices are reassembled in order of M along z, and the
mask channels become 2020-style labels (NCR/NET 1, ED 2, ET 4). The export carries no affine:
an identity affine is assumed (the arrays' own axes), and the manifest says so.
Needs the optional extra: pip install 'brats-shards[h5]'.

Files are untrusted: only regular files of at most MAX_SLICE_FILE_BYTES are read (once, then
parsed from memory), and the volume they assemble is bounded like a NIfTI header's promise
(`preprocess.nifti.MAX_DIM` per axis, `MAX_VOXELS` in all) before anything is allocated.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np

from preprocess.nifti import MAX_DIM, MAX_VOXELS, RawVolume, read_regular
from preprocess.errors import InputError
from shards.domain import MODALITIES, RELEASES, SEG, encode_mask, to_labels

RELEASE = "2020"  # the export is of BraTS 2020: its mask channels become that release's labels
SLICE_FILE = re.compile(r"^volume_(\d+)_slice_(\d+)\.h5$")
MAX_SLICE_FILE_BYTES = 2**28
NOTE = "HDF5 slice export: no affine in the input; an identity affine (the arrays' own axes) is assumed"


def find_volumes(root: Path) -> dict[str, list[tuple[int, Path]]]:
    """volume id -> [(slice index, path)], sorted by slice index."""
    out: dict[str, list[tuple[int, Path]]] = {}
    for p in root.rglob("volume_*_slice_*.h5"):
        m = SLICE_FILE.match(p.name)
        if m:
            out.setdefault(f"volume_{int(m[1])}", []).append((int(m[2]), p))
    return {k: sorted(v) for k, v in sorted(out.items(), key=lambda kv: int(kv[0].split("_")[1]))}


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading HDF5 slice exports needs h5py: pip install 'brats-shards[h5]'") from None
    return h5py


def load_volumes(slices: list[tuple[int, Path]], root: Path | None = None) -> tuple[dict, dict]:
    """(vols, sources) in the shape `pipeline.load_patient` returns for NIfTI input."""
    h5py = _h5py()
    depth = max(i for i, _ in slices) + 1
    if depth > MAX_DIM:
        raise InputError(f"{Path(slices[-1][1]).name}: slice index {depth - 1} is beyond the {MAX_DIM} supported")
    image = mask = None
    digest = hashlib.sha256()
    nbytes = 0
    for i, path in slices:
        raw = read_regular(path, MAX_SLICE_FILE_BYTES)
        digest.update(hashlib.sha256(raw).digest())
        nbytes += len(raw)
        try:
            with h5py.File(io.BytesIO(raw), "r") as f:  # the bytes just hashed, not a second open
                img_ds, m_ds = f["image"], f["mask"]
                _check_shapes(Path(path).name, img_ds.shape, m_ds.shape, depth)
                img, m = np.asarray(img_ds), np.asarray(m_ds)
        except (OSError, KeyError) as e:
            raise ValueError(f"cannot read {Path(path).name}: {e}") from e
        if image is None:
            image = np.zeros(img.shape[:2] + (depth, 4), np.float32)
            mask = np.zeros(img.shape[:2] + (depth, 3), bool)
        elif img.shape[:2] != image.shape[:2]:
            raise ValueError(f"{Path(path).name}: slice size {img.shape[:2]} differs from {image.shape[:2]}")
        image[:, :, i] = img
        mask[:, :, i] = m > 0.5
    seg = to_labels(np.moveaxis(mask, -1, 0), "subregions", RELEASES[RELEASE])
    affine = np.eye(4)
    sha = digest.hexdigest()
    vols = {name: RawVolume(np.ascontiguousarray(image[..., c]), affine, sha, nbytes)
            for c, name in enumerate(MODALITIES)}
    vols[SEG] = RawVolume(seg, affine, sha, nbytes)
    folder = Path(slices[0][1]).parent
    rel = str(folder.relative_to(root)) if root else str(folder)
    sources = {"h5_slices": {"path": rel, "files": len(slices), "sha256": sha, "bytes": nbytes,
                             "note": "sha256 over the files' own sha256 digests, in slice order"}}
    return vols, sources


def _check_shapes(name: str, img: tuple, m: tuple, depth: int) -> None:
    """Shapes as the export writes them, and a volume within bounds, before reading any data."""
    if len(img) != 3 or img[-1] != 4 or tuple(m) != tuple(img[:2]) + (3,):
        raise ValueError(f"{name}: image {img} / mask {m}; expected (H, W, 4) and (H, W, 3)")
    if max(img[:2]) > MAX_DIM or img[0] * img[1] * depth > MAX_VOXELS:
        raise InputError(f"{name}: slices of {img[0]}x{img[1]} over {depth} indices exceed the supported "
                         f"{MAX_DIM} per axis / {MAX_VOXELS} voxels: refused")


def write_export(root: Path, volume: int, images: np.ndarray, seg: np.ndarray, release: str = RELEASE) -> list[Path]:
    """Write one volume as the seed's export (for tests and demos): images (4, X, Y, Z), seg (X, Y, Z)
    in the labels of `release`."""
    h5py = _h5py()
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for z in range(seg.shape[2]):
        p = root / f"volume_{volume}_slice_{z}.h5"
        with h5py.File(p, "w") as f:
            f["image"] = np.moveaxis(images[:, :, :, z], 0, -1).astype(np.float64)
            f["mask"] = np.moveaxis(encode_mask(seg[:, :, z], RELEASES[release]), 0, -1)  # (X, Y, 3) uint8
        paths.append(p)
    return paths
