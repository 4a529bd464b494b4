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
