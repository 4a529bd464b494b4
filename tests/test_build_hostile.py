"""Issue 18, second pass, on the build: a symlink inside the output never lets a build write or
delete outside it (case 1); a changed input is rebuilt, and `verify --sources` names it (case 8);
a patient whose headers promise more memory than a sane limit is refused before any inflate
(case 21). Each through the CLI: exit code, one `error:` line naming what is at fault, and
nothing written where it should not be."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from preprocess.synthetic import make_demo_data

REPO = Path(__file__).resolve().parents[1]
TINY = (32, 32, 16)
N = 3


def _cli(*argv):
    """The CLI in process: (exit code, stdout, stderr, an exception other than exit)."""
    from typer.testing import CliRunner

    from cli import app

    r = CliRunner().invoke(app, [str(a) for a in argv])
    exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    return r.exit_code, r.stdout, r.stderr, exc


def _build(inp, out, *more):
    return _cli("build-shards", inp, out, "--workers", "0", "--size", "16", "--quiet", "--val-fraction", "0.34",
                *more)


def _refused(r, *names):
    code, out, err, exc = r
    assert exc is None, exc
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in names:
        assert str(n) in err, (n, err)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (links not followed) with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "in"
    make_demo_data(root, N, shape=TINY, seed=3)
    return root


@pytest.fixture(scope="module")
def built(release, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile-set") / "set"
    code, so, se, exc = _build(release, out)
    assert code == 0 and exc is None, (so, se, exc)
    return out


def _pids(release: Path) -> list[str]:
    return sorted(p.name for p in release.iterdir() if p.is_dir())


@pytest.fixture
def fewer(release, tmp_path) -> Path:
    """The release less its first patient (a re-run then deletes that patient's files)."""
    dst = tmp_path / "fewer"
    shutil.copytree(release, dst)
    shutil.rmtree(dst / _pids(release)[0])
    return dst


# ---------------------------------------------------------------- case 1: symlinks inside OUTPUT

def _plant(out: Path, rel: str, elsewhere: Path) -> None:
    """Move `out/rel` (a folder or file, made if absent) to `elsewhere` and link it back."""
    src = out / rel
    if src.exists():
        shutil.move(str(src), str(elsewhere))
    elif rel.endswith((".lock", ".json")):
        elsewhere.write_bytes(b"someone else's file\n")
    else:
        elsewhere.mkdir(parents=True)
    src.parent.mkdir(parents=True, exist_ok=True)
    src.symlink_to(elsewhere, target_is_directory=elsewhere.is_dir())


def _linked(built: Path, release: Path) -> list[str]:
    pid = next(p for p in _pids(release) if (built / "zarr" / "train" / p).is_dir())
    return ["wds", "zarr", "zarr/train", f"zarr/train/{pid}", f"zarr/train/{pid}/image", ".build",
            ".build/done", ".lock", "manifest.json"]


@pytest.mark.slow
def test_a_symlink_inside_the_output_is_refused_and_nothing_outside_changes(built, release, fewer, tmp_path):
    """Each path the build writes or deletes, as a link to a folder (or file) outside OUTPUT:
    the re-run is refused naming it, and the other folder keeps exactly its bytes."""
    for rel in _linked(built, release):
        out = tmp_path / rel.replace("/", "_").lstrip(".") / "set"
        shutil.copytree(built, out, symlinks=True)
        elsewhere = out.parent / "elsewhere"
        if rel == ".build/done":
            (out / ".build").mkdir()
        _plant(out, rel, elsewhere)
        before = _tree(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes()
        _refused(_build(fewer, out), rel.split("/")[-1], "symbolic link")
        after = _tree(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes()
        assert after == before, rel
        assert sorted(p.name for p in out.parent.iterdir()) == ["elsewhere", "set"], rel


def test_a_symlinked_file_inside_a_patient_group_is_refused(built, release, fewer, tmp_path):
    """A link planted between runs in place of one shard file (same size, so it looks done)."""
    out = tmp_path / "set"
    shutil.copytree(built, out, symlinks=True)
    tar = sorted((out / "wds").iterdir())[-1]
    other = tmp_path / "other.tar"
    shutil.move(str(tar), other)
    tar.symlink_to(other)
    _refused(_build(fewer, out), tar.name, "symbolic link")
    assert other.is_file()


def test_a_link_to_a_folder_inside_the_output_is_refused_too(built, release, fewer, tmp_path):
    """Even a link whose target stays inside OUTPUT: the build never follows a link it manages."""
    out = tmp_path / "set"
    shutil.copytree(built, out, symlinks=True)
    (out / "wds").rename(out / "wds-real")
    (out / "wds").symlink_to("wds-real", target_is_directory=True)
    _refused(_build(fewer, out), "wds")
    assert len(list((out / "wds-real").iterdir())) == N


def test_a_symlink_outside_the_managed_names_is_left_alone(built, fewer, tmp_path):
    """The user's own link in OUTPUT (not a path the build writes) does not stop the build."""
    out = tmp_path / "set"
    shutil.copytree(built, out, symlinks=True)
    (out / "notes").symlink_to(tmp_path)
    code, so, se, exc = _build(fewer, out)
    assert code == 0 and exc is None, (so, se)
    assert (out / "notes").is_symlink()


def test_a_link_planted_during_the_run_is_not_followed(built, release, fewer, tmp_path, monkeypatch):
    """`wds` swapped for a link while the first patient is being processed: its tar is not written
    through the link, and the sweep deletes nothing there."""
    import preprocess.build as b

    out = tmp_path / "set"
    shutil.copytree(built, out, symlinks=True)
    shutil.rmtree(out / "wds")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / f"train-{_pids(release)[1]}.tar").write_bytes(b"theirs")
    real = b.process_patient

    def planting(*a, **kw):
        if not (out / "wds").is_symlink():
            shutil.rmtree(out / "wds", ignore_errors=True)
            (out / "wds").symlink_to(elsewhere, target_is_directory=True)
        return real(*a, **kw)

    monkeypatch.setattr(b, "process_patient", planting)
    _refused(_build(fewer, out), "wds", "symbolic link")
    assert _tree(elsewhere) == {f"train-{_pids(release)[1]}.tar": b"theirs"}
