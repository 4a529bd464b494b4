"""BraTS post-processing of one patient's predicted regions [WT, TC, ET], thresholds chosen on
validation patients.

Two rules, applied in this order:
  1. Small components: 26-connected (3D) components of the predicted WT smaller than
     `min_component_mm3` are removed from all three regions (isolated false-positive specks).
  2. Empty ET: if the predicted ET of the whole patient (after rule 1) is smaller than
     `et_min_mm3`, it becomes necrosis: ET is emptied, its voxels stay in TC and WT.

Why: the BraTS ranking scores a region that is empty in the reference as Dice 1 if the
prediction is empty too and 0 otherwise, so a few false ET voxels in a patient without enhancing
tumour (often low-grade gliomas) cost a whole patient's ET Dice, while dropping a small true ET
costs the same. Which side wins is a property of the model, hence nnU-Net's recipe for BraTS
(Isensee et al. 2020, "nnU-Net for Brain Tumor Segmentation"): pick the threshold that maximises
mean Dice on held-out patients. `choose` does that grid search on validation patients; the
trainer stores its `config` in the checkpoint and prediction applies `postprocess` with it.

Thresholds are volumes in mm^3, not voxel counts, so a threshold carries across grids: the
`voxel_mm3` argument (product of the voxel spacing) converts counts to volumes. A 2D model's
prediction for one patient is passed as its stack of slices (3, S, H, W), labelled in 3D like a
volume.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from numbers import Real

import numpy as np
from scipy import ndimage

from shards.config import from_known_fields
from shards.domain import REGIONS
from train.metrics import scores

# the largest sane threshold: a BraTS field of view, 240 x 240 x 155 voxels of 1 mm^3; a larger
# one (or inf) would empty every prediction without a word
MAX_MM3 = 240.0 * 240.0 * 155.0
ET_GRID = (0, 50, 100, 200, 300, 500, 750, 1000)  # mm^3
COMPONENT_GRID = (0, 10, 25, 50, 100, 250)  # mm^3


@dataclass(frozen=True)
class PostprocessConfig:
    et_min_mm3: float = 0.0  # predicted ET smaller than this (whole patient) becomes NCR
    min_component_mm3: float = 0.0  # predicted WT components smaller than this are removed

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, Real) or not 0 <= v <= MAX_MM3:  # `not` catches NaN
                raise ValueError(f"PostprocessConfig.{f.name} must be a volume in [0, {MAX_MM3:.0f}] mm^3 "
                                 f"(a BraTS field of view), not {str(v)[:40]!r}")
            object.__setattr__(self, f.name, float(v))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PostprocessConfig":
        return from_known_fields(cls, d)


def _nested(regions: np.ndarray) -> np.ndarray:
    """bool (3, ...) [WT, TC, ET] -> a new array made nested by union (ET ⊂ TC ⊂ WT), as
    `shards.domain.to_labels` reads it (a voxel positive in ET is tumour core and whole tumour)."""
    r = np.asarray(regions)
    if r.ndim < 2 or r.shape[0] != 3:
        raise ValueError(f"expected regions of shape (3, ...) [{', '.join(REGIONS)}], got {r.shape}")
    et = r[2].astype(bool)
    tc = r[1].astype(bool) | et
    return np.stack([r[0].astype(bool) | tc, tc, et])


def _components(wt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fully connected (26 in 3D) components of `wt` -> (labels, size in voxels per label; [0] = 0)."""
    labels, n = ndimage.label(wt, structure=np.ones((3,) * wt.ndim, bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labels, sizes


def _check_voxel(voxel_mm3: float) -> None:
    if not voxel_mm3 > 0:
        raise ValueError(f"voxel_mm3 must be > 0, not {voxel_mm3!r}")


def postprocess(regions: np.ndarray, cfg: PostprocessConfig, voxel_mm3: float = 1.0) -> np.ndarray:
    """bool (3, ...) [WT, TC, ET] of one patient (3D, or slices (3, S, H, W)) -> a new bool array,
    nested (ET ⊂ TC ⊂ WT), with the two rules of the module docstring applied; input untouched."""
    _check_voxel(voxel_mm3)
    out = _nested(regions)
    if cfg.min_component_mm3 > 0:
        labels, sizes = _components(out[0])
        keep = sizes * voxel_mm3 >= cfg.min_component_mm3  # (n + 1,) lookup by label
        keep[0] = False
        out &= keep[labels]
    if out[2].sum() * voxel_mm3 < cfg.et_min_mm3:
        out[2] = False  # ET -> NCR: the voxels stay in TC and WT
    return out


def _case_counts(pred: np.ndarray, ref: np.ndarray, voxel_mm3: float):
    """What every grid point needs of one patient, counted once: per WT component of the
    prediction, its volume (mm^3) and, per region, its predicted and true-positive voxels (3, n+1);
    and the reference's voxels per region (3,)."""
    _check_voxel(voxel_mm3)
    pred, ref = _nested(pred), _nested(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    labels, sizes = _components(pred[0])
    n = len(sizes)
    pred_n = np.stack([np.bincount(labels[p], minlength=n) for p in pred])
    tp_n = np.stack([np.bincount(labels[p & r], minlength=n) for p, r in zip(pred, ref)])
    ref_total = ref.reshape(3, -1).sum(1)
    return sizes * voxel_mm3, pred_n, tp_n, ref_total, voxel_mm3


def _region_dice(counts, cfg: PostprocessConfig) -> np.ndarray:
    """Dice (3,) of one patient after post-processing with `cfg`, from its `_case_counts`."""
    volumes, pred_n, tp_n, ref_total, voxel_mm3 = counts
    keep = volumes >= cfg.min_component_mm3
    keep[0] = False
    pred_k, tp_k = pred_n @ keep, tp_n @ keep  # (3,) voxels left after rule 1
    if pred_k[2] * voxel_mm3 < cfg.et_min_mm3:
        pred_k[2] = tp_k[2] = 0
    return np.array([scores(tp, p - tp, r - tp)["dice"] for tp, p, r in zip(tp_k, pred_k, ref_total)])


def choose(cases, et_grid=ET_GRID, component_grid=COMPONENT_GRID) -> dict:
    """Grid search for the PostprocessConfig maximising mean Dice over patients and the 3 regions
    (BraTS empty rules). `cases`: iterable of (pred bool (3, ...), ref bool (3, ...), voxel_mm3).
    Ties go to the smaller ET threshold, then the smaller component threshold (least change)."""
    stats = [_case_counts(p, r, v) for p, r, v in cases]
    if not stats:
        raise ValueError("choose() needs at least one validation patient")

    def mean_dice(cfg):  # (3,) mean over patients
        return np.mean([_region_dice(s, cfg) for s in stats], axis=0)

    grid = list(itertools.product(sorted(et_grid), sorted(component_grid)))
    if not grid:
        raise ValueError("choose() needs a non-empty et_grid and component_grid")
    before = mean_dice(PostprocessConfig())
    best_cfg, best = None, None
    for e, c in grid:
        cfg = PostprocessConfig(et_min_mm3=e, min_component_mm3=c)
        d = mean_dice(cfg)
        if best is None or d.mean() > best.mean() + 1e-12:  # strictly better, not rounding noise
            best_cfg, best = cfg, d
    return {"config": best_cfg.to_dict(), "dice_before": float(before.mean()), "dice_after": float(best.mean()),
            "per_region_before": dict(zip(REGIONS, map(float, before))),
            "per_region_after": dict(zip(REGIONS, map(float, best)))}
