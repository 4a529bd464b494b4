"""Careless or hostile checkpoints (issue 18, cases 2, 15, 16, 17, 22b): `predict` and `export`
refuse, in one `error:` line naming the file and the field, a checkpoint whose config would size
a model its weights do not fit (or a huge one), a file that is not a checkpoint at all, post-
processing thresholds that are not volumes, channel names that contradict the outputs; nothing
is written. A failed save (full disk) is one error naming the file, the old file intact.

Each case edits a tiny trained checkpoint (torch.save of a modified dict, no pickles) and runs the
command as a user would (typer's runner, in process)."""

from __future__ import annotations

import errno
import json
import math
import os
import zipfile

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from train import checkpoint as ckpt
from train.config import TrainConfig
from train.loop import train


@pytest.fixture(scope="module")
def trained(shard_set, tmp_path_factory):
    """A checkpoint as `train` writes it today (the default recipe, tiny)."""
    run = tmp_path_factory.mktemp("run")
    train(str(shard_set), run, TrainConfig(base_channels=4, depth=2, batch_size=8, num_workers=0, epochs=1,
                                           max_batches=2), progress=False)
    return run / "checkpoints" / "last.pt"


def edited(trained, tmp_path, edit, name="edited.pt"):
    """A copy of the trained checkpoint with `edit(dict)` applied (plain tensors and data only)."""
    ck = torch.load(trained, weights_only=True)
    edit(ck)
    path = tmp_path / name
    torch.save(ck, path)
    return path


def run(*argv):
    r = CliRunner().invoke(app, [*map(str, argv)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.stdout + r.stderr
    return r


def refused(r, *names) -> str:
    """Exit 2, one `error:` line holding every name, never the advice to unpickle."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    assert "weights_only" not in lines[0]
    return lines[0]


def predict_refused(ck, inputs, tmp_path, *names, extra=()):
    out = tmp_path / "pred"
    line = refused(run("predict", ck, inputs, out, "--quiet", *extra), *names)
    assert not out.exists()  # refused before anything was written
    return line


def export_refused(ck, tmp_path, *names):
    out = tmp_path / "exported" / "model.pt"
    line = refused(run("export", ck, out, "--format", "torchscript"), *names)
    assert not out.parent.exists() or os.listdir(out.parent) == []
    return line


def set_config(**kw):
    return lambda ck: ck["config"].update(kw)


# ---------------------------------------------------------------- case 2: config vs tensors


@pytest.mark.parametrize("edit, field", [
    (set_config(base_channels=4000), "config.base_channels"),  # the 265 KB file asking for 4 GB
    (set_config(base_channels=8), "model["),  # in bounds, but not what the weights are
    (set_config(depth=3), "model"),
    (set_config(depth=True), "config.depth"),
    (set_config(base_channels=4.0), "config.base_channels"),
    (set_config(context=10**6), "config.context"),
    (set_config(context=1), "model['inc.net.0.weight']"),  # 12 input channels claimed, 4 stored
    (set_config(model="resnet"), "config"),
    (set_config(norm="group"), "config"),
    (set_config(deep_supervision="yes"), "config.deep_supervision"),
    (set_config(init="pretrained"), "config"),
    (set_config(dice_smooth=float("nan")), "config"),
    (lambda ck: ck.update(config=[1, 2]), "config"),
    (lambda ck: ck["preprocess"]["preprocess"].update(size=10**6), "preprocess.preprocess"),
    (lambda ck: ck["preprocess"]["preprocess"].update(size=32.5), "preprocess.preprocess.size"),
    (lambda ck: ck["preprocess"].update(convention="2099"), "preprocess.convention"),
    (lambda ck: ck["preprocess"].update(modalities=["t1", "t1", "t2", "flair"]), "preprocess.modalities"),
    (lambda ck: ck.update(preprocess="size 128"), "preprocess"),
])
def test_predict_checks_the_config_against_the_weights(trained, release_2020, tmp_path, edit, field):
    bad = edited(trained, tmp_path, edit)
    predict_refused(bad, release_2020, tmp_path, bad, field)


def test_export_checks_the_config_before_building(trained, tmp_path):
    bad = edited(trained, tmp_path, set_config(base_channels=4000))
    export_refused(bad, tmp_path, bad, "config.base_channels")


def test_a_huge_model_within_the_bounds_is_refused_by_its_size(trained, tmp_path):
    """base_channels 256 and depth 7 are each allowed; together billions of weights: refused by
    the count computed on the meta device, nothing allocated."""
    bad = edited(trained, tmp_path, set_config(base_channels=256, depth=7))
    with pytest.raises(ckpt.CheckpointError, match="more than"):
        ckpt.read(bad)


@pytest.mark.parametrize("edit, field", [
    (lambda ck: ck["model"].update({"head.weight": torch.full_like(ck["model"]["head.weight"], math.nan)}),
     "NaN"),
    (lambda ck: ck["model"].update(extra=torch.zeros(3)), "unexpected ['extra']"),
    (lambda ck: ck["model"].pop("head.bias"), "missing ['head.bias']"),
    (lambda ck: ck["model"].update({"head.bias": "zeros"}), "model"),
    (lambda ck: ck["model"].update({"head.bias": torch.zeros(3, dtype=torch.int64)}), "model['head.bias']"),
])
def test_weights_that_do_not_fit_are_refused(trained, release_2020, tmp_path, edit, field):
    bad = edited(trained, tmp_path, edit)
    predict_refused(bad, release_2020, tmp_path, bad, field)


# ---------------------------------------------------------------- case 15: not a checkpoint


def _not_checkpoints(tmp_path):
    """Every kind of file a careless --ensemble may name."""
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    zipped = tmp_path / "archive.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("a.txt", "hello")
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # needs unpickling code to load
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    plain = tmp_path / "plain.pt"
    torch.save({"a": 1}, plain)  # loads, but is no checkpoint
    folder = tmp_path / "a_run"
    (folder / "checkpoints").mkdir(parents=True)
    return {"text": text, "zip": zipped, "pickled": pickled, "empty": empty, "plain": plain, "folder": folder,
            "missing": tmp_path / "missing.pt"}


KINDS = ("text", "zip", "pickled", "empty", "plain", "folder", "missing")


@pytest.mark.parametrize("kind", KINDS)
def test_ensemble_member_that_is_no_checkpoint(trained, release_2020, tmp_path, kind):
    bad = _not_checkpoints(tmp_path)[kind]
    line = predict_refused(trained, release_2020, tmp_path, bad, "not a brats-shards checkpoint",
                           extra=("--ensemble", bad))
    if kind == "folder":
        assert "is a folder" in line and "checkpoints/best.pt" in line


def test_a_run_folder_given_for_its_checkpoint(trained, release_2020, tmp_path):
    """`predict RUN_FOLDER ...` and `export RUN_FOLDER ...` use the run's best.pt (else last.pt);
    a folder holding neither is one line saying so."""
    import nibabel as nib
    import numpy as np

    run_folder = trained.parent.parent
    best = run_folder / "checkpoints" / "best.pt"
    for ck, out in ((run_folder, tmp_path / "by_run"), (best, tmp_path / "by_file")):
        r = run("predict", ck, release_2020, out, "--quiet")
        assert r.exit_code == 0, r.output
    for f in sorted((tmp_path / "by_file").iterdir()):
        assert np.array_equal(np.asarray(nib.load(f).dataobj), np.asarray(nib.load(tmp_path / "by_run" / f.name).dataobj))
    r = run("export", run_folder, tmp_path / "m.pt", "--format", "torchscript")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.pt.json").read_text())["source"]["checkpoint"] == "best.pt"
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    predict_refused(empty, release_2020, tmp_path, empty, "is a folder", "run folder")


def test_truncated_checkpoint(trained, release_2020, tmp_path):
    cut = tmp_path / "cut.pt"
    data = trained.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    predict_refused(trained, release_2020, tmp_path, cut, "not a brats-shards checkpoint", extra=("--ensemble", cut))


@pytest.mark.parametrize("kind", ("text", "pickled", "folder", "plain"))
def test_main_checkpoint_that_is_no_checkpoint(release_2020, tmp_path, kind):
    bad = _not_checkpoints(tmp_path)[kind]
    predict_refused(bad, release_2020, tmp_path, bad, "not a brats-shards checkpoint")


@pytest.mark.parametrize("kind", ("text", "zip", "pickled", "empty", "plain"))
def test_export_of_no_checkpoint(tmp_path, kind):
    bad = _not_checkpoints(tmp_path)[kind]
    export_refused(bad, tmp_path, bad, "not a brats-shards checkpoint")


# ---------------------------------------------------------------- case 16: thresholds


@pytest.mark.parametrize("value", [math.inf, 1e308, -1.0, math.nan, "100", True, [5]])
@pytest.mark.parametrize("key", ["et_min_mm3", "min_component_mm3"])
def test_postprocess_thresholds_must_be_volumes(trained, release_2020, tmp_path, key, value):
    bad = edited(trained, tmp_path, lambda ck: ck.update(postprocess={"et_min_mm3": 0.0, "min_component_mm3": 0.0,
                                                                       key: value}))
    predict_refused(bad, release_2020, tmp_path, bad, "postprocess", key)


@pytest.mark.parametrize("value", [[1.0, 2.0], [], 0, ""], ids=["list", "empty-list", "zero", "empty-text"])
def test_postprocess_that_is_not_a_mapping(trained, release_2020, tmp_path, value):
    bad = edited(trained, tmp_path, lambda ck: ck.update(postprocess=value))
    predict_refused(bad, release_2020, tmp_path, bad, "postprocess")


# ---------------------------------------------------------------- case 17: channel names


@pytest.mark.parametrize("edit", [
    lambda ck: ck.update(channels=["WT", "TC"]),  # fewer names than outputs
    lambda ck: ck.update(channels=["WT", "TC", "ET", "RC"]),
    lambda ck: ck.update(channels=["NCR/NET", "ED", "ET"]),  # sub-region names on region outputs
    lambda ck: ck.update(channels=["ET", "TC", "WT"]),  # the right names in the wrong order
    lambda ck: ck.update(channels="WT,TC,ET"),
    lambda ck: ck.update(channels=[]),  # present but empty: a claim, not an older checkpoint
])
def test_export_refuses_channel_names_that_contradict_the_outputs(trained, tmp_path, edit):
    bad = edited(trained, tmp_path, edit)
    export_refused(bad, tmp_path, bad, "channels")


def test_output_mode_that_contradicts_the_targets(trained, tmp_path):
    bad = edited(trained, tmp_path, lambda ck: ck.update(output_mode="subregions"))
    export_refused(bad, tmp_path, bad, "output_mode")


# ---------------------------------------------------------------- case 22b: a full disk


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_full_disk_while_saving(tmp_path, monkeypatch, failure):
    path = tmp_path / "last.pt"
    ckpt.save(path, {"epoch": 1})
    before = path.read_bytes()

    def full(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half")  # the temporary is half-written when the disk fills
        raise failure

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ckpt.CheckpointError, match="could not write checkpoint .*last.pt: the disk is full") as e:
        ckpt.save(path, {"epoch": 2})
    assert "\n" not in str(e.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


# ---------------------------------------------------------------- what train writes still loads


def test_checkpoints_as_train_writes_them_predict_and_export(trained, release_2023, tmp_path):
    r = run("predict", trained, release_2023, tmp_path / "pred", "--quiet", "--ensemble", trained)
    assert r.exit_code == 0, r.stderr
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 3
    r = run("export", trained, tmp_path / "model.pt", "--format", "torchscript")
    assert r.exit_code == 0, r.stderr
    rec = ckpt.read(trained)
    assert rec["channels"] == ["WT", "TC", "ET"] and rec["sha256"] and rec["config"].base_channels == 4


def test_checkpoint_from_before_channels_and_thresholds_were_stored(trained, tmp_path):
    """Older checkpoints lack channels, output_mode and postprocess: they read as before."""
    old = edited(trained, tmp_path, lambda ck: [ck.pop(k) for k in ("channels", "output_mode", "postprocess")])
    rec = ckpt.read(old)
    assert rec["output_mode"] == "regions" and rec["channels"] == ["WT", "TC", "ET"]
    assert rec["postprocess"].et_min_mm3 == 0.0
    assert isinstance(ckpt.build(rec), torch.nn.Module)


def test_read_bytes_once(trained, monkeypatch, tmp_path):
    """export reads the file once: the sha256 in its metadata is of the bytes the model came from."""
    import hashlib

    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    r = run("export", trained, tmp_path / "model.pt", "--format", "torchscript")
    assert r.exit_code == 0, r.stderr
    assert len(calls) == 1
    meta = json.loads((tmp_path / "model.pt.json").read_text())
    assert meta["source"]["checkpoint_sha256"] == hashlib.sha256(trained.read_bytes()).hexdigest()


# ---------------------------------------------------------------- variants: files that allocate


def _recompressed(trained, tmp_path, name="bomb.pt"):
    """The trained checkpoint with its records deflated: torch would load it, and a record can
    then unpack to far more than the file holds."""
    src = zipfile.ZipFile(trained)
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    return path


def test_a_deflated_archive_is_refused_before_loading(trained, release_2020, tmp_path):
    bomb = _recompressed(trained, tmp_path)
    assert torch.load(bomb, weights_only=True)["config"]  # torch itself would unpack it
    predict_refused(bomb, release_2020, tmp_path, bomb, "compressed")


def test_the_old_non_zip_format_is_refused(trained, release_2020, tmp_path):
    old = tmp_path / "legacy.pt"
    torch.save(torch.load(trained, weights_only=True), old, _use_new_zipfile_serialization=False)
    predict_refused(old, release_2020, tmp_path, old, "not a torch zip archive")


@pytest.mark.timeout(60)  # reading a FIFO would wait for a writer forever
def test_a_fifo_is_never_read(trained, release_2020, tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    predict_refused(trained, release_2020, tmp_path, fifo, "FIFO", extra=("--ensemble", fifo))


def test_wide_maps_at_a_huge_slice_size_are_refused(trained, tmp_path):
    """A few MB of weights (base 256, depth 1) at slices of 1024^2: ~10 GB per forward pass."""
    def edit(ck):
        ck["config"].update(base_channels=256, depth=1)
        ck["preprocess"]["preprocess"]["size"] = 1024
    bad = edited(trained, tmp_path, edit)
    export_refused(bad, tmp_path, bad, "config.base_channels", "preprocess size 1024")


def test_train_on_a_full_disk_is_one_line(shard_set, tmp_path, monkeypatch):
    """`train` when last.pt cannot be written: one error naming it, no temporary left behind."""
    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    r = run("train", shard_set, "--out", out, "--base-channels", "4", "--depth", "2", "--batch-size", "8",
            "--num-workers", "0", "--epochs", "1", "--max-batches", "2", "--quiet")
    line = refused(r, "could not write checkpoint", "last.pt", "disk is full")
    assert "Traceback" not in line
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_read_raw_loads_without_field_checks_but_safely(trained, tmp_path):
    """read_raw (for a resume, which checks its own fields): the dict as saved; a pickling file refused."""
    raw, data = ckpt.read_raw(trained)
    assert data == trained.read_bytes() and set(raw) >= {"model", "config", "preprocess", "epoch"}
    bad = _not_checkpoints(tmp_path)["pickled"]
    with pytest.raises(ckpt.CheckpointError, match="never unpickled"):
        ckpt.read_raw(bad)


@pytest.mark.parametrize("tensor", [
    lambda t: torch.empty(t.shape, device="meta"),  # no data at all
    lambda t: torch.zeros(t.shape, dtype=torch.complex64),
    lambda t: torch.zeros(t.shape, dtype=torch.bool),
    lambda t: torch.zeros(t.shape).to_sparse(),
], ids=["meta", "complex", "bool", "sparse"])
def test_tensors_of_the_right_shape_but_wrong_kind(trained, release_2020, tmp_path, tensor):
    bad = edited(trained, tmp_path, lambda ck: ck["model"].update({"head.bias": tensor(ck["model"]["head.bias"])}))
    predict_refused(bad, release_2020, tmp_path, bad, "model['head.bias']")


def test_a_file_past_the_size_bound_is_not_read_whole(trained, release_2020, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "MAX_BYTES", 1000)
    predict_refused(trained, release_2020, tmp_path, trained, "larger than 1,000 bytes")


@pytest.mark.parametrize("value", [math.inf, -5.0, torch.tensor(5.0)], ids=["inf", "negative", "tensor"])
def test_export_refuses_thresholds_that_are_not_volumes(trained, tmp_path, value):
    bad = edited(trained, tmp_path, lambda ck: ck.update(postprocess={"et_min_mm3": value}))
    export_refused(bad, tmp_path, bad, "postprocess", "et_min_mm3")


@pytest.mark.parametrize("field, value", [("epoch", 10**12), ("epoch", "1"), ("manifest_sha256", "x" * 10_000)],
                         ids=["epoch-huge", "epoch-text", "sha-long"])
def test_export_refuses_metadata_fields_out_of_range(trained, tmp_path, field, value):
    bad = edited(trained, tmp_path, lambda ck: ck.update({field: value}))
    export_refused(bad, tmp_path, bad, field)


@pytest.mark.parametrize("kind", ("folder", "missing"))
def test_export_of_a_folder_or_a_missing_file(tmp_path, kind):
    bad = _not_checkpoints(tmp_path)[kind]
    export_refused(bad, tmp_path, bad, "not a brats-shards checkpoint")


def test_predict_ensemble_of_a_text_file_in_a_real_process(trained, release_2020, tmp_path):
    """The issue's case as a user meets it: stderr is one line, no traceback, no unpickling advice."""
    import subprocess
    import sys
    from pathlib import Path

    notes = _not_checkpoints(tmp_path)["text"]
    r = subprocess.run([sys.executable, "cli.py", "predict", str(trained), str(release_2020), str(tmp_path / "p"),
                        "--ensemble", str(notes), "--quiet"], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: not a brats-shards checkpoint: ") and str(notes) in r.stderr
    assert "weights_only" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("edit, field", [
    (set_config(epochs=torch.zeros(2)), "config"),  # a tensor where a number belongs
    (lambda ck: ck.update(channels=torch.zeros(3)), "channels"),
    (lambda ck: ck.update(postprocess=torch.zeros(2)), "postprocess"),
    (lambda ck: ck["preprocess"].update(convention=["2020"]), "preprocess.convention"),
    (lambda ck: ck.update(config={1: 2}), "config"),
], ids=["tensor-in-config", "tensor-channels", "tensor-postprocess", "list-convention", "int-keys"])
def test_fields_that_are_not_plain_data(trained, release_2020, tmp_path, edit, field):
    bad = edited(trained, tmp_path, edit)
    predict_refused(bad, release_2020, tmp_path, bad, field)


def test_check_names_a_missing_field(trained):
    raw = torch.load(trained, weights_only=True)
    del raw["model"]
    with pytest.raises(ckpt.CheckpointError, match="x.pt is not a usable checkpoint: model is missing"):
        ckpt.check(raw, "x.pt")
