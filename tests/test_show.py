import json
import subprocess
import sys
from pathlib import Path

import pytest

from train import palette
from train.config import TrainConfig
from train.loop import train

REPO = Path(__file__).resolve().parents[1]


# what each figure must show, as pixel counts of colours in the decoded PNG
OVERLAY = ("NCR/NET", "ED", "ET")  # train.palette's colours blended with grey: red, green, yellow
TAB = {"C0": "#1f77b4"}  # matplotlib's first colour (histograms)
BARS = {f"bar {n}": palette.line_colour(n) for n in OVERLAY}  # the class-balance bars: the same colours, darker


def png_colours(path: Path) -> dict:
    """Decode a PNG: its size, distinct colours, whether it is grey only, and how many pixels show
    each overlay colour (a mask channel over grey) and each of matplotlib's first colours."""
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(path)[..., :3]  # (H, W, 3) in [0, 1]
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    far, near = 0.3, 0.05  # overlay: the mask colour's channels differ from the others by 0.36
    counts = {"NCR/NET": (r - g > far) & (r - b > far) & (abs(g - b) < near),
              "ED": (g - r > far) & (g - b > far) & (abs(r - b) < near),
              "ET": (r - b > far) & (g - b > far) & (abs(r - g) < near)}
    for name, hexc in TAB.items():
        rgb = np.array([int(hexc[i: i + 2], 16) for i in (1, 3, 5)]) / 255
        counts[name] = np.abs(img - rgb).max(axis=-1) < 0.02
    for name, rgb in BARS.items():
        counts[name] = np.abs(img - np.array(rgb)).max(axis=-1) < 0.02
    return {"shape": img.shape[:2], "std": float(img.std()),
            "colours": len(np.unique((img * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)),
            "grey": bool(np.abs(r - g).max() < 0.02 and np.abs(g - b).max() < 0.02),
            **{k: int(v.sum()) for k, v in counts.items()}}


def check_png(path: Path, overlay: set[str] | None = None) -> dict:
    """Not blank, and the content its kind (from the file name) must have. `overlay`: the mask
    channels the drawn slices hold (then exactly their colours show); None: at least one."""
    c = png_colours(path)
    assert min(c["shape"]) > 100 and c["std"] > 0.05 and c["colours"] >= 50, (path.name, c)
    name = path.name
    if name.endswith("_modalities.png"):  # four MRI slices in grey, many levels
        assert c["grey"] and c["colours"] >= 100, (name, c)
    elif name.endswith(("_planes.png", "_overlay.png")):  # tumour sub-regions over FLAIR
        shown = {k for k in OVERLAY if c[k] >= 20}
        assert shown == overlay if overlay is not None else shown, (name, c)
        assert overlay is None or all(c[k] == 0 for k in set(OVERLAY) - overlay), (name, c)
    elif name.startswith("run_"):  # truth and prediction overlays of the most tumorous slices
        assert any(c[k] >= 20 for k in OVERLAY), (name, c)
    elif name.endswith("_histograms.png"):
        assert c["C0"] >= 1000, (name, c)
    elif name == "class_balance.png":  # stacked bars in the overlays' colours: NCR/NET red, ED green, ET yellow
        assert min(c[k] for k in BARS) >= 100, (name, c)
    else:
        raise AssertionError(f"unexpected figure {name}")
    return c


def _check_pngs(stdout: str, expected: list[str], overlay: set[str] | None = None):
    paths = [Path(line) for line in stdout.split()]
    assert sorted(p.name for p in paths) == sorted(expected)
    for p in paths:
        check_png(p, overlay)


@pytest.mark.parametrize("which", ["raw", "shards"])
def test_show_figures(release_2020, shard_set, tmp_path, which):
    src = release_2020 if which == "raw" else shard_set
    pid = "BraTS20_Training_003"
    r = subprocess.run([sys.executable, "cli.py", "show", str(src), "--out", str(tmp_path), "--patient", pid],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # the sub-regions this patient has (its source labels: 1 NCR/NET, 2 ED, 4 ET)
    labels = json.loads((shard_set / "manifest.json").read_text())["patients"][pid]["label_voxels"]
    present = {name for name, label in zip(OVERLAY, ("1", "2", "4")) if labels.get(label, 0) > 0}
    assert present and present != set(OVERLAY)  # both: shown colours and a colour that must not show
    _check_pngs(r.stdout, [f"{pid}_{k}.png" for k in ("modalities", "planes", "overlay", "histograms")]
                + ["class_balance.png"], present)


def test_show_run_predictions(shard_set, tmp_path):
    train(str(shard_set), tmp_path / "run", TrainConfig(base_channels=4, depth=2, batch_size=8, num_workers=0,
                                                        epochs=1), progress=False)
    r = subprocess.run([sys.executable, "cli.py", "show", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "f")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
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


def test_planes_are_drawn_at_the_voxels_true_proportions():
    """Thick axial slices (1 x 1 x 3 mm) draw coronal and sagittal pixels three times as tall as
    wide (they were stretched to fill the panel); an LPS volume's spacing follows its axes to RAS."""
    import numpy as np

    from preprocess.geometry import Geometry
    from train.show import PLANES, plane_aspect

    assert plane_aspect("axial", (1.0, 1.0, 3.0)) == 1.0
    assert plane_aspect("coronal", (1.0, 1.0, 3.0)) == 3.0 and plane_aspect("sagittal", (0.5, 1.0, 3.0)) == 3.0
    assert plane_aspect("coronal", (2.0, 1.0, 3.0)) == 1.5
    swapped = Geometry.of_source(np.diag([0.0, 0.0, 3.0, 1.0]) + np.array([[0, 0.9, 0, 0], [1.2, 0, 0, 0], [0, 0, 0, 0],
                                                                              [0, 0, 0, 0]]), (10, 20, 5), "2020")
    # storage x (1.2 mm) runs along RAS y, storage y (0.9 mm) along RAS x: swapped in RAS order
    assert swapped.spacing == (1.2, 0.9, 3.0) and swapped.canonical_spacing == (0.9, 1.2, 3.0)
    assert swapped.canonical_shape == (20, 10, 5) and swapped.slice_spacing(5) == (0.9 * 20 / 5, 1.2 * 10 / 5, 3.0)
    assert {p: marks for p, (_, marks) in PLANES.items()} == {"axial": "LRPA", "coronal": "LRIS", "sagittal": "PAIS"}


def test_run_figures_show_spaced_slices_with_the_most_tumour():
    """Not three neighbours: the most tumorous slices at least an eighth of the stack apart."""
    import numpy as np

    from train.show import spaced_slices

    area = np.array([0, 1, 5, 9, 10, 9, 3, 0, 0, 2, 8, 0, 0, 0, 0, 0])
    assert spaced_slices(area, 3) == [2, 4, 10]  # not [3, 4, 5]
    assert spaced_slices(np.zeros(4, np.int64), 3) == [0] and spaced_slices(np.zeros(0, np.int64), 3) == []


def test_show_refuses_a_tampered_geometry_in_one_line(shard_set, tmp_path):
    """The manifest's geometry is data from whoever shared the set: one that is not a geometry
    record (an orientation naming axis 7) is refused naming the patient, not a traceback."""
    import shutil

    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    m = json.loads((root / "manifest.json").read_text())
    pid = sorted(m["patients"])[0]
    m["patients"][pid]["geometry"]["ornt"] = [[7, 1], [1, 1], [2, 1]]
    (root / "manifest.json").write_text(json.dumps(m))
    r = _cli("show", root, "--out", tmp_path / "f", "--patient", pid)
    assert r.returncode == 2 and "Traceback" not in r.stderr and pid in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
