"""Triplanar 2D: `build-shards --planes`, `train --plane`, `predict --ensemble` across planes.

What must hold: the coronal and sagittal slices are the same preprocessed volume cut along
another axis (square pixels, the way back exact); the axial files of a set built with more planes
are the bytes of an axial-only build; plain zarr/tar readers find every plane; a manifest whose
plane records were tampered with is refused, named; the planes' models average on the source grid.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from cli_run import cli, refused
from preprocess.config import PreprocessConfig
from preprocess.discover import discover
from preprocess.geometry import Geometry
from preprocess.nifti import load_volume
from preprocess.pipeline import process_patient
from shards.domain import RELEASES, encode_mask, regions_of
from shards.layout import PLANES
from shards.manifest import ManifestError, load_manifest
from shards.source import ShardSetError, ShardSource
from shards.verify import verify
from train import predict as predict_mod

ALL = "axial,coronal,sagittal"


def _build(inp, out, *more, size=48):
    r = cli("build-shards", inp, out, "--workers", "0", "--size", size, "--quiet", "--val-fraction", "0.34", *more)
    assert r[0] == 0, r
    return out


@pytest.fixture(scope="module")
def sets(release_2020, tmp_path_factory):
    """The same input built axial-only and with all three planes (48 px: the toy volumes' padded
    planes, so nothing is resized and the way back is exact)."""
    root = tmp_path_factory.mktemp("planes")
    return _build(release_2020, root / "axial"), _build(release_2020, root / "tri", "--planes", ALL)


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("plane", PLANES)
def test_the_way_there_and_back_is_exact_in_every_plane(plane):
    """Labels of an LPS volume of three different sides, cut into slices of the plane at the
    padded plane's size and mapped back, land on the voxels they came from."""
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 4, size=(20, 16, 12)).astype(np.uint8)
    geo = Geometry.of_source(np.diag([-1.0, -1.0, 1.0, 1.0]), seg.shape, "2020", plane=plane)
    a, b, n = geo.view_shape
    assert a == b or plane == "axial"
    slices = geo.forward(seg, list(range(n)), a, labels=True)  # (S, a, a)
    onehot = (slices[:, None] == np.arange(4)[None, :, None, None]).astype(np.float32)
    back = geo.inverse(onehot, list(range(n))).argmax(axis=0)
    np.testing.assert_array_equal(back, seg)


def test_geometry_record_of_an_axial_set_is_unchanged_and_a_plane_is_checked():
    geo = Geometry.of_source(np.eye(4), (20, 16, 12), "2020")
    assert "plane" not in geo.to_dict()  # every axial set's bytes, as before
    cor = Geometry.of_source(np.eye(4), (20, 16, 12), "2020", plane="coronal")
    assert cor.to_dict()["plane"] == "coronal" and cor.view_shape == (20, 20, 16)
    assert Geometry.from_dict(cor.to_dict()) == cor
    with pytest.raises(ValueError, match="plane"):
        Geometry.from_dict(dict(cor.to_dict(), plane="oblique"))
    with pytest.raises(ValueError, match="crop_box"):  # a box outside the padded plane
        Geometry.from_dict(dict(cor.to_dict(), crop_box=[0, 21, 0, 20]))


def test_anisotropic_voxels_are_refused_for_coronal_slices_and_named(release_copy, tmp_path):
    pf = discover(release_copy).patients[0]
    for path in pf.files.values():  # 1 x 1 x 3 mm voxels
        import nibabel as nib

        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([-1.0, -1.0, 3.0, 1.0])), path)
    process_patient(pf, PreprocessConfig(size=16))  # axial: as before
    with pytest.raises(Exception, match="square pixels") as e:
        process_patient(pf, PreprocessConfig(size=16, plane="coronal"))
    assert pf.pid in str(e.value)
    r = cli("build-shards", release_copy, tmp_path / "set", "--workers", "0", "--size", 16, "--quiet", "--planes", ALL)
    assert r[0] == 1 and "1 failed" in r[1], r  # the others are built
    failed = {f["patient"]: f["reason"] for f in load_manifest(tmp_path / "set")["failed"]}
    assert "square pixels" in failed[pf.pid]


# ---------------------------------------------------------------- the build


def test_axial_files_are_the_axial_only_build_and_the_set_verifies(sets):
    axial, tri = sets
    a, t = load_manifest(axial), load_manifest(tri)
    ha, ht = ({f["path"]: f["sha256"] for f in m["files"]} for m in (a, t))
    assert all(ht.get(p) == h for p, h in ha.items())
    assert t["config"]["planes"] == ALL.split(",") and "planes" not in a["config"]
    assert a["patients"] == {p: {k: v for k, v in e.items() if k != "planes"} for p, e in t["patients"].items()}
    assert verify(tri) == []
    r = cli("info", tri)
    assert r[0] == 0 and "planes" in r[1], r


def test_plane_slices_are_the_volume_cut_along_another_axis(sets, release_2020):
    """A coronal slice's mask is the segmentation at that RAS y (nibabel's own reorientation, the
    48 x 24 plane padded by 12 zeros each side), a sagittal one at that x; read by plain zarr."""
    import nibabel as nib
    import zarr

    _, tri = sets
    m = load_manifest(tri)
    pid = m["splits"]["val"][0]  # every brain slice kept
    pf = next(p for p in discover(release_2020).patients if p.pid == pid)
    ras = np.asarray(nib.as_closest_canonical(nib.load(pf.files["seg"])).dataobj).astype(np.uint8)
    assert ras.shape == (48, 48, 24)
    cut = {"coronal": lambda k: ras[:, k, :], "sagittal": lambda k: ras[k, :, :]}
    for plane in ("coronal", "sagittal"):
        entry = m["patients"][pid]["planes"][plane]
        g = zarr.open_group(str(tri / "zarr" / "val" / pid / plane), mode="r")
        assert g.attrs["geometry"]["plane"] == plane and g["image"].shape[0] == entry["n_slices"] > 24
        for i, k in enumerate(entry["slice_index"]):
            labels = np.pad(cut[plane](k), ((0, 0), (12, 12)))
            want = encode_mask(labels[None], RELEASES["2020"], "subregions")[:, 0]
            np.testing.assert_array_equal(g["mask"][i], want)


def test_plain_tar_readers_find_each_plane_apart(sets):
    _, tri = sets
    m = load_manifest(tri)
    pid = m["splits"]["train"][0]
    for plane in PLANES:
        rel = ("wds" if plane == "axial" else f"wds/{plane}") + f"/train-{pid}.tar"
        with tarfile.open(tri / rel) as tf:
            metas = [json.load(tf.extractfile(n)) for n in tf.getnames() if n.endswith(".meta.json")]
        n = m["patients"][pid]["n_slices"] if plane == "axial" else m["patients"][pid]["planes"][plane]["n_slices"]
        assert len(metas) == n and all(x.get("plane", "axial") == plane for x in metas)
    assert sorted(p.name for p in (tri / "wds").glob("*.tar")) == sorted(
        f"{m['patients'][p]['split']}-{p}.tar" for p in m["patients"])  # wds/*.tar: axial alone


def test_reader_gives_the_same_plane_from_zarr_and_wds_and_refuses_a_missing_plane(sets):
    axial, tri = sets
    src = ShardSource(tri).select_plane("sagittal")
    pid = src.patients("train")[0]
    zi, zm, _ = src.read_patient(pid, "zarr")
    wi, wm, _ = src.read_patient(pid, "wds")
    assert zi.shape[0] == src.n_slices(pid) == load_manifest(tri)["patients"][pid]["planes"]["sagittal"]["n_slices"]
    np.testing.assert_array_equal(zi, wi)
    np.testing.assert_array_equal(zm, wm)
    assert src.manifest["config"]["preprocess"]["plane"] == "sagittal"
    with pytest.raises(ShardSetError, match="--planes axial,coronal"):
        ShardSource(axial).select_plane("coronal")


def test_rerun_is_incremental_and_other_planes_are_another_set(sets, release_2020, tmp_path):
    _, tri = sets
    out = tmp_path / "tri"
    shutil.copytree(tri, out)
    before = (out / "manifest.json").read_bytes()
    r = cli("build-shards", release_2020, out, "--workers", "0", "--size", "48", "--quiet", "--val-fraction", "0.34",
            "--planes", ALL)
    assert r[0] == 0 and "0 built" in r[1], r
    assert (out / "manifest.json").read_bytes() == before
    refused(cli("build-shards", release_2020, out, "--workers", "0", "--size", "48", "--quiet", "--val-fraction",
                "0.34", "--planes", "axial,coronal"), "another config")


def test_a_crashed_plane_tar_write_is_swept(sets, release_2020, tmp_path):
    _, tri = sets
    out = tmp_path / "tri"
    shutil.copytree(tri, out)
    pid = load_manifest(out)["splits"]["train"][0]
    leftover = out / "wds" / "coronal" / f".train-{pid}.tar.1234.tmp"
    leftover.write_bytes(b"half a tar")
    _build(release_2020, out, "--planes", ALL)
    assert not leftover.exists() and verify(out) == []


@pytest.mark.parametrize("bad", ["coronal", "axial,axial", "sagittal,coronal", "axial,oblique", "", "axial,,coronal"])
def test_bad_planes_are_refused_in_one_line(release_2020, tmp_path, bad):
    refused(cli("build-shards", release_2020, tmp_path / "o", "--planes", bad), "--planes")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- hostile manifests


def _tamper(tri, tmp_path, edit):
    out = tmp_path / "t"
    shutil.copytree(tri, out)
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def _first(m):
    return m["patients"][sorted(m["patients"])[0]]


def _move_tar(m):  # a coronal tar listed where the axial one is: another plane's slices read as axial
    f = next(f for f in m["files"] if f.get("plane") == "coronal" and f["format"] == "wds")
    f["path"] = f["path"].replace("wds/coronal/", "wds/")


TAMPERED = {
    "plane missing from a patient": (lambda m: _first(m)["planes"].pop("sagittal"), "planes"),
    "planes on an axial set": (lambda m: m["config"].pop("planes"), "planes"),
    "geometry of another plane": (lambda m: _first(m)["planes"]["coronal"]["geometry"].update(plane="sagittal"),
                                  "geometry"),
    "slice count out of range": (lambda m: _first(m)["planes"]["coronal"].update(n_slices=-1), "n_slices"),
    "unknown plane in config": (lambda m: m["config"].update(planes=["axial", "oblique"]), "config.planes"),
    "axial not first": (lambda m: m["config"].update(planes=["coronal", "axial", "sagittal"]), "config.planes"),
    "plane in the set's preprocess": (lambda m: m["config"]["preprocess"].update(plane="coronal"), "preprocess.plane"),
    "file of an unknown plane": (lambda m: m["files"][0].update(plane="oblique"), "plane"),
    "plane tar moved": (_move_tar, "tar"),
    "plane tar dropped": (lambda m: m["files"].remove(next(f for f in m["files"] if f.get("plane") == "sagittal"
                                                            and f["format"] == "wds")), "one tar per patient and plane"),
    "planes as a list": (lambda m: _first(m).update(planes=["coronal", "sagittal"]), "mapping"),
    "a plane record overriding the split": (lambda m: _first(m)["planes"]["coronal"].update(split="val"),
                                            "not exactly"),
    "slice_index of letters": (lambda m: _first(m)["planes"]["coronal"].update(
        slice_index=["a"] * _first(m)["planes"]["coronal"]["n_slices"]), "slice_index"),
    "slice_index too short": (lambda m: _first(m)["planes"]["sagittal"].update(slice_index=[1]), "slice_index"),
    "slice_index repeated": (lambda m: _first(m)["planes"]["sagittal"].update(
        slice_index=[5] * _first(m)["planes"]["sagittal"]["n_slices"]), "slice_index"),
    "slice_index huge": (lambda m: _first(m)["planes"]["sagittal"].update(
        slice_index=[10**30] * _first(m)["planes"]["sagittal"]["n_slices"]), "slice_index"),
    "mask_pixels of another channel count": (lambda m: _first(m)["planes"]["coronal"].update(mask_pixels=[1, 2]),
                                             "mask_pixels"),
    "pixels not n_slices slices": (lambda m: _first(m)["planes"]["coronal"].update(
        pixels=_first(m)["planes"]["coronal"]["pixels"] + 1), "pixels"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_plane_records_are_refused(sets, tmp_path, case):
    edit, words = TAMPERED[case]
    out = _tamper(sets[1], tmp_path, edit)
    with pytest.raises(ManifestError, match=words):
        load_manifest(out)
    refused(cli("info", out), words)


def _val_plane(m, plane="coronal"):
    return m["patients"][m["splits"]["val"][0]]["planes"][plane]


GEOMETRY = {  # valid as a manifest, wrong as a geometry: refused when training opens the set
    "no spacing": lambda m: _val_plane(m).update(geometry={"plane": "coronal"}),
    "spacing of letters": lambda m: _val_plane(m)["geometry"].update(spacing="abc"),
    "crop box outside the padded plane": lambda m: _val_plane(m)["geometry"].update(crop_box=[0, 1000, 0, 1000]),
    "slices beyond the plane's axis": lambda m: _val_plane(m).update(
        slice_index=list(range(100, 100 + _val_plane(m)["n_slices"]))),
}


@pytest.mark.parametrize("case", sorted(GEOMETRY))
def test_a_tampered_plane_geometry_is_refused_before_training(sets, tmp_path, case):
    out = _tamper(sets[1], tmp_path, GEOMETRY[case])
    refused(cli("train", out, "--out", tmp_path / "run", "--plane", "coronal", *TRAIN), "coronal")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_build_accepts_the_planes_in_any_order_as_one_config(release_2020, sets, tmp_path):
    out = tmp_path / "tri"
    shutil.copytree(sets[1], out)
    before = (out / "manifest.json").read_bytes()
    r = cli("build-shards", release_2020, out, "--workers", "0", "--size", "48", "--quiet", "--val-fraction", "0.34",
            "--planes", "sagittal, axial,coronal")
    assert r[0] == 0 and "0 built" in r[1], r
    assert (out / "manifest.json").read_bytes() == before


def test_verify_refuses_a_listed_file_that_is_a_link(sets, tmp_path):
    out = tmp_path / "t"
    shutil.copytree(sets[1], out)
    pid = load_manifest(out)["splits"]["train"][0]
    tar = out / "wds" / "coronal" / f"train-{pid}.tar"
    outside = tmp_path / "outside.tar"
    shutil.move(tar, outside)
    tar.symlink_to(outside)  # the same bytes, elsewhere: verify must not read through it
    problems = verify(out)
    assert any("symbolic link" in p and f"train-{pid}.tar" in p for p in problems), problems


def test_show_of_a_plane_run_draws_that_plane(runs, sets, tmp_path, monkeypatch):
    import train.show as show

    seen = []
    real = show.ShardSource.select_plane

    def spy(self, plane):
        seen.append(plane)
        return real(self, plane)

    monkeypatch.setattr(show.ShardSource, "select_plane", spy)
    r = cli("show", "--run", runs / "sagittal", "--out", tmp_path / "fig")
    assert r[0] == 0, r
    assert seen == ["sagittal"] and any((tmp_path / "fig").iterdir())


def test_export_of_a_plane_model_names_its_plane(runs, tmp_path):
    r = cli("export", runs / "coronal" / "checkpoints" / "last.pt", tmp_path / "m.pt", "--format", "torchscript")
    assert r[0] == 0, r
    meta = json.loads((tmp_path / "m.pt.json").read_text())
    assert meta["preprocess"]["plane"] == "coronal" and "coronal slice" in meta["context"]["rule"]
    assert "canonical RAS y" in meta["context"]["rule"]


def test_a_tampered_plane_shard_fails_verify(sets, tmp_path):
    out = tmp_path / "t"
    shutil.copytree(sets[1], out)
    f = next(f for f in load_manifest(out)["files"] if f.get("plane") == "sagittal" and f["path"].endswith("/0"))
    data = bytearray((out / f["path"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / f["path"]).write_bytes(bytes(data))
    problems = verify(out)
    assert any(f["path"] in p for p in problems), problems


# ---------------------------------------------------------------- train --plane, predict --ensemble

TRAIN = ("--epochs", "1", "--max-batches", "2", "--batch-size", "8", "--base-channels", "8", "--depth", "2",
         "--num-workers", "0", "--device", "cpu", "--quiet", "--checkpoint-every", "0")


@pytest.fixture(scope="module")
def runs(sets, tmp_path_factory):
    root = tmp_path_factory.mktemp("plane-runs")
    for plane in PLANES:
        r = cli("train", sets[1], "--out", root / plane, "--plane", plane, *TRAIN)
        assert r[0] == 0, r
    return root


def test_train_on_a_plane_records_it_for_predict_and_resume(runs, sets):
    ck = torch.load(runs / "coronal" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["config"]["plane"] == "coronal" and ck["preprocess"]["preprocess"]["plane"] == "coronal"
    ax = torch.load(runs / "axial" / "checkpoints" / "last.pt", weights_only=True)
    assert "plane" not in ax["preprocess"]["preprocess"]  # an axial model's record as before
    r = cli("train", sets[1], "--out", runs / "coronal", "--resume", *TRAIN[:1], "2", *TRAIN[2:])
    assert r[0] == 0, r  # no --plane: the checkpoint's
    refused(cli("train", sets[1], "--out", runs / "coronal", "--resume", "--plane", "sagittal", "--epochs", "3"),
            "plane")
    refused(cli("train", sets[0], "--out", runs / "x", "--plane", "coronal", *TRAIN), "coronal", "--planes")
    refused(cli("train", sets[1], "--out", runs / "y", "--plane", "oblique", *TRAIN), "--plane")


def test_validation_figures_of_a_plane_count_its_own_slices(runs, sets):
    """Per-patient validation rows of the coronal run are over the coronal slices' patients."""
    text = (runs / "coronal" / "val_patients.csv").read_text()
    assert all(pid in text for pid in load_manifest(sets[1])["splits"]["val"])


def test_ensemble_of_planes_is_the_mean_on_the_source_grid(runs, release_2020, tmp_path):
    dev = torch.device("cpu")
    ms = [predict_mod.load_checkpoint(runs / p / "checkpoints" / "last.pt", dev) for p in PLANES]
    predict_mod.check_ensemble(ms)
    pf = discover(release_2020, need_seg=False).patients[0]
    members = [(m["model"], m["context"], m["preprocess"]) for m in ms]
    prob, affine = predict_mod.ensemble_probabilities(pf, members, dev)
    alone = [predict_mod.ensemble_probabilities(pf, [mem], dev)[0] for mem in members]
    assert prob.shape[1:] == load_volume(pf.files["t1"]).data.shape
    np.testing.assert_allclose(prob, sum(alone) / 3, atol=1e-6)
    assert not np.allclose(alone[0], alone[1])  # the planes do differ
    r = cli("predict", runs / "axial", release_2020, tmp_path / "pred", "--ensemble", runs / "coronal", "--ensemble",
            runs / "sagittal", "--quiet", "--device", "cpu")
    assert r[0] == 0 and "6 prediction(s) written, 0 failed" in r[1], r
    out = load_volume(tmp_path / "pred" / f"{pf.pid}.nii.gz")
    np.testing.assert_allclose(out.affine, affine)


def test_an_ensemble_still_refuses_other_recipes(runs):
    dev = torch.device("cpu")
    a, c = (predict_mod.load_checkpoint(runs / p / "checkpoints" / "last.pt", dev) for p in ("axial", "coronal"))
    c = dict(c, preprocess=replace(c["preprocess"], size=32))
    with pytest.raises(predict_mod.PredictError, match="preprocess"):
        predict_mod.check_ensemble([a, c])


@pytest.mark.parametrize("plane", PLANES)
def test_a_perfect_model_of_any_plane_writes_back_the_segmentation(release_2020, tmp_path, monkeypatch, plane):
    """The model's output replaced by the truth of that plane's slices: the way back of every plane
    (transpose, padding, box) lands the labels on the source voxels they came from."""
    pf = discover(release_2020).patients[0]
    pre = PreprocessConfig(size=48, plane=plane)
    truth = process_patient(pf, pre)
    regions = regions_of(truth.mask, 1, pf.release).astype(np.float32)
    monkeypatch.setattr(predict_mod, "predict_slices", lambda *a, **k: regions)
    labels, _ = predict_mod.predict_patient(torch.nn.Identity(), pre, "regions", pf, torch.device("cpu"))
    seg = load_volume(pf.files["seg"]).data
    brain = np.zeros(seg.shape, bool)  # the slices kept: brain in the plane
    inv = truth.geometry.inverse(np.ones((len(truth.slice_index), 1, 48, 48), np.float32), truth.slice_index)[0] > 0
    brain |= inv
    np.testing.assert_array_equal(labels[brain], seg[brain])
    assert not seg[~brain].any()  # no tumour outside the kept slices
