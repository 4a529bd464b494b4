"""Side-by-side check of `evaluate` against the official BraTS evaluation packages.

    pip install brats-evaluation        # the official package (panoptica); not a project dependency
    python bench/official_eval_check.py [--patients 6] [--brats2023-metrics DIR]

Synthetic 2023-style references (1 mm isotropic) with several lesions: two tumours (the second a
mirrored tumour of another case), a small 27-voxel enhancing lesion in every third case.
Predictions made from them by shifting and eroding/dilating, missing the second tumour in every
other case, and with 1-4 spurious blobs of 1 to 27 voxels. For WT, TC and ET:
  * global Dice and HD95 against brats-evaluation's `global_bin_dsc` / `global_bin_hd95`;
  * lesion-wise Dice, HD95 and TP/FP/FN with the rules `BRATS_EVALUATION` against its
    `sq_dsc` / `sq_hd95` / `tp` `fp` `fn` (what its brats-parse-metrics reports as
    lesionwise_dsc_mean / lesionwise_hd95_mean);
  * with --brats2023-metrics DIR (a checkout of github.com/rachitsaluja/BraTS-2023-Metrics with the
    brats_2023_metrics package; needs `pip install connected-components-3d`): the lesion-wise
    columns of `evaluate` (rules BRATS_2023) against that code with its BraTS-GLI parameters. Its
    get_lesion_wise_score does the lesion work (components, dilation, matching, per-lesion Dice
    and HD95, FPs); its get_lesion_wise_results no longer runs on pandas 2 (DataFrame.replace
    over arrays), so `brats2023_reference` below restates its last ten lines (size threshold,
    374 penalties, the division).
Last line: JSON with the largest absolute differences of each comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from preprocess.nifti import save_volume
from preprocess.synthetic.toy import make_case
from shards.domain import REGIONS, RELEASES, subregion_channels, to_regions
from train.evaluate import EMPTY_HD95, patient_metrics
from train.lesionwise import BRATS_EVALUATION, lesion_metrics

SHAPE = (120, 120, 78)
R2023 = RELEASES["2023"]


def make_pair(i: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference, prediction) label maps of case i with several lesions."""
    from scipy import ndimage

    rng = np.random.default_rng(i)
    first = make_case(i, SHAPE, release="2023").seg
    second = np.flip(make_case(i + 50, SHAPE, release="2023").seg, axis=0)
    ref = np.where(first > 0, first, second).astype(np.uint8)
    if i % 3 == 0:
        ref[8:11, 8:11, 8:11] = 3  # 27 voxels: below the 50 mm^3 minimum of BraTS 2023
    base = ref if i % 2 else np.where(second > 0, 0, ref).astype(np.uint8)  # even i: second tumour missed
    shifted = np.roll(base, shift=(i % 3, -1, 1), axis=(0, 1, 2))
    grow = ndimage.binary_dilation(shifted > 0) if i % 2 else ndimage.binary_erosion(shifted > 0)
    pred = np.where(grow, np.maximum(shifted, 2 * (shifted == 0)), 0).astype(np.uint8)
    for _ in range(i % 4 + 1):  # spurious blobs of 1 to 3 voxels a side, any label
        side, at = rng.integers(1, 4), rng.integers(5, np.array(SHAPE) - 8)
        pred[at[0]:at[0] + side, at[1]:at[1] + side, at[2]:at[2] + side] = rng.integers(1, 4)
    return ref, pred


def brats2023_reference(module, pred_path: Path, ref_path: Path, region: str) -> dict:
    """The BraTS 2023 lesion-wise score of one region by the 2023 code (see the docstring)."""
    dilation, min_volume = module.get_challenge_parameters("BraTS-GLI")
    store = module.get_lesion_wise_score(str(pred_path), str(ref_path), region, dilation)
    kept = [(len(comps) > 0, d, 374.0 if math.isinf(h) else h) for comps, _, vol, d, h in store["metric_pairs"]
            if vol > min_volume]
    n_fp = len(store["fp"])
    n = len(kept) + n_fp
    tp = sum(found for found, _, _ in kept)
    if n == 0:
        return {"dice": 1.0, "hd95": 0.0, "tp": 0, "fp": 0, "fn": 0}
    return {"dice": sum(d for _, d, _ in kept) / n, "hd95": (sum(h for _, _, h in kept) + 374.0 * n_fp) / n,
            "tp": tp, "fp": n_fp, "fn": len(kept) - tp}


def gap(ours: float, theirs: float) -> float:
    """|ours - theirs|, 0 where both are the same infinity or both NaN, inf where only one is."""
    if (math.isnan(ours) and math.isnan(theirs)) or ours == theirs:
        return 0.0
    if not (math.isfinite(ours) and math.isfinite(theirs)):
        return math.inf
    return abs(ours - theirs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=6)
    ap.add_argument("--brats2023-metrics", type=Path, default=None,
                    help="checkout of rachitsaluja/BraTS-2023-Metrics (the folder holding brats_2023_metrics/)")
    args = ap.parse_args()
    from importlib.resources import files

    from panoptica import Panoptica_Evaluator

    reference_2023 = None
    if args.brats2023_metrics:
        sys.path.insert(0, str(args.brats2023_metrics))
        if "Inf" not in np.__dict__:  # the 2023 code predates NumPy 2, which dropped np.Inf
            np.Inf = np.inf
        from brats_2023_metrics.surface_distance import brats_metrics as reference_2023

    config = files("brats_evaluation").joinpath("configs", "config_gli.yaml")
    evaluator = Panoptica_Evaluator.load_from_config(str(config))
    tmp = Path(tempfile.mkdtemp())
    worst = {k: {"dice": 0.0, "hd95": 0.0, "count_mismatches": 0} for k in ("global", "lesion_brats_evaluation",
                                                                          "lesion_brats2023")}
    notes = {"comparisons": 0, "official_nan_both_empty": 0, "official_inf_one_empty": 0,
             "lesions_brats_evaluation_rules": {"ref": 0, "fp": 0, "fn": 0}}

    def record(kind: str, d_dice: float, d_hd: float, counts_equal: bool = True):
        w = worst[kind]
        w["dice"], w["hd95"] = max(w["dice"], d_dice), max(w["hd95"], d_hd)
        w["count_mismatches"] += not counts_equal

    for i in range(1, args.patients + 1):
        ref, pred = make_pair(i)
        ref_p, pred_p = tmp / f"ref_{i}.nii.gz", tmp / f"pred_{i}.nii.gz"
        save_volume(ref_p, ref, np.eye(4))
        save_volume(pred_p, pred, np.eye(4))
        ours = patient_metrics(pred, ref, (1.0, 1.0, 1.0), R2023)
        rp = to_regions(subregion_channels(pred, R2023), "subregions")  # (3, X, Y, Z) [WT, TC, ET]
        rr = to_regions(subregion_channels(ref, R2023), "subregions")
        official = evaluator.evaluate(str(pred_p), str(ref_p), verbose=False)
        for k, region in enumerate(REGIONS):
            notes["comparisons"] += 1
            o = official[region.lower()].to_dict(True)
            g_dice, g_hd = ours[f"dice_{region}"], ours[f"hd95_{region}"]
            if math.isnan(o["global_bin_dsc"]):  # both empty: the package gives NaN, we give the BraTS 1 / 0
                notes["official_nan_both_empty"] += 1
            elif math.isinf(o["global_bin_hd95"]) and g_hd == EMPTY_HD95:  # one empty: inf, ours 373.13
                notes["official_inf_one_empty"] += 1
                record("global", gap(g_dice, o["global_bin_dsc"]), 0.0)
            else:
                record("global", gap(g_dice, o["global_bin_dsc"]), gap(g_hd, o["global_bin_hd95"]))
            lw = lesion_metrics(rp[k], rr[k], (1.0, 1.0, 1.0), BRATS_EVALUATION)
            same = (lw["tp"], lw["fp"], lw["fn"]) == (o["tp"], o["fp"], o["fn"])
            record("lesion_brats_evaluation", gap(lw["dice"], o["sq_dsc"]), gap(lw["hd95"], o["sq_hd95"]), same)
            for key, n in (("ref", lw["tp"] + lw["fn"]), ("fp", lw["fp"]), ("fn", lw["fn"])):
                notes["lesions_brats_evaluation_rules"][key] += n
            line = (f"case {i} {region}: global Dice {g_dice:.4f} / {o['global_bin_dsc']:.4f} HD95 {g_hd:.3f} / "
                    f"{o['global_bin_hd95']:.3f} | lesion-wise (brats-evaluation rules) TP/FP/FN "
                    f"{lw['tp']}/{lw['fp']}/{lw['fn']} vs {o['tp']}/{o['fp']}/{o['fn']} Dice {lw['dice']:.4f} / "
                    f"{o['sq_dsc']:.4f} HD95 {lw['hd95']:.3f} / {o['sq_hd95']:.3f}")
            if reference_2023 is not None:
                b23 = lesion_metrics(rp[k], rr[k], (1.0, 1.0, 1.0))  # the rules of evaluate's columns
                assert b23["dice"] == ours[f"lesion_dice_{region}"] and b23["hd95"] == ours[f"lesion_hd95_{region}"]
                t = brats2023_reference(reference_2023, pred_p, ref_p, region)
                same = all(b23[c] == t[c] for c in ("tp", "fp", "fn"))
                record("lesion_brats2023", gap(b23["dice"], t["dice"]), gap(b23["hd95"], t["hd95"]), same)
                line += (f" | BraTS 2023 rules TP/FP/FN {b23['tp']}/{b23['fp']}/{b23['fn']} vs {t['tp']}/{t['fp']}/"
                         f"{t['fn']} Dice {b23['dice']:.4f} / {t['dice']:.4f} HD95 {b23['hd95']:.3f} / {t['hd95']:.3f}")
            print(line)
    if reference_2023 is None:
        worst["lesion_brats2023"] = None
    print(json.dumps({"cases": args.patients, **notes,
                      **{f"max_abs_diff_{k}": v for k, v in worst.items()}}))


if __name__ == "__main__":
    main()
