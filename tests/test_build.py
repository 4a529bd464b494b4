import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from reference import tar_samples  # tests/reference.py

from preprocess.discover import discover
from preprocess.config import PreprocessConfig
from preprocess.pipeline import process_patient
from preprocess.synthetic.toy import make_demo_data
from preprocess.build import BuildConfig, BuildError, OutputLock, assign_splits, build
from shards.manifest import load_manifest
from shards.verify import verify

REPO = Path(__file__).resolve().parents[1]
CFG = BuildConfig(preprocess=PreprocessConfig(size=32), val_fraction=0.34)


def _build(inp, out, cfg=CFG, workers=0, **kw):
    """The manifest a build returns (`_run`: the whole BuildResult)."""
    return _run(inp, out, cfg, workers, **kw).manifest


def _run(inp, out, cfg=CFG, workers=0, **kw):
    return build(inp, out, cfg, workers=workers, progress=False, **kw)


def _cli(*args, **kw):
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, **kw)


def test_manifest_contract(release_2020, tmp_path):
    m = _build(release_2020, tmp_path / "s")
    assert m["format"]["name"] == "brats-shards" and m["format"]["version"] == 2
    assert m["config"]["preprocess"]["size"] == 32 and m["failed"] == []
    assert set(m["patients"]) == {p.pid for p in discover(release_2020).patients}
    train, val = set(m["splits"]["train"]), set(m["splits"]["val"])
    assert train and val and not train & val
    for p in m["patients"].values():
        assert p["n_slices"] == len(p["slice_index"]) > 0
        assert set(p["sources"]) == {"t1", "t1gd", "t2", "flair", "seg"}
        assert set(p["label_voxels"]) <= {"0", "1", "2", "4"}
    on_disk = sorted(str(p.relative_to(tmp_path / "s")) for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert on_disk == sorted([f["path"] for f in m["files"]] + ["manifest.json"])  # nothing unlisted
    assert verify(tmp_path / "s") == []


def test_round_trip_equals_direct_processing(release_2020, tmp_path):
    """volume -> shards -> read back (both formats) equals the recipe applied in memory."""
    import zarr

    m = _build(release_2020, tmp_path / "s")
    for pid, p in m["patients"].items():
        ps = process_patient(next(x for x in discover(release_2020).patients if x.pid == pid), CFG.preprocess)
        g = zarr.open_group(str(tmp_path / "s" / "zarr" / p["split"] / pid), mode="r")
        assert np.array_equal(g["image"][:], ps.image) and np.array_equal(g["mask"][:], ps.mask)
        assert g.attrs["slice_index"] == ps.slice_index
        (tar,) = [f["path"] for f in m["files"] if f["patient"] == pid and f["format"] == "wds"]
        with open(tmp_path / "s" / tar, "rb") as fh:
            samples = tar_samples(fh)
        assert len(samples) == p["n_slices"]
        assert np.array_equal(np.stack([s["image"] for s in samples]), ps.image)
        assert np.array_equal(np.stack([s["mask"] for s in samples]), ps.mask)


PLAIN_READER = r"""
import io, json, sys, glob
import numpy as np, zarr, webdataset as wds
root = sys.argv[1]
m = json.load(open(root + "/manifest.json"))
out = {}
for pid, p in m["patients"].items():
    g = zarr.open_group(f"{root}/zarr/{p['split']}/{pid}", mode="r")
    out[pid] = [float(g["image"][:].astype(np.float64).sum()), int(g["mask"][:].sum()), g["image"].shape[0]]
tars = sorted(root + "/" + f["path"] for f in m["files"] if f["format"] == "wds")
def npy_json_only(key, data):  # the README's safe decoding: no pickle, no torch.load
    if key.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    return json.loads(data) if key.endswith(".json") else None
ds = wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode(npy_json_only, pre=[], post=[])
seen = {}
for s in ds:
    pid = s["meta.json"]["patient"]
    v = seen.setdefault(pid, [0.0, 0, 0])
    v[0] += float(s["image.npy"].astype(np.float64).sum()); v[1] += int(s["mask.npy"].sum()); v[2] += 1
mods = sorted(k for k in sys.modules if k.split(".")[0] in ("preprocess", "shards", "train", "cli"))
print(json.dumps({"zarr": out, "wds": seen, "project_modules": mods}))
"""


def test_plain_zarr_and_webdataset_read_the_set(release_2020, tmp_path):
    m = _build(release_2020, tmp_path / "s")
    script = tmp_path / "reader.py"
    script.write_text(PLAIN_READER)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True,
                       cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["project_modules"] == []
    for pid, p in m["patients"].items():
        z, w = res["zarr"][pid], res["wds"][pid]
        assert z[2] == w[2] == p["n_slices"]
        assert z[1] == w[1] == sum(p["mask_pixels"])
        assert z[0] == pytest.approx(w[0])


def test_same_bytes_whatever_the_worker_count(release_2020, tmp_path):
    ra = _run(release_2020, tmp_path / "a", workers=0)
    rb = _run(release_2020, tmp_path / "b", workers=2)
    a, b = ra.manifest, rb.manifest
    assert (ra.built, ra.reused, rb.built, rb.reused) == (6, 0, 6, 0)
    assert len(ra.task_seconds) == len(rb.peak_rss_mb) == 6 and min(ra.task_seconds) > 0
    assert a == b and "_run" not in a
    assert json.loads((tmp_path / "a" / "manifest.json").read_bytes()) == a  # what was written is what came back
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_local_workers_start_without_dask_malloc_trim(monkeypatch):
    """Dask's MALLOC_TRIM_THRESHOLD_ turns off glibc's adaptive mmap threshold, re-faulting every
    patient's arrays; the build's own workers start without it unless the user set it."""
    from dask.distributed import Client

    from preprocess.build.run import _local_cluster

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with _local_cluster(1) as cluster, Client(cluster) as c:
        assert list(c.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == [None]
        assert list(c.run(os.environ.get, "OMP_NUM_THREADS").values()) == ["1"]  # Dask's other settings stay
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    with _local_cluster(1) as cluster, Client(cluster) as c:
        assert list(c.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == ["131072"]


def test_labels_are_counted_once_per_patient(release_2020, monkeypatch):
    from preprocess import steps

    calls = []
    real = steps.label_counts
    monkeypatch.setattr(steps, "label_counts", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    pf = discover(release_2020).patients[0]
    ps = process_patient(pf, PreprocessConfig(size=32))
    assert len(calls) == 1
    seg = np.asarray(nib.load(pf.files["seg"]).dataobj)
    assert ps.label_voxels == {str(v): int((seg == v).sum()) for v in (0, 1, 2, 4) if (seg == v).any()}


def test_failed_zarr_write_waits_for_the_tar_and_leaves_no_temporaries(release_2020, tmp_path, monkeypatch):
    """The tar is written on a second thread while the Zarr arrays are encoded: when the Zarr
    write fails, the build waits for the tar's thread, stops naming the Zarr path, leaves no
    temporary behind, and a re-run completes to a fresh build's bytes."""
    import errno

    from shards import wds_io, zarr_io
    from shards.atomic import TMP_NAME

    real_tar = wds_io.write_patient

    def slow_tar(*a, **kw):
        time.sleep(0.3)  # still busy when the Zarr write fails
        return real_tar(*a, **kw)

    def full(path, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(wds_io, "write_patient", slow_tar)
    monkeypatch.setattr(zarr_io, "write_patient", full)
    out = tmp_path / "s"
    with pytest.raises(BuildError, match=r"cannot write .*/zarr/.*BraTS20_Training_001.*: No space left"):
        _build(release_2020, out)
    assert [p.name.split("-", 1)[1] for p in (out / "wds").iterdir()] == ["BraTS20_Training_001.tar"]  # finished
    assert [p for p in out.rglob("*") if TMP_NAME.match(p.name)] == []
    assert not (out / ".build" / "done" / "BraTS20_Training_001.json").exists()
    monkeypatch.undo()
    _build(release_2020, out)
    _build(release_2020, tmp_path / "fresh")
    assert (out / "manifest.json").read_bytes() == (tmp_path / "fresh" / "manifest.json").read_bytes()


def test_patients_a_dead_worker_never_flushed_are_flushed_by_the_driver(release_2020, tmp_path, monkeypatch):
    """A worker that returned a patient and died before flushing it: the driver flushes its files
    and writes its done record itself before the manifest."""
    import preprocess.build.durable as b  # the flushes and done records

    synced = []
    real = b.fsync_file
    monkeypatch.setattr(b.DEFERRED_FSYNCS, "add", lambda *a, **kw: None)  # the worker's fsync never happens
    monkeypatch.setattr(b, "fsync_file", lambda p: (synced.append(Path(p)), real(p))[1])
    out = tmp_path / "s"
    m = _build(release_2020, out)
    assert {out / f["path"] for f in m["files"] if f["patient"]} <= set(synced)
    monkeypatch.undo()
    _build(release_2020, tmp_path / "fresh")
    assert (out / "manifest.json").read_bytes() == (tmp_path / "fresh" / "manifest.json").read_bytes()


def test_flush_failures_on_dask_workers_stop_the_build(release_2020, tmp_path, monkeypatch):
    from dask.distributed import LocalCluster

    import preprocess.build.durable as b  # the flushes and done records

    def failing(p):
        raise OSError(5, "Input/output error", str(p))

    monkeypatch.setattr(b, "fsync_file", failing)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(BuildError, match=r"cannot write .*: Input/output error \(and \d+ more\)$"):
            _build(release_2020, tmp_path / "s", scheduler=cluster.scheduler_address)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_a_patient_rebuilt_loses_its_stale_done_record_first(release_2020, tmp_path, monkeypatch):
    """A done record describes files on disk; when its patient is rebuilt (its files were found
    incomplete), the record goes before the new, not yet flushed, files are written."""
    import preprocess.build.durable as b  # the flushes and done records

    out = tmp_path / "s"
    real = b.fsync_file
    monkeypatch.setattr(b, "fsync_file", lambda p: (_ for _ in ()).throw(OSError(5, "I/O error", str(p)))
                        if "BraTS20_Training_003" in str(p) else real(p))
    with pytest.raises(BuildError):
        _build(release_2020, out)  # unfinished: patients 1, 2, 4, ... have done records, 3 not
    monkeypatch.undo()
    (tar,) = (out / "wds").glob("*-BraTS20_Training_001.tar")
    assert (out / ".build" / "done" / "BraTS20_Training_001.json").is_file() and tar.is_file()
    tar.write_bytes(tar.read_bytes()[:-512])  # no longer what its record says
    seen = {}
    import preprocess.build.run as run_mod

    real_task = run_mod.build_patient

    def task(pf, *a, **kw):
        seen[pf.pid] = (out / ".build" / "done" / f"{pf.pid}.json").exists()
        return real_task(pf, *a, **kw)

    monkeypatch.setattr(run_mod, "build_patient", task)
    _build(release_2020, out)
    assert seen == {"BraTS20_Training_001": False, "BraTS20_Training_003": False}
    monkeypatch.undo()
    _build(release_2020, tmp_path / "fresh")
    assert (out / "manifest.json").read_bytes() == (tmp_path / "fresh" / "manifest.json").read_bytes()


def test_done_records_are_written_only_after_their_files_are_on_disk(release_2020, tmp_path, monkeypatch):
    """Files are renamed into place unsynced and flushed on a background thread; a patient's done
    record (which a re-run trusts) follows the flush of every one of its files, Zarr and tar."""
    import preprocess.build.durable as b  # the flushes and done records

    log = []
    real_fsync, real_json = b.fsync_file, b.write_json
    monkeypatch.setattr(b, "fsync_file", lambda p: (log.append(("fsync", Path(p))), real_fsync(p))[1])
    monkeypatch.setattr(b, "write_json", lambda p, o: (log.append(("json", Path(p))), real_json(p, o))[1])
    out = tmp_path / "s"
    m = _build(release_2020, out)
    for pid in m["patients"]:
        done = next(i for i, (k, p) in enumerate(log) if k == "json" and p.name == f"{pid}.json")
        synced = {p for k, p in log[:done] if k == "fsync"}
        files = {out / f["path"] for f in m["files"] if f["patient"] == pid}
        assert len(files) >= 6 and files <= synced  # zarr.json x3, two storage shards, the tar
        assert any(p.suffix == ".tar" for p in files) and any("/c/" in p.as_posix() for p in files)


def test_a_failed_flush_stops_the_build_and_the_patient_is_redone(release_2020, tmp_path, monkeypatch):
    import errno

    import preprocess.build.durable as b  # the flushes and done records

    real = b.fsync_file

    def failing(p):
        if Path(p).name.endswith("BraTS20_Training_002.tar"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(p))
        real(p)

    monkeypatch.setattr(b, "fsync_file", failing)
    out = tmp_path / "s"
    with pytest.raises(BuildError, match=r"cannot write .*BraTS20_Training_002\.tar: Input/output error$"):
        _build(release_2020, out)
    assert not (out / "manifest.json").exists()
    assert not (out / ".build" / "done" / "BraTS20_Training_002.json").exists()
    assert (out / ".build" / "done" / "BraTS20_Training_001.json").exists()
    monkeypatch.undo()
    r = _run(release_2020, out)
    assert r.built == 1 and r.reused == 5  # only the patient whose flush failed is built again
    _build(release_2020, tmp_path / "fresh")
    assert (out / "manifest.json").read_bytes() == (tmp_path / "fresh" / "manifest.json").read_bytes()


@pytest.mark.parametrize("kw, why", [
    (dict(formats=("zarr", "parquet")), "formats must be"), (dict(formats=()), "formats must be"),
    (dict(formats=("wds", "wds")), "formats must be"), (dict(formats="zarr"), "formats must be"),
    (dict(val_fraction=1.5), "val_fraction"), (dict(val_fraction=float("nan")), "val_fraction"),
    (dict(val_fraction=True), "val_fraction"), (dict(split_seed="0"), "split_seed"),
    (dict(codec="lz4"), "unknown codec"), (dict(codec="blosc-lz4:10"), "from 0 to 9"),
    (dict(codec="zstd:fast"), "zstd takes"), (dict(codec="none:3"), "none takes no level"),
    (dict(preprocess={"size": 32}), "PreprocessConfig"),
])
def test_build_config_is_validated_at_construction(kw, why):
    with pytest.raises(ValueError, match=why):
        BuildConfig(**kw)


def test_build_config_round_trips_and_the_cli_refuses_bad_values(tmp_path):
    cfg = BuildConfig(preprocess=PreprocessConfig(size=64, mask="regions"), val_fraction=0.0, split_seed=3,
                      formats=["wds", "zarr"], codec="zstd:-5")
    assert cfg.formats == ("wds", "zarr")  # order kept: it is the manifest's layouts order
    assert BuildConfig.from_dict(dict(cfg.to_dict(), convention="2020")) == cfg
    r = _cli("build-shards", tmp_path / "in", tmp_path / "out", "--codec", "blosc-lz4:12")
    assert r.returncode == 2 and r.stderr == "error: codec 'blosc-lz4:12': blosc-lz4 takes from 0 to 9\n"
    assert not (tmp_path / "out").exists()


def test_split_is_by_patient_and_stable_when_patients_are_added():
    pids = [f"BraTS20_Training_{i:03d}" for i in range(1, 201)]
    s1 = assign_splits(pids[:100], 0.2, seed=3)
    s2 = assign_splits(pids, 0.2, seed=3)
    assert all(s1[p] == s2[p] for p in s1)
    assert 0.1 < sum(v == "val" for v in s2.values()) / 200 < 0.3
    assert assign_splits(pids, 0.2, seed=4) != s2
    assert list(assign_splits(pids[:2], 0.01, 0).values()).count("val") == 1  # tiny sets get one


def test_bad_patients_are_named_others_complete(release_copy, tmp_path):
    pids = [p.pid for p in discover(release_copy).patients]
    (release_copy / pids[0] / f"{pids[0]}_flair.nii.gz").unlink()
    seg = release_copy / pids[1] / f"{pids[1]}_seg.nii.gz"
    seg.write_bytes(seg.read_bytes()[:100])
    r = _cli("build-shards", release_copy, tmp_path / "s", "--size", "32", "--workers", "0", "--quiet")
    assert r.returncode == 1
    assert f"FAILED {pids[0]}: missing flair" in r.stdout
    assert f"FAILED {pids[1]}: cannot read {pids[1]}_seg.nii.gz" in r.stdout
    m = load_manifest(tmp_path / "s")
    assert [f["patient"] for f in m["failed"]] == pids[:2]
    assert set(m["patients"]) == set(pids[2:])
    assert verify(tmp_path / "s") == []
    ok = _cli("build-shards", release_copy.parent / "nope", tmp_path / "t", "--workers", "0")
    assert ok.returncode == 2 and "does not exist" in ok.stderr


def test_failed_patient_retried_after_fix(release_2020, release_copy, tmp_path):
    pid = discover(release_copy).patients[0].pid
    flair = release_copy / pid / f"{pid}_flair.nii.gz"
    flair.rename(tmp_path / "flair.bak")
    assert _build(release_copy, tmp_path / "s")["failed"][0]["patient"] == pid
    (tmp_path / "flair.bak").rename(flair)
    r = _run(release_copy, tmp_path / "s")
    m = r.manifest
    assert m["failed"] == [] and (r.built, r.reused) == (1, 5)
    ref = _build(release_2020, tmp_path / "ref")
    written = json.loads((tmp_path / "s" / "manifest.json").read_bytes())
    assert written == m and pid in written["patients"] and written["failed"] == []
    assert m["files"] == ref["files"] and m["patients"] == ref["patients"]
    assert verify(tmp_path / "s") == []


def test_second_build_into_locked_output_is_refused(release_2020, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    with OutputLock(out):
        with pytest.raises(BuildError, match="another build is writing"):
            _build(release_2020, out)
    _build(release_2020, out)  # lock released: builds


def test_other_config_into_existing_output_is_refused(release_2020, tmp_path):
    _build(release_2020, tmp_path / "s")
    with pytest.raises(BuildError, match="another config"):
        _build(release_2020, tmp_path / "s", cfg=BuildConfig(preprocess=PreprocessConfig(size=16)))


def test_verify_names_the_corrupted_file(release_2020, tmp_path):
    m = _build(release_2020, tmp_path / "s")
    victim = next(f["path"] for f in m["files"] if f["format"] == "wds")
    p = tmp_path / "s" / victim
    data = bytearray(p.read_bytes())
    data[5000] ^= 0xFF
    p.write_bytes(bytes(data))
    r = _cli("verify", tmp_path / "s")
    assert r.returncode == 1 and f"BAD {victim}: sha256 differs" in r.stdout
    info = _cli("info", tmp_path / "s", "--json")
    assert info.returncode == 0, info.stderr
    s = json.loads(info.stdout)
    _check_info(s, tmp_path / "s", m)
    text = _cli("info", tmp_path / "s")
    for split in ("train", "val"):
        d = s["splits"][split]
        assert f"{split:5s}: {d['patients']:5d} patients {d['slices']:7d} slices" in text.stdout


def _check_info(s: dict, root: Path, m: dict) -> None:
    """`info --json` against what the set holds: slices and mask fractions from the arrays on disk,
    bytes from the files' sizes (the corrupted tar keeps its size)."""
    from shards.source import ShardSource

    src = ShardSource(root)
    assert s["mask_channels"] == ["NCR/NET", "ED", "ET"] and s["failed"] == []
    assert set(s["splits"]) == {"train", "val"}
    for split, d in s["splits"].items():
        masks = [src.read_patient(pid, "zarr")[1] for pid in m["splits"][split]]  # (S, 3, H, W) each
        assert d["patients"] == len(masks) > 0
        assert d["slices"] == sum(len(k) for k in masks) > 0
        pixels = sum(k.shape[0] * k.shape[2] * k.shape[3] for k in masks)
        expected = [sum(int(k[:, c].sum()) for k in masks) / pixels for c in range(3)]
        assert d["mask_fraction"] == pytest.approx(expected, rel=1e-12) and 0 < min(expected) < max(expected) < 0.5
    on_disk = {fmt: sum(p.stat().st_size for p in (root / fmt).rglob("*") if p.is_file()) for fmt in ("zarr", "wds")}
    assert s["bytes"] == on_disk and min(on_disk.values()) > 0


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_bytes(tmp_path):
    inp = tmp_path / "in"
    make_demo_data(inp, 8, shape=(96, 96, 48), seed=3)
    ref = _cli("build-shards", inp, tmp_path / "ref", "--workers", "0", "--quiet", "--size", "64")
    assert ref.returncode == 0, ref.stderr
    for kill_after in (1, 4):
        out = tmp_path / f"s{kill_after}"
        proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "build-shards", str(inp), str(out),
                                 "--workers", "0", "--quiet", "--size", "64"], cwd=REPO)
        done = out / ".build" / "done"
        deadline = time.time() + 120
        while time.time() < deadline and (not done.exists() or len(list(done.glob("*.json"))) < kill_after):
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "manifest.json").exists()
        # also leave what a kill in the middle of a write leaves behind
        (out / "wds" / ".train-BraTS20_Training_008.tar.999.tmp").write_bytes(b"partial")
        again = _cli("build-shards", inp, out, "--workers", "0", "--size", "64", "--quiet")
        assert again.returncode == 0, again.stderr
        assert "already done" in again.stdout and " 0 already done" not in again.stdout
        assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()
        assert verify(out) == []
        left = sorted(p.name for p in out.rglob("*") if p.name.startswith("."))
        assert left == [], left
    rerun = _cli("build-shards", inp, tmp_path / "ref", "--workers", "0", "--size", "64", "--quiet")
    assert rerun.returncode == 0 and "(0 built, 8 already done)" in rerun.stdout


@pytest.mark.slow
def test_build_on_a_separately_started_dask_cluster(release_2020, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PYTHONPATH=str(REPO))
    sched = subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                              "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([str(bindir / "dask"), "worker", addr, "--nworkers", "2", "--nthreads", "1",
                               "--no-dashboard"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        from dask.distributed import Client

        with Client(addr, timeout=60) as c:
            c.wait_for_workers(2, timeout=60)
        m = _build(release_2020, tmp_path / "d", scheduler=addr)
        ref = _build(release_2020, tmp_path / "ref")
        assert m == ref and m["failed"] == []
        assert not (tmp_path / "d" / ".build").exists()  # every worker's flushes done, records removed
    finally:
        for p in (worker, sched):
            p.terminate()
            p.wait(timeout=30)
