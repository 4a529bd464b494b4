import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from preprocess.discover import discover
from preprocess.pipeline import PreprocessConfig, process_patient
from preprocess.synthetic import make_demo_data
from preprocess.build import BuildConfig, BuildError, OutputLock, assign_splits, build
from shards.manifest import load_manifest, verify

REPO = Path(__file__).resolve().parents[1]
CFG = BuildConfig(preprocess=PreprocessConfig(size=32), val_fraction=0.34)


def _build(inp, out, cfg=CFG, workers=0, **kw):
    return build(inp, out, cfg, workers=workers, progress=False, **kw)


def _cli(*args, **kw):
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, **kw)


def test_manifest_contract(release_2020, tmp_path):
    m = _build(release_2020, tmp_path / "s")
    assert m["format"]["name"] == "brats-shards" and m["format"]["version"] == 1
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

    from shards import wds_io

    m = _build(release_2020, tmp_path / "s")
    for pid, p in m["patients"].items():
        ps = process_patient(next(x for x in discover(release_2020).patients if x.pid == pid), CFG.preprocess)
        g = zarr.open_group(str(tmp_path / "s" / "zarr" / p["split"] / pid), mode="r")
        assert np.array_equal(g["image"][:], ps.image) and np.array_equal(g["mask"][:], ps.mask)
        assert g.attrs["slice_index"] == ps.slice_index
        (tar,) = [f["path"] for f in m["files"] if f["patient"] == pid and f["format"] == "wds"]
        with open(tmp_path / "s" / tar, "rb") as fh:
            samples = list(wds_io.iter_tar(fh))
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
    a = _build(release_2020, tmp_path / "a", workers=0)
    b = _build(release_2020, tmp_path / "b", workers=2)
    a.pop("_run"), b.pop("_run")
    assert a == b
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


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
    m = _build(release_copy, tmp_path / "s")
    assert m["failed"] == [] and m["_run"]["built"] == 1
    ref = _build(release_2020, tmp_path / "ref")
    assert (tmp_path / "s" / "manifest.json").read_bytes() != b""
    m.pop("_run"), ref.pop("_run")
    assert m["files"] == ref["files"]


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
    s = json.loads(info.stdout)
    assert s["splits"]["train"]["patients"] + s["splits"]["val"]["patients"] == 6


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
        (out / "wds" / ".train-000009.tar.999.tmp").write_bytes(b"partial")
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
        m.pop("_run"), ref.pop("_run")
        assert m == ref and m["failed"] == []
    finally:
        for p in (worker, sched):
            p.terminate()
            p.wait(timeout=30)
