"""Every release of the table: discovery, build, train, predict and evaluate, on tiny fake cases
(preprocess/synthetic/releases.py) of each layout, on odd grids."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from preprocess.build import BuildConfig, build
from preprocess.discover import DiscoveryError, discover
from preprocess.nifti import load_volume
from preprocess.config import PreprocessConfig
from preprocess.steps import brain_mask
from preprocess.pipeline import process_patient
from preprocess.synthetic.toy import make_demo_data
from preprocess.synthetic.releases import release_case, write_release, write_release_case
from shards.domain import RELEASES, regions_of, subregion_channels, subregions_of
from shards.source import ShardSource
from train import checkpoint as ckpt
from train.evaluate import evaluate
from train.loop import TrainConfig, train
from train import predict as predict_mod

GRID = (45, 54, 45)  # the 2024 MNI152 grid 182x218x182, downscaled: odd and not square
FORCED = {"ped-2024": "ped-2024", "ped-2023": "ped-2023"}  # same names, other labels: named
DEFACED = {"ped-2024", "ped-2023", "men-rt"}
TINY = TrainConfig(base_channels=4, depth=2, batch_size=8, num_workers=0, epochs=1, max_batches=2)


def _write(root, name, n=3, **kw):
    return write_release(root, name, n, shape=GRID, defaced=name in DEFACED, **kw)


# ---------------------------------------------------------------- discovery

@pytest.mark.parametrize("name", [n for n in RELEASES if n not in ("2020", "2023")])
def test_discovery_detects_each_convention(tmp_path, name):
    ids = _write(tmp_path, name, n=2)
    d = discover(tmp_path, release=FORCED.get(name))
    assert d.convention == name
    assert [p.pid for p in d.patients] == sorted(ids) and not any(p.problem for p in d.patients)
    if RELEASES[name].layout == "folders":
        assert set(d.patients[0].files) == set(RELEASES[name].modalities) | {"seg"}


def test_2023_names_stay_2023_and_2024_absorbs_its_pre_treatment_cases(tmp_path):
    make_demo_data(tmp_path / "a", 2, shape=(24, 24, 12), release="2023")
    assert discover(tmp_path / "a").convention == "2023"  # BraTS-GLI-xxxxx-000 only: the 2023 set
    make_demo_data(tmp_path / "b", 1, shape=(24, 24, 12), release="2023")
    write_release_case(tmp_path / "b", "gli-2024", 7, shape=(24, 24, 12))
    d = discover(tmp_path / "b")  # a 2024 set: one -000 (pre-treatment) and one -100 case
    assert d.convention == "gli-2024" and {p.pid[-3:] for p in d.patients} == {"000", "100"}


@pytest.mark.parametrize("other", ["men", "gli-2024", "2023"])
def test_mixed_releases_refused_naming_two_patients(tmp_path, other):
    make_demo_data(tmp_path, 1, shape=(24, 24, 12), release="2020")
    if other == "2023":  # a 2023-named GLI case beside a 2020 one
        make_demo_data(tmp_path, 1, shape=(24, 24, 12), release="2023", start=5)
        second = "BraTS-GLI-00005-000"
    else:
        second = write_release_case(tmp_path, other, 3, shape=(24, 24, 12))
    with pytest.raises(DiscoveryError, match="mixes releases") as e:
        discover(tmp_path)
    msg = str(e.value)
    assert "BraTS20_Training_001" in msg and second in msg and "\n" not in msg


def test_ped_ids_need_the_release_named(tmp_path):
    _write(tmp_path, "ped-2024", n=1)
    with pytest.raises(DiscoveryError, match="--release ped-2024 or ped-2023"):
        discover(tmp_path)
    assert discover(tmp_path, release="ped-2023").convention == "ped-2023"


# ---------------------------------------------------------------- build

@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """name -> (input folder, shard set) for the releases the trainer tests use."""
    out = {}
    for name, mask in (("gli-2024", "subregions"), ("men-rt", "subregions"), ("msd", "regions")):
        root = tmp_path_factory.mktemp(name)
        _write(root / "in", name, n=4)
        build(root / "in", root / "shards", BuildConfig(PreprocessConfig(size=32, mask=mask), val_fraction=0.3),
              workers=0, progress=False)
        out[name] = (root / "in", root / "shards")
    return out


@pytest.mark.parametrize("name", [n for n in RELEASES if n not in ("2020", "2023")])
def test_build_holds_the_release_channels(tmp_path, name):
    _write(tmp_path / "in", name, n=2)
    m = build(tmp_path / "in", tmp_path / "s", BuildConfig(PreprocessConfig(size=24)), workers=0, progress=False,
              release=FORCED.get(name)).manifest
    rel = RELEASES[name]
    assert m["config"]["convention"] == name and not m["failed"]
    mods, chans = list(rel.modalities), list(rel.subregions)
    default = mods == ["t1", "t1gd", "t2", "flair"] and chans == ["NCR/NET", "ED", "ET"]
    assert m["config"].get("modalities", mods) == mods and m["config"].get("mask_channels", chans) == chans
    assert default or m["config"]["modalities"] == mods  # written where not the glioma default
    src = ShardSource(str(tmp_path / "s"))
    pid = sorted(m["patients"])[0]
    for fmt in ("zarr", "wds"):
        image, mask, _ = src.read_patient(pid, fmt)
        assert image.shape[1:] == (len(mods), 24, 24) and mask.shape[1:] == (len(chans), 24, 24)
    attrs = json.loads((tmp_path / "s" / "zarr" / m["patients"][pid]["split"] / pid / "zarr.json").read_text())
    assert attrs["attributes"]["modalities"] == mods and attrs["attributes"]["mask_channels"] == chans
    geo = m["patients"][pid]["geometry"]
    assert sorted(geo["source_shape"]) == sorted(GRID)  # no 240x240x155 assumed anywhere


def test_resection_cavity_is_its_own_channel(tmp_path):
    pid = write_release_case(tmp_path, "gli-2024", 2, shape=GRID)
    assert pid.endswith("-100")  # post-treatment timepoint
    seg = load_volume(tmp_path / pid / f"{pid}-seg.nii.gz").data
    assert 4 in np.unique(seg)  # label 4 is RC here, not enhancing tumour
    pf = discover(tmp_path).patients[0]
    ps = process_patient(pf, PreprocessConfig(size=24))
    rc, et = ps.mask[:, 3].sum(), ps.mask[:, 2].sum()
    assert rc > 0 and et > 0
    sub = subregion_channels(seg, RELEASES["gli-2024"])
    assert sub[3].sum() == (seg == 4).sum() and not (sub[2] & sub[3]).any()  # RC never merged into ET
    reg = regions_of(sub, 0, RELEASES["gli-2024"])
    assert not (reg[0] & sub[3]).any()  # nor into the whole tumour
    assert np.array_equal(subregions_of(reg, 0, RELEASES["gli-2024"]), sub)


def test_men_rt_is_one_modality_one_target(sets):
    m = ShardSource(str(sets["men-rt"][1])).manifest
    assert m["config"]["modalities"] == ["t1gd"] and m["config"]["mask_channels"] == ["GTV"]
    assert all(len(p["mask_pixels"]) == 1 for p in m["patients"].values())
    pid = sorted(m["patients"])[0]
    assert set(m["patients"][pid]["sources"]) == {"t1gd", "seg"}


def test_defaced_head_is_the_brain_mask(tmp_path):
    """Rule: the brain mask is the nonzero voxels, as for skull-stripped data; with a defaced head
    that is the head, so slices with head are kept and z-scores use the head's statistics."""
    shape = (40, 40, 20)
    pid, images, seg = release_case("ped-2024", 1, shape=shape, defaced=True)
    head = np.any([img != 0 for img in images.values()], axis=0)
    brain_only = release_case("ped-2024", 1, shape=shape, defaced=False)[1]["t1"] != 0
    assert head.sum() > 1.3 * brain_only.sum()  # the scalp is there, around the brain
    assert np.array_equal(brain_mask(list(images.values())), head)
    write_release_case(tmp_path, "ped-2024", 1, shape=shape, defaced=True)
    pf = discover(tmp_path, release="ped-2024").patients[0]
    ps = process_patient(pf, PreprocessConfig(size=40))  # native in-plane size: no resize
    assert ps.slice_index == [int(z) for z in np.nonzero(head.any(axis=(0, 1)))[0]]  # head slices, not brain's
    img = ps.image.astype(np.float32)  # (S, 4, X, Y) in RAS order, as `release_case` made it
    inside = np.moveaxis(head[:, :, ps.slice_index], 2, 0)  # (S, X, Y)
    for c in range(img.shape[1]):
        v = img[:, c][inside]
        assert abs(v.mean()) < 0.01 and abs(v.std() - 1) < 0.01  # z-scored over the head
        assert not img[:, c][~inside].any()  # outside the head: background 0


# ---------------------------------------------------------------- train, predict, evaluate

@pytest.fixture(scope="module")
def runs(sets, tmp_path_factory):
    out = {}
    for name in sets:
        run = tmp_path_factory.mktemp(f"run-{name}")
        train(str(sets[name][1]), run, TINY, progress=False)
        out[name] = run
    return out


@pytest.mark.parametrize("name,n_in,outputs", [
    ("gli-2024", 4, ["WT", "TC", "ET", "RC"]),  # regions targets: RC a fourth output, scored alone
    ("men-rt", 1, ["GTV"]),
    ("msd", 4, ["WT", "TC", "ET"]),
])
def test_train_one_epoch_with_the_set_channels(runs, name, n_in, outputs):
    ck = ckpt.load(runs[name] / "checkpoints" / "last.pt")
    assert ck["channels"] == outputs
    assert ck["model"]["inc.net.0.weight"].shape[1] == n_in
    assert ck["model"]["head.weight"].shape[0] == len(outputs)
    with open(runs[name] / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert all(f"patient_dice_{r}" in row for r in RELEASES[name].regions)
    assert all(f"dice_sub_{s}" in row for s in RELEASES[name].subregions)


@pytest.fixture
def oracle(monkeypatch):
    """predict with the truth as the model's output (the regions of the patient's own mask): the
    channels -> labels -> file path is then checked exactly (a one-epoch model predicts little)."""
    seen = {}
    real_prepare = predict_mod.prepare_planes

    def prepare(pf, recipes):
        pre = recipes[0]
        truth = process_patient(pf, pre)  # predict's discovery still lists the segmentation
        seen["regions"] = truth.mask if pre.mask == "regions" else regions_of(truth.mask, 1, pf.release)
        return real_prepare(pf, recipes)  # what predict itself reads: the images alone

    monkeypatch.setattr(predict_mod, "prepare_planes", prepare)
    monkeypatch.setattr(predict_mod, "predict_slices",
                        lambda model, image, *a, **k: seen["regions"].astype(np.float32))


@pytest.mark.parametrize("name,values", [("gli-2024", {0, 1, 2, 3, 4}), ("msd", {0, 1, 2, 3}), ("men-rt", {0, 1})])
def test_predict_writes_the_input_convention(sets, runs, oracle, tmp_path, name, values):
    src = sets[name][0]
    ck = runs[name] / "checkpoints" / "last.pt"
    r = predict_mod.predict(ck, src, tmp_path / "pred", progress=False, postprocess=False)
    assert not r["failed"] and len(r["written"]) == 4
    found = set()
    for pf in discover(src).patients:
        out = load_volume(tmp_path / "pred" / f"{pf.pid}.nii.gz")
        ref = load_volume(pf.files["seg"])
        assert out.data.shape == ref.data.shape == GRID
        assert np.allclose(out.affine, ref.affine) and out.data.dtype == np.uint8
        found |= set(np.unique(out.data).tolist())
    assert found == values  # RC written as 4; MSD 1 oedema, 2 NET, 3 ET; MEN-RT 1 GTV
    scores = evaluate(tmp_path / "pred", src, progress=False)
    assert not scores["failed"] and len(scores["rows"]) == 4
    regions = list(RELEASES[name].regions)
    assert [k for k in scores["rows"][0] if k.startswith("dice_") and "sub" not in k] == [f"dice_{g}" for g in regions]
    for g in regions:  # the truth through the way back; 45x54 -> 32x32 -> 45x54 blurs small ET (measured 0.75)
        assert scores["summary"][f"dice_{g}"]["mean"] > 0.65, (g, scores["summary"])


def test_predict_refuses_an_input_of_other_channels(runs, tmp_path):
    make_demo_data(tmp_path / "in", 1, shape=(32, 32, 16), release="2020")
    r = predict_mod.predict(runs["men-rt"] / "checkpoints" / "last.pt", tmp_path / "in", tmp_path / "pred",
                            progress=False)
    (reason,) = r["failed"].values()
    assert "trained on men-rt" in reason and not r["written"]


def test_evaluate_runs_on_the_tiny_models_predictions(sets, runs, tmp_path):
    """Without the oracle: predict with the one-epoch model, then evaluate, for each release."""
    for name in sets:
        out = tmp_path / name
        r = predict_mod.predict(runs[name] / "checkpoints" / "last.pt", sets[name][0], out, progress=False)
        assert not r["failed"]
        scores = evaluate(out, sets[name][0], progress=False)
        assert not scores["failed"] and all(f"hd95_{g}" in scores["rows"][0] for g in RELEASES[name].regions)
        for path in r["written"]:
            assert set(np.unique(load_volume(path).data)) <= set(RELEASES[name].label_values)
