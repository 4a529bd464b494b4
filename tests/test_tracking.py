"""train/tracking.py: what is logged is read back from TensorBoard's event files and MLflow's store."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shards.errors import BratsShardsError
from train import tracking
from train.tracking import TrackingError, make_trackers, overlay_grid, scalar_tags

REPO = Path(__file__).resolve().parents[1]
NAMES = ["WT", "TC", "ET"]
CONFIG = {"train": {"lr": 0.01, "epochs": 2, "model": "unet", "augment": "nnunet"}, "shards": "/data/set",
          "manifest_sha256": "ab" * 32}
H, W = 24, 20  # slice (x, y); an overlay panel is (y, x)


def _row(epoch: int) -> dict:
    """A metrics row as train.validate.epoch_record makes it (region targets)."""
    row = {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.5 / epoch, "mean_dice": 0.1 * epoch}
    for key in ("dice", "prec", "recall"):
        row.update({f"{key}_{n}": 0.1 * epoch + i / 100 for i, n in enumerate(NAMES)})
    row.update({"dice_sub_NCR/NET": 0.2, "dice_sub_ED": 0.3, "dice_sub_ET": 0.4})
    row.update({"patient_dice_WT": 0.5 * epoch / 2, "patient_dice_TC": float("nan"), "patient_dice_ET": 0.25})
    row.update(lr=0.01 / epoch, seconds=12.5, slices_per_s=300.0 + epoch)
    return row


def _samples(n: int = 2) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = rng.normal(size=(4, H, W)).astype(np.float32)
        mask = np.zeros((3, H, W), bool)
        mask[:, 5:10, 5:10] = True
        pred = np.zeros((3, H, W), bool)
        pred[:, 8:14, 8:14] = True
        out.append({"key": f"P{i}_s012", "image": image, "mask": mask, "pred": pred, "area": 75})
    return out


K = 12  # overlay_grid enlarges each (20 x 24) panel by 12 to reach 240 pixels a side
PAD = 4


def _grid_shape(n_samples: int) -> tuple[int, int]:
    return n_samples * W * K + (n_samples - 1) * PAD, 3 * H * K + 2 * PAD  # (height, width)


def _accumulator(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# ---------------------------------------------------------------- pure parts

def test_scalar_tags_group_the_metrics_row():
    tags = scalar_tags(_row(2))
    assert tags["loss/train"] == 0.5 and tags["loss/val"] == 0.75 and tags["dice/mean"] == pytest.approx(0.2)
    assert tags["dice/WT"] == pytest.approx(0.2) and tags["precision/TC"] == pytest.approx(0.21)
    assert tags["recall/ET"] == pytest.approx(0.22) and tags["dice_sub/NCR/NET"] == 0.2
    assert tags["patient_dice/WT"] == 0.5 and np.isnan(tags["patient_dice/TC"])  # not taken for dice/
    assert tags["lr"] == 0.005 and tags["throughput/slices_per_s"] == 302.0
    assert tags["throughput/epoch_seconds"] == 12.5
    assert "epoch" not in tags and len(tags) == len(_row(2)) - 1
    assert scalar_tags({"epoch": 1, "note": "x", "flag": True, "new_metric": 3}) == {"new_metric": 3.0}


def test_overlay_grid_colours_and_orientation():
    """Columns grey | truth | prediction, each channel in its train.palette colour (the run figures'
    and show's), painted outermost first, enlarged to 240 pixels, anterior up."""
    s = _samples(1)[0]
    s["image"][:] = 0.0  # black background: the colours alone
    s["mask"][:] = False
    s["pred"][:] = False
    s["mask"][0, 1, 2] = True  # truth WT only at (x=1, y=2): green
    s["mask"][0, 5, 6] = s["mask"][1, 5, 6] = True  # truth WT and TC: TC's red shows
    s["pred"][2, 3, 4] = True  # prediction ET at (3, 4): yellow
    grid = overlay_grid([s], ["WT", "TC", "ET"])
    assert grid.dtype == np.uint8 and grid.shape == (*_grid_shape(1), 3)

    def pixel(panel: int, x: int, y: int):
        return tuple(grid[(W - 1 - y) * K + K // 2, panel * (H * K + PAD) + x * K + K // 2])  # y runs up

    assert pixel(1, 1, 2) == (23, 115, 23) and pixel(1, 5, 6) == (115, 23, 23)  # 0.45 x green, red
    assert pixel(2, 3, 4) == (115, 115, 23)  # 0.45 x yellow
    assert grid[:, :H * K].max() == 0  # the grey panel: black, nothing marked
    assert (grid[:, H * K + PAD:2 * H * K + PAD] > 0).any(axis=-1).sum() == 2 * K * K  # two marked voxels
    assert grid[:, H * K:H * K + PAD].min() == 255  # white gap between panels


def test_flatten_config():
    flat = tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": None})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "x", "e": "null"}


def test_mlflow_uri_default_is_local(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.mlflow_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.mlflow_uri(tmp_path) == "http://tracking.example:5000"


# ---------------------------------------------------------------- optional, refused

def test_no_kinds_imports_nothing_heavy(tmp_path):
    code = ("import sys; from train.tracking import make_trackers; "
            f"assert make_trackers({str(tmp_path)!r}, [], {{}}) == []; "
            "heavy = [m for m in ('torch', 'tensorboard', 'mlflow', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind, modules", [("tensorboard", ["torch.utils.tensorboard", "tensorboard"]),
                                           ("mlflow", ["mlflow", "mlflow.tracking"]),
                                           ("mlflow", ["sqlalchemy"])])  # mlflow-skinny alone: no local store
def test_missing_package_names_the_extra(tmp_path, monkeypatch, kind, modules):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if modules == ["sqlalchemy"]:  # mlflow itself loaded first: a half-imported mlflow would stay behind
        pytest.importorskip("mlflow.tracking")
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # `import m` now raises ImportError
    with pytest.raises(TrackingError) as up_front:
        tracking.require([kind])
    with pytest.raises(TrackingError) as e:
        make_trackers(tmp_path, [kind], CONFIG)
    assert isinstance(e.value, BratsShardsError) and str(e.value) == str(up_front.value)
    msg = str(e.value)
    assert f"pip install 'brats-shards[{kind}]'" in msg and f"--log {kind}" in msg and "\n" not in msg
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_unknown_kind_refused(tmp_path):
    with pytest.raises(TrackingError, match="wandb: unknown"):
        make_trackers(tmp_path, ["wandb"], CONFIG)
    tracking.require([])  # nothing asked, nothing needed


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_scalars_images_and_config(tmp_path):
    pytest.importorskip("tensorboard")
    [tb] = make_trackers(tmp_path, ["tensorboard"], CONFIG, run_name="run-a")
    for epoch in (1, 2):
        tracking.log_epoch([tb], _row(epoch), _samples(), NAMES)
    tracking.close_all([tb])

    acc = _accumulator(tmp_path / "tensorboard")
    tags = acc.Tags()
    assert set(scalar_tags(_row(1))) == set(tags["scalars"])
    for tag in ("loss/train", "dice/WT", "patient_dice/WT", "lr", "throughput/slices_per_s"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([scalar_tags(_row(s))[tag] for s in (1, 2)])
    assert np.isnan(acc.Scalars("patient_dice/TC")[0].value)
    images = acc.Images("predictions")
    assert [i.step for i in images] == [1, 2]
    assert all((i.height, i.width) == _grid_shape(2) for i in images)
    from PIL import Image  # tensorboard's own dependency

    png = np.asarray(Image.open(io.BytesIO(images[1].encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(png, overlay_grid(_samples(), ["WT", "TC", "ET"]))  # lossless, as drawn
    texts = {t: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(t)]
             for t in ("config/text_summary", "predictions/legend/text_summary")}
    assert texts["config/text_summary"][0][0] == 1 and "| train.lr | 0.01 |" in texts["config/text_summary"][0][1]
    assert "columns: grey image, truth, prediction; WT green, TC red, ET yellow" in texts[
        "predictions/legend/text_summary"][0][1]


def test_tensorboard_resume_purges_the_steps_logged_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    [tb] = make_trackers(tmp_path, ["tensorboard"], CONFIG)
    for epoch in (1, 2, 3):  # killed after logging epoch 3, its checkpoint at epoch 2
        tb.epoch(_row(epoch), epoch)
    tb.close(ok=False)
    [tb] = make_trackers(tmp_path, ["tensorboard"], CONFIG, start_step=3)
    for epoch in (3, 4):
        tb.epoch({**_row(epoch), "train_loss": 10.0 + epoch}, epoch)
    tb.close()

    train_loss = _accumulator(tmp_path / "tensorboard").Scalars("loss/train")
    assert [(e.step, e.value) for e in train_loss] == [(1, 1.0), (2, 0.5), (3, 13.0), (4, 14.0)]


# ---------------------------------------------------------------- MLflow

def test_mlflow_local_store_params_metrics_images_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")
    from mlflow.tracking import MlflowClient

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder
    out = tmp_path / "run"
    [ml] = make_trackers(out, ["mlflow"], CONFIG, run_name="run-a")
    for epoch in (1, 2):
        tracking.log_epoch([ml], _row(epoch), _samples(), NAMES)
    ml.close(ok=False)  # killed
    run_id = json.loads((out / tracking.RUN_FILE).read_text())["run_id"]

    # resumed at epoch 3 with more epochs: the same run goes on, the changed option is tagged
    resumed = {**CONFIG, "train": {**CONFIG["train"], "epochs": 3}, "extra": 1}
    [ml] = make_trackers(out, ["mlflow"], resumed, run_name="run-a", start_step=3)
    assert ml.run_id == run_id
    tracking.log_epoch([ml], _row(3), [], NAMES)
    tracking.close_all([ml])

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert client.get_experiment(run.info.experiment_id).name == "brats-shards"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["train.epochs"] == "2"
    assert run.data.params["extra"] == "1" and run.data.params["shards"] == "/data/set"
    assert run.data.tags["resumed_at_step_3.train.epochs"] == "3"
    history = client.get_metric_history(run_id, "dice/WT")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert set(run.data.metrics) == set(scalar_tags(_row(1)))
    assert [m.step for m in client.get_metric_history(run_id, "throughput/slices_per_s")] == [1, 2, 3]
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert sum(p.endswith(".png") for p in images) == 2 and all("predictions" in p for p in images)
    assert "WT green, TC red, ET yellow" in run.data.tags["predictions.legend"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no ./mlruns or ./mlartifacts in the CWD
    assert (out / "mlartifacts").is_dir()

    # a fresh start (start_step 1) in the same OUT: a new run beside the old one
    [ml] = make_trackers(out, ["mlflow"], CONFIG)
    ml.close()
    assert ml.run_id != run_id and json.loads((out / tracking.RUN_FILE).read_text())["run_id"] == ml.run_id


def test_train_cli_logs_tensorboard_read_back(shard_set, tmp_path):
    """`train --log tensorboard` end to end: the event file holds each epoch's scalars and overlay."""
    pytest.importorskip("tensorboard")
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "cli.py", "train", str(shard_set), "--out", str(run), "--epochs", "2",
                        "--base-channels", "4", "--depth", "2", "--batch-size", "8", "--num-workers", "0",
                        "--max-batches", "2", "--log", "tensorboard", "--quiet"], cwd=repo, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in acc.Scalars("dice/WT")] == [1, 2]
    assert [e.step for e in acc.Scalars("patient_dice/ET")] == [1, 2]
    assert acc.Scalars("lr")[1].value < acc.Scalars("lr")[0].value  # poly decay, logged per epoch
    assert len(acc.Images(acc.Tags()["images"][0])) == 2


def test_quiet_training_with_mlflow_prints_nothing(shard_set, tmp_path):
    """--quiet silences MLflow's INFO lines (its store's table creation) as it does the loop's."""
    pytest.importorskip("mlflow")
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    argv = [sys.executable, str(REPO / "cli.py"), "train", str(shard_set), "--epochs", "1", "--base-channels", "4",
            "--depth", "2", "--batch-size", "8", "--num-workers", "0", "--max-batches", "2", "--log", "mlflow"]
    quiet = subprocess.run(argv + ["--out", str(tmp_path / "q"), "--quiet"], capture_output=True, text=True,
                           cwd=tmp_path, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert (quiet.stdout, quiet.stderr) == ("", ""), (quiet.stdout, quiet.stderr)
    loud = subprocess.run(argv + ["--out", str(tmp_path / "l")], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert loud.returncode == 0 and "INFO" in loud.stdout + loud.stderr  # the lines --quiet removes are real
