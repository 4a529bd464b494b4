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

from preprocess.synthetic.toy import make_demo_data
from cli_run import build as _build, cli as _cli, refused as _refused  # tests/cli_run.py

REPO = Path(__file__).resolve().parents[1]
TINY = (32, 32, 16)
N = 3


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
    import preprocess.build.task as b  # where the task calls process_planes

    out = tmp_path / "set"
    shutil.copytree(built, out, symlinks=True)
    shutil.rmtree(out / "wds")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / f"train-{_pids(release)[1]}.tar").write_bytes(b"theirs")
    real = b.process_planes

    def planting(*a, **kw):
        if not (out / "wds").is_symlink():
            shutil.rmtree(out / "wds", ignore_errors=True)
            (out / "wds").symlink_to(elsewhere, target_is_directory=True)
        return real(*a, **kw)

    monkeypatch.setattr(b, "process_planes", planting)
    _refused(_build(fewer, out), "wds", "symbolic link")
    assert _tree(elsewhere) == {f"train-{_pids(release)[1]}.tar": b"theirs"}


# ---------------------------------------------------------------- case 21: one patient's memory, bounded from its headers

def _nifti_header(shape, dtype) -> bytes:
    import nibabel as nib
    import numpy as np

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.dtype(dtype))
    hdr.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    hdr.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0" * 4


def _bomb(path: Path, shape, dtype, zeros: bytes | None) -> None:
    """A .nii.gz whose header promises `shape` x `dtype`; its voxels (all zero) as repeated gzip
    members of one small compressed block: a few MB on disk that inflate to the whole promise."""
    import gzip

    import numpy as np

    data = gzip.compress(_nifti_header(shape, dtype), 1)
    if zeros is not None:
        total = int(np.prod(shape)) * np.dtype(dtype).itemsize
        block = 64 << 20
        assert total % block == 0
        data += zeros * (total // block)
    path.write_bytes(data)


_PEAK = """
import resource, sys
from cli import app
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), vm + (3 << 30)))  # never more than 3 GiB more
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sys.argv = ["cli.py"] + sys.argv[1:]
try:
    app()
finally:
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    open(sys.argv[3] + ".rss", "w").write(str(grown * 1024))
"""


def test_a_float64_gzip_bomb_patient_is_refused_from_its_headers(release, tmp_path):
    """Four modalities and a segmentation, each a legal 2**28-voxel float64 volume on its own
    (2 GiB), together ~10 GiB inflated: the patient fails, naming a file and the limit, and the
    build's memory grows by less than 300 MB (it never inflates them)."""
    import gzip

    inp = tmp_path / "in"
    shutil.copytree(release, inp)
    pid = _pids(release)[0]
    zeros = gzip.compress(b"\0" * (64 << 20), 9)
    for f in sorted((inp / pid).iterdir()):
        _bomb(f, (4096, 4096, 16), "float64", zeros)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _PEAK, "build-shards", str(inp), str(out), "--workers", "0",
                        "--size", "16", "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr[-2000:])
    line = next(l for l in r.stdout.splitlines() if f"FAILED {pid}" in l)
    assert "BRATS_SHARDS_MAX_PATIENT_BYTES" in line and f"{pid}_" in line, line
    assert int(Path(str(out) + ".rss").read_text()) < 300 << 20


@pytest.mark.parametrize("shape,n", [((240, 240, 155), 5), ((182, 218, 182), 5), ((512, 512, 300), 2),
                                     ((512, 512, 300), 5), ((240, 240, 155, 4), 2)],
                         ids=["brats", "gli-2024", "men-rt", "five-native", "msd-4d"])
def test_real_release_shapes_in_float64_still_fit(tmp_path, shape, n):
    from preprocess.nifti import check_patient_footprint, patient_footprint

    files = [tmp_path / f"v{i}.nii.gz" for i in range(n)]
    for f in files:
        _bomb(f, shape, "float64", None)  # the header is all the check reads
    assert patient_footprint(files)[0] > 0
    check_patient_footprint(files)


def test_the_patient_limit_is_configurable_and_a_bad_value_is_refused(release, tmp_path, monkeypatch):
    monkeypatch.setenv("BRATS_SHARDS_MAX_PATIENT_BYTES", "1000")
    code, so, se, exc = _build(release, tmp_path / "small")
    assert code == 1 and exc is None, (so, se)
    assert all(f"FAILED {p}" in so for p in _pids(release)) and "BRATS_SHARDS_MAX_PATIENT_BYTES" in so
    for bad in ("lots", "-5", "0"):
        monkeypatch.setenv("BRATS_SHARDS_MAX_PATIENT_BYTES", bad)
        _refused(_build(release, tmp_path / bad), "BRATS_SHARDS_MAX_PATIENT_BYTES")
        assert not (tmp_path / bad).exists()


# ---------------------------------------------------------------- case 8: a changed input is rebuilt

def _flair(inp: Path, pid: str) -> Path:
    return next((inp / pid).glob("*_flair.nii.gz"))


def _change(path: Path, keep_stat: bool = False) -> None:
    """Rewrite a volume with other voxels (brighter); `keep_stat`: then pad or cut the gzip to the
    old size (a gzip reader stops at the stream's end... so pad with a second empty member) and
    put the old mtime back, as a careless copy tool or a hostile colleague might."""
    import gzip

    import nibabel as nib
    import numpy as np

    from preprocess.nifti import save_volume

    st = path.stat()
    img = nib.load(str(path))
    save_volume(path, (np.asarray(img.dataobj) * 2 + 1).astype(np.int16), img.affine)
    if keep_stat:
        data = path.read_bytes()
        pad = gzip.compress(b"", 9)
        assert len(data) + len(pad) <= st.st_size, "the changed volume compresses larger"
        # an empty gzip member as long as the gap: a gzip comment in its header fills it
        gap = st.st_size - len(data)
        data += _empty_member(gap)
        path.write_bytes(data)
        assert path.stat().st_size == st.st_size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _empty_member(n: int) -> bytes:
    """A gzip member of exactly `n` bytes holding nothing (a comment pads its header)."""
    import gzip
    import struct
    import zlib

    body = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = body.compress(b"") + body.flush()
    fixed = 10 + len(deflated) + 8
    comment = b"x" * (n - fixed - 1) + b"\0"
    header = b"\x1f\x8b\x08\x10" + b"\0" * 4 + b"\x00\xff"
    member = header + comment + deflated + struct.pack("<II", zlib.crc32(b""), 0)
    assert len(member) == n and gzip.decompress(member) == b""
    return member


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def set_and_input(built, release, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "set"
    shutil.copytree(release, inp)  # copy2: the same mtimes as the set's input
    shutil.copytree(built, out, symlinks=True)
    return inp, out


@pytest.mark.parametrize("keep_stat", [False, True], ids=["plain", "same-size-and-mtime"])
def test_a_changed_flair_is_rebuilt_to_the_bytes_of_a_fresh_build(set_and_input, tmp_path, keep_stat):
    import json

    inp, out = set_and_input
    pid = _pids(inp)[1]
    _change(_flair(inp, pid), keep_stat=keep_stat)
    code, so, se, exc = _build(inp, out)
    assert code == 0 and exc is None, (so, se)
    assert "(1 built, 2 already done)" in so and pid in so, so
    m = json.loads((out / "manifest.json").read_bytes())
    assert m["patients"][pid]["sources"]["flair"]["sha256"] == _sha(_flair(inp, pid))
    code, so, se, exc = _build(inp, tmp_path / "fresh")
    assert code == 0, (so, se)
    assert _tree(out) == _tree(tmp_path / "fresh")


def test_an_interrupted_build_rebuilds_a_done_patient_whose_input_changed(release, tmp_path, monkeypatch):
    """The done records of a killed build: a source changed since is not trusted."""
    import preprocess.build.run as b  # where the driver checks its manifest

    inp, out = tmp_path / "in", tmp_path / "set"
    shutil.copytree(release, inp)

    def stop(*a, **kw):
        raise b.BuildError("stopped before the manifest")

    monkeypatch.setattr(b, "check_own_manifest", stop)
    _refused(_build(inp, out), "stopped")
    assert len(list((out / ".build" / "done").glob("*.json"))) == N
    monkeypatch.undo()
    pid = _pids(inp)[0]
    _change(_flair(inp, pid))
    code, so, se, exc = _build(inp, out)
    assert code == 0 and "(1 built, 2 already done)" in so, (so, se)
    code, so, se, exc = _build(inp, tmp_path / "fresh")
    assert _tree(out) == _tree(tmp_path / "fresh")


def test_a_renamed_or_removed_source_is_rebuilt_or_failed(set_and_input):
    """Sources the manifest names that discovery no longer finds in the same place."""
    inp, out = set_and_input
    a, b = _pids(inp)[:2]
    f = _flair(inp, a)
    data = __import__("gzip").decompress(f.read_bytes())
    f.unlink()
    f.with_name(f.name[:-3]).write_bytes(data)  # the same volume, now as .nii
    _flair(inp, b).unlink()
    code, so, se, exc = _build(inp, out)
    assert code == 1 and exc is None, (so, se)
    assert f"FAILED {b}" in so and "(1 built, 1 already done)" in so, so


def _verify(out, *more):
    return _cli("verify", out, *more)


def test_verify_sources_names_each_changed_or_missing_source(set_and_input):
    inp, out = set_and_input
    code, so, se, exc = _verify(out, "--sources", inp)
    assert code == 0 and exc is None and "OK" in so, (so, se)
    a, b = _pids(inp)[:2]
    _change(_flair(inp, a), keep_stat=True)
    seg = next((inp / b).glob("*_seg.nii.gz"))
    seg.unlink()
    code, so, se, exc = _verify(out, "--sources", inp)
    assert code == 1 and exc is None, (so, se)
    bad = [l for l in so.splitlines() if l.startswith("BAD")]
    assert len(bad) == 2, so
    assert a in bad[0] and _flair(inp, a).name in bad[0] and "sha256" in bad[0], bad
    assert b in bad[1] and seg.name in bad[1] and "missing" in bad[1], bad
    code, so, se, exc = _verify(out)  # the shard files themselves still match
    assert code == 0, so


def test_verify_sources_never_reads_outside_the_input(set_and_input, tmp_path):
    """A manifest whose source paths climb out of INPUT (a hostile set) is named, not followed."""
    import json

    inp, out = set_and_input
    pid = _pids(inp)[0]
    m = json.loads((out / "manifest.json").read_bytes())
    m["patients"][pid]["sources"]["flair"]["path"] = "../set/manifest.json"
    m["patients"][pid]["sources"]["t1"]["path"] = "/etc/passwd"
    (out / "manifest.json").write_text(json.dumps(m))
    code, so, se, exc = _verify(out, "--sources", inp)
    assert code == 1 and exc is None, (so, se)
    bad = [l for l in so.splitlines() if l.startswith("BAD")]
    assert any(pid in l and "../set/manifest.json" in l and "outside" in l for l in bad), bad
    assert any(pid in l and "/etc/passwd" in l and "outside" in l for l in bad), bad


def test_verify_sources_of_a_missing_folder_is_refused(set_and_input, tmp_path):
    _, out = set_and_input
    _refused(_verify(out, "--sources", tmp_path / "nowhere"), "--sources", "nowhere")


def test_a_touched_but_unchanged_source_is_not_rebuilt(set_and_input):
    """A new mtime alone is re-hashed, found equal, and the patient stays done (same bytes)."""
    inp, out = set_and_input
    before = _tree(out)
    for f in (inp / _pids(inp)[0]).iterdir():
        os.utime(f)
    code, so, se, exc = _build(inp, out)
    assert code == 0 and f"(0 built, {N} already done)" in so and "rebuilt" not in so, (so, se)
    assert _tree(out) == before


@pytest.mark.parametrize("sources", ["x", {"flair": [1]}, {"flair": {"path": 5, "bytes": -1, "sha256": None}},
                                     {"flair": {"path": "a/b.nii.gz", "bytes": 10**30, "sha256": "0"}}],
                         ids=["not-an-object", "entry-a-list", "wrong-types", "huge-size"])
def test_verify_sources_names_an_unusable_source_record(set_and_input, sources):
    """A hostile manifest's source records: each named as a problem, never a crash or an OK."""
    import json

    inp, out = set_and_input
    pid = _pids(inp)[0]
    m = json.loads((out / "manifest.json").read_bytes())
    m["patients"][pid]["sources"] = sources
    (out / "manifest.json").write_text(json.dumps(m))
    code, so, se, exc = _verify(out, "--sources", inp)
    if code == 2:  # the manifest itself refused: one line naming it
        _refused((code, so, se, exc), "manifest.json")
        return
    assert code == 1 and exc is None, (so, se, exc)
    assert any(l.startswith(f"BAD {pid}: ") for l in so.splitlines()), so


def _deep(top: Path, levels: int = 1100) -> Path:
    """A folder `levels` deep below `top`, made one level at a time (os.makedirs recurses)."""
    d = top
    for _ in range(levels):
        d = d / "d"
        d.mkdir(parents=d.parent == top)
    return d


@pytest.mark.parametrize("where", ["zarr/junk", "wds/junk", "zarr/train/stale"])
def test_a_deep_tree_planted_in_a_set_is_named_not_a_recursion_error(set_and_input, where):
    """verify and a re-run of the build walk OUTPUT: a tree past Python's recursion limit planted
    in it is reported as unlisted (verify) or refused/left alone (build), never a traceback."""
    inp, out = set_and_input
    (_deep(out / where) / "x.bin").write_bytes(b"planted")
    try:
        code, so, se, exc = _verify(out)
        assert exc is None and "Traceback" not in so + se, (exc, so[-500:], se[-500:])
        assert code == 1 and where.split("/")[0] + "/" in so, (code, so[-500:], se[-500:])
        code, so, se, exc = _build(inp, out)
        assert exc is None and "Traceback" not in so + se, (exc, so[-500:], se[-500:])
        assert code in (0, 2), (code, so[-500:], se[-500:])
        if code == 2:
            _refused((code, so, se, exc), where.split("/")[0])
    finally:  # pytest's own clean-up of old temporary folders recurses, and would fail on the tree
        subprocess.run(["rm", "-rf", str(out / where)], check=True)
