import subprocess
import sys
from pathlib import Path

import pytest

from train.loop import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def _check_pngs(stdout: str, expected: list[str]):
    import matplotlib.image as mpimg

    paths = [Path(line) for line in stdout.split()]
    assert sorted(p.name for p in paths) == sorted(expected)
    for p in paths:
        img = mpimg.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.05, f"{p.name} looks blank"


@pytest.mark.parametrize("which", ["raw", "shards"])
def test_show_figures(release_2020, shard_set, tmp_path, which):
    src = release_2020 if which == "raw" else shard_set
    pid = "BraTS20_Training_003"
    r = subprocess.run([sys.executable, "cli.py", "show", str(src), "--out", str(tmp_path), "--patient", pid],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _check_pngs(r.stdout, [f"{pid}_{k}.png" for k in ("modalities", "planes", "overlay", "histograms")]
                + ["class_balance.png"])


def test_show_run_predictions(shard_set, tmp_path):
    train(str(shard_set), tmp_path / "run", TrainConfig(base_channels=4, depth=2, batch_size=8, num_workers=0,
                                                        epochs=1), progress=False)
    r = subprocess.run([sys.executable, "cli.py", "show", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "f")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    val = json.loads((shard_set / "manifest.json").read_text())["splits"]["val"]
    _check_pngs(r.stdout, [f"run_{pid}.png" for pid in val])


def test_show_unknown_patient_is_a_clear_error(release_2020, tmp_path):
    r = subprocess.run([sys.executable, "cli.py", "show", str(release_2020), "--out", str(tmp_path),
                        "--patient", "nobody"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "patient nobody not found" in r.stderr


# -- untrusted names and files: nothing is written outside --out, nothing read unbounded ------------------

def _cli(*args, limit_as: int | None = None, timeout: float = 300):
    def preexec():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec if limit_as else None)


def _one_line_refusal(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def _pngs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def test_show_refuses_a_patient_option_that_is_not_a_plain_id(shard_set, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    r = _cli("show", shard_set, "--out", out, "--patient", "../../esc")
    _one_line_refusal(r)
    assert "--patient" in r.stderr
    assert _pngs(tmp_path) == []


def test_show_never_writes_outside_out_for_a_hostile_manifest(shard_set, tmp_path):
    """A patient id `../../esc` would put its PNGs two folders above --out."""
    import json
    import shutil

    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    m = json.loads((root / "manifest.json").read_text())
    victim = sorted(m["splits"]["val"])[0]
    evil = "../../esc"
    m["format"]["layouts"] = ["wds"]
    m["files"] = [dict(f, patient=evil) if f["patient"] == victim else f for f in m["files"] if f["format"] == "wds"]
    m["patients"][evil] = m["patients"].pop(victim)
    m["splits"]["val"] = [evil if p == victim else p for p in m["splits"]["val"]]
    (root / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "a" / "b" / "out"
    r = _cli("show", root, "--out", out, "--patient", evil)
    _one_line_refusal(r)
    r = _cli("show", root, "--out", out)  # default patient: the first listed
    _one_line_refusal(r)
    assert "manifest.json" in r.stderr
    assert [p for p in _pngs(tmp_path) if out not in p.parents] == []


def test_show_refuses_a_png_path_resolving_outside_out(shard_set, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere.png"
    target.write_bytes(b"precious")
    pid = "BraTS20_Training_003"
    (out / f"{pid}_modalities.png").symlink_to(target)
    r = _cli("show", shard_set, "--out", out, "--patient", pid)
    _one_line_refusal(r)
    assert "outside" in r.stderr and target.read_bytes() == b"precious"


@pytest.mark.parametrize("config", ["/dev/zero", '{"shards": {"__class__": "os.system"}}', "[1]", "{bad json"])
def test_show_run_config_is_read_bounded_and_shards_is_data(tmp_path, config):
    import os

    run = tmp_path / "run"
    run.mkdir()
    if config.startswith("/dev/"):
        os.symlink(config, run / "config.json")  # reading it to the end would never finish
    else:
        (run / "config.json").write_text(config)
    r = _cli("show", "--run", run, "--out", tmp_path / "f", limit_as=3 << 30, timeout=120)
    _one_line_refusal(r)
    assert "config.json" in r.stderr
