"""Every release of the table through every command, as a user types them: make-demo-data (realistic),
build-shards, info, verify, train (a few steps), predict, evaluate, show, export to ONNX and
TorchScript, with ONNX Runtime and TorchScript agreeing with torch."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from cli_run import cli  # tests/cli_run.py
from preprocess.discover import discover
from preprocess.nifti import load_volume
from shards.domain import RELEASES

FORCED = {"ped-2024", "ped-2023"}  # same ids as each other, other labels: the release must be named
TINY = ("--base-channels", "4", "--depth", "2", "--batch-size", "8", "--epochs", "1", "--max-batches", "2",
        "--num-workers", "0", "--augment", "off", "--quiet")


def ok(*argv) -> str:
    code, out, err, exc = cli(*argv)
    assert code == 0 and exc is None, (argv[:2], code, err[-800:], exc)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RELEASES))
def test_every_command_on_every_release(tmp_path, name):
    rel = RELEASES[name]
    named = ("--release", name) if name in FORCED else ()
    data, shards, run, preds, figs = (tmp_path / d for d in ("data", "shards", "run", "preds", "figs"))

    ok("make-demo-data", data, "--release", name, "--patients", "3", "--shape", "48,48,32", "--seed", "1")
    ok("build-shards", data, shards, "--workers", "0", "--size", "32", "--quiet", "--val-fraction", "0.34", *named)
    info = json.loads(ok("info", shards, "--json"))
    assert info["config"]["convention"] == name and len(info["mask_channels"]) == len(rel.subregions), info
    assert "OK" in ok("verify", shards)

    ok("train", shards, "--out", run, *TINY)
    assert (run / "checkpoints" / "last.pt").is_file()

    ok("predict", run, data, preds, "--quiet", *named)
    patients = discover(data, need_seg=True, release=name).patients
    for p in patients:
        pred = load_volume(preds / f"{p.pid}.nii.gz").data
        ref = load_volume(p.files["seg"]).data
        assert pred.shape == ref.shape and set(np.unique(pred).tolist()) <= set(rel.label_values), p.pid

    ok("evaluate", preds, data, "--split-from", run, "--quiet", *named)
    with open(preds / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["patient"] for r in rows) == sorted(p.pid for p in patients)
    manifest = json.loads((shards / "manifest.json").read_text())
    splits = {p: s for s in ("train", "val") for p in manifest["splits"][s]}
    assert {r["patient"]: r["split"] for r in rows} == splits and set(splits.values()) == {"train", "val"}
    for region in rel.regions:
        for column in (f"dice_{region}", f"hd95_{region}", f"nsd_{region}", f"lesion_nsd_{region}"):
            assert all(0 <= float(r[column]) < 400 for r in rows), column

    ok("show", shards, "--out", figs / "set", "--run", run)
    ok("show", data, "--out", figs / "raw", *named)
    for folder in (figs / "set", figs / "raw"):
        pngs = list(folder.glob("*.png"))
        assert len(pngs) >= 5 and all(p.stat().st_size > 5000 for p in pngs), folder

    ort = pytest.importorskip("onnxruntime")
    ok("export", run, tmp_path / "m.onnx", "--format", "onnx")
    ok("export", run, tmp_path / "m.pt", "--format", "torchscript")
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    n_in, n_out = len(meta["input"]["channels"]), len(meta["output"]["channels"])
    assert n_in == len(rel.modalities) and n_out == len(rel.regions), meta
    x = np.random.default_rng(0).standard_normal((2, n_in, 32, 32)).astype(np.float32)
    from train.predict import load_checkpoint

    model = load_checkpoint(run / "checkpoints" / "last.pt", torch.device("cpu"))["model"]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
        got_ts = torch.jit.load(str(tmp_path / "m.pt")).eval()(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert want.shape == (2, n_out, 32, 32)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(got_ts, want, atol=1e-4)
