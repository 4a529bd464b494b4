"""A manifest is untrusted data: every way it could steer a reader outside its set, or make it
allocate without bound, is refused with one line naming the manifest; the CLI exits 2."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shards.errors import BratsShardsError
from shards.manifest import ManifestError, load_manifest, parse_manifest
from shards.names import patient_id_problem, relpath_problem

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(shard_set) -> dict:
    return json.loads((shard_set / "manifest.json").read_text())


def _first(m):
    return next(iter(m["patients"]))


def _rename_patient(m, new):
    old = _first(m)
    p = m["patients"].pop(old)
    m["patients"][new] = p
    m["splits"][p["split"]] = [new if q == old else q for q in m["splits"][p["split"]]]
    for f in m["files"]:
        if f["patient"] == old:
            f["patient"] = new
            f["path"] = f["path"].replace(f"/{old}/", f"/{new}/")
    return m


def _set_file_path(m, new):
    m["files"][0]["path"] = new
    return m


MUTATIONS = {
    "absolute path": lambda m: _set_file_path(m, "/tmp/x/owned"),
    "climbing path": lambda m: _set_file_path(m, "wds/../../../tmp/x/owned"),
    "backslash path": lambda m: _set_file_path(m, "wds\\..\\x.tar"),
    "path outside its layout": lambda m: _set_file_path(m, "elsewhere/x.tar"),
    "patient id climbing out": lambda m: _rename_patient(m, "../../esc"),
    "patient id with a slash": lambda m: _rename_patient(m, "a/b"),
    "patient id too long": lambda m: _rename_patient(m, "P" * 200),
    "billion slices": lambda m: m["patients"][_first(m)].update(n_slices=10**9) or m,
    "negative bytes": lambda m: m["files"][0].update(bytes=-1) or m,
    "huge bytes": lambda m: m["files"][0].update(bytes=2**62) or m,
    "bytes as a string": lambda m: m["files"][0].update(bytes="348") or m,
    "sha256 not hex": lambda m: m["files"][0].update(sha256="z" * 64) or m,
    "file of an unknown patient": lambda m: m["files"][0].update(patient="nobody") or m,
    "split lists an unknown patient": lambda m: m["splits"]["train"].append("nobody") or m,
    "unknown split": lambda m: m["splits"].update(test=[]) or m,
    "unknown layout": lambda m: m["format"].update(layouts=["pickle"]) or m,
    "files duplicated": lambda m: m["files"].append(dict(m["files"][0])) or m,
    "patients is a list": lambda m: m.update(patients=[]) or m,
    "no files key": lambda m: m.pop("files") and m,
    "unhashable patient of a file": lambda m: m["files"][0].update(patient=[1, 2]) or m,
    "unhashable layout": lambda m: m["format"].update(layouts=["zarr", {}]) or m,
    "tar naming no patient": lambda m: [f.pop("patient") for f in m["files"] if f["format"] == "wds"][:1] and m,
    "patient listed in two splits": lambda m: m["splits"]["val"].append(m["splits"]["train"][0]) or m,
    "patient in no split": lambda m: m["splits"]["train"].pop() and m,
    "huge zarr metadata": lambda m: [f.update(bytes=50 * 2**20) for f in m["files"]
                                     if f["path"].endswith("/image/zarr.json")][:1] and m,
    "mask_pixels beyond pixels": lambda m: m["patients"][_first(m)].update(mask_pixels=[10**12, 0, 0]) or m,
    # training reads it to say whom the set thinned: a string or a list there was a TypeError
    "tumour_free_fraction a string": lambda m: m["config"]["preprocess"].update(tumour_free_fraction="0.5x") or m,
    "tumour_free_fraction a list": lambda m: m["config"]["preprocess"].update(tumour_free_fraction=[1]) or m,
    "tumour_free_fraction NaN": lambda m: m["config"]["preprocess"].update(tumour_free_fraction=float("nan")) or m,
    "tumour_free_fraction above 1": lambda m: m["config"]["preprocess"].update(tumour_free_fraction=2) or m,
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_hostile_manifest_is_refused(good, name):
    m = MUTATIONS[name](copy.deepcopy(good))
    with pytest.raises(ManifestError, match=r"^where: "):
        parse_manifest(json.dumps(m).encode(), "where")


def test_good_manifest_passes_and_errors_are_one_line(good):
    assert parse_manifest(json.dumps(good).encode(), "m") == good
    for raw in (b"[1, 2]", b"{not json", b"\xff\xfe", b"[" * 100_000, b'{"format": 1}', b"1" * 5000):
        with pytest.raises(BratsShardsError) as e:
            parse_manifest(raw, "m")
        assert "\n" not in str(e.value) and str(e.value).startswith("m")


def test_names():
    assert patient_id_problem("BraTS20_Training_001") is None
    assert patient_id_problem("BraTS-GLI-00001-000") is None and patient_id_problem("P.1") is None
    for bad in ("", "..", "../x", "a/b", ".hidden", "a b", "x" * 81, None, 3):
        assert patient_id_problem(bad) is not None, bad
    assert relpath_problem("zarr/train/P/image/c/0/0/0/0") is None
    for bad in ("", "/etc/passwd", "a/../b", "a//b", "./a", "a\\b", "C:x", "a\0b", "x" * 600):
        assert relpath_problem(bad) is not None, bad


def test_manifest_from_a_device_or_fifo_is_refused_without_reading(tmp_path):
    (tmp_path / "z").mkdir()
    os.symlink("/dev/zero", tmp_path / "z" / "manifest.json")
    with pytest.raises(ManifestError, match="not a regular file"):
        load_manifest(tmp_path / "z")
    (tmp_path / "f").mkdir()
    os.mkfifo(tmp_path / "f" / "manifest.json")  # opening a FIFO for reading would block
    with pytest.raises(ManifestError, match="not a regular file"):
        load_manifest(tmp_path / "f")


@pytest.mark.parametrize("command", ["info", "verify", "show"])
@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"format": {"name": "brats-shards", "version": 2}}'])
def test_cli_refuses_bad_manifests_in_one_line(tmp_path, command, content):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "manifest.json").write_text(content)
    extra = ["--out", str(tmp_path / "figs")] if command == "show" else []
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), command, str(tmp_path / "set"), *extra],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "manifest.json" in r.stderr
