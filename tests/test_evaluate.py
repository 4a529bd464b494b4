import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from preprocess.nifti import save_volume
from shards.domain import RELEASES
from train.evaluate import COLUMNS, EMPTY_HD95, evaluate, hd95, patient_metrics

R2020, R2023 = RELEASES["2020"], RELEASES["2023"]

REPO = Path(__file__).resolve().parents[1]


def test_identical_gives_dice_1_hd95_0():
    ref = np.zeros((20, 20, 10), np.uint8)
    ref[5:12, 5:12, 3:7] = 2
    ref[7:10, 7:10, 4:6] = 4
    ref[8, 8, 5] = 1
    m = patient_metrics(ref, ref, (1, 1, 1), R2020)
    assert all(m[f"dice_{r}"] == 1.0 for r in ("WT", "TC", "ET"))
    assert all(m[f"hd95_{r}"] == 0.0 for r in ("WT", "TC", "ET"))
    assert m["dice_sub_NCR/NET"] == m["dice_sub_ED"] == m["dice_sub_ET"] == 1.0


def test_hand_computed_values():
    ref = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(ref)
    ref[5, 5, 5] = 4
    pred[5, 5, 8] = 4  # 3 voxels away along z, spacing 2 mm along z -> 6 mm
    assert hd95(pred == 4, ref == 4, (1.0, 1.0, 2.0)) == pytest.approx(6.0)
    # Dice: ref 8 voxels, pred 8 voxels overlapping 4 -> 2*4/16
    ref2 = np.zeros((10, 10, 10), np.uint8)
    pred2 = np.zeros_like(ref2)
    ref2[0:2, 0:2, 0:2] = 2
    pred2[1:3, 0:2, 0:2] = 2
    m = patient_metrics(pred2, ref2, (1, 1, 1), R2020)
    assert m["dice_WT"] == pytest.approx(0.5) and m["dice_sub_ED"] == pytest.approx(0.5)
    assert m["hd95_WT"] == pytest.approx(1.0)  # every surface voxel is within 1 mm of the other surface
    # region composition: NCR counts in WT and TC, ED only in WT
    ref3 = np.zeros((6, 6, 6), np.uint8)
    ref3[1, 1, 1], ref3[2, 2, 2], ref3[3, 3, 3] = 1, 2, 4
    pred3 = np.zeros_like(ref3)
    pred3[1, 1, 1] = 4  # NCR voxel called enhancing: right for WT and TC, wrong for ET
    m = patient_metrics(pred3, ref3, (1, 1, 1), R2020)
    assert m["dice_WT"] == pytest.approx(2 * 1 / (1 + 3))
    assert m["dice_TC"] == pytest.approx(2 * 1 / (1 + 2))
    assert m["dice_ET"] == 0.0 and m["dice_sub_NCR/NET"] == 0.0


def test_lesion_wise_columns_penalise_a_missed_lesion():
    """Two enhancing lesions of 64 voxels far apart, one predicted: globally Dice 2*64/(128+64);
    lesion-wise (1 + 0) / 2 and HD95 (0 + 374) / 2, in WT and TC too (ET lies in both)."""
    ref = np.zeros((20, 20, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = ref[13:17, 13:17, 2:6] = 3
    pred = np.where(np.arange(20)[:, None, None] < 10, ref, 0).astype(np.uint8)
    m = patient_metrics(pred, ref, (1, 1, 1), R2023)
    assert list(m) == COLUMNS[1:]
    assert m["dice_ET"] == pytest.approx(2 / 3)
    for r in ("WT", "TC", "ET"):
        assert m[f"lesion_dice_{r}"] == 0.5 and m[f"lesion_hd95_{r}"] == 187.0


def test_hd95_pools_both_directions():
    """Reference {a}; prediction {b, c} at 1 and 5 mm from a. Pooled distances [1, 1, 5]:
    95th percentile 1 + 0.9 * 4 = 4.6 (the official package's definition; the larger of the two
    directed percentiles would give 4.8)."""
    ref = np.zeros((10, 3, 3), bool)
    pred = np.zeros_like(ref)
    ref[2, 1, 1] = True
    pred[3, 1, 1] = pred[7, 1, 1] = True
    assert hd95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(4.6)


def test_empty_conventions():
    empty = np.zeros((8, 8, 8), np.uint8)
    some = empty.copy()
    some[3, 3, 3] = 4
    both = patient_metrics(empty, empty, (1, 1, 1), R2020)
    assert both["dice_ET"] == 1.0 and both["hd95_ET"] == 0.0
    missed = patient_metrics(empty, some, (1, 1, 1), R2020)
    assert missed["dice_ET"] == 0.0 and missed["hd95_ET"] == EMPTY_HD95
    false_alarm = patient_metrics(some, empty, (1, 1, 1), R2020)
    assert false_alarm["dice_ET"] == 0.0 and false_alarm["hd95_ET"] == EMPTY_HD95
    assert patient_metrics(some == 4, (some == 4).astype(np.uint8) * 3, (1, 1, 1), R2023)["dice_ET"] == 0.0


def test_folders_missing_prediction_and_2023_labels(tmp_path):
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    ref = np.zeros((12, 12, 6), np.uint8)
    ref[3:8, 3:8, 2:4] = 2
    ref[4:6, 4:6, 2:4] = 3
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    for pid in ("BraTS-GLI-00001-000", "BraTS-GLI-00002-000"):
        save_volume(tmp_path / "ref" / f"{pid}.nii.gz", ref, aff)
    save_volume(tmp_path / "pred" / "BraTS-GLI-00001-000.nii.gz", ref, aff)
    r = evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "m.csv", progress=False)
    rows = {row["patient"]: row for row in r["rows"]}
    assert rows["BraTS-GLI-00001-000"]["dice_ET"] == 1.0  # label 3 read as enhancing tumour
    assert rows["BraTS-GLI-00002-000"]["dice_WT"] == 0.0 and r["missing"] == ["BraTS-GLI-00002-000"]
    assert r["summary"]["dice_ET"]["mean"] == pytest.approx(0.5)
    cli = subprocess.run([sys.executable, "cli.py", "evaluate", str(tmp_path / "pred"), str(tmp_path / "ref"),
                          "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert "dice_WT" in cli.stdout and "scored as empty: BraTS-GLI-00002-000" in cli.stdout
    assert "lesion-wise" in cli.stdout and "lesion_hd95_ET" in cli.stdout
    header = (tmp_path / "pred" / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("patient,dice_WT,dice_TC,dice_ET,hd95_WT") and header == ",".join(COLUMNS)
    assert header.endswith("lesion_hd95_WT,lesion_hd95_TC,lesion_hd95_ET,lesion_nsd_WT,lesion_nsd_TC,lesion_nsd_ET")
    assert ",nsd_WT,nsd_TC,nsd_ET," in header
    # every lesion here (WT 50 voxels, TC and ET 8) is at most 50 mm^3: not scored, even when
    # missed -> lesion-wise 1 / 0
    assert rows["BraTS-GLI-00002-000"]["lesion_dice_ET"] == 1.0 and rows["BraTS-GLI-00002-000"]["lesion_hd95_ET"] == 0.0


def test_evaluate_marks_each_patient_train_or_val_and_summarises_them_apart(release_2020, shard_set, tmp_path):
    """--split-from a shard set or a run: a 'split' column, and the validation patients summarised
    on their own (a run with --folds holds out its fold of the training split)."""
    import csv
    import json as _json

    from shards.manifest import load_manifest
    from train.config import TrainConfig
    from train.data import fold_patients
    from train.evaluate import evaluate as score, patient_splits

    pred = tmp_path / "pred"
    pred.mkdir()
    for seg in release_2020.glob("*/*_seg.nii.gz"):  # the references as predictions: Dice 1
        shutil.copy(seg, pred / f"{seg.parent.name}.nii.gz")
    m = load_manifest(shard_set)
    splits = patient_splits(shard_set)
    assert splits == {**{p: "train" for p in m["splits"]["train"]}, **{p: "val" for p in m["splits"]["val"]}}
    r = score(pred, release_2020, tmp_path / "m.csv", progress=False, splits=splits)
    with open(tmp_path / "m.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["patient"]: row["split"] for row in rows} == {p: splits.get(p, "other") for p in splits}
    assert set(r["by_split"]) == {"train", "val"} and r["by_split"]["val"]["dice_WT"]["mean"] == 1.0
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(_json.dumps({"shards": str(shard_set), "manifest_sha256": "x",
                                                  "train": TrainConfig(folds=2, fold=1).to_dict()}))
    held = fold_patients(tuple(m["splits"]["train"]), 2, 1)[1]
    assert sorted(p for p, s in patient_splits(run).items() if s == "val") == sorted(held)


def test_global_nsd_as_the_official_package_computes_it():
    """The package's global NSD takes no voxel spacing and keeps its 0.5-voxel default tolerance:
    the share of surface voxels lying on the other region's surface. A 10-voxel ET cube (z 5-14)
    against the same cube at z 7-16: of the reference's 488 surface voxels, the side rings at z 7-13
    (252) and the z 14 face's outer ring (36) lie on the prediction's side faces: 288 / 488 each
    way, at any spacing. The lesion-wise NSD keeps the spacing (tolerance: the smallest, 1 mm)."""
    ref = np.zeros((20, 20, 20), np.int16)
    ref[5:15, 5:15, 5:15] = 3
    pred = np.roll(ref, 2, axis=2)
    for spacing in ((1.0, 1.0, 1.0), (1.0, 1.0, 2.0)):
        row = patient_metrics(pred, ref, spacing, RELEASES["2023"])
        assert row["nsd_WT"] == row["nsd_ET"] == pytest.approx(288 / 488, abs=1e-12)
    assert patient_metrics(pred, ref, (1.0, 1.0, 1.0), RELEASES["2023"])["lesion_nsd_ET"] == pytest.approx(352 / 488)
    empty = np.zeros_like(ref)
    both_empty = patient_metrics(empty, empty, (1.0, 1.0, 1.0), RELEASES["2023"])
    assert both_empty["nsd_ET"] == 1.0 and both_empty["lesion_nsd_ET"] == 1.0
    assert patient_metrics(empty, ref, (1.0, 1.0, 1.0), RELEASES["2023"])["nsd_ET"] == 0.0
