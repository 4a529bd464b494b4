"""The training recipe's ingredients: model variants, targets, loss, schedule, oversampling, 2.5D
context, folds, and the recipe end to end (train -> checkpoint -> predict, ensembles)."""

import dataclasses

import numpy as np
import pytest
import torch

from preprocess.discover import discover
from preprocess.nifti import load_volume
from shards.domain import regions_of, subregions_of
from shards.source import ShardSource
from train import checkpoint
from train.data import SliceStream, StreamConfig, fold_patients, neighbour_rows, oversample, with_context
from train.config import TrainConfig
from train.errors import TrainError
from train.loop import train
from train.model import build_model
from train.predict import PredictError, predict
from train.recipe import SEED_RECIPE, ds_weights, lr_factor, make_recipe_loss, to_targets

TINY = TrainConfig(base_channels=4, depth=3, batch_size=8, num_workers=0, epochs=2)


# ---------------------------------------------------------------- model

def test_deep_supervision_outputs_in_training_only():
    m = build_model("unet", 4, 4, norm="instance", act="leaky", deep_supervision=True)
    out = m.train()(torch.zeros(2, 4, 32, 32))
    assert [tuple(o.shape) for o in out] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    assert tuple(m.eval()(torch.zeros(1, 4, 32, 32)).shape) == (1, 3, 32, 32)
    assert isinstance(m.inc.net[1], torch.nn.InstanceNorm2d) and isinstance(m.inc.net[2], torch.nn.LeakyReLU)


def test_seed_model_keeps_its_parameter_names():
    """A checkpoint of the seed recipe (batch norm, no heads) loads into the model built from its config."""
    names = set(build_model("unet", 4, 2).state_dict())
    assert "inc.net.1.running_mean" in names and not any(n.startswith("aux_heads") for n in names)


def test_old_checkpoint_configs_read_as_the_seed_recipe():
    cfg = TrainConfig.from_dict({"model": "unet", "augment": True, "lr": 3e-3})
    assert (cfg.norm, cfg.act, cfg.targets, cfg.optimizer, cfg.schedule) == ("batch", "relu", "channels", "adam", "plateau")
    assert cfg.augment == "light" and cfg.lr == 3e-3 and cfg.fg_fraction == 0 and not cfg.postprocess
    assert TrainConfig.from_dict({"augment": False}).augment == "off"


def test_the_default_samples_as_nnunet_without_deep_supervision_and_old_runs_keep_theirs(shard_set, tmp_path):
    """The default (measured on the bench): deep supervision off, nnU-Net's class-balanced draws an
    option (off). A config stored before fg_balance existed reads as off (the seed recipe's); one
    stored with deep supervision on keeps it, so such a run resumes as it started."""
    from train.config import from_options

    assert not TrainConfig().fg_balance and not TrainConfig().deep_supervision
    assert not TrainConfig.from_dict({"model": "unet", "fg_fraction": 1 / 3}).fg_balance
    assert TrainConfig.from_dict({**TrainConfig().to_dict(), "deep_supervision": True}).deep_supervision
    seed = from_options("seed", {})
    assert not seed.fg_balance and seed.fg_fraction == 0.0
    given = from_options("default", {"fg_balance": True, "deep_supervision": True})
    assert given.deep_supervision and given.fg_balance
    run = tmp_path / "run"
    train(str(shard_set), run, dataclasses.replace(TINY, epochs=1, max_batches=2), progress=False)
    stored = checkpoint.load(run / "checkpoints" / "last.pt")
    assert stored["config"]["fg_balance"] is False and stored["config"]["deep_supervision"] is False
    assert not any(k.startswith("aux_heads") for k in stored["model"])


def test_config_refuses_bad_recipe_values():
    for bad in (dict(folds=1), dict(folds=3, fold=3), dict(context=-1), dict(fg_fraction=1.5), dict(norm="group"),
                dict(schedule="step")):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


# ---------------------------------------------------------------- targets, loss, schedule

def test_region_targets_from_subregions():
    sub = torch.zeros(1, 3, 1, 4)
    sub[0, 0, 0, 0] = 1  # NCR
    sub[0, 1, 0, 1] = 1  # ED
    sub[0, 2, 0, 2] = 1  # ET
    reg = to_targets(sub, "regions", "subregions")
    assert reg[0, :, 0].tolist() == [[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 0]]  # WT, TC, ET
    assert to_targets(sub, "channels", "subregions") is sub
    back = subregions_of(regions_of(sub.numpy().astype(bool), axis=1), axis=1)
    assert (back == sub.numpy().astype(bool)).all()


def test_deep_supervision_loss_weights_and_downsampled_targets():
    assert ds_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    loss = make_recipe_loss("dice-bce")
    y = (torch.rand(2, 3, 16, 16) > 0.7).float()
    full = torch.randn(2, 3, 16, 16)
    assert loss([full], y) == pytest.approx(loss(full, y).item())
    perfect = [y * 20 - 10, torch.nn.functional.avg_pool2d(y, 2) * 20 - 10]
    wrong = [perfect[0], -perfect[1]]
    assert loss(wrong, y) > loss(perfect, y)  # the low-resolution head counts


def test_lr_schedules():
    assert lr_factor("poly", 0) == 1 and lr_factor("poly", 1) == 0
    poly = [lr_factor("poly", p / 10) for p in range(11)]
    assert all(a > b for a, b in zip(poly, poly[1:]))
    assert lr_factor("cosine", 0.05, warmup=0.1) < lr_factor("cosine", 0.1, warmup=0.1) == pytest.approx(1)
    assert lr_factor("cosine", 1.0, warmup=0.1) == pytest.approx(0, abs=1e-9)
    assert lr_factor("plateau", 0.7) == 1


# ---------------------------------------------------------------- data: context, folds, oversampling

def test_context_neighbour_rule():
    # stored source slices 3 4 5 _ 7 8: 6 was dropped at build time
    rows = neighbour_rows([3, 4, 5, 7, 8], 2)
    assert rows.tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 2], [0, 1, 2, 2, 3], [2, 3, 3, 4, 4], [3, 3, 4, 4, 4]]
    image = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((5, 4, 2, 2), np.float32)
    image[:, 1] += 100  # the second modality
    ctx = with_context(image, [3, 4, 5, 7, 8], 1)
    assert ctx.shape == (5, 12, 2, 2)
    assert ctx[1, :, 0, 0].tolist() == [0, 100, 0, 0, 1, 101, 1, 1, 2, 102, 2, 2]  # offsets -1, 0, +1
    assert with_context(image, [3, 4, 5, 7, 8], 0) is image


def test_folds_partition_and_stay_put_when_patients_are_added():
    pids = [f"P{i:03d}" for i in range(40)]
    held = [fold_patients(pids, 5, f)[1] for f in range(5)]
    assert sorted(sum(held, ())) == pids and all(held)
    for f in range(5):
        train_f, held_f = fold_patients(pids, 5, f)
        assert not set(train_f) & set(held_f)
    more = pids + [f"Q{i}" for i in range(10)]
    assert all(set(held[f]) <= set(fold_patients(more, 5, f)[1]) for f in range(5))


def test_oversample_fills_the_share_from_the_reservoir():
    empty = [(np.zeros(1), np.zeros((3, 2, 2)), f"e{i}", "p") for i in range(8)]
    tumour = [(np.zeros(1), np.ones((3, 2, 2)), f"t{i}", "p") for i in range(3)]
    batch = list(empty)
    oversample(batch, tumour, 1 / 3, np.random.default_rng(0))
    assert len(batch) == 8 and sum(b[1].any() for b in batch) == 3  # ceil(8/3)
    batch = list(empty)
    oversample(batch, [], 1 / 3, np.random.default_rng(0))
    assert batch == empty  # nothing seen yet: unchanged


def test_stream_oversampling_keeps_batch_counts_and_is_deterministic(shard_set):
    src = ShardSource(shard_set)

    def run(frac):
        ds = SliceStream(src, StreamConfig(batch_size=8, fg_fraction=frac, seed=3), num_workers=1)
        return [(b["keys"], b["mask"].flatten(1).amax(1)) for b in ds]

    plain, over, again = run(0.0), run(0.5), run(0.5)
    assert len(plain) == len(over) > 0
    assert [k for k, _ in over] == [k for k, _ in again]
    assert all(int(fg.sum()) >= 4 for _, fg in over[1:])  # from the second batch, tumour has been seen
    assert sum(int(fg.sum()) for _, fg in over) > sum(int(fg.sum()) for _, fg in plain)


def test_stream_context_channels(shard_set):
    src = ShardSource(shard_set)
    ds = SliceStream(src, StreamConfig(split="val", train=False, batch_size=4, context=1), num_workers=1)
    batch = next(iter(ds))
    assert batch["image"].shape[1] == 12
    image, _, _ = src.read_patient(batch["patients"][0], "zarr")
    assert torch.equal(batch["image"][1, 4:8], torch.from_numpy(image[1].astype(np.float32)))  # the centre
    assert torch.equal(batch["image"][1, 0:4], torch.from_numpy(image[0].astype(np.float32)))  # offset -1


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def default_run(shard_set, tmp_path_factory):
    run = tmp_path_factory.mktemp("default_run")
    hist = train(str(shard_set), run, dataclasses.replace(TINY, context=1), progress=False)
    return run, hist


def test_default_recipe_trains_on_regions_and_stores_what_predict_needs(default_run):
    run, hist = default_run
    row = hist[-1]
    assert {"dice_WT", "dice_TC", "dice_ET", "dice_sub_NCR/NET", "dice_sub_ED", "dice_sub_ET"} <= set(row)
    assert row["lr"] < TINY.lr  # poly: decayed within the run
    ck = checkpoint.load(run / "checkpoints" / "best.pt")
    assert ck["output_mode"] == "regions" and ck["channels"] == ["WT", "TC", "ET"]
    assert set(ck["postprocess"]) == {"et_min_mm3", "min_component_mm3"}
    assert ck["model"]["inc.net.0.weight"].shape[1] == 12  # 4 modalities x 3 slices
    assert not np.isnan(row["dice_sub_ED"])


def test_seed_recipe_is_reproduced(shard_set, tmp_path):
    cfg = dataclasses.replace(TINY, epochs=1, **SEED_RECIPE)
    hist = train(str(shard_set), tmp_path / "seed", cfg, progress=False)
    ck = checkpoint.load(tmp_path / "seed" / "checkpoints" / "last.pt")
    assert ck["output_mode"] == "subregions" and "dice_NCR/NET" in hist[0] and ck["postprocess"] == {}
    assert "inc.net.1.running_mean" in ck["model"]  # batch norm


def test_resume_refuses_a_changed_recipe(default_run, shard_set, tmp_path):
    run, _ = default_run
    with pytest.raises(TrainError, match="norm"):
        train(str(shard_set), run, dataclasses.replace(TINY, context=1, norm="batch", epochs=3), resume=True,
              progress=False)


def test_folds_validate_on_held_out_training_patients(shard_set, tmp_path):
    train_pids = ShardSource(shard_set).patients("train")
    _, held = fold_patients(train_pids, 2, 0)
    cfg = dataclasses.replace(TINY, epochs=1, folds=2, fold=0, batch_size=4)
    train(str(shard_set), tmp_path / "f0", cfg, progress=False)
    import csv
    with open(tmp_path / "f0" / "val_patients.csv") as f:
        assert sorted({r["patient"] for r in csv.DictReader(f)}) == sorted(held)


def test_predict_ensemble_with_context_writes_source_geometry(default_run, shard_set, release_2020, tmp_path):
    run, _ = default_run
    ck = run / "checkpoints" / "best.pt"
    one = predict(ck, release_2020, tmp_path / "one", progress=False)
    two = predict([ck, run / "checkpoints" / "last.pt"], release_2020, tmp_path / "two", progress=False)
    assert not one["failed"] and len(two["written"]) == len(one["written"]) == 6
    for pf in discover(release_2020).patients:
        out = load_volume(tmp_path / "two" / f"{pf.pid}.nii.gz")
        src = load_volume(pf.files["t1"])
        assert out.data.shape == src.data.shape and np.allclose(out.affine, src.affine)
        assert set(np.unique(out.data)) <= {0, 1, 2, 4}


def test_predict_refuses_an_ensemble_of_different_preprocessing(default_run, tmp_path, release_2020):
    run, _ = default_run
    ck = checkpoint.load(run / "checkpoints" / "best.pt")
    ck["output_mode"] = "subregions"
    other = tmp_path / "other.pt"
    checkpoint.save(other, ck)
    with pytest.raises(PredictError, match="output_mode"):
        predict([run / "checkpoints" / "best.pt", other], release_2020, tmp_path / "p", progress=False)


def test_predict_cli_ensemble_and_no_postprocess(default_run, release_2020, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    run, _ = default_run
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "cli.py", "predict", str(run / "checkpoints" / "best.pt"), str(release_2020),
                        str(tmp_path / "p"), "--ensemble", str(run / "checkpoints" / "last.pt"), "--no-postprocess",
                        "--quiet"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "6 prediction(s) written, 0 failed" in r.stdout


def test_postprocess_thresholds_change_predictions(default_run, release_2020, tmp_path):
    """A checkpoint whose stored ET threshold exceeds any ET volume writes no ET label; without
    post-processing the same model's ET (where it predicts one) is written."""
    run, _ = default_run
    ck = checkpoint.load(run / "checkpoints" / "best.pt")
    ck["postprocess"] = {"et_min_mm3": 1e6, "min_component_mm3": 0.0}
    strict = tmp_path / "strict.pt"
    checkpoint.save(strict, ck)
    predict(strict, release_2020, tmp_path / "pp", progress=False)
    predict(strict, release_2020, tmp_path / "raw", progress=False, postprocess=False)
    pids = [pf.pid for pf in discover(release_2020).patients]
    with_pp = [load_volume(tmp_path / "pp" / f"{p}.nii.gz").data for p in pids]
    without = [load_volume(tmp_path / "raw" / f"{p}.nii.gz").data for p in pids]
    assert not any((v == 4).any() for v in with_pp)
    assert sum(int((a > 0).sum()) for a in with_pp) == sum(int((b > 0).sum()) for b in without)  # ET -> NCR, WT kept
    assert any((v == 4).any() for v in without)  # the tiny model does predict some ET ...
    assert any(((a == 1) & (b == 4)).any() for a, b in zip(with_pp, without))  # ... which became NCR/NET
