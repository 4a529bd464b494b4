"""Incremental builds: files are named from their patient, so a re-run after patients were added
builds only the new ones, a re-run after patients were removed deletes only theirs, and either
way the folder ends byte-identical to a fresh build of the same input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from preprocess.build import BuildConfig, BuildError, assign_splits, build
from preprocess.discover import discover
from preprocess.config import PreprocessConfig
from preprocess.synthetic.toy import make_demo_data
from shards import FORMAT_VERSION, layout
from shards.manifest import ManifestError, load_manifest
from shards.verify import verify

TINY = (48, 48, 24)
SEED = 5
N = 6
FORMATS = [("zarr",), ("wds",), ("zarr", "wds")]


def _cfg(formats) -> BuildConfig:
    return BuildConfig(preprocess=PreprocessConfig(size=32), val_fraction=0.34, formats=formats)


def _run(inp: Path, out: Path, cfg: BuildConfig):
    return build(inp, out, cfg, workers=0, progress=False)


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: a rewrite (even to the same bytes) changes one of them."""
    return {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in _files(root).items()}


def _assert_same_as_fresh(inp: Path, out: Path, fresh: Path, cfg: BuildConfig) -> None:
    ref = _run(inp, fresh, cfg)
    assert ref.built == len(ref.manifest["patients"])
    got, want = _files(out), _files(fresh)
    assert sorted(got) == sorted(want)  # no leftovers, nothing missing
    for rel in want:
        assert got[rel].read_bytes() == want[rel].read_bytes(), rel
    assert (out / "manifest.json").read_bytes() == (fresh / "manifest.json").read_bytes()
    assert verify(out) == []


def _pids(inp: Path) -> list[str]:
    return [p.pid for p in discover(inp).patients]


@pytest.fixture
def first_build(tmp_path, request):
    cfg = _cfg(request.param)
    inp, out = tmp_path / "in", tmp_path / "out"
    make_demo_data(inp, N, shape=TINY, seed=SEED)
    r = _run(inp, out, cfg)
    assert r.built == N and r.reused == 0 and r.manifest["failed"] == []
    return inp, out, cfg, r.manifest


@pytest.mark.parametrize("first_build", FORMATS, indirect=True, ids=["zarr", "wds", "both"])
def test_files_are_named_from_their_patient(first_build):
    _, out, cfg, m = first_build
    assert m["format"]["version"] == FORMAT_VERSION == 2
    for pid, p in m["patients"].items():
        paths = {f["path"] for f in m["files"] if f["patient"] == pid}
        if "wds" in cfg.formats:
            assert layout.wds_tar(p["split"], pid) == f"wds/{p['split']}-{pid}.tar" in paths
        if "zarr" in cfg.formats:
            assert f"{layout.zarr_group(p['split'], pid)}/zarr.json" in paths


@pytest.mark.parametrize("first_build", FORMATS, indirect=True, ids=["zarr", "wds", "both"])
def test_adding_a_patient_builds_only_that_patient(first_build, tmp_path):
    inp, out, cfg, m = first_build
    before = _stamps(out)
    (new,) = make_demo_data(inp, 1, shape=TINY, seed=SEED, start=N + 1)
    pids = _pids(inp)
    assert new in pids and len(pids) == N + 1
    # precondition: the new patient moves nobody (the tiny-set val rule does not kick in)
    splits = assign_splits(pids, cfg.val_fraction, cfg.split_seed)
    assert all(splits[p] == m["patients"][p]["split"] for p in m["patients"])

    r = _run(inp, out, cfg)
    assert (r.built, r.reused) == (1, N) and set(r.manifest["patients"]) == set(pids)
    after = _stamps(out)
    untouched = {rel: s for rel, s in before.items() if rel != "manifest.json"}
    assert {rel: after.get(rel) for rel in untouched} == untouched  # no other file rewritten
    assert {f["path"] for f in r.manifest["files"] if f["patient"] == new} == set(after) - set(before)
    _assert_same_as_fresh(inp, out, tmp_path / "fresh", cfg)


@pytest.mark.parametrize("first_build", FORMATS, indirect=True, ids=["zarr", "wds", "both"])
@pytest.mark.parametrize("which", ["train", "val"])
def test_removing_a_patient_drops_only_its_files(first_build, which, tmp_path):
    inp, out, cfg, m = first_build
    candidates = m["splits"][which]
    # a val patient can go only if another val patient stays (else the tiny-set rule moves one)
    if which == "val" and len(candidates) < 2:
        pytest.skip("this draw has a single val patient")
    gone = candidates[0]
    its = {f["path"] for f in m["files"] if f["patient"] == gone}
    assert its and all((out / p).is_file() for p in its)
    before = _stamps(out)
    shutil.rmtree(inp / gone)
    left = _pids(inp)
    assert gone not in left and len(left) == N - 1
    splits = assign_splits(left, cfg.val_fraction, cfg.split_seed)
    assert all(splits[p] == m["patients"][p]["split"] for p in left)  # precondition: nobody moves

    r = _run(inp, out, cfg)
    assert (r.built, r.reused) == (0, N - 1) and gone not in r.manifest["patients"]
    assert not any((out / p).exists() for p in its)
    assert not (out / layout.zarr_group(m["patients"][gone]["split"], gone)).exists()
    after = _stamps(out)
    kept = {rel: s for rel, s in before.items() if rel != "manifest.json" and rel not in its}
    assert {rel: after.get(rel) for rel in kept} == kept
    assert set(after) == set(kept) | {"manifest.json"}
    _assert_same_as_fresh(inp, out, tmp_path / "fresh", cfg)


@pytest.mark.parametrize("first_build", [("zarr", "wds")], indirect=True, ids=["both"])
def test_add_and_remove_in_one_rerun(first_build, tmp_path):
    inp, out, cfg, m = first_build
    gone = m["splits"]["train"][0]
    shutil.rmtree(inp / gone)
    make_demo_data(inp, 2, shape=TINY, seed=SEED, start=N + 1)
    pids = _pids(inp)
    splits = assign_splits(pids, cfg.val_fraction, cfg.split_seed)
    assert all(splits[p] == m["patients"][p]["split"] for p in pids if p in m["patients"])
    r = _run(inp, out, cfg)
    assert (r.built, r.reused) == (2, N - 1)
    _assert_same_as_fresh(inp, out, tmp_path / "fresh", cfg)


@pytest.mark.parametrize("first_build", [("wds",)], indirect=True, ids=["wds"])
def test_format_version_1_sets_are_refused(first_build, tmp_path):
    inp, out, cfg, m = first_build
    old = json.loads((out / "manifest.json").read_text())
    old["format"]["version"] = 1
    for f in old["files"]:  # the version-1 naming
        if f["format"] == "wds":
            f["path"] = f"wds/{f['split']}-{sorted(old['splits'][f['split']]).index(f['patient']):06d}.tar"
    (out / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ManifestError, match="format version 1"):
        load_manifest(out)
    with pytest.raises(BuildError, match="format version 1.*build into a new folder"):
        _run(inp, out, cfg)
    # a version-2 manifest naming a tar the old way is refused too
    old["format"]["version"] = 2
    (out / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ManifestError, match="a WebDataset shard is its patient's wds/"):
        load_manifest(out)
