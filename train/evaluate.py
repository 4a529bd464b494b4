"""`evaluate`: BraTS region metrics of predicted label maps against reference segmentations.

Per patient: Dice, HD95 (mm, from the voxel spacing) and NSD of the regions WT (labels 1, 2, ET),
TC (1, ET) and ET, plus Dice of the sub-regions NCR/NET (1), ED (2), ET (columns `dice_sub_NCR/NET`,
...), then the lesion-wise Dice, HD95 and NSD of each region (`lesion_dice_WT`, ..., `lesion_nsd_ET`).
Labels follow the release (`shards.domain.RELEASES`), read from the reference folder's file
names; for a flat folder of <pid>.nii.gz files, the one `--release` names, else the one the ids
tell (`release_of_id`; BraTS-PED ids need the name), else the glioma convention (2018-2021 or
2023) the reference's label values fit, which the output states. A prediction or reference
holding a value that is not a label of its release (another convention's label, 7, -3, 0.999,
NaN) fails that patient, naming the values: it would otherwise be scored as background. Releases other than the glioma sets
are scored on their own regions and sub-regions (gli-2024: WT, TC, ET and RC; MEN-RT: GTV), as
their official configs group them; the columns then name those.

Global metrics follow the official BraTS evaluation package (brats-evaluation, built on
panoptica): Dice, HD95 and NSD of each region as a whole. HD95 is the 95th percentile of the pooled
surface distances in both directions; surface voxels are a region minus its erosion with a
6-connected (face) neighbourhood; distances in mm by Euclidean distance transform with the
file's voxel spacing (`train.lesionwise.hd95`). NSD (normalised surface distance, or surface
Dice) is the share of both surfaces within a tolerance of the other (`train.lesionwise.nsd`). The
package computes its global metrics without the voxel spacing (panoptica_result.py
`_calc_global_bin_metric` calls them without it), so its global NSD measures in voxels with the
default tolerance of 0.5 voxel: the share of each region's surface voxels lying on the other's
surface; `nsd_*` is that. (Its global HD95 is in voxels too: the same as this one's mm at 1 mm
isotropic, as every BraTS release is; on other spacings `hd95_*` stays in mm.) Regions with no
voxel in common score NSD 0, the package's zero-overlap rule. Checked side by side:
bench/official_eval_check.py, figures in BENCHMARKS.md.

Lesion-wise metrics (`train.lesionwise`, rules `LESION_PARAMS`): those the BraTS 2023 and 2024
challenges ranked on (github.com/rachitsaluja/BraTS-2023-Metrics, the BraTS-GLI parameters).
A lesion is a 26-connected component of the region; reference lesions whose 3-voxel dilations
(18-connected element) touch are one lesion; a lesion is found by every predicted component
touching its 3-voxel dilation and scored with Dice, HD95 and NSD against their union. A missed
lesion and a predicted component touching no lesion each score Dice 0, HD95 374 mm and NSD 0
(the 2023 code had no NSD; it is scored here by the same rules); reference lesions of at most
50 mm^3 are not scored. The patient's value is the sum over lesions divided by the count of
found + missed + false lesions; none of any kind: Dice 1, HD95 0, NSD 1. (The current official package reports instead the mean over one-to-one matched lesions
without penalties; `train.lesionwise.BRATS_EVALUATION` computes that one.)

Empty-set conventions of the global metrics (those of the BraTS 2018-2021 evaluation):
  * Dice and NSD: reference and prediction both empty -> 1 (the package: NaN); exactly one
    empty -> 0.
  * HD95: both empty -> 0; exactly one empty -> 373.13 mm, the diagonal of the 240x240x155
    BraTS volume at 1 mm.
  * A reference patient with no prediction file is scored as an empty prediction and listed.

Geometry: prediction and reference are both reoriented to RAS+ before comparing, so a file that
stores the same voxels in another axis order (LPS vs RAS) scores the same. A prediction on
another grid (shape, or an affine placing its voxels elsewhere) or one that cannot be read fails
that patient, named with the reason, and the others are still scored.
"""

from __future__ import annotations

import csv
import itertools
import re
from pathlib import Path

import numpy as np

from preprocess.discover import DiscoveryError, discover
from preprocess.geometry import affine_problem, apply_ornt, canonical_affine, canonical_ornt, spacing_of
from preprocess.nifti import load_volume
from shards.domain import (REGIONS, RELEASES, SEG, SUBREGIONS, Release, release_name, release_of_id,
                           release_of_values, subregion_channels, to_regions)
from shards import MANIFEST
from shards.errors import BratsShardsError
from shards.source import ShardSource
from train.lesionwise import BRATS_2023, EMPTY_HD95, hd95, lesion_metrics, nsd  # noqa: F401 (EMPTY_HD95: re-exported)
from train.config import TrainConfig
from train.data import fold_patients
from train.metrics import dice
from train.runfolder import read_run_config

LESION_PARAMS = BRATS_2023  # the rules of the lesion-wise columns
# The package computes its global metrics without the voxel spacing (distances in voxels), so its
# global NSD has the default tolerance of 0.5 (voxels): only coinciding surface voxels count.
GLOBAL_NSD_SPACING, GLOBAL_NSD_TOLERANCE = (1.0, 1.0, 1.0), 0.5
COLUMNS = (["patient"] + [f"dice_{r}" for r in REGIONS] + [f"hd95_{r}" for r in REGIONS]
           + [f"nsd_{r}" for r in REGIONS] + [f"dice_sub_{r}" for r in SUBREGIONS]
           + [f"lesion_{m}_{r}" for m in ("dice", "hd95", "nsd") for r in REGIONS])
# Two grids are the same when every voxel centre of one lies within this fraction of a voxel of
# the other's: header float32 rounding moves them by ~1e-5 mm, a real shift by a voxel or more.
GRID_TOLERANCE = 0.01


class EvaluateError(BratsShardsError, ValueError):
    """The run as a whole cannot be scored (no references, no predictions); names the folder."""


class PatientFailed(Exception):
    """One patient cannot be scored; the one-line message names the file and why."""


def patient_metrics(pred: np.ndarray, ref: np.ndarray, spacing, rel: Release) -> dict:
    """Label maps in the labels of `rel` -> one row of the columns in COLUMNS (less `patient`)."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {ref.shape}")
    sp, sr = subregion_channels(pred, rel), subregion_channels(ref, rel)  # (K, X, Y, Z) glioma [NCR/NET, ED, ET]
    rp, rr = to_regions(sp, "subregions", 0, rel), to_regions(sr, "subregions", 0, rel)  # glioma [WT, TC, ET]
    row = {}
    for i, r in enumerate(rel.regions):
        row[f"dice_{r}"] = dice(rp[i], rr[i])
    for i, r in enumerate(rel.regions):
        row[f"hd95_{r}"] = hd95(rp[i], rr[i], spacing)
    for i, r in enumerate(rel.regions):
        row[f"nsd_{r}"] = nsd(rp[i], rr[i], GLOBAL_NSD_SPACING, GLOBAL_NSD_TOLERANCE)  # as the package: in voxels
    for i, name in enumerate(rel.subregions):
        row[f"dice_sub_{name}"] = dice(sp[i], sr[i])
    lesion = [lesion_metrics(rp[i], rr[i], spacing, LESION_PARAMS) for i in range(len(rel.regions))]
    for m in ("dice", "hd95", "nsd"):
        for i, r in enumerate(rel.regions):
            row[f"lesion_{m}_{r}"] = lesion[i][m]
    return row


def _references(ref_dir: Path, release: str | None = None) -> dict[str, tuple[Path, Release | None]]:
    """pid -> (segmentation path, release; None: read from the label values): a BraTS-layout
    folder or flat <pid>.nii.gz files (read as `release` when it is given)."""
    if not ref_dir.is_dir():
        raise EvaluateError(f"reference folder {ref_dir} does not exist or is not a folder")
    flat = sorted(p for p in ref_dir.iterdir() if re.search(r"\.nii(\.gz)?$", p.name))
    if flat:
        return _flat_references(flat, _named_release(release))
    try:
        disc = discover(ref_dir, need_seg=True, release=release)
    except DiscoveryError as e:
        raise EvaluateError(str(e)) from e
    return {p.pid: (p.files[SEG], p.release) for p in disc.patients if SEG in p.files}


def _named_release(name: str | None) -> Release | None:
    if name is None:
        return None
    name = release_name(name)
    if name not in RELEASES:
        raise EvaluateError(f"unknown --release {name!r}; known: {', '.join(RELEASES)}")
    return RELEASES[name]


def _flat_references(files: list[Path], named: Release | None) -> dict[str, tuple[Path, Release | None]]:
    """Flat <pid>.nii.gz references: the named release, else the one the id tells, else None (the
    glioma convention read from the label values). Ids that several releases share with other
    labels (BraTS-PED) need the name; one run scores one set of columns."""
    out = {}
    for p in files:
        pid = re.sub(r"(_seg)?\.nii(\.gz)?$", "", p.name)
        rel = named or release_of_id(pid)
        shared = [r.name for r in RELEASES.values() if not r.detect and r.id_pattern and r.matches_id(pid)]
        if rel is None and shared:  # PED 2023 and 2024: same ids, other labels; never guessed
            raise EvaluateError(f"{p}: releases {' and '.join(shared)} name their cases alike but label them "
                                f"differently; name the one this is (--release {shared[0]} or {shared[-1]})")
        out[pid] = (p, rel)
    _one_convention(out)
    return out


def _one_convention(refs: dict) -> None:
    """Refuse a folder mixing releases scored on other regions (MEN-RT and 2020 ids): one CSV, one
    set of columns. Ids that tell no release are glioma (2018-2021 or 2023: the same columns)."""
    seen = {}
    for pid, (_, rel) in sorted(refs.items()):
        rel = rel or RELEASES["2020"]
        seen.setdefault((tuple(rel.regions), tuple(rel.subregions)), (pid, rel.name))
    if len(seen) > 1:
        (a, ra), (b, rb) = list(seen.values())[:2]
        raise EvaluateError(f"reference folder mixes releases scored on other regions: {a} is {ra}, {b} is {rb}; "
                            f"evaluate each release separately")


def _predictions(pred_dir: Path, refs: dict, ref_dir: Path) -> dict[str, Path | None]:
    """pid -> its prediction file (None: missing). A folder with none for any reference patient is
    a mistyped path or a naming mismatch, not a run that scored 0 everywhere."""
    if not pred_dir.is_dir():
        raise EvaluateError(f"prediction folder {pred_dir} does not exist or is not a folder")
    found = {pid: next((c for c in (pred_dir / f"{pid}.nii.gz", pred_dir / f"{pid}.nii") if c.exists()), None)
             for pid in refs}
    if not any(found.values()):
        raise EvaluateError(f"prediction folder {pred_dir} holds no prediction for any of the {len(refs)} "
                            f"reference patient(s) in {ref_dir} (expected e.g. {min(refs)}.nii.gz)")
    return found


def _load(path: Path, what: str):
    try:
        return load_volume(path)
    except Exception as e:  # whatever is wrong with the file (not NIfTI, truncated), it is this patient's
        raise PatientFailed(f"{what} {path} cannot be read: {type(e).__name__}: {e}") from e


def _canonical(vol, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, affine) reoriented to RAS+: files storing the same voxels in another axis order
    then compare voxel by voxel."""
    data = np.asarray(vol.data)
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):  # (X, Y, Z, 1), as some tools write
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise PatientFailed(f"{path} holds an array of shape {data.shape}, not a 3-D label map")
    if (why := affine_problem(vol.affine)) is not None:  # NaN or singular: no orientation to read
        raise PatientFailed(f"{path} {why}")
    ornt = canonical_ornt(vol.affine)
    return np.ascontiguousarray(apply_ornt(data, ornt)), canonical_affine(vol.affine, ornt, data.shape)


def _check_grid(path: Path, pred_shape, pred_affine, ref_shape, ref_affine) -> None:
    """Refuse to score a prediction whose voxels are not the reference's (both in RAS+ order)."""
    if pred_shape != ref_shape:
        raise PatientFailed(f"{path}: shape {pred_shape} differs from the reference's {ref_shape} "
                            f"(both reoriented to RAS)")
    # the affine maps are linear, so the largest gap between the grids is at a corner voxel
    corners = np.array([[*c, 1.0] for c in itertools.product(*[(0, n - 1) for n in ref_shape])]).T
    gap = float(np.abs((pred_affine - ref_affine) @ corners)[:3].max())
    tol = GRID_TOLERANCE * min(spacing_of(ref_affine))
    if not gap <= tol:  # NaN affines fail too
        raise PatientFailed(f"{path}: its affine places voxels up to {gap:.3g} mm from the reference's "
                            f"(tolerance {tol:.3g} mm): not the reference's grid")


def score_patient(pid: str, ref_path: Path, rel: Release | None, pred_path: Path | None,
                  assumed: dict | None = None) -> dict:
    """One patient's metrics row; PatientFailed when a file cannot be read, the grids differ or a
    label map holds values that are not labels of the release. `assumed` collects pid -> release
    for references whose release was read from their label values (flat folder, no --release)."""
    ref, ref_affine = _canonical(_load(ref_path, "reference"), ref_path)
    ref_values = _label_values(ref, ref_path, "reference")
    if pred_path is None:
        pred, pred_values = np.zeros(ref.shape, np.uint8), {0}
    else:
        pred, pred_affine = _canonical(_load(pred_path, "prediction"), pred_path)
        _check_grid(pred_path, pred.shape, pred_affine, ref.shape, ref_affine)
        pred_values = _label_values(pred, pred_path, "prediction")
    if rel is None:  # flat reference folder, no --release: the glioma convention its labels fit
        rel = _glioma_of_values(ref_values, pred_values, ref_path)
        if assumed is not None:
            assumed[pid] = rel.name
    _check_labels(ref_values, rel, ref_path, "reference", "name its release with --release")
    _check_labels(pred_values, rel, pred_path, "prediction", "write predictions in the reference's labels")
    spacing = spacing_of(ref_affine)  # RAS axis order, as the arrays now are
    return {"patient": pid, **patient_metrics(pred.astype(np.int16, copy=False), ref.astype(np.int16, copy=False),
                                              spacing, rel)}


def _label_values(data: np.ndarray, path: Path, what: str) -> set[int]:
    """The distinct values of a label map, as ints; PatientFailed when they are not whole finite
    numbers (0.999 x label, NaN, a complex or structured array): such a map has no labels to score."""
    if data.dtype.kind not in "biuf":
        raise PatientFailed(f"{what} {path} holds {data.dtype} values, not integer labels")
    if data.dtype.kind == "f":
        if np.isnan(data).any():
            raise PatientFailed(f"{what} {path} holds NaN values, not integer labels")
        if np.isinf(data).any():
            raise PatientFailed(f"{what} {path} holds infinite values, not integer labels")
        fractional = data != np.round(data)
        if fractional.any():
            raise PatientFailed(f"{what} {path} holds values that are not whole numbers (e.g. "
                                f"{float(data[fractional].flat[0]):.6g}), not integer labels")
    return {int(v) for v in np.unique(data).tolist()}


def _check_labels(values: set[int], rel: Release, path: Path | None, what: str, hint: str) -> None:
    """Every value must be a label of `rel`: another convention's label (2023's ET 3 against 2020
    references) or a stray value would otherwise be scored as background without a word."""
    bad = sorted(values - set(rel.label_values))
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise PatientFailed(f"{what} {path} holds label(s) {shown}, not labels of release {rel.name} "
                            f"({', '.join(map(str, rel.label_values))}); {hint}")


GLIOMA_CONVENTIONS = (RELEASES["2020"], RELEASES["2023"])


def _glioma_of_values(ref_values: set[int], pred_values: set[int], ref_path: Path) -> Release:
    """The glioma convention of a reference that comes without a release: the one its labels fit
    (2018-2021: 0, 1, 2, 4; 2023: 0, 1, 2, 3); when both do (no ET, or no label above 2), the one
    the prediction's ET label tells, else 2018-2021. Labels that fit neither are refused."""
    fits = [r for r in GLIOMA_CONVENTIONS if ref_values <= set(r.label_values)]
    if not fits:
        raise PatientFailed(f"reference {ref_path} holds labels {', '.join(map(str, sorted(ref_values)))}, which fit "
                            f"neither the 2018-2021 (0, 1, 2, 4) nor the 2023 (0, 1, 2, 3) glioma convention; name "
                            f"its release with --release")
    return fits[0] if len(fits) == 1 else release_of_values(pred_values)


def evaluate(pred_dir: str | Path, ref_dir: str | Path, out_csv: str | Path | None = None,
             progress: bool = True, release: str | None = None, splits: dict[str, str] | None = None) -> dict:
    """Score every reference patient. Returns {"rows": [...], "summary": {...}, "missing": [pid]
    (scored as empty), "failed": {pid: reason}, "assumed": {pid: release read from the label
    values (flat folder, no --release)}, "by_split": {split: summary}}; EvaluateError when
    nothing can be scored. `splits` (`patient_splits`): each row gets its patient's split
    ('train', 'val', or 'other' for a patient the set does not hold), summarised apart."""
    from tqdm import tqdm

    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    refs = _references(ref_dir, release)
    if not refs:
        raise EvaluateError(f"no reference segmentations found in {ref_dir}")
    preds = _predictions(pred_dir, refs, ref_dir)
    rows, missing, failed, assumed = [], [], {}, {}
    for pid, (ref_path, rel) in tqdm(sorted(refs.items()), desc="patients", unit="patient",
                                          disable=None if progress else True):
        try:
            rows.append(score_patient(pid, ref_path, rel, preds[pid], assumed))
        except PatientFailed as e:
            failed[pid] = " ".join(str(e).split())
            continue
        if preds[pid] is None:
            missing.append(pid)
    by_split = {}
    if splits is not None:
        for r in rows:
            r["split"] = splits.get(r["patient"], "other")
        by_split = {s: summarise([r for r in rows if r["split"] == s]) for s in ("val", "train", "other")
                    if any(r["split"] == s for r in rows)}
    summary = summarise(rows)
    if out_csv:
        write_csv(out_csv, rows)
    return {"rows": rows, "summary": summary, "missing": missing, "failed": failed, "assumed": assumed,
            "by_split": by_split}


def patient_splits(location: str | Path) -> dict[str, str]:
    """patient -> 'train' or 'val' as a shard set (folder or URL) or a training run holds them:
    a run's validation patients are its set's val split, or with --folds the fold it held out."""
    run = Path(location)
    if run.is_dir() and (run / "config.json").is_file() and not (run / MANIFEST).exists():
        conf = read_run_config(run)
        try:
            cfg = TrainConfig.from_dict(conf["train"])
        except (KeyError, TypeError, ValueError) as e:
            raise EvaluateError(f"{run / 'config.json'}: 'train' is not a training config ({e})") from None
        m = ShardSource(conf["shards"]).manifest
        train_pids, val_pids = m["splits"]["train"], m["splits"]["val"]
        if cfg.folds:
            train_pids, val_pids = fold_patients(tuple(train_pids), cfg.folds, cfg.fold)
        return {**{p: "train" for p in train_pids}, **{p: "val" for p in val_pids}}
    m = ShardSource(str(location)).manifest
    return {p: s for s in ("train", "val") for p in m["splits"][s]}


def summarise(rows: list[dict]) -> dict:
    if not rows:
        return {}
    keys = [k for k in rows[0] if k not in ("patient", "split")]
    return {k: {"mean": float(np.mean([r[k] for r in rows])), "median": float(np.median([r[k] for r in rows])),
                "std": float(np.std([r[k] for r in rows]))} for k in keys}


def write_csv(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else COLUMNS)  # header only if all failed
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def format_summary(summary: dict, n: int) -> str:
    lines = [f"{n} patient(s)          mean     median        std"]
    for k, v in summary.items():
        if k.startswith("lesion_") and not any(j.startswith("lesion_") for j in list(summary)[:list(summary).index(k)]):
            lines.append(f"  lesion-wise ({LESION_PARAMS.name} rules):")
        lines.append(f"  {k:16s} {v['mean']:9.4f} {v['median']:10.4f} {v['std']:10.4f}")
    return "\n".join(lines)
