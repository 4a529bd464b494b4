"""The realistic generator's rater: what a person draws from the true regions (a biased whole-tumour
outline, a smooth ~1 mm displacement), so no model can reach Dice 1.0."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtr

from preprocess.synthetic.cases import Case, case_id
from preprocess.synthetic.fields import noise_field

def annotate(rng, lab: np.ndarray, brain: np.ndarray, sp: float, et_label: int) -> np.ndarray:
    """A rater's drawing of `lab`: a biased whole-tumour outline and a smooth ~1 mm displacement."""
    if not lab.any():
        return lab.copy()
    idx = np.argwhere(lab > 0)
    pad = int(math.ceil(6.0 / sp)) + 2
    a = np.maximum(idx.min(0) - pad, 0)
    b = np.minimum(idx.max(0) + pad + 1, lab.shape)
    sl = tuple(slice(x0, x1) for x0, x1 in zip(a, b))
    sub = lab[sl]
    shp = sub.shape
    # 1. whole-tumour outline: generous or tight rater, plus local wobble (mm)
    sigma_mm = max(1.5, 0.9 * sp)
    bias = rng.uniform(-1.3, 1.3)
    d = bias + 0.7 * noise_field(rng, shp, max(1.0, 8.0 / sp))
    tau = ndtr(-d / sigma_mm).astype(np.float32)
    wt_blur = ndi.gaussian_filter((sub > 0).astype(np.float32), sigma_mm / sp, truncate=3.0)
    wt = (wt_blur > tau) & brain[sl]
    # 2. smooth displacement of the inner boundaries (nearest-neighbour warp), ~1 mm
    amp = rng.uniform(0.6, 1.3) / sp
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shp], indexing="ij")
    coords = [g + amp * noise_field(rng, shp, max(1.0, 8.0 / sp)) for g in grids]
    warped = ndi.map_coordinates(sub, coords, order=0, mode="nearest")
    inner = np.where(warped == 2, 0, warped)
    out = np.where(wt, 2, 0).astype(np.uint8)
    core = (inner > 0) & wt
    out[core] = inner[core]
    res = lab.copy()
    res[sl] = out
    return res


def rate(draft) -> None:
    """The rater's segmentation on the full grid, and the case."""
    b_brain, brain, bsl, crop, et_label = draft.b_brain, draft.brain, draft.bsl, draft.crop, draft.et_label
    hi, images, index, lab, lo, release = draft.hi, draft.images, draft.index, draft.lab, draft.lo, draft.release
    rng, shape, sp = draft.rng, draft.shape, draft.sp
    ann = annotate(rng, lab, b_brain, sp, et_label)
    seg = np.zeros(shape, np.uint8)
    full = tuple(slice(a, b) for a, b in zip(lo, hi))
    seg_crop = np.zeros(crop, np.uint8)
    seg_crop[bsl] = ann
    seg_crop[~brain] = 0
    seg[full] = seg_crop
    case = Case(pid=case_id(release, index), images=tuple(images), seg=seg)
    draft.case, draft.full = case, full
