"""`export`: ONNX and TorchScript files that compute what the checkpoint's model computes, carry
the metadata a deployer needs, and are written whole or not at all.

Parity tolerance: max |exported - torch eval| < 1e-4 on the logits (measured ~2e-6 for ONNX
Runtime on CPU, 0 for TorchScript)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from train import export as ex
from train.export import ExportError, export, input_channel_names, read_metadata
from train.config import TrainConfig
from train.loop import train
from train.predict import load_checkpoint

TOL = 1e-4
SIZE = 32  # the shard_set fixture's slice size


@pytest.fixture(scope="module")
def checkpoints(shard_set, tmp_path_factory):
    """Two tiny trained runs: the default recipe with deep supervision on (instance norm, regions), with
    no context, and the seed's blocks (batch norm, the set's own channels) with context 1."""
    configs = {0: TrainConfig(base_channels=4, depth=3, batch_size=8, num_workers=0, epochs=1, max_batches=2,
                              deep_supervision=True),
               1: TrainConfig(base_channels=4, depth=2, batch_size=8, num_workers=0, epochs=1, max_batches=2,
                              context=1, norm="batch", act="relu", deep_supervision=False, targets="channels",
                              postprocess=False)}
    out = {}
    for k, cfg in configs.items():
        run = tmp_path_factory.mktemp(f"run{k}")
        train(str(shard_set), run, cfg, progress=False)
        out[k] = run / "checkpoints" / "last.pt"
    return out


def reference(checkpoint, x: np.ndarray) -> np.ndarray:
    model = load_checkpoint(checkpoint, torch.device("cpu"))["model"]
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".tmp" in n)


@pytest.mark.parametrize("context", [0, 1])
def test_onnx_matches_torch_and_carries_metadata(checkpoints, tmp_path, context):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    meta = export(checkpoints[context], out, "onnx")
    channels = 4 * (2 * context + 1)

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("image", "logits")
    assert inp.shape[1:] == [channels, SIZE, SIZE] and isinstance(inp.shape[0], str)  # dynamic batch
    for batch in (3, 1):
        x = np.random.default_rng(batch).standard_normal((batch, channels, SIZE, SIZE)).astype(np.float32)
        (y,) = session.run(None, {"image": x})
        assert y.shape == (batch, 3, SIZE, SIZE)
        assert np.abs(y - reference(checkpoints[context], x)).max() < TOL

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    stored = json.loads(props["brats_shards"])
    assert stored == meta == json.loads((tmp_path / "model.onnx.json").read_text()) == read_metadata(out)
    assert stored["input"]["channels"] == input_channel_names(context) and len(stored["input"]["channels"]) == channels
    assert stored["input"]["shape"] == ["N", channels, SIZE, SIZE]
    assert stored["preprocess"]["size"] == SIZE and stored["context"]["slices_each_side"] == context
    expected = (["WT", "TC", "ET"], "regions") if context == 0 else (["NCR/NET", "ED", "ET"], "subregions")
    assert (stored["output"]["channels"], stored["output"]["mask_mode"]) == expected
    assert (stored["output"]["activation"], stored["output"]["threshold"]) == ("sigmoid", 0.5)
    assert stored["train_config"]["context"] == context and stored["exporter"]["opset"] == 17
    assert len(stored["source"]["checkpoint_sha256"]) == 64 and len(stored["source"]["manifest_sha256"]) == 64
    assert onnx.load(str(out)).opset_import[0].version == 17
    assert leftovers(tmp_path) == []


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_matches_torch_and_carries_metadata(checkpoints, tmp_path):
    out = tmp_path / "model.pt"
    meta = export(checkpoints[0], out, "torchscript")
    files = {"brats_shards.json": ""}
    loaded = torch.jit.load(str(out), map_location="cpu", _extra_files=files)
    assert json.loads(files["brats_shards.json"]) == meta == read_metadata(out)
    assert json.loads((tmp_path / "model.pt.json").read_text()) == meta
    assert meta["format"] == "torchscript" and meta["input"]["channels"] == ["T1@0", "T1Gd@0", "T2@0", "FLAIR@0"]
    x = np.random.default_rng(0).standard_normal((3, 4, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        y = loaded(torch.from_numpy(x))
    assert isinstance(y, torch.Tensor) and y.shape == (3, 3, SIZE, SIZE)  # one tensor: no deep supervision
    assert np.abs(y.numpy() - reference(checkpoints[0], x)).max() < TOL
    assert leftovers(tmp_path) == []


def test_input_channel_names():
    assert input_channel_names(0) == ["T1@0", "T1Gd@0", "T2@0", "FLAIR@0"]
    names = input_channel_names(1)  # offset-major, as train.data.with_context stacks them
    assert names[:4] == ["T1@-1", "T1Gd@-1", "T2@-1", "FLAIR@-1"] and names[4] == "T1@0" and names[-1] == "FLAIR@+1"


def test_refusals_name_the_file(checkpoints, tmp_path):
    ck = checkpoints[0]
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export(ck, tmp_path / "m.tflite", "tflite")
    with pytest.raises(ExportError, match="opset 99"):
        export(ck, tmp_path / "m.onnx", "onnx", opset=99)
    with pytest.raises(ExportError, match="no checkpoint at .*missing.pt"):
        export(tmp_path / "missing.pt", tmp_path / "m.onnx", "onnx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ExportError, match="folder.* is an existing folder"):
        export(ck, tmp_path / "folder", "torchscript")
    with pytest.raises(ExportError, match="folder is not a checkpoint file"):
        export(tmp_path / "folder", tmp_path / "m.pt", "torchscript")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="junk.pt is not a usable checkpoint") as e:
        export(junk, tmp_path / "m.pt", "torchscript")
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["folder", "junk.pt"]  # nothing written


def test_failed_write_leaves_the_old_file_and_no_temporaries(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "model.pt"
    out.write_bytes(b"old model")

    def half_save(obj, path, _extra_files=None):  # dies half-way through writing the temporary file
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch.jit, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        export(checkpoints[0], out, "torchscript")
    assert out.read_bytes() == b"old model" and sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_failed_onnx_export_writes_nothing(checkpoints, tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")

    def broken(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export(checkpoints[1], tmp_path / "model.onnx", "onnx")
    assert os.listdir(tmp_path) == []


def test_deep_supervision_outputs_are_refused(checkpoints, tmp_path, monkeypatch):
    """A model that still returned its deep-supervision list would export the wrong graph."""
    real = ex.load_for_export

    def in_train_mode(path):
        model, meta = real(path)
        return model.train(), meta

    monkeypatch.setattr(ex, "load_for_export", in_train_mode)
    with pytest.raises(ExportError, match="does not return one"):
        export(checkpoints[0], tmp_path / "model.pt", "torchscript")
    assert os.listdir(tmp_path) == []


def test_cli_export_torchscript_and_refusal(checkpoints, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    ck = next(iter(checkpoints.values()))
    out = tmp_path / "model.ts"
    r = subprocess.run([sys.executable, "cli.py", "export", str(ck), str(out), "--format", "torchscript"], cwd=repo,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.exists() and json.loads((tmp_path / "model.ts.json").read_text())["format"] == "torchscript"
    bad = subprocess.run([sys.executable, "cli.py", "export", str(ck), str(tmp_path / "m.x"), "--format", "tflite"],
                         cwd=repo, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "tflite" in bad.stderr
