"""`evaluate`: BraTS region metrics of predicted label maps against reference segmentations.

Per patient: Dice and HD95 (mm, from the voxel spacing) of the regions WT (labels 1, 2, ET),
TC (1, ET) and ET, plus Dice of the sub-regions NCR/NET (1), ED (2), ET.

Definitions follow the official BraTS evaluation package (brats-evaluation, built on panoptica):
Dice and HD95 of each region as a whole ("global" metrics). HD95 is the 95th percentile of the
pooled surface distances in both directions; surface voxels are a region minus its erosion with
a 6-connected (face) neighbourhood; distances in mm by Euclidean distance transform with the
file's voxel spacing (the official package assumes 1 mm; BraTS volumes are 1 mm isotropic, so
the two agree). Checked side by side: bench/official_eval_check.py, figures in BENCHMARKS.md.

Empty-set conventions (those of the BraTS 2018-2021 evaluation):
  * Dice: reference and prediction both empty -> 1; exactly one empty -> 0.
  * HD95: both empty -> 0; exactly one empty -> 373.13 mm, the diagonal of the 240x240x155
    BraTS volume at 1 mm.
  * A reference patient with no prediction file is scored as an empty prediction and listed.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from preprocess.discover import LABELS, discover
from preprocess.nifti import load_volume
from train.metrics import dice

EMPTY_HD95 = 373.12866  # sqrt(240**2 + 240**2 + 155**2)
REGIONS = ("WT", "TC", "ET")
SUBREGIONS = ("NCR", "ED", "ET")


def regions(labels: np.ndarray, et_label: int) -> dict[str, np.ndarray]:
    ncr, ed, et = labels == 1, labels == 2, labels == et_label
    return {"WT": ncr | ed | et, "TC": ncr | et, "ET": et}


def surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))
    return mask & ~eroded


def hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """95th-percentile Hausdorff distance in mm (pooled both directions), with the empty-set rules."""
    from scipy import ndimage

    pred, ref = pred.astype(bool), ref.astype(bool)
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return EMPTY_HD95
    sp, sr = surface(pred), surface(ref)
    # distance of every voxel to the nearest surface voxel of the other region
    d_to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    d_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(np.percentile(np.hstack((d_to_ref[sp], d_to_pred[sr])), 95))


def patient_metrics(pred: np.ndarray, ref: np.ndarray, spacing, et_label: int) -> dict:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {ref.shape}")
    rp, rr = regions(pred, et_label), regions(ref, et_label)
    row = {}
    for r in REGIONS:
        row[f"dice_{r}"] = dice(rp[r], rr[r])
    for r in REGIONS:
        row[f"hd95_{r}"] = hd95(rp[r], rr[r], spacing)
    for name, lab in zip(SUBREGIONS, (1, 2, et_label)):
        row[f"dice_sub_{name}"] = dice(pred == lab, ref == lab)
    return row


def _references(ref_dir: Path) -> dict[str, tuple[Path, int]]:
    """pid -> (segmentation path, enhancing label): a BraTS-layout folder or flat <pid>.nii.gz files."""
    flat = sorted(p for p in ref_dir.iterdir() if re.search(r"\.nii(\.gz)?$", p.name))
    if flat:
        out = {}
        for p in flat:
            pid = re.sub(r"(_seg)?\.nii(\.gz)?$", "", p.name)
            out[pid] = (p, 0)  # label convention read from the data below
        return out
    disc = discover(ref_dir, need_seg=True)
    return {p.pid: (p.files["seg"], LABELS[p.convention][-1]) for p in disc.patients if "seg" in p.files}


def evaluate(pred_dir: str | Path, ref_dir: str | Path, out_csv: str | Path | None = None,
             progress: bool = True) -> dict:
    from tqdm import tqdm

    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    refs = _references(ref_dir)
    rows, missing = [], []
    for pid, (ref_path, et_label) in tqdm(sorted(refs.items()), desc="patients", unit="patient",
                                          disable=None if progress else True):
        ref = load_volume(ref_path)
        candidates = [pred_dir / f"{pid}.nii.gz", pred_dir / f"{pid}.nii"]
        found = next((c for c in candidates if c.exists()), None)
        pred = load_volume(found).data if found else np.zeros(ref.data.shape, np.uint8)
        if not found:
            missing.append(pid)
        if et_label == 0:  # flat reference folder: 4 present -> 2020-style, 3 -> 2023-style
            vals = set(np.unique(ref.data).tolist()) | set(np.unique(pred).tolist())
            et_label = 3 if 3 in vals and 4 not in vals else 4
        spacing = np.sqrt((ref.affine[:3, :3] ** 2).sum(axis=0))
        row = {"patient": pid, **patient_metrics(np.asarray(pred), np.asarray(ref.data), spacing, et_label)}
        rows.append(row)
    summary = summarise(rows)
    if out_csv:
        write_csv(out_csv, rows)
    return {"rows": rows, "summary": summary, "missing": missing}


def summarise(rows: list[dict]) -> dict:
    if not rows:
        return {}
    keys = [k for k in rows[0] if k != "patient"]
    return {k: {"mean": float(np.mean([r[k] for r in rows])), "median": float(np.median([r[k] for r in rows])),
                "std": float(np.std([r[k] for r in rows]))} for k in keys}


def write_csv(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def format_summary(summary: dict, n: int) -> str:
    lines = [f"{n} patient(s)          mean     median        std"]
    for k, v in summary.items():
        lines.append(f"  {k:16s} {v['mean']:9.4f} {v['median']:10.4f} {v['std']:10.4f}")
    return "\n".join(lines)
