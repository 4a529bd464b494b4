"""Tiny fake cases of every release in `shards.domain.RELEASES`, for tests and demos.

A case is the toy glioma of `preprocess.synthetic.toy.make_case` (necrosis, oedema, enhancing rim),
relabelled into the release's sub-regions, with what the release adds:
  * a resection cavity (RC) beside the tumour where the release has one (post-treatment GLI: the
    case ids take timepoint 100, as post-treatment scans do; MET);
  * a cystic component (CC) inside the necrosis (PED 2024);
  * a defaced head (`defaced=True`, PED and MEN-RT are not skull-stripped): a nonzero scalp
    shell around the brain;
  * the release's modalities only (MEN-RT: T1Gd alone, with `_gtv` labels);
  * the MSD Task01 layout: `imagesTr/BRATS_001.nii.gz` one 4D volume (FLAIR, T1w, T1Gd, T2w) and
    `labelsTr/BRATS_001.nii.gz`.
Any grid: pass an odd shape (e.g. (45, 54, 45), the 182x218x182 MNI152 grid of 2024 downscaled).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess.synthetic.cases import Case, write_case
from preprocess.synthetic.fluid import release_labels
from preprocess.synthetic.toy import make_case
from shards.domain import MODALITIES, release as release_named

# glioma sub-region of the toy case -> the names it goes by in other releases (the first one the
# release has is taken)
AS = {1: ("NCR/NET", "NETC", "NET", "GTV"), 2: ("ED", "SNFH", "GTV"), 3: ("ET", "GTV")}


def release_case(release: str, index: int, shape=(45, 54, 45), seed: int = 0, defaced: bool = False):
    """(pid, images by modality (X, Y, Z) int16 in RAS order, seg in the release's labels)."""
    rel = release_named(release)  # 2018/2019/2021 -> 2020; ValueError naming the known ones
    case = make_case(index, shape=shape, release="2023", seed=seed)  # labels 1 NCR, 2 ED, 3 ET
    seg = release_labels(case.seg, rel, AS)
    images = dict(zip(MODALITIES, (img.copy() for img in case.images)))
    brain = images["t1"] != 0
    if "CC" in rel.subregions:  # the inner half of the necrosis is a cyst
        ncr = case.seg == 1
        zs = np.nonzero(ncr.any(axis=(0, 1)))[0]
        if zs.size:
            seg[ncr & (np.arange(shape[2]) <= np.median(zs))[None, None, :]] = rel.label_of("CC")
    if "RC" in rel.subregions:  # a cavity: a ball of brain beside the tumour, dark on T1, CSF-like
        tumour = np.argwhere(case.seg > 0).mean(axis=0) if (case.seg > 0).any() else np.array(shape) / 2
        centre = np.clip(tumour + np.array([0, shape[1] / 5, 0]), 0, np.array(shape) - 1)
        grid = np.indices(shape).astype(np.float32)
        ball = (((grid - centre[:, None, None, None]) / (np.array(shape)[:, None, None, None] / 10)) ** 2).sum(0) < 1
        cavity = ball & brain & (seg == 0)
        seg[cavity] = rel.label_of("RC")
        for m, img in images.items():
            img[cavity] = max(1, int(img[brain].mean() * (0.2 if m in ("t1", "t1gd", "flair") else 1.5)))
    if defaced:
        grid = np.indices(shape).astype(np.float32)
        centre = (np.array(shape) - 1) / 2
        r = np.sqrt((((grid - centre[:, None, None, None]) / (np.array(shape)[:, None, None, None] * 0.49)) ** 2).sum(0))
        scalp = (r < 1.0) & ~brain
        rng = np.random.default_rng([seed, index, 7])
        for img in images.values():
            img[scalp] = rng.integers(50, 400, int(scalp.sum()), dtype=np.int16)
    pid = rel.case_id.format(index=index)
    return pid, {m: images[m] for m in rel.modalities}, seg


def write_release_case(root: Path, release: str, index: int, shape=(45, 54, 45), seed: int = 0,
                       defaced: bool = False) -> str:
    """Write one case in the release's layout (LPS storage, as BraTS ships); returns its id."""
    rel = release_named(release)  # 2018/2019/2021 -> 2020; ValueError naming the known ones
    pid, images, seg = release_case(release, index, shape, seed, defaced)
    write_case(Case(pid=pid, images=tuple(images[m] for m in rel.modalities), seg=seg), Path(root), rel.name)
    return pid


def write_release(root: Path, release: str, patients: int, shape=(45, 54, 45), seed: int = 0,
                  defaced: bool = False, start: int = 1) -> list[str]:
    """Write `patients` toy cases of `release` in its layout; returns their ids."""
    return [write_release_case(root, release, i, shape, seed, defaced) for i in range(start, start + patients)]
