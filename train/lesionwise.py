"""Lesion-wise Dice, HD95 and NSD of one region (BraTS 2023+), and the surface-distance primitives
they share with the global metrics of `train.evaluate`.

A lesion is a connected component. Each reference lesion is paired with predicted components
(the `matching` rule), scored with Dice, HD95 and NSD, and the patient's score is a mean over
lesions. Two official rule sets, as `LesionParams`:

BRATS_2023 (the columns of `evaluate`): the lesion-wise metric the BraTS 2023 and 2024
challenges ranked on, by Saluja et al., github.com/rachitsaluja/BraTS-2023-Metrics, file
brats_2023_metrics/surface_distance/brats_metrics.py (commit 5db2741; the same rules in metrics.py
on its main branch):
  * lesions: 26-connected components (`cc3d.connected_components(..., connectivity=26)`, l. 184-185).
  * reference lesions whose dilations touch are one lesion: the reference is dilated
    `dil_factor` = 3 times (BraTS-GLI, l. 24-27) with the 18-connected element
    (`generate_binary_structure(3, 2)`, l. 182, 187), and the reference voxels of one
    26-connected component of that are one lesion (l. 188-195).
  * matching: every predicted component touching a lesion's 3-times-dilated mask belongs to it,
    one component possibly to several lesions (l. 206-221); the lesion's Dice and HD95 are those
    of the lesion (undilated) against the union of its components. No component: a missed
    lesion (FN), Dice 0, HD95 inf -> 374 (l. 325). A component belonging to no lesion: a false
    positive (FP, l. 236), counted with Dice 0 and HD95 374 (l. 333-338).
  * lesions of at most `lesion_volume_thresh` = 50 mm^3 (voxel count x voxel volume; l. 26,
    327) are left out of the score and of the TP/FN counts; the components touching them are
    not FPs.
  * score = sum over the kept lesions / (kept lesions + FPs), HD95 the same with 374 per FP
    (l. 329-341); nothing to count (0 / 0) -> Dice 1, HD95 0 (l. 343-347).

BRATS_EVALUATION: what the current official package reports as `lesionwise_dsc_mean` /
`lesionwise_hd95_mean` (brats-evaluation 0.0.10 on panoptica 2.1.7: panoptica's `sq_dsc` /
`sq_hd95`, brats_evaluation/metrics_parser.py l. 82-87, with brats_evaluation/configs/config_gli.yaml):
  * lesions: 26-connected components (config l. 18, ConnectedComponentsInstanceApproximator;
    panoptica/_functionals.py l. 69-77: cc3d's default connectivity, 26).
  * no dilation, no minimum size.
  * matching: one-to-one, maximising the summed Dice (config l. 19-20, MaxBipartiteMatching;
    panoptica/instance_matcher.py l. 365-460: cost 1 - Dice for pairs of Dice >= 1e-6, scipy
    `linear_sum_assignment`, a pair kept where its cost is below 1).
  * score = mean over matched pairs only (panoptica/panoptica_result.py l. 586-605): missed
    lesions and FPs are counted (`fn`, `fp`) but do not lower it. No matched pair: Dice 0,
    HD95 inf; nothing on either side: NaN (config l. 2-16, the edge_case_handler).
Side by side with both: bench/official_eval_check.py.

HD95 (both sets here, and the global one of `evaluate`): the 95th percentile of the pooled
surface distances of the two regions, in mm from the voxel spacing; the surface is a region
minus its erosion with the 6-connected (face) element, as panoptica computes it. The 2023 code
took the HD95 of DeepMind's surface-distance package (surfel-area weighted, the larger of the two
directed percentiles), so per lesion its HD95 differs from this one by a fraction of a voxel
where both are finite (up to 0.41 mm per patient in the bench); Dice, counts and penalties agree.

NSD (normalised surface distance, surface Dice), as the official package computes it (panoptica
2.1.7 panoptica/metrics/_surface_distances.py `_nsd_from_pair`, l. 92-112; the configs of every
release, config_gli/_mets/_ped/_MenPre/_MenRT/_GoAT.yaml, list NSD among the global and instance
metrics and set no tolerance, so for lesions it is the smallest voxel spacing, `min(voxelspacing)`
from the image's header; global metrics are computed without the spacing, in voxels, where the
default tolerance is 0.5 voxel, see `train.evaluate`): the surfaces of HD95 above; with a_in / b_in the shares of the reference's
/ prediction's surface voxels within the tolerance of the other surface (distance <= tolerance),
NSD = (a_in + b_in) / (a_in + b_in + a_out + b_out + tiny), which is (a_in + b_in) / 2. Edge cases
(the configs' edge_case_handler, the same in every release): no voxel in common -> 0 (global:
any zero-overlap pair; lesion-wise: no matched pair), nothing on either side -> NaN (here 1, as
Dice, in the global and BRATS_2023 columns; BRATS_EVALUATION keeps NaN). The 2023 code had no
NSD: under BRATS_2023 a missed or false lesion scores NSD 0, like its Dice. The releases' configs
differ only in their label groups (regions); brats-evaluation's MET parser (metrics_parser.py
`parse_mets_results`) re-aggregates lesion-wise scores with a 20 mm^3 size threshold and 373 mm
penalties, a rule set not computed here. On a file path the package reads the image with
SimpleITK, whose array is (z, y, x) while its spacing is (x, y, z): on anisotropic files its
lesion-wise HD95 and NSD use the spacing in reverse axis order (BraTS files are 1 mm isotropic,
where that changes nothing); this module takes the spacing in the array's axis order.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

EMPTY_HD95 = 373.12866  # global HD95 with one side empty: diagonal of the 240x240x155 volume, 1 mm
MATCHINGS = ("dilation", "one-to-one")
ONE_TO_ONE_MIN_DICE = 1e-6  # config_gli.yaml: MaxBipartiteMatching matching_threshold
_RANK = {6: 1, 18: 2, 26: 3}  # connectivity -> rank of scipy's generate_binary_structure


@dataclass(frozen=True)
class LesionParams:
    """One rule set of the lesion-wise metric (see the module docstring for the sources)."""

    name: str
    connectivity: int = 26  # voxels of one lesion touch by a face (6), an edge (18) or a corner (26)
    dilation: int = 3  # "dilation" matching: iterations of the 18-connected element
    min_volume: float = 50.0  # mm^3: reference lesions of at most this volume are not scored
    matching: str = "dilation"  # "dilation" or "one-to-one"
    penalised: bool = True  # FN and FP lesions enter the mean (Dice 0, HD95 penalty_hd95)
    penalty_hd95: float = 374.0  # HD95 of a missed or false lesion
    empty_dice: float = 1.0  # no lesion to score on either side
    empty_hd95: float = 0.0
    nsd_tolerance: float | None = None  # mm; None: the smallest voxel spacing (the official scorer's)

    def __post_init__(self):
        if self.connectivity not in _RANK:
            raise ValueError(f"connectivity must be 6, 18 or 26, not {self.connectivity}")
        if self.matching not in MATCHINGS:
            raise ValueError(f"unknown matching {self.matching!r}; choose {' or '.join(MATCHINGS)}")
        if self.dilation < 0 or self.min_volume < 0:
            raise ValueError("dilation and min_volume must be >= 0")


BRATS_2023 = LesionParams("brats2023-gli")
BRATS_EVALUATION = LesionParams("brats-evaluation-gli", dilation=0, min_volume=0.0, matching="one-to-one",
                                penalised=False, penalty_hd95=math.inf, empty_dice=math.nan, empty_hd95=math.nan)


def surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))
    return mask & ~eroded


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """(d_pred, d_ref): the distance in mm of every surface voxel of `pred` to the nearest surface
    voxel of `ref`, and the reverse; both regions non-empty."""
    from scipy import ndimage

    sp, sr = surface(pred), surface(ref)
    # distance of every voxel to the nearest surface voxel of the other region
    d_to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    d_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return d_to_ref[sp], d_to_pred[sr]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """95th-percentile Hausdorff distance in mm (pooled both directions); both empty -> 0, one
    empty -> EMPTY_HD95 (the global convention; lesion-wise scoring never passes an empty side)."""
    pred, ref = pred.astype(bool), ref.astype(bool)
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return EMPTY_HD95
    return _hd95_of(*surface_distances(pred, ref, spacing))


def _hd95_of(d_pred: np.ndarray, d_ref: np.ndarray) -> float:
    return float(np.percentile(np.hstack((d_pred, d_ref)), 95))


def nsd(pred: np.ndarray, ref: np.ndarray, spacing, tolerance: float | None = None) -> float:
    """Normalised surface distance (surface Dice) at `tolerance` mm, by default the smallest voxel
    spacing (the official scorer's): the share of both surfaces lying within the tolerance of the
    other, (a_in / |A| + b_in / |B|) / 2 in the scorer's form, with the surfaces of `hd95`. Both
    empty -> 1 (as Dice); one empty, or no voxel in common -> 0 (the scorer's zero-overlap rule)."""
    pred, ref = pred.astype(bool), ref.astype(bool)
    if not pred.any() and not ref.any():
        return 1.0
    if not (pred & ref).any():
        return 0.0
    return _nsd_of(*surface_distances(pred, ref, spacing), _tolerance(spacing, tolerance))


def _tolerance(spacing, tolerance: float | None) -> float:
    return float(min(spacing)) if tolerance is None else float(tolerance)


def _nsd_of(d_pred: np.ndarray, d_ref: np.ndarray, tol: float) -> float:
    """NSD from the two surfaces' distances (the scorer's arithmetic, in its order)."""
    a_in, b_in = np.sum(d_ref <= tol) / d_ref.size, np.sum(d_pred <= tol) / d_pred.size
    a_out, b_out = np.sum(d_ref > tol) / d_ref.size, np.sum(d_pred > tol) / d_pred.size
    return float((a_in + b_in) / (a_in + b_in + a_out + b_out + sys.float_info.min))


def _found_scores(p: np.ndarray, r: np.ndarray, spacing, tolerance: float | None) -> tuple[float, float, float]:
    """(Dice, HD95, NSD) of a found lesion `r` against its components `p` (both non-empty): the
    surface distances computed once for HD95 and NSD."""
    inter = float((r & p).sum())
    d_pred, d_ref = surface_distances(p, r, spacing)
    nsd_value = _nsd_of(d_pred, d_ref, _tolerance(spacing, tolerance)) if inter else 0.0  # zero overlap: 0
    return 2.0 * inter / float(r.sum() + p.sum()), _hd95_of(d_pred, d_ref), nsd_value


def lesion_metrics(pred: np.ndarray, ref: np.ndarray, spacing, params: LesionParams = BRATS_2023) -> dict:
    """Bool masks of one region (X, Y, Z) -> {"dice", "hd95", "nsd", "tp", "fp", "fn"}: the lesion-wise
    scores and the lesion counts (TP, FN: scored reference lesions found or missed; FP: predicted
    components matched to no reference lesion)."""
    from scipy import ndimage

    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {ref.shape}")
    conn = ndimage.generate_binary_structure(ref.ndim, _RANK[params.connectivity])
    pred_cc, n_pred = ndimage.label(pred, conn)
    ref_cc, n_ref = ndimage.label(ref, conn)
    if params.matching == "dilation" and params.dilation and n_ref:  # lesions whose dilations touch: one
        grown = ndimage.binary_dilation(ref, ndimage.generate_binary_structure(ref.ndim, 2), params.dilation)
        grown_cc, n_ref = ndimage.label(grown, conn)
        ref_cc = np.where(ref, grown_cc, 0)
    voxel_volume = float(np.prod(spacing))
    sizes = np.bincount(ref_cc.ravel(), minlength=n_ref + 1)
    kept = [k for k in range(1, n_ref + 1) if sizes[k] * voxel_volume > params.min_volume]
    match = _match_dilation if params.matching == "dilation" else _match_one_to_one
    pairs, claimed = match(pred_cc, ref_cc, n_pred, n_ref, params)  # {lesion: [components]}, {components}
    pred_boxes, ref_boxes = ndimage.find_objects(pred_cc), ndimage.find_objects(ref_cc)
    found, missed = [], 0  # (dice, hd95, nsd) of each kept lesion with components; kept lesions without
    for k in kept:
        comps = pairs.get(k)
        if not comps:
            missed += 1
            continue
        box = _union_box([ref_boxes[k - 1]] + [pred_boxes[c - 1] for c in comps], ref.shape)
        r, p = ref_cc[box] == k, np.isin(pred_cc[box], comps)
        found.append(_found_scores(p, r, spacing, params.nsd_tolerance))
    fp = n_pred - len(claimed)
    return {**_aggregate(found, missed, fp, params), "tp": len(found), "fp": fp, "fn": missed}


def _match_dilation(pred_cc, ref_cc, n_pred, n_ref, params):
    """BraTS 2023: a lesion owns every component touching its dilated mask."""
    from scipy import ndimage

    struct = ndimage.generate_binary_structure(ref_cc.ndim, 2)
    pairs, claimed = {}, set()
    for k, box in enumerate(ndimage.find_objects(ref_cc), start=1):
        if box is None:
            continue
        box = _union_box([box], ref_cc.shape, pad=params.dilation + 1)  # room for the dilation
        region = ref_cc[box] == k
        if params.dilation:
            region = ndimage.binary_dilation(region, struct, params.dilation)
        comps = np.unique(pred_cc[box][region])
        pairs[k] = [int(c) for c in comps if c]
        claimed.update(pairs[k])
    return pairs, claimed


def _match_one_to_one(pred_cc, ref_cc, n_pred, n_ref, params):
    """panoptica MaxBipartiteMatching: one component per lesion, maximising the summed Dice."""
    from scipy.optimize import linear_sum_assignment

    if not n_pred or not n_ref:
        return {}, set()
    both = (ref_cc > 0) & (pred_cc > 0)
    pair = ref_cc[both].astype(np.int64) * (n_pred + 1) + pred_cc[both]
    inter = np.bincount(pair, minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)
    r_size = np.bincount(ref_cc.ravel(), minlength=n_ref + 1)[1:, None]
    p_size = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)[None, 1:]
    dsc = 2 * inter[1:, 1:] / (r_size + p_size)  # (n_ref, n_pred)
    cost = np.where(dsc >= ONE_TO_ONE_MIN_DICE, 1.0 - dsc, 1.0 + 1e-6)
    rows, cols = linear_sum_assignment(cost)
    pairs = {int(i) + 1: [int(j) + 1] for i, j in zip(rows, cols) if cost[i, j] < 1.0}
    return pairs, {c for comps in pairs.values() for c in comps}


def _aggregate(found: list, missed: int, fp: int, params: LesionParams) -> dict:
    """(dice, hd95, nsd) of the found lesions, counts of missed and false ones -> the patient's score."""
    if params.penalised:  # missed and false lesions score (0, penalty, 0) each
        n = len(found) + missed + fp
        if n == 0:
            return {"dice": params.empty_dice, "hd95": params.empty_hd95, "nsd": params.empty_dice}
        return {"dice": sum(d for d, _, _ in found) / n,
                "hd95": (sum(h for _, h, _ in found) + (missed + fp) * params.penalty_hd95) / n,
                "nsd": sum(s for _, _, s in found) / n}
    if found:  # the mean over matched lesions alone
        return {k: float(np.mean([f[i] for f in found])) for i, k in enumerate(("dice", "hd95", "nsd"))}
    if missed or fp:
        return {"dice": 0.0, "hd95": params.penalty_hd95, "nsd": 0.0}
    return {"dice": params.empty_dice, "hd95": params.empty_hd95, "nsd": params.empty_dice}


def _union_box(boxes, shape, pad: int = 1) -> tuple:
    """Smallest box holding `boxes`, grown by `pad` voxels (clipped to the volume): with pad >= 1
    no region touches the box's border unless it touches the volume's, so erosions, distances and
    dilations of up to pad - 1 steps inside the box equal those in the whole volume."""
    return tuple(slice(max(min(b[a].start for b in boxes) - pad, 0), min(max(b[a].stop for b in boxes) + pad, n))
                 for a, n in enumerate(shape))
