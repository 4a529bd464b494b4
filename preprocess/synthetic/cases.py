"""The synthetic cases' common format and how they are written: a `Case` (images in RAS voxel
order, seg in the release's labels) to a release's folder layout, LPS-stored as BraTS ships, with
the name-mapping table real releases have."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from preprocess.nifti import save_volume
from shards.domain import MSD_ORDER, SEG, release as _release


@dataclass(frozen=True)
class Case:
    pid: str
    images: tuple[np.ndarray, ...]  # the release's modalities, (X, Y, Z) int16, RAS voxel order
    seg: np.ndarray  # (X, Y, Z) uint8 in the release's labels


def case_id(release: str, index: int) -> str:
    return _release(release).case_id.format(index=index)


def lps_affine(shape) -> np.ndarray:
    """BraTS-style affine: storage axes run towards Left and Posterior (x, y flipped)."""
    return np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, shape[1] - 1.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def ras_affine(shape) -> np.ndarray:
    return np.array([[1.0, 0, 0, -(shape[0] - 1.0)], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def lps_stored(a: np.ndarray) -> np.ndarray:
    """A RAS-ordered array as an LPS affine stores it: x and y flipped."""
    return np.ascontiguousarray(a[::-1, ::-1, :])


def write_case(case: Case, root: Path, release: str = "2020", orientation: str = "lps",
               ext: str = ".nii.gz") -> Path:
    """Write a case in the release's layout (a folder per patient, or MSD's imagesTr/ + labelsTr/
    4-D files); LPS storage flips x and y of the RAS array. `case.images` are the release's
    modalities, in the order of `shards.domain.MODALITIES`."""
    rel = _release(release)
    root = Path(root)
    shape = case.seg.shape
    affine = lps_affine(shape) if orientation == "lps" else ras_affine(shape)

    def stored(a):
        return lps_stored(a) if orientation == "lps" else a

    images = dict(zip(rel.modalities, case.images))
    if rel.layout == "msd":
        for sub in ("imagesTr", "labelsTr"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        save_volume(root / "imagesTr" / f"{case.pid}{ext}", np.stack([stored(images[m]) for m in MSD_ORDER], -1),
                    affine)
        save_volume(root / "labelsTr" / f"{case.pid}{ext}", stored(case.seg), affine)
        return root
    folder = root / case.pid
    folder.mkdir(parents=True, exist_ok=True)
    for modality, img in images.items():
        save_volume(folder / rel.file_name(case.pid, modality, ext), stored(img), affine)
    save_volume(folder / rel.file_name(case.pid, SEG, ext), stored(case.seg), affine)
    return folder


def write_cases(out: Path, make, patients: int, release: str, orientation: str, start: int,
                  progress: bool, desc: str) -> list[str]:
    """Write cases `make(i) -> (Case, grade)` for i in start.. plus the name-mapping table in the
    root, as real releases ship; returns the patient ids."""
    _release(release)  # ValueError naming the known releases
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    it = range(start, start + patients)
    if progress:
        it = tqdm(it, desc=desc, unit="patient")
    for i in it:
        case, grade = make(i)
        write_case(case, out, release=release, orientation=orientation)
        rows.append((grade, case.pid))
    if _release(release).layout == "msd":  # MSD ships no name-mapping table
        return [pid for _, pid in rows]
    with open(out / "name_mapping.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Grade", "BraTS_ID"])
        w.writerows(rows)
    return [pid for _, pid in rows]
