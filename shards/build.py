"""`build-shards`: the Dask job. One task per patient; the driver alone writes the manifest.

Crash safety and resume:
  * OUTPUT/.lock is held (flock) for the whole build: a second build into it is refused.
  * each patient's files are written under temporary names and renamed when complete;
    the task then writes OUTPUT/.build/done/{pid}.json (its small result dict);
  * a re-run with the same config skips patients whose done record and files are in place,
    so a killed build completes without redoing finished work, to the same bytes;
  * manifest.json is written last and atomically; files no manifest references are removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from preprocess.discover import PatientFiles, discover
from preprocess.h5slices import NOTE as _H5_NOTE
from preprocess.pipeline import PreprocessConfig, process_patient
from shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST, wds_io, zarr_io
from shards.atomic import sha256_file, write_json

SPLITS = ("train", "val")


class BuildError(RuntimeError):
    """The build cannot start (locked output, config mismatch, bad input folder)."""


@dataclass(frozen=True)
class BuildConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    val_fraction: float = 0.2
    split_seed: int = 0
    formats: tuple[str, ...] = ("zarr", "wds")
    codec: str = "blosc-lz4:5"  # chosen by bench/codecs.py + bench/loader.py (BENCHMARKS.md)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["formats"] = list(self.formats)
        return d


# ---------------------------------------------------------------- split

def split_score(pid: str, seed: int) -> float:
    """A patient's fixed point in [0, 1): depends on its id and the seed only."""
    h = hashlib.sha256(f"{seed}:{pid}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def assign_splits(pids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Patient-level split. A patient's split depends only on (id, seed, fraction), so adding
    patients never moves existing ones. Exception, for tiny sets: if the rule gives no val
    patient while val_fraction > 0 and there are >= 2 patients, the lowest-scoring one is val."""
    scores = {p: split_score(p, seed) for p in pids}
    split = {p: "val" if s < val_fraction else "train" for p, s in scores.items()}
    if val_fraction > 0 and len(pids) >= 2 and "val" not in split.values():
        split[min(pids, key=scores.get)] = "val"
    return split


# ---------------------------------------------------------------- per-patient task

def plan_paths(pid: str, split: str, wds_index: int) -> dict[str, str]:
    return {"zarr": f"zarr/{split}/{pid}", "wds": f"wds/{split}-{wds_index:06d}.tar"}


def _file_entry(out: Path, path: Path, pid: str, split: str, fmt: str, sha256: str | None = None) -> dict:
    return {"path": path.relative_to(out).as_posix(), "bytes": path.stat().st_size,
            "sha256": sha256 or sha256_file(path), "patient": pid, "split": split, "format": fmt}


def build_patient(pf: PatientFiles, in_root: str, out: str, split: str, wds_index: int, cfg: BuildConfig) -> dict:
    """Process and write one patient; returns a small dict (also saved as its done record).
    Bad input is returned as {'pid', 'error'}; the build records it and carries on."""
    t0 = time.perf_counter()
    out = Path(out)
    try:
        ps = process_patient(pf, cfg.preprocess, Path(in_root))
    except Exception as e:  # recorded in the manifest's `failed`, never swallowed
        reason = str(e) if type(e).__name__ == "InputError" else f"{type(e).__name__}: {e}"
        return {"pid": pf.pid, "error": reason}
    paths = plan_paths(pf.pid, split, wds_index)
    files = []
    attrs = {"patient": pf.pid, "split": split, "slice_index": ps.slice_index, "geometry": ps.geometry,
             "modalities": ["t1", "t1gd", "t2", "flair"],
             "mask_channels": ["NCR/NET", "ED", "ET"] if cfg.preprocess.mask == "subregions" else ["WT", "TC", "ET"]}
    if "zarr" in cfg.formats:
        for p in zarr_io.write_patient(out / paths["zarr"], ps.image, ps.mask, attrs, cfg.codec):
            files.append(_file_entry(out, p, pf.pid, split, "zarr"))
    if "wds" in cfg.formats:
        p, digest = wds_io.write_patient(out / paths["wds"], pf.pid, split, ps.image, ps.mask, ps.slice_index)
        files.append(_file_entry(out, p, pf.pid, split, "wds", digest))
    record = {
        "pid": pf.pid, "split": split, "n_slices": len(ps.slice_index), "slice_index": ps.slice_index,
        "label_voxels": ps.label_voxels,
        "mask_pixels": [int(c) for c in ps.mask.reshape(ps.mask.shape[0], 3, -1).sum(axis=(0, 2))],
        "pixels": int(ps.mask.shape[0] * ps.mask.shape[2] * ps.mask.shape[3]),
        "sources": ps.sources, "geometry": ps.geometry, "nonfinite_voxels": ps.nonfinite_voxels,
        "notes": list(pf.notes), "files": files,
    }
    write_json(out / ".build" / "done" / f"{pf.pid}.json", record)
    # measurements, not part of the done record (they vary run to run)
    return dict(record, seconds=time.perf_counter() - t0,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# ---------------------------------------------------------------- driver

class OutputLock:
    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise BuildError(f"another build is writing to {self.path.parent} (lock {self.path} is held)") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc):
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _valid_done(out: Path, rec: dict, split: str, wds_index: int, cfg: BuildConfig) -> bool:
    """A finished patient counts only if its files sit where this plan puts them, complete."""
    want = plan_paths(rec["pid"], split, wds_index)
    if rec.get("split") != split:
        return False
    for f in rec["files"]:
        p = out / f["path"]
        if not (p.is_file() and p.stat().st_size == f["bytes"]):
            return False
        if not (f["path"].startswith(want["zarr"] + "/") or f["path"] == want["wds"]):
            return False
    return {f["format"] for f in rec["files"]} == set(cfg.formats)


def _previous_records(out: Path, config: dict) -> dict[str, dict]:
    """Done records from an interrupted build or a finished manifest with the same config."""
    records = {}
    man = out / MANIFEST
    if man.exists():
        m = json.loads(man.read_text())
        if m.get("config") != config:
            raise BuildError(f"{out} holds a shard set built with another config; build into a new folder")
        for pid, p in m["patients"].items():
            files = [f for f in m["files"] if f.get("patient") == pid]
            records[pid] = dict(p, pid=pid, files=files)
    build = out / ".build"
    if (build / "config.json").exists():
        if json.loads((build / "config.json").read_text()) != config:
            raise BuildError(f"{out} holds an unfinished build with another config; "
                             f"re-run with the same options or build into a new folder")
        for p in sorted((build / "done").glob("*.json")):
            rec = json.loads(p.read_text())
            records[rec["pid"]] = rec
    return records


def _sweep(out: Path, keep: set[str]) -> None:
    """Remove temporaries and files no manifest entry references (leftovers of a crash)."""
    for p in out.glob(".*.tmp"):
        p.unlink()
    for sub in ("zarr", "wds"):
        base = out / sub
        if not base.exists():
            continue
        for p in sorted(base.rglob("*"), reverse=True):
            rel = p.relative_to(out).as_posix()
            if p.is_file() and rel not in keep:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()


def _run_tasks(todo, args, workers: int, scheduler: str | None, progress: bool):
    """Yield results of build_patient over `todo` (serially, or on a Dask cluster)."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="patients", unit="patient", disable=None if progress else True)
    if not todo:
        bar.close()
        return
    if workers == 0 and scheduler is None:
        for pf, split, idx in todo:
            yield build_patient(pf, *args[:2], split, idx, args[2])
            bar.update()
        bar.close()
        return
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        # processes, one thread each: one patient in memory per worker at a time
        cluster = LocalCluster(n_workers=min(workers, len(todo)), threads_per_worker=1, processes=True,
                               memory_limit="6GiB", dashboard_address=None)
        client = Client(cluster)
    try:
        futures = {client.submit(build_patient, pf, args[0], args[1], split, idx, args[2],
                                 key=f"patient-{pf.pid}-{time.time_ns()}", pure=False): pf.pid
                   for pf, split, idx in todo}
        for fut in as_completed(futures):
            try:
                yield fut.result()
            except Exception as e:  # a worker died (out of memory, killed): name the patient
                yield {"pid": futures[fut], "error": f"worker failed: {type(e).__name__}: {e}"}
            bar.update()
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()


def build(input_dir: str | Path, output_dir: str | Path, cfg: BuildConfig, workers: int | None = None,
          scheduler: str | None = None, progress: bool = True) -> dict:
    """Build (or complete) a shard set; returns the manifest. Raises BuildError if it cannot start."""
    from preprocess.discover import DiscoveryError

    in_root, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    try:
        disc = discover(in_root)
    except DiscoveryError as e:
        raise BuildError(str(e)) from None
    if not set(cfg.formats) <= {"zarr", "wds"} or not cfg.formats:
        raise BuildError(f"formats must be zarr, wds or both, not {cfg.formats}")
    zarr_io.parse_codec(cfg.codec)
    out.mkdir(parents=True, exist_ok=True)
    workers = os.cpu_count() if workers is None else workers
    config = dict(cfg.to_dict(), convention=disc.convention)
    with OutputLock(out):
        previous = _previous_records(out, config)
        write_json(out / ".build" / "config.json", config)
        pids = [p.pid for p in disc.patients]
        splits = assign_splits(pids, cfg.val_fraction, cfg.split_seed)
        index = {}
        for s in SPLITS:
            for i, pid in enumerate(p for p in pids if splits[p] == s):
                index[pid] = i
        done, todo = {}, []
        for pf in disc.patients:
            rec = previous.get(pf.pid)
            if rec and _valid_done(out, rec, splits[pf.pid], index[pf.pid], cfg):
                done[pf.pid] = rec
            else:
                todo.append((pf, splits[pf.pid], index[pf.pid]))
        group_files = []
        if "zarr" in cfg.formats:
            group_files = zarr_io.write_group_meta(out / "zarr", sorted(set(splits.values())))
        failed = {}
        timings = []
        for res in _run_tasks(todo, (str(in_root), str(out), cfg), workers, scheduler, progress):
            if "error" in res:
                failed[res["pid"]] = res["error"]
            else:
                timings.append((res.pop("seconds"), res.pop("peak_rss_mb")))
                done[res["pid"]] = res
        manifest = _manifest(out, disc, config, done, failed, group_files)
        _sweep(out, {f["path"] for f in manifest["files"]})
        write_json(out / MANIFEST, manifest)
        shutil.rmtree(out / ".build", ignore_errors=True)
    manifest["_run"] = {"built": len(todo) - len(failed), "reused": len(done) - (len(todo) - len(failed)),
                        "task_seconds": [t for t, _ in timings], "peak_rss_mb": [m for _, m in timings]}
    return manifest


def _manifest(out: Path, disc, config: dict, done: dict, failed: dict, group_files) -> dict:
    files = [f for pid in sorted(done) for f in done[pid]["files"]]
    for p in group_files:
        files.append({"path": p.relative_to(out).as_posix(), "bytes": p.stat().st_size,
                      "sha256": sha256_file(p), "patient": None, "split": None, "format": "zarr"})
    patients = {}
    for pid in sorted(done):
        rec = {k: v for k, v in done[pid].items() if k not in ("files", "pid")}
        patients[pid] = rec
    return {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION, "layouts": list(config["formats"])},
        "config": config,
        "source": {"convention": disc.convention, "n_patients_found": len(disc.patients), "kind": disc.kind,
                   **({"note": _H5_NOTE} if disc.kind == "h5-slices" else {})},
        "patients": patients,
        "splits": {s: [p for p in sorted(done) if done[p]["split"] == s] for s in SPLITS},
        "files": sorted(files, key=lambda f: f["path"]),
        "failed": [{"patient": p, "reason": failed[p]} for p in sorted(failed)],
    }
