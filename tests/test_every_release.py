"""`show` and `export` for every release of the table: channel counts and names come from the
checkpoint and the release table, never from the glioma sets' four modalities and three channels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shards.domain import MODALITY_NAMES, RELEASES, label_rule
from shards.source import ShardSource
from cli_run import cli  # tests/cli_run.py
from train.config import TrainConfig
from train.export import export, read_metadata
from train.loop import train
from train import palette
from train.predict import load_checkpoint
from train.show import figures

FORCED = {"ped-2024", "ped-2023"}  # same file names, other labels: the release must be named
ALPHA = 0.45  # train.plots.overlay's blend: pixel = (1 - ALPHA) grey + ALPHA colour
TINY = TrainConfig(base_channels=4, depth=2, batch_size=8, num_workers=0, epochs=1, max_batches=2, context=1)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """release -> (toy input folder, shard set of 32 px slices)."""
    out = {}
    for name in RELEASES:
        root = tmp_path_factory.mktemp(name)
        code, _, err, exc = cli("make-demo-data", root / "in", "--patients", "2", "--shape", "40,44,30",
                                "--release", name, "--kind", "toy", "--seed", "1")
        assert code == 0 and exc is None, (name, err, exc)
        more = ("--release", name) if name in FORCED else ()
        code, _, err, exc = cli("build-shards", root / "in", root / "shards", "--workers", "0", "--size", "32",
                                "--quiet", "--val-fraction", "0.5", *more)
        assert code == 0 and exc is None, (name, err, exc)
        out[name] = (root / "in", root / "shards")
    return out


NAMES = ("WT", "TC", "ET", "RC", "CC", "GTV", "?")  # a colour each in train.palette (ED: WT's, NETC: TC's)


def colours_shown(path) -> set[str]:
    """The overlay colours (by the first of NAMES that has it) that at least 20 pixels of a PNG
    show: a pixel shows colour c when removing ALPHA * c leaves a grey."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3].astype(np.float64)
    coloured = img.max(-1) - img.min(-1) > 0.2  # grey pixels and white margins are not overlays
    shown = set()
    for name in NAMES:
        rest = img - ALPHA * palette.colour(name)
        match = coloured & (rest.max(-1) - rest.min(-1) < 0.03) & (rest.min(-1) > -0.02)
        if match.sum() >= 20:
            shown.add(palette.colour_word(name))
    return shown


def bar_pixels(path, names) -> list[int]:
    """Pixels of each channel's class-balance bar colour (train.palette.line_colour) in a PNG."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    return [int((np.abs(img - np.array(palette.line_colour(n))).max(-1) < 0.02).sum()) for n in names]


@pytest.mark.parametrize("name", list(RELEASES))
@pytest.mark.parametrize("which", ["raw", "shards"])
def test_show_draws_every_release(sets, tmp_path, name, which):
    inp, shards = sets[name]
    rel = RELEASES[name]
    src = inp if which == "raw" else shards
    paths = figures(src, tmp_path, release=name if name in FORCED and which == "raw" else None)
    pid = paths[0].name.rsplit("_", 1)[0]
    assert sorted(p.name for p in paths) == sorted(
        [f"{pid}_{k}.png" for k in ("modalities", "planes", "overlay", "histograms")] + ["class_balance.png"])
    for p in paths:
        assert p.stat().st_size > 5000, p
    k = len(rel.subregions)
    shown = colours_shown(tmp_path / f"{pid}_overlay.png")
    words = {palette.colour_word(n) for n in rel.subregions}
    assert shown and shown <= words, (name, shown)  # only the release's channels' colours
    if which == "shards":  # exactly the colours of the channels present in the drawn slice: the most tumorous one
        s = ShardSource(shards)
        _, mask, _ = s.read_patient(pid, "zarr")
        z = int(mask.reshape(len(mask), -1).sum(1).argmax())
        present = {palette.colour_word(rel.subregions[c]) for c in range(k) if mask[z, c].any()}
        assert shown == present, (name, shown, present)
    if which == "shards":  # a bar in its channel's colour for each channel with pixels
        pixels = np.sum([p["mask_pixels"] for p in s.manifest["patients"].values()], axis=0)
        bars = bar_pixels(tmp_path / "class_balance.png", rel.subregions)
        assert [bars[c] >= 30 for c in range(k)] == [bool(v) for v in pixels[:k]], (name, bars)


def test_show_refuses_a_release_the_shard_set_is_not(sets, tmp_path):
    code, _, err, _ = cli("show", sets["men-rt"][1], "--out", tmp_path, "--release", "2020")
    assert code == 2 and "men-rt" in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def checkpoints(sets, tmp_path_factory):
    out = {}
    for name in ("gli-2024", "men-rt"):
        run = tmp_path_factory.mktemp(f"run-{name}")
        train(str(sets[name][1]), run, TINY, progress=False)
        out[name] = run / "checkpoints" / "last.pt"
    return out


@pytest.mark.parametrize("name,outputs", [("gli-2024", ["WT", "TC", "ET", "RC"]), ("men-rt", ["GTV"])])
def test_export_of_other_releases_matches_torch(checkpoints, tmp_path, name, outputs):
    ort = pytest.importorskip("onnxruntime")
    rel = RELEASES[name]
    m = len(rel.modalities)
    x = np.random.default_rng(0).standard_normal((3, 3 * m, 32, 32)).astype(np.float32)  # context 1: 3 slices
    model = load_checkpoint(checkpoints[name], torch.device("cpu"))["model"]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert want.shape == (3, len(outputs), 32, 32)

    onnx_path, ts_path = tmp_path / "m.onnx", tmp_path / "m.pt"
    meta = export(checkpoints[name], onnx_path, "onnx")
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    export(checkpoints[name], ts_path, "torchscript")
    with torch.no_grad():
        got_ts = torch.jit.load(str(ts_path)).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got_ts, want, atol=1e-4)

    for path in (onnx_path, ts_path):
        stored = read_metadata(path)
        assert stored["output"]["channels"] == outputs and stored["output"]["shape"][1] == len(outputs)
        assert stored["input"]["channels"] == [f"{MODALITY_NAMES[mod]}@{o}" for o in ("-1", "0", "+1")
                                               for mod in rel.modalities]
        assert f"*{m} + m" in stored["context"]["rule"]
        assert stored["labels"]["rule"] == label_rule(rel, stored["output"]["mask_mode"])
        labels = stored["labels"]["releases"]  # every release of the same channels, with its label values
        assert labels[name] == {s: rel.label_of(s) for s in rel.subregions}
        assert all(sorted(v) == sorted(rel.subregions) for v in labels.values())
    assert json.loads((tmp_path / "m.onnx.json").read_text()) == {**meta}


def _readme_snippet() -> str:
    """The README's reading example, exactly as written (the python block of 'The shard set')."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```python\nimport io, json\nimport numpy as np, zarr, webdataset as wds")
    return text[start + len("```python\n"): text.index("```\n", start + 10)]


def _run_snippet(root, tmp_path) -> dict:
    import subprocess
    import sys

    code = _readme_snippet()
    assert 'root = "demo/shards"\n' in code
    code = code.replace('root = "demo/shards"', f"root = {str(root)!r}")
    code += ("\nimport json as _j\nprint(_j.dumps({'zarr': [list(image.shape), list(mask.shape)] if 'image' in dir() "
             "else None, 'wds': [len(samples), list(samples[0][0].shape), list(samples[0][1].shape)] "
             "if 'samples' in dir() else None, 'n': n, 'm': len(mods), 'k': len(chans)}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(RELEASES))
def test_the_readme_reading_snippet_reads_every_release(sets, tmp_path, name):
    out = _run_snippet(sets[name][1], tmp_path)
    rel = RELEASES[name]
    assert (out["m"], out["k"]) == (len(rel.modalities), len(rel.subregions))
    assert out["zarr"][0][:2] == [out["n"], out["m"]] and out["zarr"][1][:2] == [out["n"], out["k"]]
    assert out["wds"][:3] == [out["n"], [out["m"], 32, 32], [out["k"], 32, 32]]


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_the_readme_reading_snippet_reads_a_single_format_set(sets, tmp_path, fmt):
    code, _, err, exc = cli("build-shards", sets["2020"][0], tmp_path / "s", "--workers", "0", "--size", "32",
                            "--quiet", "--format", fmt)
    assert (code, exc) == (0, None), err
    out = _run_snippet(tmp_path / "s", tmp_path)
    assert (out["zarr"] is None) == (fmt == "wds") and (out["wds"] is None) == (fmt == "zarr")
