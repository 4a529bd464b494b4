"""`evaluate` on careless or hostile label maps (issue 18, cases 5 and 6): a prediction or reference
whose values are not labels of the release it is scored in fails its patient, named with the
values; a flat reference folder is read in the release `--release` names, or in a convention the
output states, or refused when its labels fit none.

Every test runs the command as a user would (typer's runner, in process) on tiny label maps."""

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app

AFFINE = np.eye(4)


def save_volume(path, data, affine):
    """Any dtype, int64 included (nibabel wants it named in the header)."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine, dtype=data.dtype)
    nib.save(img, str(path))


def _glioma(labels=(1, 2, 4), shape=(12, 12, 6)) -> np.ndarray:
    """A label map holding NCR/NET, ED and ET in the given label values (2020: 1, 2, 4)."""
    ncr, ed, et = labels
    ref = np.zeros(shape, np.uint8)
    ref[3:8, 3:8, 2:4] = ed
    ref[4:6, 4:6, 2:4] = et
    ref[5, 5, 3] = ncr
    ref[6, 6, 2] = ncr
    return ref


def _ped() -> np.ndarray:
    """A BraTS-PED 2024 label map: 1 ET, 2 NETC, 3 CC, 4 ED, each present."""
    ref = np.zeros((12, 12, 6), np.uint8)
    ref[2:9, 2:9, 1:5] = 4
    ref[3:7, 3:7, 2:4] = 3
    ref[4:6, 4:6, 2:4] = 1
    ref[5, 5, 3] = 2
    return ref


def _run(*argv):
    r = CliRunner().invoke(app, ["evaluate", *map(str, argv), "--quiet"])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.stdout + r.stderr
    return r


def _refused(r, *names):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in names:
        assert str(n) in lines[0], (n, lines[0])


def _rows(path) -> dict:
    with open(path, newline="") as f:
        return {row["patient"]: row for row in csv.DictReader(f)}


def _folders(tmp_path, refs: dict, preds: dict):
    """Flat reference and prediction folders of <pid>.nii.gz label maps."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for pid, data in refs.items():
        save_volume(ref / f"{pid}.nii.gz", data, AFFINE)
    for pid, data in preds.items():
        save_volume(pred / f"{pid}.nii.gz", data, AFFINE)
    return pred, ref


# ------------------------------------------------------------------ case 5: prediction labels

BAD_PREDICTIONS = {
    # what -> (prediction of the victim from its 2020 reference, what the reason must name)
    "2023 labels": (lambda ref: np.where(ref == 4, 3, ref).astype(np.uint8), "3"),
    "0.999 x label": (lambda ref: ref.astype(np.float32) * np.float32(0.999), "not whole numbers"),
    "label 7": (lambda ref: np.where(ref == 2, 7, ref).astype(np.uint8), "7"),
    "label -3": (lambda ref: np.where(ref == 1, -3, ref.astype(np.int16)), "-3"),
    "NaN": (lambda ref: np.where(ref == 2, np.nan, ref.astype(np.float32)), "NaN"),
    "infinity": (lambda ref: np.where(ref == 2, np.inf, ref.astype(np.float32)), "inf"),
    "label 255": (lambda ref: np.where(ref == 0, 255, ref).astype(np.uint8), "255"),
    "label 2**40": (lambda ref: np.where(ref == 4, 2**40, ref.astype(np.int64)), str(2**40)),
    "complex": (lambda ref: ref.astype(np.complex64), "complex"),
}


@pytest.mark.parametrize("what", list(BAD_PREDICTIONS))
def test_prediction_labels_outside_the_release_fail_that_patient(tmp_path, what):
    make, named = BAD_PREDICTIONS[what]
    ref = _glioma()
    pred, refs = _folders(tmp_path, {"BraTS20_Training_001": ref, "BraTS20_Training_002": ref},
                          {"BraTS20_Training_001": make(ref), "BraTS20_Training_002": ref})
    r = _run(pred, refs, "--csv", tmp_path / "m.csv")
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    failed = [ln for ln in r.stdout.splitlines() if "FAILED" in ln]
    assert len(failed) == 1 and "BraTS20_Training_001" in failed[0] and named in failed[0], failed
    assert str(pred / "BraTS20_Training_001.nii.gz") in failed[0]
    rows = _rows(tmp_path / "m.csv")
    assert list(rows) == ["BraTS20_Training_002"] and float(rows["BraTS20_Training_002"]["dice_ET"]) == 1.0


def test_2023_predictions_against_a_2020_folder_of_cases_fail(tmp_path):
    """The same check with a BraTS-layout reference folder (the release told by the file names)."""
    ref = _glioma()
    folder = tmp_path / "ref" / "BraTS20_Training_001"
    folder.mkdir(parents=True)
    save_volume(folder / "BraTS20_Training_001_seg.nii.gz", ref, AFFINE)
    (tmp_path / "pred").mkdir()
    save_volume(tmp_path / "pred" / "BraTS20_Training_001.nii.gz", np.where(ref == 4, 3, ref).astype(np.uint8),
                AFFINE)
    r = _run(tmp_path / "pred", tmp_path / "ref", "--csv", tmp_path / "m.csv")
    assert r.exit_code == 1 and "FAILED BraTS20_Training_001" in r.stdout and "3" in r.stdout, r.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.int64])
def test_predictions_stored_as_other_types_but_exact_labels_are_scored(tmp_path, dtype):
    ref = _glioma()
    pred, refs = _folders(tmp_path, {"BraTS20_Training_001": ref}, {"BraTS20_Training_001": ref.astype(dtype)})
    r = _run(pred, refs, "--csv", tmp_path / "m.csv")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    row = _rows(tmp_path / "m.csv")["BraTS20_Training_001"]
    assert all(float(row[f"dice_{k}"]) == 1.0 for k in ("WT", "TC", "ET")), row


# ------------------------------------------------------------------ case 6: flat folders and --release

def test_flat_ped_2024_folder_is_scored_in_ped_2024_with_release(tmp_path):
    ref = _ped()
    pred, refs = _folders(tmp_path, {"BraTS-PED-00001-000": ref}, {"BraTS-PED-00001-000": ref})
    r = _run(pred, refs, "--csv", tmp_path / "m.csv", "--release", "ped-2024")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    row = _rows(tmp_path / "m.csv")["BraTS-PED-00001-000"]
    assert {"dice_CC", "dice_ED", "dice_NETC"} <= set(row), list(row)
    assert all(float(row[k]) == 1.0 for k in row if k.startswith("dice_")), row


def test_flat_ped_2024_et_only_prediction_scores_et_1(tmp_path):
    """PED ET is label 1: a prediction right about ET alone scores ET 1, not 0 (glioma ET is 4)."""
    ref = _ped()
    pred, refs = _folders(tmp_path, {"BraTS-PED-00001-000": ref},
                          {"BraTS-PED-00001-000": np.where(ref == 1, 1, 0).astype(np.uint8)})
    r = _run(pred, refs, "--csv", tmp_path / "m.csv", "--release", "ped-2024")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert float(_rows(tmp_path / "m.csv")["BraTS-PED-00001-000"]["dice_ET"]) == 1.0


def test_flat_ped_folder_without_release_is_refused(tmp_path):
    ref = _ped()
    pred, refs = _folders(tmp_path, {"BraTS-PED-00001-000": ref}, {"BraTS-PED-00001-000": ref})
    r = _run(pred, refs, "--csv", tmp_path / "m.csv")
    _refused(r, "BraTS-PED-00001-000", "--release")
    assert not (tmp_path / "m.csv").exists()


def test_flat_folder_with_unknown_release_is_refused(tmp_path):
    pred, refs = _folders(tmp_path, {"A": _glioma()}, {"A": _glioma()})
    r = _run(pred, refs, "--csv", tmp_path / "m.csv", "--release", "2099")
    _refused(r, "2099", "--release")
    assert not (tmp_path / "m.csv").exists()


def test_flat_references_whose_labels_fit_no_glioma_convention_fail(tmp_path):
    """Anonymous ids holding PED-2024 labels (1-4): neither 2018-2021 (0,1,2,4) nor 2023 (0,1,2,3);
    refused per patient asking for --release, not scored as glioma."""
    pred, refs = _folders(tmp_path, {"case1": _ped(), "case2": _glioma()}, {"case1": _ped(), "case2": _glioma()})
    r = _run(pred, refs, "--csv", tmp_path / "m.csv")
    assert r.exit_code == 1, (r.stdout, r.stderr)
    failed = [ln for ln in r.stdout.splitlines() if "FAILED" in ln]
    assert len(failed) == 1 and "case1" in failed[0] and "--release" in failed[0], failed
    assert list(_rows(tmp_path / "m.csv")) == ["case2"]


def test_flat_folder_without_release_says_which_convention_it_assumed(tmp_path):
    pred, refs = _folders(tmp_path, {"a": _glioma(), "b": _glioma((1, 2, 3))}, {"a": _glioma(), "b": _glioma((1, 2, 3))})
    r = _run(pred, refs, "--csv", tmp_path / "m.csv")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    note = [ln for ln in r.stdout.splitlines() if "--release" in ln]
    assert note and "2020" in note[0] and "2023" in note[0], r.stdout
    rows = _rows(tmp_path / "m.csv")
    assert all(float(rows[p][f"dice_{k}"]) == 1.0 for p in "ab" for k in ("WT", "TC", "ET")), rows


def test_references_outside_the_named_release_fail_their_patient(tmp_path):
    """2018-2021 references (ET = 4) evaluated with --release 2023 (ET = 3): label 4 is not 2023's."""
    pred, refs = _folders(tmp_path, {"a": _glioma()}, {"a": _glioma()})
    r = _run(pred, refs, "--csv", tmp_path / "m.csv", "--release", "2023")
    assert r.exit_code == 1, (r.stdout, r.stderr)
    failed = [ln for ln in r.stdout.splitlines() if "FAILED" in ln]
    assert len(failed) == 1 and str(refs / "a.nii.gz") in failed[0] and "4" in failed[0], failed
