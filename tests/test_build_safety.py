"""The build on hostile or unlucky inputs and outputs: it deletes only what it wrote, bounds every
read, never writes a non-finite value, and fails with one line naming the patient, file or path."""

import errno
import gzip
import os
import shutil
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from preprocess import steps
from preprocess.discover import DiscoveryError, discover
from preprocess.nifti import load_volume, save_volume
from preprocess.config import PreprocessConfig
from preprocess.pipeline import process_patient
from preprocess.errors import InputError
from preprocess.build import BuildConfig, BuildError, assign_splits, build, split_score
from shards.manifest import load_manifest
from shards.verify import verify

CFG = BuildConfig(preprocess=PreprocessConfig(size=32), val_fraction=0.34)


def _build(inp, out, cfg=CFG, **kw):
    return build(inp, out, cfg, workers=0, progress=False, **kw).manifest


def _pids(root) -> list[str]:
    return [p.pid for p in discover(root).patients]


def _file(root, pid, mod, ext=".nii.gz") -> Path:
    return root / pid / f"{pid}_{mod}{ext}"


def _failed(m) -> dict:
    return {f["patient"]: f["reason"] for f in m["failed"]}


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ---------------------------------------------------------------- 1. deletes only what it wrote

def test_rebuild_keeps_files_it_did_not_write(release_copy, tmp_path):
    out = tmp_path / "s"
    m = _build(release_copy, out)
    mine = [out / "wds" / "my-own-000000.tar", out / "zarr" / "mine" / "data.bin", out / ".notes.tmp",
            out / "zarr" / "train" / ".notes.1.tmp",  # no patient of ours is called "notes"
            out / "wds" / ".train-notes.tar.1.tmp", out / "wds" / "train-notes.tar"]
    for p in mine:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"user data")
    # leftovers of our own interrupted writes: removed
    ours = [out / ".manifest.json.123.tmp", out / "wds" / f".val-{_pids(release_copy)[2]}.tar.42.tmp",
            out / "zarr" / "train" / f".{_pids(release_copy)[1]}.77.tmp" / "zarr.json"]
    for p in ours:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    gone = _pids(release_copy)[0]  # a patient leaves the input: its files were ours, they go
    shutil.rmtree(release_copy / gone)
    m2 = _build(release_copy, out)
    assert all(p.read_bytes() == b"user data" for p in mine)
    assert not any(p.exists() for p in ours) and not ours[2].parent.exists()
    now = {f["path"] for f in m2["files"]}
    old = [f["path"] for f in m["files"] if f["patient"] == gone and f["path"] not in now]
    assert old and not any((out / p).exists() for p in old)
    assert not (out / "zarr" / m["patients"][gone]["split"] / gone).exists()
    assert gone not in m2["patients"]
    assert all("not listed" in why for why in verify(out))  # our files check out; the user's are not ours


def test_foreign_non_empty_output_is_refused_untouched(release_2020, tmp_path):
    out = tmp_path / "photos"
    (out / "2023").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BuildError) as e:
        _build(release_2020, out)
    msg = _one_line(e)
    assert str(out) in msg and "2023" in msg and "notes.txt" in msg
    assert sorted(p.name for p in out.iterdir()) == ["2023", "notes.txt"]  # not even a lock file
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _build(release_2020, empty)["failed"] == []  # an empty folder is fine


# ---------------------------------------------------------------- 2. two files for one modality

def test_two_files_for_one_modality_fail_the_patient_naming_both(release_copy, tmp_path):
    a, b = _pids(release_copy)[:2]
    stale = _file(release_copy, a, "t1", ".nii")
    v = load_volume(_file(release_copy, b, "t1"))  # another patient's T1 left behind
    save_volume(stale, np.asarray(v.data), v.affine)
    (p,) = [p for p in discover(release_copy).patients if p.pid == a]
    assert f"{a}_t1.nii " in p.problem + " " and f"{a}_t1.nii.gz" in p.problem
    m = _build(release_copy, tmp_path / "s")
    assert set(_failed(m)) == {a} and "two files for t1" in _failed(m)[a]
    assert len(m["patients"]) == len(_pids(release_copy)) - 1


# ---------------------------------------------------------------- 3. bounded reads

def _nifti_header(shape, dtype_code=4, bitpix=16) -> bytearray:
    """A minimal NIfTI-1 single-file header (348 bytes + 4 extension bytes)."""
    h = bytearray(352)
    struct.pack_into("<i", h, 0, 348)
    dims = [len(shape), *shape] + [1] * (7 - len(shape))
    struct.pack_into("<8h", h, 40, *dims)
    struct.pack_into("<hh", h, 70, dtype_code, bitpix)
    struct.pack_into("<8f", h, 76, *([1.0] * 8))
    struct.pack_into("<f", h, 108, 352.0)  # vox_offset
    struct.pack_into("<f", h, 112, 1.0)  # scl_slope
    h[344:348] = b"n+1\0"
    return h


def test_gzip_bomb_is_refused_without_inflating_it(release_copy, tmp_path):
    pid = _pids(release_copy)[0]
    t1 = _file(release_copy, pid, "t1")
    real = gzip.decompress(t1.read_bytes())
    bomb = gzip.compress(real + bytes(64 * 2**20), compresslevel=9)  # +64 MiB of zeros: ~64 KiB more
    assert len(bomb) < len(t1.read_bytes()) + 2**18
    t1.write_bytes(bomb)
    with pytest.raises(InputError, match=rf"{t1.name} inflates to more than the \d+ bytes its header promises"):
        load_volume(t1)
    m = _build(release_copy, tmp_path / "s")
    assert list(_failed(m)) == [pid] and "inflates to more than" in _failed(m)[pid]


@pytest.mark.timeout(60)  # the FIFO hung the build forever
@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_non_regular_files_are_refused(release_copy, tmp_path, kind):
    pid = _pids(release_copy)[1]
    _file(release_copy, pid, "t1").unlink()
    victim = _file(release_copy, pid, "t1", ".nii")
    if kind == "dev-zero":
        victim.symlink_to("/dev/zero")
    else:
        os.mkfifo(victim)
    m = _build(release_copy, tmp_path / "s")
    assert list(_failed(m)) == [pid]
    reason = _failed(m)[pid]
    assert victim.name in reason and "not a regular file" in reason
    assert ("/dev/zero" in reason) == (kind == "dev-zero")


@pytest.mark.parametrize("shape,match", [((5000, 5000, 5000), "dimension outside 1..4096"),
                                         ((4000, 4000, 100), "voxels .* more than the 268435456 supported"),
                                         ((48, 48, 24, 0), "dimension outside")])
def test_header_promising_absurd_sizes_is_refused(tmp_path, shape, match):
    for ext, data in ((".nii", bytes(_nifti_header(shape)) + bytes(1000)),
                      (".nii.gz", gzip.compress(bytes(_nifti_header(shape)) + bytes(100_000)))):
        p = tmp_path / f"P_t1{ext}"
        p.write_bytes(data)
        with pytest.raises(InputError, match=match) as e:
            load_volume(p)
        assert p.name in _one_line(e)


def test_file_larger_than_its_header_promises_is_refused(tmp_path):
    p = tmp_path / "P_t1.nii"
    p.write_bytes(bytes(_nifti_header((8, 8, 8))) + bytes(8 * 8 * 8 * 2 + 2**20))
    with pytest.raises(InputError, match="P_t1.nii is .* bytes, more than the .* its header"):
        load_volume(p)


# ---------------------------------------------------------------- 4. large integer intensities

def _rewrite(path, fn):
    v = load_volume(path)
    save_volume(path, *fn(np.asarray(v.data), v.affine))


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_large_integer_intensities_stay_finite_and_exact(release_copy, dtype):
    pf = discover(release_copy).patients[0]
    # about 3.4e7 +- 1e6: the int64 sum of squares overflowed, std came out 0, z-scores of 1e6 became Inf
    big = lambda d, a: (np.where(d != 0, d.astype(np.int64) * 1000 + 34_000_000, 0).astype(dtype), a)  # noqa: E731
    _rewrite(pf.files["t1"], big)
    ps = process_patient(pf, PreprocessConfig(size=48))
    assert np.isfinite(ps.image).all()
    t1 = load_volume(pf.files["t1"]).data[::-1, ::-1, :]
    brain = np.stack([t1[:, :, z] != 0 for z in ps.slice_index])
    x = ps.image[:, 0].astype(np.float64)
    assert abs(x[brain].mean()) < 2e-3 and abs(x[brain].std() - 1) < 2e-3


def test_integer_statistics_are_exact_where_int64_squares_overflow():
    rng = np.random.default_rng(3)
    cases = [rng.integers(33_000_000, 34_000_000, 50_000).astype(np.int32),
             rng.integers(-2**31, 2**31 - 1, 5_000).astype(np.int32),
             rng.integers(-2**62, 2**62, 5_000).astype(np.int64),
             np.array([-2**63, 2**63 - 1, 7], np.int64),
             rng.integers(0, 2**64 - 1, 5_000, dtype=np.uint64),
             rng.integers(33_000_000, 34_000_000, 50_000).astype(np.float32)]
    for v in cases:
        ints = [int(x) for x in v]
        n, s, s2 = len(ints), sum(ints), sum(x * x for x in ints)
        mean, std = steps._exact_mean_std(v)
        assert mean == float(Fraction(s, n)), v.dtype
        assert std == pytest.approx(float(Fraction(n * s2 - s * s, n * n)) ** 0.5, rel=1e-15), v.dtype
    small = np.random.default_rng(4).integers(-3000, 3000, 100_000).astype(np.int16)  # fast path unchanged
    s, s2, n = int(small.sum(dtype=np.int64)), int((small.astype(np.int64) ** 2).sum()), small.size
    assert steps._exact_mean_std(small) == (s / n, float(np.sqrt(max((s2 - s * s / n) / n, 0.0))))


def test_non_finite_normalised_image_fails_the_patient(release_copy, tmp_path, monkeypatch):
    """Whatever goes wrong upstream, no Inf reaches a shard: a z-score beyond float16 fails the patient."""
    monkeypatch.setattr(steps, "brain_stats", lambda vol, brain, n=None: (0.0, 1e-6))
    monkeypatch.setattr(steps, "mean_std_of_sums", lambda s, s2, n: (0.0, 1e-6))  # the compiled kernel's sums
    pf = discover(release_copy).patients[0]
    with pytest.raises(InputError, match=rf"{pf.pid}: normalised .*_t1.nii.gz.* float16 range") as e:
        process_patient(pf, PreprocessConfig(size=32))
    _one_line(e)
    m = _build(release_copy, tmp_path / "s")
    assert m["patients"] == {} and len(m["failed"]) == len(_pids(release_copy))


# ---------------------------------------------------------------- 5. patient ids

def test_overlong_patient_id_fails_that_patient_only(release_copy, tmp_path):
    old = _pids(release_copy)[2]
    new = "P" * 120
    (release_copy / old).rename(release_copy / new)
    for f in (release_copy / new).iterdir():
        f.rename(f.with_name(f.name.replace(old, new)))
    m = _build(release_copy, tmp_path / "s")
    assert list(_failed(m)) == [new] and "120 characters long" in _failed(m)[new]
    assert len(m["patients"]) == len(_pids(release_copy)) - 1
    assert load_manifest(tmp_path / "s")["failed"][0]["patient"] == new and verify(tmp_path / "s") == []


# ---------------------------------------------------------------- 6. one-line errors

def test_output_path_that_is_a_file_is_refused(release_2020, tmp_path):
    f = tmp_path / "out"
    f.write_text("not a folder")
    with pytest.raises(BuildError, match=f"output {f} exists and is not a folder") as e:
        _build(release_2020, f)
    _one_line(e)
    with pytest.raises(BuildError, match=f"cannot create output folder {f}/sub") as e:
        _build(release_2020, f / "sub")
    _one_line(e)


def test_read_only_output_folder_is_refused_naming_it(release_2020, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
    else:  # root writes anywhere: simulate the read-only folder at the system call
        real_open = os.open

        def ro_open(path, flags, *a, **kw):
            if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *a, **kw)

        monkeypatch.setattr(os, "open", ro_open)
    try:
        with pytest.raises(BuildError, match=f"cannot write {out}/.lock: Permission denied") as e:
            _build(release_2020, out)
        _one_line(e)
    finally:
        out.chmod(0o755)


def test_full_disk_stops_the_build_naming_the_file(release_2020, tmp_path, monkeypatch):
    from shards import wds_io

    def full(path, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a short write reports it: no filename

    monkeypatch.setattr(wds_io, "write_patient", full)
    out = tmp_path / "s"
    with pytest.raises(BuildError, match=rf"cannot write {out}/wds/(train|val)-BraTS20_Training_001\.tar: No space left") as e:
        _build(release_2020, out)
    _one_line(e)
    assert not (out / "manifest.json").exists() and not (out / ".lock").exists()
    monkeypatch.undo()
    assert _build(release_2020, out)["failed"] == []  # space freed: the unfinished build completes


def _patch_sform(path: Path, rows) -> None:
    """Overwrite srow_x/y/z (the affine nibabel prefers when sform_code > 0) in a .nii.gz header."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    assert struct.unpack_from("<h", raw, 254)[0] > 0  # sform_code
    struct.pack_into("<12f", raw, 280, *np.asarray(rows, np.float32).ravel())
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.mark.parametrize("rows,which,match", [  # was: "t1 has a different affine from t1"
    ([[np.nan, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], ["t1"], "NaN/Inf value in its affine"),
    # the same singular affine everywhere; was: "cannot convert float NaN to integer"
    ([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], ["t1", "t1gd", "t2", "flair", "seg"], "singular affine"),
    # parallel axes: was accepted, with an arbitrary orientation
    ([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]], ["t1", "t1gd", "t2", "flair", "seg"], "singular affine"),
])
def test_unusable_affine_is_named(release_copy, rows, which, match):
    pf = discover(release_copy).patients[0]
    for m in which:
        _patch_sform(pf.files[m], rows)
    with pytest.raises(InputError, match=match) as e:
        process_patient(pf, PreprocessConfig(size=32))
    assert _one_line(e).startswith(pf.files["t1"].name)


def test_complex_image_is_refused(release_copy):
    pf = discover(release_copy).patients[0]
    _rewrite(pf.files["flair"], lambda d, a: (d.astype(np.complex64) * (1 + 1j), a))
    with pytest.raises(InputError, match=rf"{pf.files['flair'].name} holds complex64 voxels"):
        process_patient(pf, PreprocessConfig(size=32))


def test_symlink_loop_in_input_is_refused_naming_the_link(release_copy, tmp_path):
    pid = _pids(release_copy)[0]
    link = release_copy / pid / "up"
    link.symlink_to("..")
    with pytest.raises(DiscoveryError, match=f"symlink loop in the input: {link} points to {release_copy}"):
        discover(release_copy)
    with pytest.raises(BuildError, match=str(link)) as e:
        _build(release_copy, tmp_path / "s")
    _one_line(e)


def test_val_split_is_not_left_empty_when_val_patients_fail(release_copy, tmp_path):
    pids = _pids(release_copy)
    splits = assign_splits(pids, CFG.val_fraction, CFG.split_seed)
    val = [p for p in pids if splits[p] == "val"]
    for p in val:
        _file(release_copy, p, "flair").unlink()
    m = _build(release_copy, tmp_path / "s")
    assert set(_failed(m)) == set(val)
    moved = min((p for p in pids if p not in val), key=lambda p: split_score(p, CFG.split_seed))
    assert m["splits"]["val"] == [moved] and moved not in m["splits"]["train"]
    assert {f["path"] for f in m["files"] if f["patient"] == moved} >= {f"wds/val-{moved}.tar",
                                                                       f"zarr/val/{moved}/zarr.json"}
    assert verify(tmp_path / "s") == []
    on_disk = sorted(p.relative_to(tmp_path / "s").as_posix() for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert on_disk == sorted([f["path"] for f in m["files"]] + ["manifest.json"])  # the train copy is gone
    first = (tmp_path / "s" / "manifest.json").read_bytes()
    again = _build(release_copy, tmp_path / "s")  # a re-run ends where the first run did
    assert (tmp_path / "s" / "manifest.json").read_bytes() == first and again["splits"]["val"] == [moved]


def test_gzip_stream_cut_in_its_trailer_is_refused(tmp_path):
    """Only the CRC/size trailer missing: every voxel is there, but nothing vouches for them."""
    from preprocess.nifti import load_volume
    from preprocess.errors import InputError

    import nibabel as nib
    import numpy as np

    p = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(8 * 8 * 8, dtype=np.int16).reshape(8, 8, 8), np.eye(4)), p)
    assert load_volume(p).data.shape == (8, 8, 8)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(InputError, match="cut.nii.gz is a truncated gzip stream"):
        load_volume(cut)


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    """shards.atomic.atomic_path: a failed write removes its temporary and leaves the old file."""
    from shards.atomic import TMP_NAME, atomic_path, tmp_name, write_bytes

    target = tmp_path / "sub" / "f.bin"
    write_bytes(target, b"old")  # the folder is created
    assert TMP_NAME.match(tmp_name(target).name)["name"] == "f.bin"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old" and sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]
    with atomic_path(target, ".nii.gz") as tmp:
        assert tmp.name.endswith(".tmp.nii.gz") and tmp.parent == target.parent
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_read_bounded_allocates_what_the_file_holds_not_the_limit(tmp_path):
    """A checkpoint or manifest bound of gigabytes must not be allocated for a small file: under a
    1 GiB address-space limit, reading 100 bytes with an 8 GiB bound works (a subprocess: the
    limit stays there)."""
    import subprocess
    import sys

    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from shards.atomic import open_regular, read_bounded; "
            "fd, _ = open_regular(sys.argv[1]); d = read_bounded(fd, 8 << 30); "
            "fd, _ = open_regular(sys.argv[1]); print(len(d), read_bounded(fd, 99))")
    (tmp_path / "f").write_bytes(b"x" * 100)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and r.stdout.split() == ["100", "None"], (r.stdout, r.stderr[-500:])
