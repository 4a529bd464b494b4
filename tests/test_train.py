import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import checkpoint
from train.config import TrainConfig
from train.errors import TrainError
from train.loop import train
from train.recipe import SEED_RECIPE

REPO = Path(__file__).resolve().parents[1]
# the seed recipe: its plateau schedule does not depend on --epochs, so a run extended from 2 to 3
# epochs equals a straight 3-epoch run (with poly or cosine the schedule follows --epochs)
TINY = dataclasses.replace(TrainConfig(base_channels=4, depth=2, batch_size=8, num_workers=0, epochs=2),
                           **{**SEED_RECIPE, "lr": 3e-3})
SEED_COLUMNS = ["epoch", "train_loss", "val_loss", "mean_dice", "dice_NCR/NET", "dice_ED", "dice_ET",
                "prec_NCR/NET", "prec_ED", "prec_ET", "recall_NCR/NET", "recall_ED", "recall_ET"]


def _rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "slices_per_s")} for r in rows]


def test_cli_end_to_end(shard_set_dotted, tmp_path):
    shard_set = shard_set_dotted  # one val patient is BraTS20_Training.004: its id, not its keys' '_', is reported
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "cli.py", "train", str(shard_set), "--out", str(run), "--epochs", "2",
                        "--base-channels", "4", "--depth", "2", "--batch-size", "8", "--num-workers", "1",
                        "--model", "attention-unet", "--recipe", "seed", "--augment", "light"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "epoch 2: train loss" in r.stdout and "per-patient 3D Dice WT" in r.stdout
    rows = _rows(run)
    assert len(rows) == 2 and list(rows[0])[: len(SEED_COLUMNS)] == SEED_COLUMNS
    assert {"patient_dice_WT", "patient_dice_TC", "patient_dice_ET"} <= set(rows[0])
    assert all(0 <= float(rows[1][c]) <= 1 for c in SEED_COLUMNS[3:])
    with open(run / "val_patients.csv") as f:
        per = list(csv.DictReader(f))
    val = json.loads((shard_set / "manifest.json").read_text())["splits"]["val"]
    assert sorted({p["patient"] for p in per}) == sorted(val) and len(per) == 2 * len(val)
    assert "BraTS20_Training.004" in val
    for name in ("loss.png", "dice.png", "predictions.png"):
        assert (run / "plots" / name).stat().st_size > 5000
    ck = checkpoint.load(run / "checkpoints" / "last.pt")  # weights_only=True
    assert ck["epoch"] == 1 and ck["config"]["model"] == "attention-unet" and len(ck["manifest_sha256"]) == 64
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "history"} <= set(ck)
    assert (run / "checkpoints" / "best.pt").exists()


def test_learns_on_small_data(tmp_path):
    """The whole chain learns: images and masks are paired right, the loss and metrics agree."""
    from preprocess.config import PreprocessConfig
    from preprocess.synthetic.toy import make_demo_data
    from preprocess.build import BuildConfig, build

    make_demo_data(tmp_path / "in", 8, shape=(64, 64, 32), seed=4)
    pre = PreprocessConfig(size=32, crop=True, tumour_free_fraction=0.3)
    build(tmp_path / "in", tmp_path / "s", BuildConfig(preprocess=pre, val_fraction=0.25), workers=0, progress=False)
    hist = train(str(tmp_path / "s"), tmp_path / "run", TrainConfig(base_channels=8, depth=2, batch_size=4,
                                                                    num_workers=0, epochs=8, lr=1e-2), progress=False)
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    # validation counts every slice of its patients, the tumour-free ones too (false positives
    # there count): 8 epochs of this tiny model reach about 0.46 / 0.40 (0.63 / 0.61 when the
    # validation patients were thinned like the training ones), from 0.12 / 0.11 after one epoch
    assert max(h["dice_WT"] for h in hist[-3:]) > max(0.4, 3 * hist[0]["dice_WT"])
    assert max(h["patient_dice_WT"] for h in hist[-3:]) > max(0.33, 3 * hist[0]["patient_dice_WT"])


def test_resume_equals_straight_run_and_extends(shard_set, tmp_path):
    straight = train(str(shard_set), tmp_path / "a", TrainConfig.from_dict(dict(TINY.to_dict(), epochs=3)),
                     progress=False)
    train(str(shard_set), tmp_path / "b", TINY, progress=False)  # 2 epochs, then extended to 3
    resumed = train(str(shard_set), tmp_path / "b", TrainConfig.from_dict(dict(TINY.to_dict(), epochs=3)),
                    resume=True, progress=False)
    assert len(resumed) == 3
    assert _stable(_rows(tmp_path / "a")) == _stable(_rows(tmp_path / "b"))
    a = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["scheduler"] == b["scheduler"]
    assert straight[-1]["mean_dice"] == resumed[-1]["mean_dice"]


def test_resume_refuses_other_model_or_shards(shard_set, tmp_path):
    train(str(shard_set), tmp_path / "run", TrainConfig.from_dict(dict(TINY.to_dict(), epochs=1)), progress=False)
    with pytest.raises(TrainError, match="base_channels"):
        train(str(shard_set), tmp_path / "run", TrainConfig.from_dict(dict(TINY.to_dict(), base_channels=8)),
              resume=True, progress=False)
    other = tmp_path / "other"
    shutil.copytree(shard_set, other)
    m = json.loads((other / "manifest.json").read_text())
    m["config"]["note"] = "another set"
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TrainError, match="another shard set"):
        train(str(other), tmp_path / "run", TINY, resume=True, progress=False)
    with pytest.raises(TrainError, match="no checkpoint"):
        train(str(shard_set), tmp_path / "fresh", TINY, resume=True, progress=False)


# Runs the CLI (argv after the kill step) and SIGKILLs the process, as a crash would (no cleanup,
# no atexit), right after optimizer step number argv[1]: a kill at a known batch, not a guess.
KILL_AFTER_STEP = """
import os, signal, sys
import torch
kill_at, argv = int(sys.argv[1]), sys.argv[2:]
def counting(original):
    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        counting.n += 1
        if counting.n == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return step
counting.n = 0
torch.optim.Adam.step, torch.optim.SGD.step = counting(torch.optim.Adam.step), counting(torch.optim.SGD.step)
from cli import app
app(argv, prog_name="cli.py")
"""


def _samples_log(run):
    with open(run / "samples_rank0.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_the_straight_result(shard_set, tmp_path):
    """Mid-epoch checkpoints every 2 steps; killed 3 steps into epoch 2: the resume continues from
    step 2 of epoch 2 (the loader's position) and ends with the straight run's weights."""
    from shards.source import ShardSource
    from train.data import SliceStream, StreamConfig

    cli = ["train", str(shard_set), "--base-channels", "4", "--depth", "2", "--batch-size", "8", "--num-workers", "0",
           "--epochs", "4", "--lr", "0.003", "--log-samples", "--quiet", "--checkpoint-every", "2"]
    ref = subprocess.run([sys.executable, "cli.py"] + cli + ["--out", str(tmp_path / "ref")], cwd=REPO,
                         capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    stream = SliceStream(ShardSource(shard_set), StreamConfig(batch_size=8))
    first, second = stream.batches_per_epoch(0), stream.batches_per_epoch(1)
    assert second >= 3
    run = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_STEP, str(first + 3)] + cli + ["--out", str(run)],
                            cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # the kill landed: epoch 2 had begun
    # ... and epoch 2 had not ended: 3 of its batches trained, the first 2 checkpointed with the position
    assert [r["epoch"] for r in _rows(run)] == ["1"]
    assert [e["epoch"] for e in _samples_log(run)] == [1]
    ck = checkpoint.load(run / "checkpoints" / "last.pt")
    assert ck["epoch"] == 0 and ck["position"]["epoch"] == 1 and ck["position"]["batch"] == 2
    again = subprocess.run([sys.executable, "cli.py"] + cli + ["--out", str(run), "--resume"], cwd=REPO,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert _stable(_rows(run)) == _stable(_rows(tmp_path / "ref"))
    assert _samples_log(run) == _samples_log(tmp_path / "ref")  # epoch 2 redone on the same slices
    a = checkpoint.load(run / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "ref" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_run_killed_in_its_first_epoch_resumes_too(shard_set, tmp_path):
    """Killed 3 steps into epoch 1: last.pt holds no finished epoch (epoch -1) and the position
    of step 2; the resume takes it (it was refused as 'epoch -1 out of range') and ends with the
    straight run's weights."""
    cli = ["train", str(shard_set), "--base-channels", "4", "--depth", "2", "--batch-size", "8", "--num-workers", "0",
           "--epochs", "2", "--lr", "0.003", "--quiet", "--checkpoint-every", "2"]
    ref = subprocess.run([sys.executable, "cli.py"] + cli + ["--out", str(tmp_path / "ref")], cwd=REPO,
                         capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_STEP, "3"] + cli + ["--out", str(run)],
                            cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ck = checkpoint.load(run / "checkpoints" / "last.pt")
    assert ck["epoch"] == -1 and ck["position"]["epoch"] == 0 and ck["position"]["batch"] == 2
    again = subprocess.run([sys.executable, "cli.py"] + cli + ["--out", str(run), "--resume"], cwd=REPO,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert _stable(_rows(run)) == _stable(_rows(tmp_path / "ref"))
    a = checkpoint.load(run / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "ref" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_two_ranks_disjoint_data_equal_batches(shard_set, tmp_path):
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "cli.py", "train",
                        str(shard_set), "--out", str(run), "--epochs", "2", "--base-channels", "4", "--depth", "2",
                        "--batch-size", "4", "--num-workers", "1", "--device", "cpu", "--log-samples", "--quiet"],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = {}
    for rank in (0, 1):
        with open(run / f"samples_rank{rank}.jsonl") as f:
            logs[rank] = [json.loads(line) for line in f]
    for e in range(2):
        a, b = logs[0][e], logs[1][e]
        assert a["batches"] == b["batches"] > 0
        assert not set(a["keys"]) & set(b["keys"])
        pa = {k.rsplit("_s", 1)[0] for k in a["keys"]}
        pb = {k.rsplit("_s", 1)[0] for k in b["keys"]}
        assert not pa & pb  # whole patients per rank
    assert len(_rows(run)) == 2


def test_grad_clip_bounds_the_update(shard_set, tmp_path):
    """--grad-clip (nnU-Net's 12): one SGD step with the gradient norm clipped to 1e-9 barely moves
    the weights; the same step unclipped moves them; the initial weights are the seed's."""
    from train.loop import training_parts

    cfg = TrainConfig(base_channels=4, depth=2, batch_size=8, num_workers=0, epochs=1, max_batches=1,
                      postprocess=False, augment="off", weight_decay=0.0)  # decay moves weights unclipped
    start = {k: v.clone() for k, v in training_parts(cfg, torch.device("cpu"))["model"].state_dict().items()}

    def moved(run_cfg, name):
        train(str(shard_set), tmp_path / name, run_cfg, progress=False)
        state = checkpoint.load(tmp_path / name / "checkpoints" / "last.pt")["model"]
        return max(float((state[k].float() - start[k].float()).abs().max()) for k in start if k.endswith("weight"))

    assert moved(dataclasses.replace(cfg, grad_clip=1e-9), "clipped") < 1e-7
    assert moved(cfg, "free") > 1e-4
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=float("nan"))


def test_he_init_is_nnunets_and_seeded():
    """init="he" (nnU-Net's InitWeights_He, slope 1e-2): every convolution's weights He-normal,
    std sqrt(2 / (1 + 0.01^2) / fan_in), biases 0; the same seed gives the same weights."""
    from train.loop import training_parts

    cfg = TrainConfig(base_channels=8, depth=3, init="he")
    model = training_parts(cfg, torch.device("cpu"))["model"]
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert convs
    for m in convs:
        fan_in = m.weight[0].numel()  # torch's fan_in: weight.size(1) x kernel, for transposed ones too
        want = (2 / (1 + 1e-4) / fan_in) ** 0.5
        if m.weight.numel() >= 2000:  # enough draws for the std to be within 10 %
            assert abs(float(m.weight.std()) / want - 1) < 0.1, (m, float(m.weight.std()), want)
        assert m.bias is None or not m.bias.any()
    again = training_parts(cfg, torch.device("cpu"))["model"].state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    torch_default = training_parts(TrainConfig(base_channels=8, depth=3), torch.device("cpu"))["model"]
    assert not torch.equal(torch_default.head.weight, model.head.weight)
    with pytest.raises(ValueError, match="init must be one of torch, he"):
        TrainConfig(init="xavier")


def test_dice_smooth_is_the_losss_eps():
    """dice_smooth (nnU-Net: 1e-5): an empty channel predicted empty costs nothing at either eps, and
    a channel predicted wrongly on a few pixels costs far more at 1e-5 than at 1."""
    from train.recipe import make_recipe_loss

    target = torch.zeros(2, 1, 8, 8)
    empty = torch.full((2, 1, 8, 8), -20.0)
    assert make_recipe_loss("dice", 1e-5)(empty, target) < 0.05 and make_recipe_loss("dice", 1.0)(empty, target) < 1e-6
    stray = empty.clone()
    stray[0, 0, 0, :2] = 20.0  # two false-positive pixels on an empty channel
    assert float(make_recipe_loss("dice", 1e-5)(stray, target)) > 0.99
    assert float(make_recipe_loss("dice", 1.0)(stray, target)) < 0.7
    for bad in (0.0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="dice_smooth"):
            TrainConfig(dice_smooth=bad)
