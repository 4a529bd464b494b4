"""`train` against careless or hostile inputs (issue 18): a tampered last.pt, a resume with other
options, two runs into one folder, folds that must partition whatever the seed, a damaged
mlflow_run.json, credentials in a shard set's URL. Each refusal is one `error:` line naming what
is at fault, exit 2, and nothing written into the run folder."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from train import checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--base-channels", "4", "--depth", "2", "--batch-size", "8", "--num-workers", "0", "--max-batches", "2",
        "--quiet"]


def _cli(*args):
    """Run the CLI in this process: (exit code, stdout, stderr); anything but a clean exit fails."""
    from cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def _refused(result, *names):
    code, _, err = result
    assert code == 2, (code, err[-2000:])
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in names:
        assert str(n) in err, (n, err)
    return err


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_epoch_run(shard_set, tmp_path_factory) -> Path:
    """A finished 1-epoch run (the default recipe, tiny model); tests copy it before damaging it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    code, _, err = _cli("train", shard_set, "--out", run, "--epochs", "1", *TINY)
    assert code == 0, err
    return run


@pytest.fixture
def run_copy(one_epoch_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(one_epoch_run, dst)
    return dst


def _tamper(run: Path, edit) -> dict:
    """Rewrite run's last.pt with `edit(ck)` applied; returns the folder's files after it."""
    path = run / "checkpoints" / "last.pt"
    ck = checkpoint.load(path)
    edit(ck)
    torch.save(ck, path)
    return _snapshot(run)


def _resume(shard_set, run, *extra):
    return _cli("train", shard_set, "--out", run, "--resume", "--epochs", "2", "--quiet", *extra)


# ---------------------------------------------------------------- case 13: resume options

def test_resume_with_options_left_out_takes_the_checkpoints(shard_set, run_copy):
    """The run was trained with --base-channels 4 --depth 2 ...: `--resume --epochs 2` alone goes on."""
    code, _, err = _resume(shard_set, run_copy)
    assert code == 0, err
    cfg = json.loads((run_copy / "config.json").read_text())["train"]
    assert (cfg["base_channels"], cfg["depth"], cfg["batch_size"], cfg["max_batches"], cfg["epochs"]) == (4, 2, 8, 2, 2)
    assert checkpoint.load(run_copy / "checkpoints" / "last.pt")["epoch"] == 1


@pytest.mark.parametrize("extra,named", [
    (["--optimizer", "adam"], "--optimizer adam"),
    (["--lr", "0.5", "--batch-size", "4"], "--batch-size 4"),
    (["--recipe", "seed"], "--recipe seed"),
    (["--format", "wds"], "--format wds"),
    (["--deep-supervision"], "--deep-supervision True"),
    (["--fg-balance"], "--fg-balance True"),
])
def test_resume_with_another_run_fixing_option_is_refused_before_writing(shard_set, run_copy, extra, named):
    before = _snapshot(run_copy)
    err = _refused(_resume(shard_set, run_copy, *extra), named, run_copy / "checkpoints" / "last.pt")
    assert "KeyError" not in err
    assert _snapshot(run_copy) == before  # config.json and the checkpoints as they were


def test_resume_names_every_differing_option_at_once(shard_set, run_copy):
    err = _refused(_resume(shard_set, run_copy, "--optimizer", "adamw", "--seed", "3", "--depth", "2"))
    assert "--optimizer adamw" in err and "--seed 3" in err and "--depth" not in err  # --depth 2 agrees


# ---------------------------------------------------------------- case 14: a tampered last.pt

def _position(batch=1, **kw):
    return {"epoch": 1, "batch": batch, "loss_sum": 0.5, "n_seen": 8 * batch, "keys": [],
            "rng": torch.get_rng_state(), **kw}


@pytest.mark.parametrize("edit,field", [
    (lambda ck: ck.update(position=_position(batch=10**12)), "position.batch"),
    (lambda ck: ck.update(position=_position(loss_sum=float("nan"))), "position.loss_sum"),
    (lambda ck: ck.update(position=_position(loss_sum=-1.0)), "position.loss_sum"),
    (lambda ck: ck.update(position=_position(n_seen=10**15)), "position.n_seen"),
    (lambda ck: ck.update(position=_position(keys=["k"] * 100)), "position.keys"),
    (lambda ck: ck.update(position=_position(epoch=7)), "position.epoch"),
    (lambda ck: ck.update(position=_position(rng=torch.zeros(3))), "position.rng"),
    (lambda ck: ck.update(position="mid-epoch"), "position"),
    (lambda ck: ck.update(position=_position(world=4)), "processes"),
    (lambda ck: ck.update(epoch=-50), "epoch"),
    (lambda ck: ck.update(epoch=10**12), "epoch"),
    (lambda ck: ck.update(epoch=True), "epoch"),
    (lambda ck: ck.update(best_dice=float("nan")), "best_dice"),
    (lambda ck: ck.update(best_dice=7.0), "best_dice"),
    (lambda ck: ck.pop("history"), "history"),
    (lambda ck: ck.update(history="epoch 1"), "history"),
    (lambda ck: ck.update(history=[]), "history"),
    (lambda ck: ck["history"][0].update(train_loss=float("nan")), "history row 1 column train_loss"),
    (lambda ck: ck["history"][0].update(train_loss="low"), "history row 1 column train_loss"),
    (lambda ck: ck.update(history=[[1, 2]]), "history row 1"),
    (lambda ck: ck.update(rng=torch.zeros(5056, dtype=torch.float32)), "rng"),
    (lambda ck: ck.update(rng=torch.zeros(10, dtype=torch.uint8)), "rng"),
    (lambda ck: ck.update(rng=[1, 2, 3]), "rng"),
    (lambda ck: ck.update(optimizer={"state": {}, "param_groups": "x"}), "optimizer"),
    (lambda ck: ck["optimizer"]["param_groups"][0].update(lr=float("nan")), "optimizer"),
    (lambda ck: ck["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(1, 2)), "optimizer state 0"),
    (lambda ck: ck["optimizer"]["state"][0]["momentum_buffer"].fill_(float("inf")), "optimizer state 0"),
    (lambda ck: ck.update(scheduler={"optimizer": 1}), "scheduler"),
    (lambda ck: ck["scheduler"].update(best=float("nan")), "scheduler.best"),
    (lambda ck: ck.update(model={"weight": torch.zeros(2)}), "model"),
    (lambda ck: ck["model"].update({k: v * float("nan") for k, v in list(ck["model"].items())[:1]}), "NaN"),
    (lambda ck: ck["model"].update({k: v[:1] for k, v in list(ck["model"].items())[:1]}), "builds"),
    (lambda ck: ck["config"].update(num_workers=10**6), "config.num_workers"),
    (lambda ck: ck["config"].update(base_channels=10**6), "config.base_channels"),
    (lambda ck: ck["config"].update(depth=60), "config.depth"),
    (lambda ck: ck["config"].update(lr="fast"), "config.lr"),
    (lambda ck: ck["config"].update(lr=float("nan")), "config.lr"),
    (lambda ck: ck["config"].update(max_batches=2.5), "config.max_batches"),
    (lambda ck: ck["config"].update(compile="yes"), "config.compile"),
    (lambda ck: ck["config"].update(context=10**5), "config.context"),
    (lambda ck: ck["config"].update(base_channels=8), "model"),  # weights of another width
    (lambda ck: ck.update(postprocess={"et_min_mm3": -5}), "postprocess"),
    (lambda ck: ck.update(config="unet"), "config"),
    (lambda ck: ck["config"].update(epochs="many"), "config"),
])
def test_tampered_checkpoint_field_is_refused_naming_it(shard_set, run_copy, edit, field):
    before = _tamper(run_copy, edit)
    err = _refused(_resume(shard_set, run_copy), run_copy / "checkpoints" / "last.pt", field)
    assert _snapshot(run_copy) == before, err  # nothing written: no config.json, metrics or checkpoint change


@pytest.mark.parametrize("text", ["epoch,patient\n", "epoch,patient,dice_WT,dice_TC,dice_ET\nlast,P,1,1,1\n",
                                  "epoch,patient,dice_WT,dice_TC,dice_ET\n1,P,1,1,1,extra\n", "fifo"])
def test_damaged_val_patients_csv_is_refused_before_training(shard_set, run_copy, text):
    path = run_copy / "val_patients.csv"
    path.unlink()
    if text == "fifo":
        os.mkfifo(path)
    else:
        path.write_text(text)
    before = {p.name: p.stat().st_mtime_ns for p in run_copy.rglob("*")}
    _refused(_resume(shard_set, run_copy), path)
    assert {p.name: p.stat().st_mtime_ns for p in run_copy.rglob("*")} == before


def test_a_file_that_is_no_checkpoint_is_refused_naming_it(shard_set, run_copy):
    (run_copy / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 not a zip")
    _refused(_resume(shard_set, run_copy), run_copy / "checkpoints" / "last.pt")


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_last_pt_that_is_no_file_is_refused_without_blocking(shard_set, run_copy, kind):
    path = run_copy / "checkpoints" / "last.pt"
    path.unlink()
    {"fifo": os.mkfifo, "device": lambda p: p.symlink_to("/dev/zero"), "folder": Path.mkdir}[kind](path)
    _refused(_resume(shard_set, run_copy), path, "not a regular file")


def test_a_valid_position_resumes(shard_set, run_copy):
    """The validators accept what a killed run leaves: a position one batch into epoch 2."""
    _tamper(run_copy, lambda ck: ck.update(position=_position()))
    code, _, err = _resume(shard_set, run_copy)
    assert code == 0, err


# ---------------------------------------------------------------- case 10: --num-workers mid-epoch

def test_mid_epoch_resume_with_other_num_workers_is_refused(shard_set, run_copy):
    """The order of an epoch's slices depends on the worker count: a mid-epoch resume with another
    one would diverge from the straight run without a word."""
    before = _tamper(run_copy, lambda ck: ck.update(position=_position()))
    _refused(_resume(shard_set, run_copy, "--num-workers", "1"), "--num-workers 0")
    assert _snapshot(run_copy) == before


def test_num_workers_may_change_at_an_epoch_end(shard_set, run_copy):
    code, _, err = _resume(shard_set, run_copy, "--num-workers", "1")
    assert code == 0, err
    assert json.loads((run_copy / "config.json").read_text())["train"]["num_workers"] == 1


# ---------------------------------------------------------------- case 12: one run per folder

def test_second_run_into_a_locked_folder_is_refused_before_writing(shard_set, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run, os.O_RDONLY)  # what a run in progress holds
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        _refused(_cli("train", shard_set, "--out", run, "--epochs", "1", *TINY), run, "another train run")
        assert list(run.iterdir()) == []
        _refused(_cli("train", shard_set, "--out", run, "--resume", "--quiet"), run, "another train run")
        _refused(_cli("train", shard_set, "--out", run, "--overwrite", *TINY), run, "another train run")
        _refused(_cli("train", shard_set, "--out", run / ".", "--epochs", "1", *TINY), "another train run")
        (tmp_path / "link").symlink_to(run)  # the same folder by another name is the same lock
        _refused(_cli("train", shard_set, "--out", tmp_path / "link", "--epochs", "1", *TINY), "another train run")
    finally:
        os.close(fd)
    code, _, err = _cli("train", shard_set, "--out", run, "--epochs", "1", *TINY)
    assert code == 0, err  # released: the folder is free again


def test_a_killed_runs_lock_does_not_block(shard_set, tmp_path):
    """The kernel drops the lock of a process that died: the next run goes ahead."""
    run = tmp_path / "run"
    run.mkdir()
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        _refused(_cli("train", shard_set, "--out", run, "--epochs", "1", *TINY), "another train run")
    finally:
        p.kill()
        p.wait()
    code, _, err = _cli("train", shard_set, "--out", run, "--epochs", "1", *TINY)
    assert code == 0, err


def test_a_refused_run_into_a_new_folder_leaves_no_folder(shard_set, tmp_path):
    run = tmp_path / "new" / "deeper" / "run"
    _refused(_cli("train", shard_set, "--out", run, "--resume", "--quiet"), "no checkpoint")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["checkpoints", "tensorboard", "samples_rank0.jsonl", "mlflow.db"])
def test_a_link_in_the_run_folder_is_refused_nothing_outside_touched(shard_set, run_copy, tmp_path, name):
    """--overwrite deletes and a run writes inside OUT only: OUT/checkpoints planted as a link to
    another run's folder would lose that run's checkpoints."""
    victim = tmp_path / "elsewhere"
    shutil.copytree(run_copy / "checkpoints", victim)
    (victim / "samples_rank0.jsonl").write_text("{}\n")
    shutil.rmtree(run_copy / name) if (run_copy / name).is_dir() else (run_copy / name).unlink(missing_ok=True)
    (run_copy / name).symlink_to(victim if name in ("checkpoints", "tensorboard") else victim / "samples_rank0.jsonl")
    before = _snapshot(victim)
    _refused(_cli("train", shard_set, "--out", run_copy, "--overwrite", "--log-samples", *TINY), run_copy / name)
    _refused(_resume(shard_set, run_copy, "--log-samples"), run_copy / name)
    assert _snapshot(victim) == before


# ---------------------------------------------------------------- case 9: folds

def test_folds_partition_the_patients_whatever_the_seed():
    """--folds 2 --fold i --seed i: every patient held out exactly once."""
    from train.data import fold_patients

    pids = [f"BraTS20_Training_{i:03d}" for i in range(1, 11)]
    for seeds in ((0, 1), (1, 0), (3, 7), (5, 2)):
        held = [fold_patients(pids, 2, f, seed)[1] for f, seed in enumerate(seeds)]
        assert sorted(held[0] + held[1]) == pids, seeds
    for k in (3, 5):  # any K, any seeds per fold
        held = [p for f in range(k) for p in fold_patients(pids, k, f, seed=f * 11)[1]]
        assert sorted(held) == pids


def test_resume_of_a_fold_run_from_the_seeded_rule_is_refused(shard_set, tmp_path):
    run = tmp_path / "run"
    code, _, err = _cli("train", shard_set, "--out", run, "--epochs", "1", "--folds", "2", "--fold", "1", *TINY)
    assert code == 0, err
    before = _tamper(run, lambda ck: ck.pop("fold_rule"))  # as an earlier version wrote it
    _refused(_resume(shard_set, run), "--folds", run / "checkpoints" / "last.pt")
    assert _snapshot(run) == before


# ---------------------------------------------------------------- case 24: mlflow_run.json

@pytest.mark.parametrize("content", [b"[1, 2]", b'"run"', b'{"tracking_uri": 3, "run_id": "abc"}',
                                     b'{"tracking_uri": "sqlite:///x", "run_id": "../../etc"}',
                                     b'{"tracking_uri": "sqlite:///x", "run_id": ["a"]}',
                                     b"{" + b" " * (2 << 20) + b"}", b"\xff\xfe not json"],
                         ids=["list", "string", "uri-not-text", "id-a-path", "id-a-list", "2-MiB", "not-utf8"])
def test_damaged_mlflow_run_file_is_refused_naming_it(tmp_path, content, monkeypatch):
    pytest.importorskip("mlflow")
    from shards.errors import BratsShardsError
    from train import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    (out / tracking.RUN_FILE).write_bytes(content)
    with pytest.raises(BratsShardsError, match=tracking.RUN_FILE) as e:
        tracking.make_trackers(out, ["mlflow"], {"train": {}}, start_step=2)
    assert "\n" not in str(e.value) and str(out / tracking.RUN_FILE) in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == [tracking.RUN_FILE]  # no store created


def test_mlflow_run_file_that_is_a_fifo_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from shards.errors import BratsShardsError
    from train import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / tracking.RUN_FILE)
    with pytest.raises(BratsShardsError, match="not a regular file"):
        tracking.make_trackers(out, ["mlflow"], {"train": {}}, start_step=2)


# ---------------------------------------------------------------- case 4: credentials in a URL

SECRETS = ("password", "sekrit-token", "s3cr3t-key")


def _files_holding(folders, secrets=SECRETS) -> list[str]:
    """Every file under `folders` whose bytes hold one of `secrets` (SQLite stores included)."""
    found = []
    for folder in folders:
        for p in Path(folder).rglob("*"):
            if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets):
                found.append(str(p))
    return found


@pytest.mark.slow
def test_url_credentials_are_stored_nowhere(shard_set, serve, tmp_path, monkeypatch):
    """A set at http://user:password@host/...?token=..., storage options with a secret: config.json,
    the checkpoints, TensorBoard, MLflow, the progress lines and the cache never hold them."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    base, _ = serve(shard_set)
    url = base.replace("http://", "http://user:password@")
    run, cache = tmp_path / "run", tmp_path / "cache"
    opts = json.dumps({"headers": {"X-Api-Token": "sekrit-token", "X-Secret": "s3cr3t-key"}})
    code, out, err = _cli("train", url, "--out", run, "--epochs", "1", "--cache-dir", cache, "--log", "tensorboard",
                          "--log", "mlflow", "--storage-options", opts, "--base-channels", "4", "--depth", "2",
                          "--batch-size", "8", "--num-workers", "0", "--max-batches", "2")
    assert code == 0, err
    assert (run / "mlflow.db").exists() and list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert not any(s in out + err for s in SECRETS)
    assert json.loads((run / "config.json").read_text())["shards"] == base.replace("http://", "http://user:***@")
    assert _files_holding([run, cache]) == []


def test_mlflow_server_password_is_not_kept_in_the_run_file(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI=https://user:password@server: OUT/mlflow_run.json names the store masked,
    and a resume against the same server still finds its run."""
    from train import tracking

    class FakeClient:  # a server's client: what MLflowTracker calls, nothing sent anywhere
        runs: dict = {}

        def __init__(self, tracking_uri):
            self.uri = tracking_uri

        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name, artifact_location=None):
            return "1"

        def create_run(self, experiment, run_name=None, tags=None):
            run_id = f"{len(self.runs) + 1:032x}"
            self.runs[run_id] = {}
            return type("R", (), {"info": type("I", (), {"run_id": run_id})})()

        def get_run(self, run_id):
            data = type("D", (), {"params": {}})()
            return type("R", (), {"info": type("I", (), {"run_id": run_id}), "data": data})()

        def update_run(self, *a, **k):
            pass

        def log_batch(self, *a, **k):
            pass

        def set_terminated(self, *a, **k):
            pass

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:password@mlflow.example/?token=sekrit-token")
    monkeypatch.setattr(tracking, "_import_mlflow", lambda: FakeClient)
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    [ml] = tracking.make_trackers(out, ["mlflow"], {"train": {}})
    ml.close()
    assert _files_holding([out]) == []
    [again] = tracking.make_trackers(out, ["mlflow"], {"train": {}}, start_step=2)
    assert again.run_id == ml.run_id
