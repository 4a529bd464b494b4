"""Every kind of refusal reaches the user the same way: one line on stderr naming what is at
fault, exit 2; a job that ran with some patients failing exits 1."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _refused(r, *names):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    for n in names:
        assert str(n) in r.stderr, (n, r.stderr)


def test_build_into_a_file_is_refused(release_2020, tmp_path):
    (tmp_path / "out").write_text("a file")
    _refused(_cli("build-shards", release_2020, tmp_path / "out", "--workers", "0", "--quiet"), tmp_path / "out")


def test_build_with_a_bad_patient_exits_1_naming_it(release_copy, tmp_path):
    victim = sorted(p for p in release_copy.iterdir() if p.is_dir())[0]
    next(victim.glob("*_flair.nii.gz")).unlink()
    r = _cli("build-shards", release_copy, tmp_path / "out", "--workers", "0", "--size", "32", "--quiet")
    assert r.returncode == 1 and f"FAILED {victim.name}" in r.stdout, r.stdout + r.stderr


def test_train_into_an_existing_run_is_refused(shard_set, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    _refused(_cli("train", shard_set, "--out", tmp_path / "run", "--quiet"), tmp_path / "run", "--resume")


def test_unreachable_remote_set_is_refused_naming_the_url(tmp_path):
    url = "http://127.0.0.1:9/set"  # the discard port: nothing listens
    _refused(_cli("train", url, "--out", tmp_path / "run", "--cache-dir", tmp_path / "c", "--quiet"), url)


def test_evaluate_of_a_mistyped_folder_is_refused(release_2020, tmp_path):
    _refused(_cli("evaluate", tmp_path / "no-such-predictions", release_2020), "no-such-predictions")


def test_evaluate_prediction_with_a_nan_affine_fails_its_patient(release_2020, tmp_path):
    """The pipeline's affine check runs before reorientation: no LinAlgError traceback."""
    import nibabel as nib

    preds = tmp_path / "preds"
    preds.mkdir()
    pids = sorted(p.name for p in release_2020.iterdir() if p.is_dir())
    for pid in pids:
        ref = nib.load(next((release_2020 / pid).glob("*_seg.nii.gz")))
        nib.save(nib.Nifti1Image(np.asarray(ref.dataobj), ref.affine), preds / f"{pid}.nii")
    # nibabel will not write a NaN affine: put one into the header's srow_x (bytes 280-283)
    raw = bytearray((preds / f"{pids[0]}.nii").read_bytes())
    raw[280:284] = np.float32(np.nan).tobytes()
    (preds / f"{pids[0]}.nii").write_bytes(bytes(raw))
    r = _cli("evaluate", preds, release_2020, "--quiet")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"FAILED {pids[0]}" in r.stdout and "NaN" in r.stdout


def test_show_names_a_patient_discovery_rejected(release_copy, tmp_path):
    victim = sorted(p for p in release_copy.iterdir() if p.is_dir())[0]
    next(victim.glob("*_flair.nii.gz")).unlink()
    _refused(_cli("show", release_copy, "--patient", victim.name, "--out", tmp_path / "f"), victim.name, "flair")


def test_a_damaged_build_record_is_not_published(release_2020, tmp_path):
    """A `.build/done` record is data on disk: one that points outside its patient's group is
    refused before it reaches a manifest."""
    out = tmp_path / "out"
    r = _cli("build-shards", release_2020, out, "--workers", "0", "--size", "32", "--format", "zarr", "--quiet")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    pid = next(iter(m["patients"]))
    rec = dict(m["patients"][pid], pid=pid, files=[f for f in m["files"] if f["patient"] == pid])
    # a path that climbs out and back in: the file it names exists with the recorded size
    i = next(i for i, f in enumerate(rec["files"]) if f["path"].endswith("/image/zarr.json"))
    rec["files"][i] = dict(rec["files"][i], path=f"zarr/{rec['split']}/{pid}/../{pid}/image/zarr.json")
    (out / ".build" / "done").mkdir(parents=True)
    (out / ".build" / "config.json").write_text(json.dumps(m["config"]))
    (out / ".build" / "done" / f"{pid}.json").write_text(json.dumps(rec))
    before = (out / "manifest.json").read_bytes()
    r = _cli("build-shards", release_2020, out, "--workers", "0", "--size", "32", "--format", "zarr", "--quiet")
    _refused(r, "manifest.json")
    assert (out / "manifest.json").read_bytes() == before  # the good manifest was not replaced
    assert subprocess.run([sys.executable, str(REPO / "cli.py"), "verify", str(out)],
                          capture_output=True, text=True).returncode == 0  # and no file it lists was swept


def test_an_image_shard_left_out_of_the_manifest_is_refused_not_read_as_zeros(shard_set, tmp_path):
    from shards.contract import ShardFormatError
    from shards.source import ShardSource

    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    m = json.loads((root / "manifest.json").read_text())
    pid = m["splits"]["val"][0]
    m["files"] = [f for f in m["files"] if not (f["patient"] == pid and f["path"].endswith("/image/c/0/0/0/0"))]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardFormatError, match="image/c/0/0/0/0: missing"):
        ShardSource(root).read_patient(pid, "zarr")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command,patch,hint", [
    ("train", "train.loop.train", "--resume"),
    ("build-shards", "preprocess.build.build", "re-run the same command"),
    ("demo", "train.demo.run_demo", "run the same command again"),
])
def test_ctrl_c_says_how_to_continue(shard_set, release_2020, tmp_path, monkeypatch, command, patch, hint):
    from cli_run import cli

    monkeypatch.setattr(patch, _interrupt)
    argv = {"train": [shard_set, "--out", tmp_path / "run"], "build-shards": [release_2020, tmp_path / "s"],
            "demo": ["--out", tmp_path / "demo"]}[command]
    code, out, err, exc = cli(command, *argv)
    assert exc is None and code == 130, (code, err, exc)
    assert err.startswith("interrupted: ") and hint in err and err.count("\n") == 1, err


def test_ctrl_c_in_a_real_training_run_says_how_to_resume(shard_set, tmp_path):
    """SIGINT to a training process: one line naming --resume and the checkpoint, exit 130."""
    import signal
    import time

    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "cli.py", "train", str(shard_set), "--out", str(run), "--epochs", "50",
                          "--base-channels", "4", "--depth", "2", "--batch-size", "8", "--num-workers", "0",
                          "--quiet"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.csv").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)  # an epoch finished: the run is well under way
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == f"interrupted: continue with the same command plus --resume (from " \
                                          f"{run / 'checkpoints' / 'last.pt'})", err[-2000:]
    assert "Traceback" not in err


def test_matplotlib_is_loaded_before_the_first_step(shard_set, tmp_path, monkeypatch):
    """A Ctrl-C inside matplotlib's first import reads as an ImportError, not KeyboardInterrupt:
    the trainer imports it at setup, so SIGINT after an epoch can not land there."""
    import train.loop
    from train.config import TrainConfig

    calls = []
    monkeypatch.setattr("train.plots._plt", lambda: calls.append("plt"))

    def first_step(*args, **kwargs):
        calls.append("step")
        raise KeyboardInterrupt

    monkeypatch.setattr(train.loop, "train_epoch", first_step)
    with pytest.raises(KeyboardInterrupt):
        train.loop.train(str(shard_set), tmp_path / "run", TrainConfig(base_channels=4, depth=2, batch_size=8,
                                                                        num_workers=0, epochs=1), progress=False)
    assert calls == ["plt", "step"]


@pytest.mark.parametrize("argv,line", [
    (["train", "SET", "--out", "RUN", "--format", "tar"], "error: --format must be one of zarr, wds, not 'tar'"),
    (["train", "SET", "--out", "RUN", "--fg-fraction", "3"], "error: --fg-fraction must lie in [0, 1], not 3.0"),
    (["train", "SET", "--out", "RUN", "--num-workers", "-1"], "error: --num-workers must be >= 0, not -1"),
    (["build-shards", "SRC", "OUT", "--val-fraction", "2"], "error: --val-fraction must be a number in [0, 1], not 2.0"),
    (["build-shards", "SRC", "OUT", "--normalize", "z"], "error: --normalize must be 'volume' or 'slice', not 'z'"),
])
def test_refusals_of_option_values_name_the_option(shard_set, release_2020, tmp_path, argv, line):
    from cli_run import cli

    subs = {"SET": shard_set, "RUN": tmp_path / "run", "SRC": release_2020, "OUT": tmp_path / "out"}
    code, out, err, exc = cli(*[subs.get(a, a) for a in argv])
    assert (code, exc, err) == (2, None, line + "\n")


def test_every_help_reads_at_80_columns_with_full_option_names_and_defaults():
    """At 80 columns no help line is cut or runs over, every option is named in full (the rich
    table cut `--deep-supervision` and `--checkpoint-every`), and the recipe options, whose values
    come from --recipe, say what they default to."""
    import click
    import typer
    from typer.testing import CliRunner

    from cli import app

    group = typer.main.get_command(app)
    for name, command in [("", group), *group.commands.items()]:
        r = CliRunner().invoke(app, [name, "--help"] if name else ["--help"], terminal_width=80)
        assert r.exit_code == 0, (name, r.output)
        lines = r.output.splitlines()
        assert all(len(line) <= 80 for line in lines), (name, [line for line in lines if len(line) > 80])
        assert "…" not in r.output, name
        for p in getattr(command, "params", []):
            if isinstance(p, click.Option):
                for opt in p.opts + p.secondary_opts:
                    assert opt in r.output, (name, opt)
    r = CliRunner().invoke(app, ["train", "--help"], terminal_width=80)
    text = " ".join(r.output.split())
    for opt, default in (("--norm", "instance"), ("--optimizer", "sgd"), ("--schedule", "poly"),
                         ("--augment", "nnunet"), ("--checkpoint-every", "500")):
        after = text[text.index(f"{opt} <"):]
        assert f"[default: {default}" in after[:400], (opt, after[:400])
