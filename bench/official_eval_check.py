"""Side-by-side check of `evaluate` against the official BraTS evaluation packages.

    pip install brats-evaluation        # the official package (panoptica); not a project dependency
    python bench/official_eval_check.py [--patients 8] [--brats2023-metrics DIR]

Synthetic 2023-style references with several lesions: two tumours (the second a mirrored tumour
of another case), a small 27-voxel enhancing lesion in every third case; odd cases at 1 mm
isotropic, even ones at 0.9 x 1.0 x 1.5 mm (so the NSD tolerance, the smallest spacing, is 0.9 mm).
Predictions made from them by shifting and eroding/dilating, missing the second tumour in every
other case, with 1-4 spurious blobs of 1 to 27 voxels, in every fourth case the enhancing tumour
moved where it touches no reference voxel (the scorer's zero-overlap rule), in case 6 (mod 8) no
enhancing tumour predicted, in case 7 (mod 8) none in either. For WT, TC, ET:
  * global Dice, HD95 and NSD against brats-evaluation's `global_bin_dsc` / `global_bin_hd95` /
    `global_bin_nsd` (its brats-parse-metrics columns global_dsc / global_hd95 / global_nsd);
  * lesion-wise Dice, HD95, NSD and TP/FP/FN with the rules `BRATS_EVALUATION` against its
    `sq_dsc` / `sq_hd95` / `sq_nsd` / `tp` `fp` `fn` (reported as lesionwise_dsc_mean,
    lesionwise_hd95_mean, lesionwise_nsd_mean);
  * the package's own readings of two things, counted apart: its global metrics take no voxel
    spacing (HD95 in voxels, NSD at a 0.5-voxel tolerance: `evaluate`'s nsd_* follow, its hd95_*
    stay in mm, equal at 1 mm), so on anisotropic cases the global HD95 gap is reported as
    global_hd95_anisotropic_max_gap_mm; and given a file it reads the spacing in reverse axis order
    (SimpleITK's (x, y, z) spacing against its (z, y, x) array), so anisotropic cases are compared
    against the package given the arrays and the spacing, and the regions where its file reading
    changes the lesion-wise HD95 are counted (anisotropic_regions_file_differs);
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
    if i % 4 == 0:  # the enhancing tumour moved off every reference voxel: zero overlap, both non-empty
        base = np.where(ref == 3, 1, ref).astype(np.uint8)
        base[100:104, 100:104, 60:64] = 3
        assert not ref[100:104, 100:104, 60:64].any()
    else:
        base = ref if i % 2 else np.where(second > 0, 0, ref).astype(np.uint8)  # even i: second tumour missed
    shifted = np.roll(base, shift=(i % 3, -1, 1), axis=(0, 1, 2))
    grow = ndimage.binary_dilation(shifted > 0) if i % 2 else ndimage.binary_erosion(shifted > 0)
    pred = np.where(grow, np.maximum(shifted, 2 * (shifted == 0)), 0).astype(np.uint8)
    for _ in range(i % 4 + 1):  # spurious blobs of 1 to 3 voxels a side, any label
        side, at = rng.integers(1, 4), rng.integers(5, np.array(SHAPE) - 8)
        pred[at[0]:at[0] + side, at[1]:at[1] + side, at[2]:at[2] + side] = rng.integers(1, 4)
    if i % 8 == 6:  # no enhancing tumour predicted: one side empty
        pred[pred == 3] = 1
    if i % 8 == 7:  # none in either: both sides empty
        ref[ref == 3], pred[pred == 3] = 1, 1
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
    ap.add_argument("--patients", type=int, default=8)
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
    columns = {"global": ("dice", "hd95", "nsd"), "lesion_brats_evaluation": ("dice", "hd95", "nsd"),
               "lesion_brats2023": ("dice", "hd95")}
    worst = {k: {**{c: 0.0 for c in cols}, "count_mismatches": 0} for k, cols in columns.items()}
    notes = {"comparisons": 0, "official_nan_both_empty": 0, "official_inf_one_empty": 0,
             "official_inf_no_overlap": 0, "lesions_brats_evaluation_rules": {"ref": 0, "fp": 0, "fn": 0},
             "anisotropic_regions_file_differs": 0, "global_hd95_anisotropic_max_gap_mm": 0.0}

    def record(kind: str, counts_equal: bool = True, **gaps):
        for c, g in gaps.items():
            worst[kind][c] = max(worst[kind][c], g)
        worst[kind]["count_mismatches"] += not counts_equal

    for i in range(1, args.patients + 1):
        ref, pred = make_pair(i)
        spacing = (1.0, 1.0, 1.0) if i % 2 else (0.9, 1.0, 1.5)
        ref_p, pred_p = tmp / f"ref_{i}.nii.gz", tmp / f"pred_{i}.nii.gz"
        save_volume(ref_p, ref, np.diag([*spacing, 1.0]))
        save_volume(pred_p, pred, np.diag([*spacing, 1.0]))
        ours = patient_metrics(pred, ref, spacing, R2023)
        rp = to_regions(subregion_channels(pred, R2023), "subregions")  # (3, X, Y, Z) [WT, TC, ET]
        rr = to_regions(subregion_channels(ref, R2023), "subregions")
        official = evaluator.evaluate(str(pred_p), str(ref_p), verbose=False)
        if len(set(spacing)) > 1:  # the package reads files with their spacing reversed (see the docstring)
            from_file, official = official, evaluator.evaluate(pred, ref, voxelspacing=spacing, verbose=False)
            notes["anisotropic_regions_file_differs"] += sum(
                from_file[r.lower()].to_dict(True)["sq_hd95"] != official[r.lower()].to_dict(True)["sq_hd95"]
                for r in REGIONS)
        for k, region in enumerate(REGIONS):
            notes["comparisons"] += 1
            o = official[region.lower()].to_dict(True)
            g = {m: ours[f"{m}_{region}"] for m in ("dice", "hd95", "nsd")}
            if math.isnan(o["global_bin_dsc"]):  # both empty: the package gives NaN, we give the BraTS 1 / 0 / 1
                notes["official_nan_both_empty"] += 1
            elif math.isinf(o["global_bin_hd95"]):  # one side empty, or no voxel in common: inf
                one_empty = not rp[k].any() or not rr[k].any()
                notes["official_inf_one_empty" if one_empty else "official_inf_no_overlap"] += 1
                assert not one_empty or g["hd95"] == EMPTY_HD95  # ours: 373.13 mm; with no overlap, the distance
                record("global", dice=gap(g["dice"], o["global_bin_dsc"]), nsd=gap(g["nsd"], o["global_bin_nsd"]))
            else:
                gaps = {m: gap(g[m], o[f"global_bin_{m.replace('dice', 'dsc')}"]) for m in g}
                if len(set(spacing)) > 1:  # the package's global HD95 is in voxels, ours in mm
                    notes["global_hd95_anisotropic_max_gap_mm"] = max(notes["global_hd95_anisotropic_max_gap_mm"],
                                                                     gaps.pop("hd95"))
                record("global", **gaps)
            lw = lesion_metrics(rp[k], rr[k], spacing, BRATS_EVALUATION)
            same = (lw["tp"], lw["fp"], lw["fn"]) == (o["tp"], o["fp"], o["fn"])
            record("lesion_brats_evaluation", same, dice=gap(lw["dice"], o["sq_dsc"]),
                   hd95=gap(lw["hd95"], o["sq_hd95"]), nsd=gap(lw["nsd"], o["sq_nsd"]))
            for key, n in (("ref", lw["tp"] + lw["fn"]), ("fp", lw["fp"]), ("fn", lw["fn"])):
                notes["lesions_brats_evaluation_rules"][key] += n
            line = (f"case {i} {region}: global Dice {g['dice']:.4f} / {o['global_bin_dsc']:.4f} HD95 "
                    f"{g['hd95']:.3f} / {o['global_bin_hd95']:.3f} NSD {g['nsd']:.4f} / {o['global_bin_nsd']:.4f} | "
                    f"lesion-wise (brats-evaluation rules) TP/FP/FN {lw['tp']}/{lw['fp']}/{lw['fn']} vs "
                    f"{o['tp']}/{o['fp']}/{o['fn']} Dice {lw['dice']:.4f} / {o['sq_dsc']:.4f} HD95 {lw['hd95']:.3f} / "
                    f"{o['sq_hd95']:.3f} NSD {lw['nsd']:.4f} / {o['sq_nsd']:.4f}")
            if reference_2023 is not None:
                line += compare_2023(reference_2023, rp[k], rr[k], spacing, ours, region, pred_p, ref_p, record)
            print(line)
    if reference_2023 is None:
        worst["lesion_brats2023"] = None
    print(json.dumps({"cases": args.patients, **notes,
                      **{f"max_abs_diff_{k}": v for k, v in worst.items()}}))


def compare_2023(module, pred_mask, ref_mask, spacing, ours, region, pred_p, ref_p, record) -> str:
    """evaluate's lesion-wise columns (rules BRATS_2023) against the BraTS 2023 code; one line."""
    b23 = lesion_metrics(pred_mask, ref_mask, spacing)  # the rules of evaluate's columns
    assert b23["dice"] == ours[f"lesion_dice_{region}"] and b23["hd95"] == ours[f"lesion_hd95_{region}"]
    t = brats2023_reference(module, pred_p, ref_p, region)
    record("lesion_brats2023", all(b23[c] == t[c] for c in ("tp", "fp", "fn")), dice=gap(b23["dice"], t["dice"]),
           hd95=gap(b23["hd95"], t["hd95"]))
    return (f" | BraTS 2023 rules TP/FP/FN {b23['tp']}/{b23['fp']}/{b23['fn']} vs {t['tp']}/{t['fp']}/"
            f"{t['fn']} Dice {b23['dice']:.4f} / {t['dice']:.4f} HD95 {b23['hd95']:.3f} / {t['hd95']:.3f}")


if __name__ == "__main__":
    main()
