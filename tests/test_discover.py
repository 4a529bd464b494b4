import json
import shutil

import pytest

from preprocess.discover import DiscoveryError, discover


def _touch(root, pid, names):
    d = root / pid
    d.mkdir(parents=True)
    for n in names:
        (d / n).write_bytes(b"")


def test_2020_2021_and_2023_names(tmp_path):
    r20, r21, r23 = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _touch(r20, "BraTS20_Training_001", [f"BraTS20_Training_001_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")])
    _touch(r21, "BraTS2021_00000", [f"BraTS2021_00000_{m}.nii" for m in ("t1", "t1ce", "t2", "flair", "seg")])
    _touch(r23, "BraTS-GLI-00000-000", [f"BraTS-GLI-00000-000-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f", "seg")])
    for root, conv, labels in ((r20, "2020", (0, 1, 2, 4)), (r21, "2020", (0, 1, 2, 4)), (r23, "2023", (0, 1, 2, 3))):
        d = discover(root)
        (p,) = d.patients
        assert p.problem is None and p.convention == conv and p.labels == labels
        assert set(p.files) == {"t1", "t1gd", "t2", "flair", "seg"}
    p = discover(r23).patients[0]
    assert p.files["t1gd"].name.endswith("-t1c.nii.gz") and p.files["flair"].name.endswith("-t2f.nii.gz")


def test_stray_files_ignored_nested_release_found(release_2020, tmp_path):
    root = tmp_path / "release"
    shutil.copytree(release_2020, root / "MICCAI_BraTS2020_TrainingData")
    (root / "survival_info.csv").write_text("a,b\n")
    d = discover(root)
    assert len(d.patients) == 6 and all(p.problem is None for p in d.patients)


def test_nonstandard_segmentation_name_is_used_and_noted(tmp_path):
    pid = "BraTS20_Training_355"
    _touch(tmp_path, pid, [f"{pid}_{m}.nii" for m in ("t1", "t1ce", "t2", "flair")] + ["W39_1998.09.19_Segm.nii"])
    (p,) = discover(tmp_path).patients
    assert p.problem is None and p.files["seg"].name == "W39_1998.09.19_Segm.nii"
    assert "W39_1998.09.19_Segm.nii" in p.notes[0]


def test_missing_modality_names_patient_and_files(tmp_path):
    pid = "BraTS20_Training_007"
    _touch(tmp_path, pid, [f"{pid}_{m}.nii.gz" for m in ("t1", "t2", "flair", "seg")] + [f"{pid}_t1gd_v2.nii.gz"])
    (p,) = discover(tmp_path).patients
    assert p.pid == pid
    assert "missing t1gd" in p.problem and f"{pid}_t1gd_v2.nii.gz" in p.problem


def test_unusable_inputs_raise(tmp_path):
    with pytest.raises(DiscoveryError, match="does not exist"):
        discover(tmp_path / "nope")
    with pytest.raises(DiscoveryError, match="no patient folders"):
        discover(tmp_path)
    _touch(tmp_path, "BraTS20_Training_001", [f"BraTS20_Training_001_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")])
    _touch(tmp_path, "BraTS-GLI-00000-000", [f"BraTS-GLI-00000-000-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f", "seg")])
    with pytest.raises(DiscoveryError, match="mixes"):
        discover(tmp_path)


@pytest.mark.parametrize("alias", ["2018", "2019", "2021"])
def test_2018_2019_and_2021_are_names_of_the_2020_convention(release_2020, tmp_path, alias):
    """BraTS 2018, 2019 and 2021 ship the 2020 file names and labels: --release takes their years."""
    from cli_run import cli

    d = discover(release_2020, release=alias)
    assert d.convention == "2020" and d.patients and not any(p.problem for p in d.patients)
    code, out, err, exc = cli("build-shards", release_2020, tmp_path / "s", "--workers", "0", "--size", "16",
                              "--quiet", "--release", alias)
    assert (code, exc) == (0, None), err
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["config"]["convention"] == "2020"
