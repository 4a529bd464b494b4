"""Validation counts every slice: --tumour-free-fraction thins training patients only, and the
per-patient figures printed while training are `evaluate`'s on the same patients, in shard space."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from cli_run import cli  # tests/cli_run.py
from shards.domain import RELEASES, to_labels
from shards.source import ShardSource
from train.data import with_context
from train.evaluate import patient_metrics
from train.predict import load_checkpoint, predict_slices
from train.validate import thinned_validation


def ok(*argv) -> str:
    code, out, err, exc = cli(*argv)
    assert code == 0 and exc is None, (argv[:2], err[-800:], exc)
    return out


@pytest.fixture(scope="module")
def thinned(tmp_path_factory):
    """Realistic cases built twice: every slice, and a fifth of the tumour-free ones."""
    root = tmp_path_factory.mktemp("thin")
    ok("make-demo-data", root / "data", "--patients", "6", "--shape", "64,64,40", "--seed", "2")
    for name, fraction in (("all", "1"), ("thin", "0.2")):
        ok("build-shards", root / "data", root / name, "--workers", "0", "--size", "32", "--quiet",
           "--val-fraction", "0.5", "--tumour-free-fraction", fraction)
    return root


def test_tumour_free_fraction_thins_training_patients_only(thinned):
    full, thin = (json.loads((thinned / n / "manifest.json").read_text()) for n in ("all", "thin"))
    assert full["splits"] == thin["splits"] and thin["splits"]["val"] and thin["splits"]["train"]
    for pid in thin["splits"]["val"]:  # every brain slice, as without thinning
        assert thin["patients"][pid]["slice_index"] == full["patients"][pid]["slice_index"], pid
    fewer = [len(thin["patients"][p]["slice_index"]) < len(full["patients"][p]["slice_index"])
             for p in thin["splits"]["train"]]
    assert all(fewer)
    assert thin["config"]["preprocess"]["tumour_free_thins"] == "train"
    assert "tumour_free_thins" not in full["config"]["preprocess"]  # unthinned sets keep their bytes


def test_training_figures_are_evaluates_on_the_same_patients(thinned, tmp_path):
    """metrics.csv's per-patient Dice of the last epoch = the mean over validation patients of
    `evaluate.patient_metrics` on the label maps `predict` makes from the same weights, over every
    stored slice (shard space, before post-processing)."""
    run = tmp_path / "run"
    ok("train", thinned / "thin", "--out", run, "--base-channels", "4", "--depth", "2", "--batch-size", "8",
       "--epochs", "1", "--max-batches", "3", "--num-workers", "0", "--augment", "off", "--quiet", "--context", "1")
    with open(run / "metrics.csv") as f:
        row = list(csv.DictReader(f))[-1]
    rel = RELEASES["2020"]
    member = load_checkpoint(run / "checkpoints" / "last.pt", torch.device("cpu"))
    src = ShardSource(str(thinned / "thin"))
    rows = []
    for pid in src.manifest["splits"]["val"]:
        image, mask, _ = src.read_patient(pid, "zarr")
        index = src.manifest["patients"][pid]["slice_index"]
        prob = predict_slices(member["model"], with_context(image, index, member["context"]), torch.device("cpu"))
        pred = to_labels(np.moveaxis(prob > 0.5, 1, 0), member["output_mode"], rel)  # (S, H, W)
        ref = to_labels(np.moveaxis(mask, 1, 0), "subregions", rel)
        rows.append(patient_metrics(pred, ref, (1.0, 1.0, 1.0), rel))
    for region in rel.regions:
        ours = float(np.mean([r[f"dice_{region}"] for r in rows]))
        assert float(row[f"patient_dice_{region}"]) == pytest.approx(ours, rel=1e-5), region  # csv: 6 digits
    assert any(0 < float(row[f"patient_dice_{r}"]) < 1 for r in rel.regions)  # a figure that can differ


def test_a_set_thinned_before_or_folds_say_so():
    config = {"preprocess": {"tumour_free_fraction": 0.3}}
    assert "rebuild" in thinned_validation(config, folds=0)
    now = {"preprocess": {"tumour_free_fraction": 0.3, "tumour_free_thins": "train"}}
    assert thinned_validation(now, folds=0) is None
    assert "--folds" in thinned_validation(now, folds=5)
    assert thinned_validation({"preprocess": {"tumour_free_fraction": 1.0}}, folds=5) is None
