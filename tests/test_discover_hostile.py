"""Issue 18, second pass, on discovery: careless or hostile input folders are refused or fail one
patient, named. A `--release` that contradicts the file names (case 7) or the layout (case 19) is
refused before anything is written; colliding MSD ids fail that patient naming both files (case
11); a stray folder (a lone segmentation, an atlas) fails as one folder instead of refusing the
input as a "mix" (case 18); a modality that is mostly NaN/Inf fails its patient (case 20); a tree
deeper than Python's recursion limit, or symlinks that reach one folder twice, are one refusal
(case 22a). Through the CLI where it matters: exit code, one `error:` line naming what is at
fault, no traceback, and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from preprocess.discover import DiscoveryError, discover
from preprocess.synthetic.releases import write_release
from shards.domain import RELEASES
from cli_run import build as _build, cli as _cli, refused as _refused  # tests/cli_run.py

TINY = (24, 28, 16)


def _touch(root: Path, release: str, pids, drop=()) -> Path:
    """Empty files named as `release` names a case's (discovery reads names only)."""
    rel = RELEASES[release]
    for pid in pids:
        (root / pid).mkdir(parents=True)
        for m in [*rel.modalities, "seg"]:
            if m not in drop:
                (root / pid / rel.file_name(pid, m)).write_bytes(b"")
    return root


def _ids(release: str, n: int = 2) -> list[str]:
    return [RELEASES[release].case_id.format(index=i) for i in range(1, n + 1)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Tiny real cases of a few releases, written once: copy before damaging."""
    base = tmp_path_factory.mktemp("toy")
    for rel in ("2020", "2023", "msd"):
        write_release(base / rel, rel, 3, shape=TINY, seed=4)
    return base


def _copy(toy: Path, rel: str, dst: Path) -> Path:
    shutil.copytree(toy / rel, dst)
    return dst


# ---------------------------------------------------------------- case 7: --release against the names

@pytest.mark.parametrize("folder, given, suggested", [
    ("2023", "ped-2024", "2023"),  # the case: GLI's ET would be stored as PED's CC
    ("2023", "ped-2023", "2023"),
    ("2023", "men", "2023"),
    ("2023", "ssa", "2023"),
    ("2023", "2020", "2023"),  # no id pattern: the file names tell
    ("2020", "2023", "2020"),
    ("2020", "gli-2024", "2020"),
    ("men", "2023", "men"),  # same suffixes, but the ids name MEN
    ("men", "gli-2024", "men"),
    ("men", "men-rt", "men"),
    ("men-rt", "men", "men-rt"),
    ("met", "gli-2024", "met"),
    ("gli-2024", "2023", "gli-2024"),  # -100 is a post-treatment case: label 4 is RC, not in 2023
    ("ped-2024", "2023", "ped-2024 or ped-2023"),
])
def test_a_release_that_contradicts_the_names_is_refused_suggesting_the_detected_one(tmp_path, folder, given,
                                                                                       suggested):
    root = _touch(tmp_path, folder, _ids(folder))
    with pytest.raises(DiscoveryError) as e:
        discover(root, release=given)
    msg = str(e.value)
    assert f"--release {given}" in msg and _ids(folder)[0] in msg and f"--release {suggested}" in msg, msg


@pytest.mark.parametrize("folder, given", [("2023", "2023"), ("2023", "gli-2024"), ("ped-2024", "ped-2024"),
                                           ("ped-2024", "ped-2023"), ("men", "men"), ("2020", "2020")])
def test_a_release_that_fits_the_names_is_accepted(tmp_path, folder, given):
    d = discover(_touch(tmp_path, folder, _ids(folder)), release=given)
    assert d.convention == given and all(p.problem is None for p in d.patients)


def test_build_refuses_a_contradicting_release_before_writing(toy, tmp_path):
    out = tmp_path / "out"
    err = _refused(_build(toy / "2023", out, "--release", "ped-2024"), "ped-2024", "BraTS-GLI-00001-000",
                   "--release 2023")
    assert "3 folders" in err or "and 2 more" in err, err
    assert not out.exists()


def test_one_misnamed_folder_among_fitting_ones_is_named(tmp_path):
    root = _touch(tmp_path, "ped-2024", _ids("ped-2024"))
    _touch(root, "2023", ["BraTS-GLI-00007-000"])
    with pytest.raises(DiscoveryError, match="BraTS-GLI-00007-000"):
        discover(root, release="ped-2024")


# ---------------------------------------------------------------- case 19: --release against the layout

def test_release_msd_on_a_folder_layout_is_refused_before_writing(toy, tmp_path):
    out = tmp_path / "out"
    _refused(_build(toy / "2020", out, "--release", "msd"), "--release msd", "imagesTr", str(toy / "2020"))
    assert not out.exists()


@pytest.mark.parametrize("given", ["2020", "2023", "ped-2024", "men-rt"])
def test_a_folder_release_on_an_msd_layout_is_refused_before_writing(toy, tmp_path, given):
    out = tmp_path / "out"
    _refused(_build(toy / "msd", out, "--release", given), f"--release {given}", "imagesTr", "--release msd")
    assert not out.exists()


def test_an_msd_download_one_level_down_is_found(toy, tmp_path):
    """The archive unpacks to Task01_BrainTumour/: given the folder above it, the MSD layout is read
    there (the patients, not imagesTr/ and labelsTr/ as two patients), and a shard set is built."""
    root = tmp_path / "in"
    _copy(toy, "msd", root / "Task01_BrainTumour")
    d = discover(root)
    assert d.convention == "msd" and [p.pid for p in d.patients] == [p.pid for p in discover(toy / "msd").patients]
    assert all(not p.problem and p.files for p in d.patients)
    with pytest.raises(DiscoveryError, match="--release 2020 reads a folder per patient"):
        discover(root, release="2020")
    code, _, err, exc = _build(root, tmp_path / "out")
    assert (code, exc) == (0, None), err


def test_an_msd_layout_below_other_folders_is_refused_naming_its_folder(toy, tmp_path):
    root = tmp_path / "in"
    _copy(toy, "msd", root / "downloads" / "Task01_BrainTumour")
    (root / "notes").mkdir()
    with pytest.raises(DiscoveryError, match=f"{root / 'downloads' / 'Task01_BrainTumour'}"):
        discover(root)


# ---------------------------------------------------------------- case 11: MSD ids that collide

def _msd(tmp_path: Path, images=("BRATS_001.nii.gz", "BRATS_002.nii.gz"), labels=None, ts=()) -> Path:
    root = tmp_path / "msd"
    for folder, names in (("imagesTr", images), ("labelsTr", images if labels is None else labels),
                          ("imagesTs", ts)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for n in names:
            (root / folder / n).write_bytes(b"")
    return root


def test_msd_nii_beside_nii_gz_fails_that_patient_naming_both(tmp_path):
    root = _msd(tmp_path, images=("BRATS_001.nii", "BRATS_001.nii.gz", "BRATS_002.nii.gz"))
    d = discover(root)
    assert [p.pid for p in d.patients] == ["BRATS_001", "BRATS_002"]
    bad = d.patients[0]
    assert "imagesTr/BRATS_001.nii" in bad.problem and "imagesTr/BRATS_001.nii.gz" in bad.problem, bad.problem
    assert d.patients[1].problem is None


def test_msd_two_label_files_for_one_id_fail_that_patient(tmp_path):
    root = _msd(tmp_path, labels=("BRATS_001.nii", "BRATS_001.nii.gz", "BRATS_002.nii.gz"))
    bad, good = discover(root).patients
    assert "labelsTr/BRATS_001.nii" in bad.problem and "labelsTr/BRATS_001.nii.gz" in bad.problem, bad.problem
    assert good.problem is None


def test_msd_label_found_whatever_its_extension(tmp_path):
    root = _msd(tmp_path, labels=("BRATS_001.nii", "BRATS_002.nii.gz"))
    d = discover(root)
    assert all(p.problem is None for p in d.patients)
    assert d.patients[0].files["seg"].name == "BRATS_001.nii"


def test_msd_same_id_in_training_and_test_images_fails_that_patient_for_predict(tmp_path):
    """predict writes OUTPUT/<pid>.nii.gz: two patients of one id would overwrite each other."""
    root = _msd(tmp_path, ts=("BRATS_001.nii.gz", "BRATS_900.nii.gz"))
    d = discover(root, need_seg=False)
    pids = [p.pid for p in d.patients]
    assert pids == sorted(set(pids)) == ["BRATS_001", "BRATS_002", "BRATS_900"]
    bad = d.patients[0]
    assert "imagesTr/BRATS_001.nii.gz" in bad.problem and "imagesTs/BRATS_001.nii.gz" in bad.problem
    assert [p.problem for p in d.patients[1:]] == [None, None]


def test_build_of_msd_with_a_colliding_id_fails_that_patient_only(toy, tmp_path):
    inp = _copy(toy, "msd", tmp_path / "in")
    shutil.copy(inp / "imagesTr" / "BRATS_002.nii.gz", inp / "imagesTr" / "BRATS_001.nii")
    code, out, err, exc = _build(inp, tmp_path / "out")
    assert exc is None and code == 1, (code, out, err)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [f["patient"] for f in m["failed"]] == ["BRATS_001"]
    assert "BRATS_001.nii and" in m["failed"][0]["reason"] and sorted(m["patients"]) == ["BRATS_002", "BRATS_003"]


# ---------------------------------------------------------------- case 18: one stray folder

@pytest.mark.parametrize("rel", ["2023", "2020"])
def test_a_stray_folder_fails_as_one_folder_named(toy, tmp_path, rel):
    inp = _copy(toy, rel, tmp_path / "in")
    first = sorted(p for p in inp.iterdir() if p.is_dir())[0]
    seg = next(first.glob("*seg*"))
    (inp / "stray").mkdir()
    shutil.copy(seg, inp / "stray" / seg.name)
    (inp / "atlas").mkdir()
    shutil.copy(next(first.glob("*t1*")), inp / "atlas" / "mni152.nii.gz")
    code, out, err, exc = _build(inp, tmp_path / "out")
    assert exc is None and code == 1, (code, out, err)
    assert "FAILED stray" in out and "FAILED atlas" in out and "Traceback" not in out + err, (out, err)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["config"]["convention"] == rel and len(m["patients"]) == 3
    assert [f["patient"] for f in m["failed"]] == ["atlas", "stray"]


def test_a_stray_segmentation_named_as_a_case_is_one_failed_patient(tmp_path):
    root = _touch(tmp_path, "2023", _ids("2023"))
    _touch(root, "2023", ["BraTS-GLI-00099-000"], drop=("t1", "t1gd", "t2", "flair"))
    d = discover(root)
    assert d.convention == "2023"
    (bad,) = [p for p in d.patients if p.problem]
    assert bad.pid == "BraTS-GLI-00099-000" and "missing" in bad.problem


def test_a_real_mix_is_still_refused(tmp_path):
    """A 2023 case missing a modality beside 2020 cases is another release's patient, not a stray."""
    root = _touch(tmp_path, "2020", _ids("2020"))
    _touch(root, "2023", ["BraTS-GLI-00001-000"], drop=("flair",))
    with pytest.raises(DiscoveryError, match="mixes releases"):
        discover(root)


# ---------------------------------------------------------------- case 20: a mostly non-finite modality

def _overflow(path: Path) -> None:
    """scl_slope 1e38 written into the header bytes (nibabel recomputes the scaling on save): every
    voxel of 4 or more overflows float32 to Inf when scaled."""
    import gzip
    import struct

    raw = bytearray(gzip.decompress(path.read_bytes()))
    end = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    raw[112:120] = struct.pack(f"{end}ff", 1e38, 0.0)  # scl_slope, scl_inter
    path.write_bytes(gzip.compress(bytes(raw)))


def test_a_modality_overflowing_to_inf_fails_its_patient_named(toy, tmp_path):
    inp = _copy(toy, "2020", tmp_path / "in")
    victim = sorted(p for p in inp.iterdir() if p.is_dir())[0]
    flair = next(victim.glob("*_flair.nii.gz"))
    _overflow(flair)
    code, out, err, exc = _build(inp, tmp_path / "out")
    assert exc is None and code == 1, (code, out, err)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (f,) = m["failed"]
    assert f["patient"] == victim.name and flair.name in f["reason"] and "NaN or Inf" in f["reason"], f
    assert len(m["patients"]) == 2


def test_a_few_nonfinite_voxels_are_still_zeroed_and_counted(toy, tmp_path):
    import nibabel as nib

    from preprocess.config import PreprocessConfig
    from preprocess.pipeline import process_patient

    inp = _copy(toy, "2020", tmp_path / "in")
    pf = discover(inp).patients[0]
    img = nib.load(str(pf.files["t2"]))
    data = np.asarray(img.dataobj).astype(np.float32)
    idx = np.argwhere(data > 0)[:5]
    data[tuple(idx.T)] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(pf.files["t2"]))
    ps = process_patient(pf, PreprocessConfig(size=16), inp)
    assert ps.nonfinite_voxels == 5


def test_nan_written_as_background_outside_the_brain_is_still_background(toy, tmp_path):
    """Some tools write NaN outside the brain: most of the volume, none of the brain."""
    import nibabel as nib

    from preprocess.config import PreprocessConfig
    from preprocess.pipeline import process_patient

    inp = _copy(toy, "2020", tmp_path / "in")
    pf = discover(inp).patients[0]
    img = nib.load(str(pf.files["t2"]))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[data == 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(pf.files["t2"]))
    ps = process_patient(pf, PreprocessConfig(size=16), inp)
    assert ps.nonfinite_voxels == int(np.isnan(data).sum()) > data.size // 2


def test_the_only_modality_all_inf_fails_its_patient_named(tmp_path):
    """MEN-RT has one modality: overflowed, no brain is left to weigh it against."""
    inp = tmp_path / "in"
    write_release(inp, "men-rt", 2, shape=TINY, seed=4)
    pf = discover(inp).patients[0]
    _overflow(pf.files["t1gd"])
    from preprocess.config import PreprocessConfig
    from preprocess.pipeline import process_patient
    from preprocess.errors import InputError

    with pytest.raises(InputError, match=f"{pf.files['t1gd'].name}: NaN or Inf"):
        process_patient(pf, PreprocessConfig(size=16), inp)


def test_a_modality_mostly_nan_fails_its_patient(toy, tmp_path):
    import nibabel as nib

    from preprocess.config import PreprocessConfig
    from preprocess.pipeline import process_patient
    from preprocess.errors import InputError

    inp = _copy(toy, "2020", tmp_path / "in")
    pf = discover(inp).patients[0]
    img = nib.load(str(pf.files["t1"]))
    data = np.asarray(img.dataobj).astype(np.float32)
    brain = np.argwhere(data > 0)
    data[tuple(brain[: len(brain) * 3 // 4].T)] = np.nan  # three quarters of the brain
    nib.save(nib.Nifti1Image(data, img.affine), str(pf.files["t1"]))
    with pytest.raises(InputError, match=pf.files["t1"].name):
        process_patient(pf, PreprocessConfig(size=16), inp)


# ---------------------------------------------------------------- case 22a: deep trees, links

def _deep(top: Path, levels: int) -> Path:
    d = top
    for _ in range(levels):  # one level at a time: os.makedirs recurses
        d = d / "d"
        d.mkdir()
    return d


@pytest.fixture
def deep_root(tmp_path):
    root = tmp_path / "deep"
    root.mkdir()
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=True)  # shutil.rmtree recurses on Python 3.11


def test_a_patient_folder_1100_levels_deep_is_one_refusal(toy, deep_root, tmp_path):
    shutil.copytree(toy / "2020", deep_root / "in")
    bottom = _deep(deep_root / "in", 1100)
    _touch(bottom, "2020", ["BraTS20_Training_900"])
    with pytest.raises(DiscoveryError, match="deeper than"):
        discover(deep_root / "in")
    out = tmp_path / "out"
    _refused(_build(deep_root / "in", out), "deeper than", str(deep_root / "in"))
    assert not out.exists()


def test_a_patient_a_few_dozen_levels_deep_is_found(deep_root):
    _touch(deep_root, "2020", _ids("2020"))
    _touch(_deep(deep_root, 60), "2020", ["BraTS20_Training_900"])
    d = discover(deep_root)
    assert [p.pid for p in d.patients][-1] == "BraTS20_Training_900" and all(not p.problem for p in d.patients)


def test_a_loop_through_a_sibling_is_refused_naming_the_link(tmp_path):
    root = _touch(tmp_path / "in", "2020", _ids("2020"))
    (root / "a").mkdir()
    (root / "b").mkdir()
    os.symlink(root / "b", root / "a" / "to_b")
    os.symlink(root / "a", root / "b" / "to_a")
    with pytest.raises(DiscoveryError, match="to_[ab]"):
        discover(root)


def test_links_that_reach_one_folder_many_ways_are_refused_not_walked(tmp_path):
    """Two links per level to the next: 2**N paths and no loop (N = 12 here, so that today's code
    ends; at 40 a walk would never end)."""
    root = _touch(tmp_path / "in", "2020", _ids("2020"))
    levels = [root / f"l{i}" for i in range(12)]
    for d in levels:
        d.mkdir()
    for d, nxt in zip(levels, levels[1:]):
        os.symlink(nxt, d / "x")
        os.symlink(nxt, d / "y")
    with pytest.raises(DiscoveryError, match="same folder"):
        discover(root)


# ---------------------------------------------------------------- variants found attacking the fixes

def test_a_release_given_for_an_hdf5_slice_export_is_refused(tmp_path):
    from preprocess.h5slices import write_export
    from preprocess.synthetic.toy import make_case

    case = make_case(1, shape=(16, 16, 4), release="2020", seed=1)
    write_export(tmp_path / "h5", 1, np.stack(case.images), case.seg)
    assert discover(tmp_path / "h5").convention == "2020"
    with pytest.raises(DiscoveryError, match="--release 2023 does not fit"):
        discover(tmp_path / "h5", release="2023")


def test_a_stray_folder_named_as_a_ped_case_fails_alone(tmp_path):
    """An atlas in a folder that happens to carry a PED id is not a PED patient: no refusal of the
    whole (2023) input asking for --release ped-2023/ped-2024."""
    root = _touch(tmp_path, "2023", _ids("2023"))
    (root / "BraTS-PED-00001-000").mkdir()
    (root / "BraTS-PED-00001-000" / "atlas.nii.gz").write_bytes(b"")
    d = discover(root)
    assert d.convention == "2023"
    assert [p.pid for p in d.patients if p.problem] == ["BraTS-PED-00001-000"]


def test_predict_fails_an_msd_id_in_both_image_folders_and_writes_the_others_once(toy, tmp_path):
    """predict's own loop (train.predict.write_predictions over discover(need_seg=False)): the
    colliding id is named, with both files, and no output is written twice."""
    from preprocess.config import PreprocessConfig
    from train.predict import prepare_patient, write_predictions

    inp = _copy(toy, "msd", tmp_path / "in")
    (inp / "imagesTs").mkdir()
    shutil.copy(inp / "imagesTr" / "BRATS_003.nii.gz", inp / "imagesTs" / "BRATS_001.nii.gz")
    shutil.copy(inp / "imagesTr" / "BRATS_003.nii.gz", inp / "imagesTs" / "BRATS_004.nii.gz")
    calls = []

    def label_map(pf):
        ps, affine = prepare_patient(pf, PreprocessConfig(size=16))
        calls.append(pf.pid)
        return np.zeros(TINY, np.uint8), affine

    r = write_predictions(discover(inp, need_seg=False).patients, tmp_path / "out", False, label_map)
    assert sorted(r["failed"]) == ["BRATS_001"]
    assert "imagesTr/BRATS_001.nii.gz" in r["failed"]["BRATS_001"]
    assert "imagesTs/BRATS_001.nii.gz" in r["failed"]["BRATS_001"]
    assert calls == ["BRATS_002", "BRATS_003", "BRATS_004"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["BRATS_002.nii.gz", "BRATS_003.nii.gz",
                                                                    "BRATS_004.nii.gz"]


@pytest.mark.parametrize("name", ["atlas", "BRATS_002"])
def test_a_folder_beside_an_msd_layout_is_named_not_silently_left_out(toy, tmp_path, name):
    inp = _copy(toy, "msd", tmp_path / "in")
    (inp / name).mkdir()
    shutil.copy(inp / "labelsTr" / "BRATS_001.nii.gz", inp / name / "mni152.nii.gz")
    d = discover(inp)
    bad = [p for p in d.patients if p.problem]
    assert [p.pid for p in bad] == [name] and f"{name}/ is a folder beside imagesTr/" in bad[0].problem
    assert len(d.patients) == 3 + (name == "atlas")


def test_a_mix_with_an_unusable_folder_says_why_that_folder_fails(tmp_path):
    root = _touch(tmp_path, "2023", _ids("2023"))
    (root / "atlas").mkdir()
    for m in ("t1", "t2"):
        (root / "atlas" / f"atlas_{m}.nii.gz").write_bytes(b"")
    with pytest.raises(DiscoveryError, match=r"atlas cannot be used as it is: missing t1gd"):
        discover(root)


def test_a_link_to_a_large_tree_is_refused_at_the_folder_limit(tmp_path, monkeypatch):
    """A link to / would walk the whole disk: the walk stops at MAX_FOLDERS (made small here)."""
    from preprocess import input_tree

    monkeypatch.setattr(input_tree, "MAX_FOLDERS", 20)
    big = tmp_path / "big"
    for i in range(30):
        (big / f"f{i}").mkdir(parents=True)
    root = _touch(tmp_path / "in", "2020", _ids("2020"))
    os.symlink(big, root / "everything")
    with pytest.raises(DiscoveryError, match="more than 20 folders"):
        discover(root)
