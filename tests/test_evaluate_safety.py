"""`evaluate` compares voxels that are the same place, fails single patients cleanly, refuses empty runs."""

import numpy as np
import pytest

from preprocess.nifti import save_volume
from preprocess.synthetic.cases import ras_affine, write_case
from preprocess.synthetic.toy import make_case
from train.evaluate import EvaluateError, evaluate

SHAPE = (40, 36, 16)  # not square: catches swapped axes


def _label_map(shape=(12, 12, 6)) -> np.ndarray:
    ref = np.zeros(shape, np.uint8)
    ref[3:8, 3:8, 2:4] = 2
    ref[4:6, 4:6, 2:4] = 4
    ref[5, 5, 3] = 1
    return ref


def test_prediction_stored_in_another_orientation_scores_as_identical(tmp_path):
    """References stored LPS (BraTS layout); predictions are the same labels stored RAS, and
    RAS with x and y swapped in storage: same world positions, so Dice 1 and HD95 0."""
    (tmp_path / "pred").mkdir()
    cases = [make_case(i, SHAPE) for i in (3, 4)]
    for case in cases:
        write_case(case, tmp_path / "ref", orientation="lps")
    ras = ras_affine(SHAPE)
    save_volume(tmp_path / "pred" / f"{cases[0].pid}.nii.gz", cases[0].seg, ras)
    swapped = np.ascontiguousarray(cases[1].seg.transpose(1, 0, 2))
    save_volume(tmp_path / "pred" / f"{cases[1].pid}.nii.gz", swapped, ras[:, [1, 0, 2, 3]])
    r = evaluate(tmp_path / "pred", tmp_path / "ref", progress=False)
    assert r["failed"] == {} and r["missing"] == [] and len(r["rows"]) == 2
    for row in r["rows"]:
        assert all(row[f"dice_{k}"] == 1.0 for k in ("WT", "TC", "ET", "sub_NCR/NET", "sub_ED", "sub_ET")), row
        assert all(row[f"hd95_{k}"] == 0.0 for k in ("WT", "TC", "ET")), row


def test_bad_predictions_fail_their_patient_only(tmp_path):
    ref = _label_map()
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    for pid in ("A", "B", "C", "D", "E", "F"):
        save_volume(tmp_path / "ref" / f"{pid}.nii.gz", ref, aff)
    pred = tmp_path / "pred"
    save_volume(pred / "A.nii.gz", ref, aff)  # right
    shifted = aff.copy()
    shifted[0, 3] = 3.0
    save_volume(pred / "B.nii.gz", ref, shifted)  # same shape, voxels 3 mm away
    save_volume(pred / "C.nii.gz", ref[:, :, :5], aff)  # wrong shape
    (pred / "D.nii.gz").write_bytes(b"this is not a NIfTI file")
    whole = (pred / "A.nii.gz").read_bytes()
    (pred / "E.nii.gz").write_bytes(whole[: len(whole) // 2])  # truncated
    (pred / "F.nii").write_bytes(b"\x00" * 600)  # not NIfTI, uncompressed
    r = evaluate(pred, tmp_path / "ref", tmp_path / "m.csv", progress=False)
    assert [row["patient"] for row in r["rows"]] == ["A"] and r["rows"][0]["dice_WT"] == 1.0
    assert sorted(r["failed"]) == ["B", "C", "D", "E", "F"]
    for pid, reason in r["failed"].items():
        assert str(pred / pid) in reason and "\n" not in reason, reason
    assert "affine" in r["failed"]["B"] and "(12, 12, 5)" in r["failed"]["C"]
    assert "cannot be read" in r["failed"]["D"] and "cannot be read" in r["failed"]["E"]
    assert (tmp_path / "m.csv").read_text().count("\n") == 2  # header + A


def test_all_predictions_failing_still_writes_a_header(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    save_volume(tmp_path / "ref" / "A.nii.gz", _label_map(), np.eye(4))
    save_volume(tmp_path / "pred" / "A.nii.gz", _label_map((10, 12, 6)), np.eye(4))
    r = evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "m.csv", progress=False)
    assert r["rows"] == [] and list(r["failed"]) == ["A"] and r["summary"] == {}
    assert (tmp_path / "m.csv").read_text().startswith("patient,dice_WT,dice_TC,dice_ET,hd95_WT")


def test_no_reference_segmentations_is_refused(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluateError, match="no patient folders"):
        evaluate(tmp_path / "pred", tmp_path / "empty", progress=False)
    case = make_case(2, (24, 24, 8))
    folder = write_case(case, tmp_path / "noseg")  # images only, as a validation release ships
    (folder / f"{case.pid}_seg.nii.gz").unlink()
    with pytest.raises(EvaluateError, match=f"no reference segmentations found in {tmp_path / 'noseg'}"):
        evaluate(tmp_path / "pred", tmp_path / "noseg", progress=False)
    with pytest.raises(EvaluateError, match="reference folder .*does not exist"):
        evaluate(tmp_path / "pred", tmp_path / "nowhere", progress=False)


def test_mistyped_or_unrelated_prediction_folder_is_refused(tmp_path):
    (tmp_path / "ref").mkdir()
    save_volume(tmp_path / "ref" / "BraTS-GLI-00001-000.nii.gz", _label_map(), np.eye(4))
    with pytest.raises(EvaluateError, match=f"prediction folder {tmp_path / 'prds'} does not exist"):
        evaluate(tmp_path / "prds", tmp_path / "ref", progress=False)
    (tmp_path / "pred").mkdir()
    save_volume(tmp_path / "pred" / "case_0001.nii.gz", _label_map(), np.eye(4))  # other naming
    with pytest.raises(EvaluateError, match=f"{tmp_path / 'pred'} holds no prediction for any of the 1"):
        evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "pred" / "metrics.csv", progress=False)
    assert not (tmp_path / "pred" / "metrics.csv").exists()
