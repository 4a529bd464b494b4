"""Side-by-side check of `evaluate` against the official BraTS evaluation package.

    pip install brats-evaluation        # the official package (panoptica); not a project dependency
    python bench/official_eval_check.py [--patients 6]

Synthetic 2023-style references (1 mm isotropic), predictions made from them by shifting and
eroding/dilating (so Dice and HD95 are far from trivial); for WT, TC and ET the official
package's global Dice and HD95 next to ours. Last line: JSON with the largest differences.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from preprocess.nifti import save_volume
from preprocess.synthetic import make_case
from train.evaluate import patient_metrics


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=6)
    args = ap.parse_args()
    from importlib.resources import files

    from panoptica import Panoptica_Evaluator
    from scipy import ndimage

    evaluator = Panoptica_Evaluator.load_from_config(str(files("brats_evaluation").joinpath("configs", "config_gli.yaml")))
    tmp = Path(tempfile.mkdtemp())
    worst = {"dice": 0.0, "hd95": 0.0}
    rows, official_nan = [], 0
    for i in range(1, args.patients + 1):
        seg = make_case(i, (120, 120, 78), release="2023").seg
        shifted = np.roll(seg, shift=(i % 3, -1, 1), axis=(0, 1, 2))
        grow = ndimage.binary_dilation(shifted > 0) if i % 2 else ndimage.binary_erosion(shifted > 0)
        pred = np.where(grow, np.maximum(shifted, 2 * (shifted == 0)), 0).astype(np.uint8)
        ref_p, pred_p = tmp / f"ref_{i}.nii.gz", tmp / f"pred_{i}.nii.gz"
        save_volume(ref_p, seg, np.eye(4))
        save_volume(pred_p, pred, np.eye(4))
        ours = patient_metrics(pred, seg, (1.0, 1.0, 1.0), 3)
        official = evaluator.evaluate(str(pred_p), str(ref_p))
        for group, region in (("wt", "WT"), ("tc", "TC"), ("et", "ET")):
            r = official[group].to_dict(True)
            if np.isnan(r["global_bin_dsc"]):  # both empty: the package gives NaN, we give the BraTS 1 / 0
                official_nan += 1
                print(f"case {i} {region}: reference and prediction empty; official NaN, ours Dice "
                      f"{ours[f'dice_{region}']:.0f} HD95 {ours[f'hd95_{region}']:.0f}")
                continue
            d_dice = abs(ours[f"dice_{region}"] - r["global_bin_dsc"])
            d_hd = abs(ours[f"hd95_{region}"] - r["global_bin_hd95"])
            worst["dice"], worst["hd95"] = max(worst["dice"], d_dice), max(worst["hd95"], d_hd)
            rows.append((i, region, ours[f"dice_{region}"], r["global_bin_dsc"], ours[f"hd95_{region}"],
                         r["global_bin_hd95"]))
            print(f"case {i} {region}: Dice ours {rows[-1][2]:.6f} official {rows[-1][3]:.6f}   "
                  f"HD95 ours {rows[-1][4]:.4f} official {rows[-1][5]:.4f}")
    print(json.dumps({"comparisons": len(rows), "max_abs_diff_dice": worst["dice"], "max_abs_diff_hd95": worst["hd95"],
                      "both_empty_official_nan": official_nan}))


if __name__ == "__main__":
    main()
