"""`build-shards`: the Dask job. One task per patient; the driver alone writes the manifest.

Crash safety and resume:
  * OUTPUT/.lock is held (flock) for the whole build: a second build into it is refused.
  * each patient's files are written under temporary names and renamed when complete; once
    they are flushed to disk (on a background thread, so the worker goes on with the next
    patient) OUTPUT/.build/done/{pid}.json (the task's small result dict) is written;
  * a re-run with the same config skips patients whose done record and files are in place,
    so a killed build completes without redoing finished work, to the same bytes;
  * manifest.json is written last and atomically.

Incremental builds: every file is named from its patient's id and split (shards/layout.py), so a
re-run after patients were added builds only those, and a re-run after patients were removed
deletes only their files; either way the folder ends byte-identical to a fresh build of the
same input.

What a build deletes: only what it (or an earlier run into the same folder) wrote: files that a
previous manifest or `.build/done` record lists, or that this run wrote, and that the new manifest
does not list; temporaries of exactly the names our writers use (`.{name}.{pid}.tmp`, see
shards/atomic.py); folders those deletions leave empty. Anything else in the output folder is
left alone. A non-empty output folder that holds neither a shard set
(manifest.json) nor an unfinished build (.build/config.json) is refused, so a typo in the output
path never mixes a shard set into someone's files.

Every failure to write (read-only folder, output path is a file, disk full) is a one-line
BuildError naming the path; a patient's bad input is an InputError recorded in `failed`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

from preprocess.discover import PatientFiles, discover
from preprocess import nifti
from preprocess.h5slices import NOTE as _H5_NOTE
from preprocess.config import PreprocessConfig
from preprocess.pipeline import process_patient
from preprocess.errors import InputError
from shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST, layout, provenance, wds_io, zarr_io
from shards.codecs import parse_codec_spec
from shards.atomic import TMP_NAME, dumps, fsync_file, sha256_file, write_json
from shards.domain import MASK_CHANNELS, MODALITIES
from shards.errors import BratsShardsError
from shards.manifest import ManifestError, load_manifest, parse_manifest
from shards.names import patient_id_problem, relpath_problem

SPLITS = layout.SPLITS
Format = Literal["zarr", "wds"]


class BuildError(BratsShardsError, RuntimeError):
    """The build cannot start or go on (locked or foreign output, config mismatch, bad input
    folder, output not writable); nothing more is done (exit 2)."""


@contextlib.contextmanager
def _writing(path: Path):
    """Turn an OSError while writing `path` into a one-line BuildError naming it: a full disk
    or a read-only folder stops the whole build (every patient would fail the same way)."""
    try:
        yield
    except OSError as e:
        raise BuildError(f"cannot write {e.filename or path}: {e.strerror or e}") from None


def parse_formats(value) -> tuple[Format, ...]:
    """A non-empty sequence of distinct layouts, in the given order (the manifest keeps it)."""
    allowed = get_args(Format)
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value \
            or any(v not in allowed for v in value) or len(set(value)) != len(value):
        raise ValueError(f"formats must be zarr, wds or both (each once), not {value!r}")
    return tuple(value)


def parse_val_fraction(value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"val_fraction must be a number in [0, 1], not {value!r}")
    return value


def parse_seed(value) -> int:
    if type(value) is not int:
        raise ValueError(f"split_seed must be an integer, not {value!r}")
    return value


@dataclass(frozen=True)
class BuildConfig:
    """What a shard set is built with; validated at construction, saved in the manifest."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    val_fraction: float = 0.2
    split_seed: int = 0
    formats: tuple[Format, ...] = ("zarr", "wds")
    codec: str = "blosc-lz4:5"  # `shards.codecs.CodecName[:level]`; chosen by bench/codecs.py + bench/loader.py

    def __post_init__(self):
        if not isinstance(self.preprocess, PreprocessConfig):
            raise ValueError(f"preprocess must be a PreprocessConfig, not {type(self.preprocess).__name__}")
        object.__setattr__(self, "formats", parse_formats(self.formats))
        parse_val_fraction(self.val_fraction)
        parse_seed(self.split_seed)
        parse_codec_spec(self.codec)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["formats"] = list(self.formats)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BuildConfig":
        """The inverse of `to_dict` (keys it does not write, e.g. a manifest's `convention`, are ignored)."""
        return cls(preprocess=PreprocessConfig.from_dict(d["preprocess"]), val_fraction=d["val_fraction"],
                   split_seed=d["split_seed"], formats=tuple(d["formats"]), codec=d["codec"])


@dataclass(frozen=True)
class BuildResult:
    """What `build` returns: the manifest it wrote, and measurements of this run (not in the manifest)."""
    manifest: dict
    built: int  # patients processed by this run
    reused: int  # patients whose files an earlier run into the folder had finished
    task_seconds: list[float] = field(default_factory=list)  # per patient built
    peak_rss_mb: list[float] = field(default_factory=list)  # per patient built: its worker's peak RSS
    changed: list[str] = field(default_factory=list)  # patients rebuilt because their sources changed


# ---------------------------------------------------------------- split

def split_score(pid: str, seed: int) -> float:
    """A patient's fixed point in [0, 1): depends on its id and the seed only."""
    h = hashlib.sha256(f"{seed}:{pid}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def assign_splits(pids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Patient-level split. A patient's split depends only on (id, seed, fraction), so adding
    patients never moves existing ones. Exception, for tiny sets: if the rule gives no val
    patient while val_fraction > 0 and there are >= 2 patients, the lowest-scoring one is val.
    `build` applies the same exception again after the run, to the patients that succeeded
    (see `_val_fallback`)."""
    scores = {p: split_score(p, seed) for p in pids}
    split = {p: "val" if s < val_fraction else "train" for p, s in scores.items()}
    if val_fraction > 0 and len(pids) >= 2 and "val" not in split.values():
        split[min(pids, key=scores.get)] = "val"
    return split


# ---------------------------------------------------------------- per-patient task

def plan_paths(pid: str, split: str) -> dict[str, str]:
    """Where a patient's files go: named from its id and split only, so adding or removing other
    patients never moves them (a re-run builds only new patients and drops only removed ones)."""
    return {"zarr": layout.zarr_group(split, pid), "wds": layout.wds_tar(split, pid)}


def _file_entry(out: Path, path: Path, pid: str, split: str, fmt: str, sha256: str | None = None) -> dict:
    return {"path": path.relative_to(out).as_posix(), "bytes": path.stat().st_size,
            "sha256": sha256 or sha256_file(path), "patient": pid, "split": split, "format": fmt}


def build_patient(pf: PatientFiles, in_root: str, out: str, split: str, cfg: BuildConfig) -> dict:
    """Process and write one patient; returns a small dict (also saved as its done record).
    Bad input is returned as {'pid', 'error'}; the build records it and carries on."""
    t0 = time.perf_counter()
    out = Path(out)
    stamps = _stamps(pf, Path(in_root))  # before reading: a change while it is read shows next time
    try:
        if not pf.problem:  # from the headers alone: volumes each legal alone may not fit together
            nifti.check_patient_footprint(pf.files.values())
        ps = process_patient(pf, cfg.preprocess, Path(in_root))
    except Exception as e:  # recorded in the manifest's `failed`, never swallowed
        reason = str(e) if isinstance(e, InputError) else " ".join(f"{type(e).__name__}: {e}".split())
        return {"pid": pf.pid, "error": reason}
    paths = plan_paths(pf.pid, split)
    for fmt in cfg.formats:  # a link planted since the build checked its output (`_refuse_links`)
        _refuse_link_on_the_way(out, paths[fmt])
    files = []
    attrs = {"patient": pf.pid, "split": split, "slice_index": ps.slice_index, "geometry": ps.geometry.to_dict(),
             "modalities": list(pf.release.modalities), "mask_channels": list(pf.release.channels(cfg.preprocess.mask))}
    # The tar is assembled, hashed and written on a second thread while this one encodes the Zarr
    # arrays (the copies, sha256, blosc and the writes release the GIL). Both threads only read
    # `ps`; each writes its own files atomically, unflushed (flushed by `_SEALS`, below).
    with ThreadPoolExecutor(1, thread_name_prefix="tar") as pool:
        tar = pool.submit(_write_tar, out / paths["wds"], pf.pid, split, ps) if "wds" in cfg.formats else None
        if "zarr" in cfg.formats:
            with _writing(out / paths["zarr"]):
                written = zarr_io.write_patient(out / paths["zarr"], ps.image, ps.mask, attrs, cfg.codec)
            for p in written:
                files.append(_file_entry(out, p, pf.pid, split, "zarr"))
        if tar is not None:
            p, digest = tar.result()
            files.append(_file_entry(out, p, pf.pid, split, "wds", digest))
    record = {
        "pid": pf.pid, "split": split, "n_slices": len(ps.slice_index), "slice_index": ps.slice_index,
        "label_voxels": ps.label_voxels,
        "mask_pixels": [int(c) for c in ps.mask.reshape(ps.mask.shape[0], ps.mask.shape[1], -1).sum(axis=(0, 2))],
        "pixels": int(ps.mask.shape[0] * ps.mask.shape[2] * ps.mask.shape[3]),
        "sources": ps.sources, "geometry": ps.geometry.to_dict(), "nonfinite_voxels": ps.nonfinite_voxels,
        "notes": list(pf.notes), "files": files, "stamps": stamps,
    }
    # The files were renamed into place without waiting for the disk; a background thread now
    # flushes them and only then writes the done record that a re-run trusts (`_seal`).
    _SEALS.add(out, [out / f["path"] for f in files], _done_path(out, pf.pid), record)
    # measurements, not part of the done record (they vary run to run)
    return dict(record, seconds=time.perf_counter() - t0,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _relative(path, root: Path) -> str:
    """A source's path as the manifest records it (pipeline.load_patient: relative to the input)."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _stamps(pf: PatientFiles, root: Path) -> dict:
    """{source path: [size, mtime_ns]}: kept in the done record only (never in the manifest, which
    must not depend on the machine), so a resumed build trusts an unchanged file without re-hashing."""
    return {_relative(p, root): provenance.stamp(p) for p in pf.files.values()}


def _changed_sources(root: Path, patients, reusable: dict) -> dict[str, list[str]]:
    """{pid: why} of the patients whose done records no longer describe their input: other files
    than those it was built from, or a file whose size, then sha256, differs (`shards.provenance`)."""
    moved = {}
    for pf in patients:
        if pf.pid in reusable and not pf.slices:
            now = {_relative(p, root) for p in pf.files.values()}
            if now != provenance.source_paths(reusable[pf.pid].get("sources")):
                moved[pf.pid] = ["its source files are not the ones it was built from"]
    rest = {pid: rec for pid, rec in reusable.items() if pid not in moved}
    return moved | provenance.changed_patients(root, rest)


def _write_tar(path: Path, pid: str, split: str, ps) -> tuple[Path, str]:
    with _writing(path):
        return wds_io.write_patient(path, pid, split, ps.image, ps.mask, ps.slice_index, sync=False)


# ---------------------------------------------------------------- durability, behind the tasks
#
# Waiting for the disk inside a task (an fsync of ~35 MB per patient: ~65 ms here) would stall
# the worker; instead each process flushes its finished patients on one background thread, in
# order, and writes each patient's done record only after its files are on disk. A re-run
# therefore never trusts a patient whose files a power loss could have emptied. Before the
# manifest, the driver waits for the flushes of its output folder in every process
# (`drain_seals`), then seals itself any patient of this run whose done record is still missing
# (its worker died after returning it).

class _Seals:
    """This process's pending flushes, per output folder: a build drains only its own."""

    def __init__(self):
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child has no seal thread

    def _reset(self):
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.pending: dict[str, list] = {}

    def add(self, out: Path, files: list[Path], done_path: Path, record: dict) -> None:
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="seal")
            self.pending.setdefault(str(out), []).append(self.pool.submit(_seal, files, done_path, record))

    def drain(self, out: str) -> list[str]:
        with self.lock:
            futures = self.pending.pop(str(out), [])
        errors = []
        for f in futures:  # in the order they were queued
            try:
                f.result()
            except Exception as e:  # noqa: BLE001 -- reported by the driver as one BuildError
                errors.append(str(e) if isinstance(e, BuildError) else f"{type(e).__name__}: {e}")
        return errors


_SEALS = _Seals()


def _seal(files: list[Path], done_path: Path, record: dict) -> None:
    for p in files:
        with _writing(p):
            fsync_file(p)
    with _writing(done_path):
        write_json(done_path, record)


def drain_seals(out: str) -> list[str]:
    """Wait for this process's pending flushes of output folder `out`; returns the one-line
    reasons of those that failed (run on every Dask worker by the driver)."""
    return _SEALS.drain(str(out))


def _raise_seal_errors(errors: list[str]) -> None:
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise BuildError(errors[0] + more)


def _done_path(out: Path, pid: str) -> Path:
    return out / ".build" / "done" / f"{pid}.json"


# ---------------------------------------------------------------- driver

class OutputLock:
    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        with _writing(self.path):  # a read-only output folder fails here, first
            # O_NOFOLLOW: a `.lock` planted as a link never truncates the file it points to
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise BuildError(f"another build is writing to {self.path.parent} (lock {self.path} is held)") from None
        try:
            with _writing(self.path):
                os.ftruncate(self.fd, 0)
                os.write(self.fd, f"{os.getpid()}\n".encode())
        except BuildError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _valid_done(out: Path, rec: dict, split: str, cfg: BuildConfig) -> bool:
    """A finished patient counts only if its files sit where this plan puts them, complete."""
    want = plan_paths(rec["pid"], split)
    if rec.get("split") != split:
        return False
    for f in rec["files"]:
        p = out / f["path"]
        if not (p.is_file() and p.stat().st_size == f["bytes"]):
            return False
        if not (f["path"].startswith(want["zarr"] + "/") or f["path"] == want["wds"]):
            return False
    return {f["format"] for f in rec["files"]} == set(cfg.formats)


def _load_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise BuildError(f"cannot read {path}: {str(e)[:120]}; build into a new folder") from None


def _previous_records(out: Path, config: dict) -> tuple[dict[str, dict], set[str]]:
    """Done records from an interrupted build or a finished manifest with the same config, and
    every file path those name (what earlier runs wrote, so what this run may delete)."""

    records, owned = {}, set()
    if (out / MANIFEST).exists():
        try:
            m = load_manifest(out)  # validated: paths stay inside the set, ids are plain names
        except ManifestError as e:
            raise BuildError(f"{e}; build into a new folder") from None
        if m.get("config") != config:
            raise BuildError(f"{out} holds a shard set built with another config; build into a new folder")
        owned |= _file_paths(m)
        for pid, p in m["patients"].items():
            files = [f for f in m["files"] if f.get("patient") == pid]
            records[pid] = dict(p, pid=pid, files=files)
    build = out / ".build"
    if (build / "config.json").exists():
        if _load_json(build / "config.json") != config:
            raise BuildError(f"{out} holds an unfinished build with another config; "
                             f"re-run with the same options or build into a new folder")
        for p in sorted((build / "done").glob("*.json")):
            rec = _load_json(p)
            if not (isinstance(rec, dict) and patient_id_problem(rec.get("pid")) is None
                    and isinstance(rec.get("files"), list)):
                raise BuildError(f"{p} is not a done record of this build; build into a new folder")
            records[rec["pid"]] = rec
            owned |= _file_paths(rec)
    return records, owned


def _refuse_link_on_the_way(out: Path, rel: str) -> None:
    """Refuse to write `out/rel` when a folder on the way to it (or it) is a symbolic link."""
    p = out
    for part in rel.split("/"):
        p = p / part
        if p.is_symlink():
            raise BuildError(f"{p} is a symbolic link (planted during the build): a build writes only inside "
                             f"its output folder and never follows a link there; remove the link and re-run")


# what a build writes or deletes in its output folder (anything else there is the user's)
_MANAGED = (".lock", ".build", MANIFEST, layout.ZARR_ROOT, layout.WDS_ROOT)


def _refuse_links(out: Path) -> None:
    """Refuse an output whose managed paths hold a symbolic link: following `OUTPUT/wds` ->
    elsewhere would write and delete in a folder the user never named. Checked before the lock
    is taken and again before the sweep deletes anything (a link planted during the run)."""
    rel = layout.symlink_inside(out, _MANAGED)
    if rel is None:
        return
    try:
        target = f" (to {os.readlink(out / rel)})"
    except OSError:  # removed meanwhile: still refused, this run saw it
        target = ""
    raise BuildError(f"{out / rel} is a symbolic link{target}: a build writes and deletes only inside its "
                     f"output folder and never follows a link there; remove the link or build into a new folder")


def _deletable(rel) -> bool:
    """A relative path a build may delete (if it wrote it): safe, under zarr/ or wds/."""
    return relpath_problem(rel) is None and rel.split("/")[0] in layout.LAYOUTS


def _file_paths(rec: dict) -> set[str]:
    """The paths a done record (or a manifest) lists that could be ours to delete."""
    paths = {f.get("path") for f in rec.get("files", []) if isinstance(f, dict)}
    return {p for p in paths if _deletable(p)}


def _check_output(out: Path) -> None:
    """Refuse an output that is a file, or a non-empty folder that is neither a shard set nor an
    unfinished build. `.lock` (and a `.build` holding only our temporary config) may be left by
    a build killed at its start."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"output {out} exists and is not a folder")
    if not out.is_dir() or (out / MANIFEST).is_file() or (out / ".build" / "config.json").is_file():
        return
    try:
        names = sorted(p.name for p in out.iterdir() if p.name != ".lock")
        if names == [".build"] and all(TMP_NAME.match(p.name) for p in (out / ".build").iterdir()):
            names = []
    except OSError as e:
        raise BuildError(f"cannot list output folder {out}: {e.strerror or e}") from None
    if names:
        shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
        raise BuildError(f"output folder {out} is not empty ({shown}) and holds no shard set or unfinished "
                         f"build; build into a new or empty folder")


def _our_temporaries(out: Path, pids: set[str]):
    """Leftovers of interrupted writes, by the exact names our writers give them (a patient's
    zarr group or tar: only for ids this build or an earlier one into the folder knows)."""
    def our_tar(n):
        m = layout.WDS_NAME.match(n)
        return m is not None and m["pid"] in pids

    where = [(out, lambda n: n == MANIFEST), (out / layout.WDS_ROOT, our_tar)]
    where += [(out / layout.zarr_split(s), pids.__contains__) for s in SPLITS]
    for folder, is_ours in where:
        if folder.is_dir() and not folder.is_symlink():
            for p in sorted(folder.iterdir()):
                m = TMP_NAME.match(p.name)
                if m and is_ours(m["name"]):
                    yield p


def _sweep(out: Path, keep: set[str], owned: set[str], pids: set[str]) -> None:
    """Remove temporaries and files we wrote that the new manifest does not list (leftovers of a
    crash, of a patient that now fails or moved split), then folders that leaves empty."""
    emptied = set()
    for p in _our_temporaries(out, pids):
        with _writing(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    for rel in sorted(owned - keep):
        p = out / rel
        if _deletable(rel) and (p.is_file() or p.is_symlink()):
            with _writing(p):
                p.unlink()
            emptied.add(p.parent)
    for d in sorted(emptied, key=lambda d: len(d.parts), reverse=True):
        while d != out and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent


def _run_tasks(todo, args, workers: int, scheduler: str | None, progress: bool):
    """Yield results of build_patient over `todo` (serially, or on a Dask cluster)."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="patients", unit="patient", disable=None if progress else True)
    if not todo:
        bar.close()
        return
    if workers == 0 and scheduler is None:
        try:
            for pf, split in todo:
                yield build_patient(pf, *args[:2], split, args[2])
                bar.update()
        finally:
            bar.close()
        return
    from dask.distributed import Client, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = _local_cluster(min(workers, len(todo)))
        client = Client(cluster)
    drained = None
    try:
        futures = {client.submit(build_patient, pf, args[0], args[1], split, args[2],
                                 key=f"patient-{pf.pid}-{time.time_ns()}", pure=False): pf.pid
                   for pf, split in todo}
        for fut in as_completed(futures):
            try:
                yield fut.result()
            except BuildError:  # the output cannot be written (disk full): stop the whole build
                raise
            except Exception as e:  # a worker died (out of memory, killed): name the patient
                yield {"pid": futures[fut], "error": f"worker failed: {type(e).__name__}: {e}"}
            bar.update()
        # every worker's finished patients on disk, with their done records, before the manifest
        # (a worker that cannot answer: `build` seals its patients itself)
        drained = client.run(drain_seals, str(args[1]), on_error="return")
        _raise_seal_errors([e for errs in drained.values() if isinstance(errs, list) for e in errs])
    finally:
        if drained is None:  # stopped early: the workers' flushes end before the lock is released
            with contextlib.suppress(Exception):
                client.run(drain_seals, str(args[1]), on_error="ignore")
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()


def _local_cluster(n_workers: int):
    """Worker processes, one thread each: one patient in memory per worker at a time.

    Dask starts its workers with MALLOC_TRIM_THRESHOLD_ set, which also turns off glibc's adaptive
    mmap threshold: every large array of every patient then comes from freshly mapped pages (page
    faults and zeroing each time: ~0.05 s of a patient's ~0.45 s here). These workers hold one
    patient at a time and free it, so they start without it; a value set in the environment is
    still passed on, as Dask does."""
    import dask
    from dask.distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, memory_limit="6GiB",
                            dashboard_address=None)


def _val_fallback(done: dict, cfg: BuildConfig) -> str | None:
    """The patient to move to val when every val patient failed: `assign_splits`' tiny-set rule
    applied to the patients that succeeded (val_fraction > 0, no successful val patient, at least
    two successes: the lowest split score moves). Deterministic: it depends on which patients
    succeeded only, so a resumed build ends where a fresh one does."""
    if cfg.val_fraction <= 0 or len(done) < 2 or any(r["split"] == "val" for r in done.values()):
        return None
    return min(sorted(done), key=lambda p: split_score(p, cfg.split_seed))


def set_channels(disc, cfg: BuildConfig) -> dict:
    """The set's image and mask channels, for the manifest's config: written only where they differ
    from the 2018-2023 glioma sets' (4 modalities; [NCR/NET, ED, ET] or [WT, TC, ET]), so those
    sets keep their bytes; `shards.manifest.set_channels` reads both."""
    rel = disc.patients[0].release
    mods, chans = list(rel.modalities), list(rel.channels(cfg.preprocess.mask))
    if mods == list(MODALITIES) and chans == list(MASK_CHANNELS[cfg.preprocess.mask]):
        return {}
    return {"modalities": mods, "mask_channels": chans}


def build(input_dir: str | Path, output_dir: str | Path, cfg: BuildConfig, workers: int | None = None,
          scheduler: str | None = None, progress: bool = True, release: str | None = None) -> BuildResult:
    """Build (or complete) a shard set; returns a BuildResult (the manifest and this run's figures).
    Raises BuildError if it cannot start or cannot write; a patient whose input is bad is recorded
    in `failed`.

    When the val patients all fail, the val split would be empty: then (see `_val_fallback`) the
    successful patient with the lowest split score is rebuilt into val (its files move to the val
    names, e.g. `wds/val-{pid}.tar`)."""
    from preprocess.discover import DiscoveryError

    from preprocess import kernel

    try:  # a bad BRATS_SHARDS_KERNEL (or patient limit) is one refusal, not every patient failing
        kernel.which()
        nifti.max_patient_bytes()
    except (ValueError, RuntimeError) as e:
        raise BuildError(str(e)) from None
    in_root, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    try:
        disc = discover(in_root, release=release)
    except DiscoveryError as e:
        raise BuildError(str(e)) from None
    _check_output(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create output folder {out}: {e.strerror or e}") from None
    _refuse_links(out)
    workers = os.cpu_count() if workers is None else workers
    config = dict(cfg.to_dict(), convention=disc.convention, **set_channels(disc, cfg))
    with OutputLock(out):
        previous, owned = _previous_records(out, config)
        with _writing(out / ".build" / "config.json"):
            write_json(out / ".build" / "config.json", config)
        splits = assign_splits([p.pid for p in disc.patients], cfg.val_fraction, cfg.split_seed)
        done, todo = {}, []
        reusable = {pf.pid: previous[pf.pid] for pf in disc.patients if pf.pid in previous and not pf.problem
                    and _valid_done(out, previous[pf.pid], splits[pf.pid], cfg)}
        changed = _changed_sources(in_root, disc.patients, reusable)  # never "already done" on old input
        for pf in disc.patients:
            rec = previous.get(pf.pid)
            if pf.pid in reusable and pf.pid not in changed:
                done[pf.pid] = rec
            else:  # its done record, if any, no longer describes what will be on disk
                todo.append((pf, splits[pf.pid]))
                if rec:
                    with _writing(_done_path(out, pf.pid)):
                        _done_path(out, pf.pid).unlink(missing_ok=True)
        group_files = []
        if "zarr" in cfg.formats:
            with _writing(out / layout.ZARR_ROOT):
                group_files = zarr_io.write_group_meta(out, sorted(set(splits.values())))
        failed, built, timings = {}, set(), []

        def record(res):
            if "error" in res:
                failed[res["pid"]] = res["error"]
                done.pop(res["pid"], None)
                return
            timings.append((res.pop("seconds"), res.pop("peak_rss_mb")))
            done[res["pid"]] = res
            built.add(res["pid"])
            owned.update(_file_paths(res))  # ours even if a later rebuild moves the patient

        try:
            for res in _run_tasks(todo, (str(in_root), str(out), cfg), workers, scheduler, progress):
                record(res)
            if (pid := _val_fallback(done, cfg)) is not None:
                pf = next(p for p in disc.patients if p.pid == pid)
                record(build_patient(pf, str(in_root), str(out), "val", cfg))
        finally:  # this process's flushes end inside the lock, whatever happened
            errors = drain_seals(str(out))
        _raise_seal_errors(errors)
        for pid in sorted(built & set(done)):  # a worker that died after returning a patient
            if not _done_path(out, pid).is_file():
                _seal([out / f["path"] for f in done[pid]["files"]], _done_path(out, pid), done[pid])
        manifest = _manifest(out, disc, config, done, failed, group_files)
        _check_own_manifest(manifest, out)  # before the sweep: it deletes what the manifest omits
        _refuse_links(out)
        _sweep(out, {f["path"] for f in manifest["files"]}, owned, set(splits) | set(previous))
        with _writing(out / MANIFEST):
            write_json(out / MANIFEST, manifest)
        shutil.rmtree(out / ".build", ignore_errors=True)
    return BuildResult(manifest, built=len(built & set(done)), reused=len(set(done) - built),
                       task_seconds=[t for t, _ in timings], peak_rss_mb=[m for _, m in timings],
                       changed=sorted(changed))


def _check_own_manifest(manifest: dict, out: Path) -> None:
    """Refuse to publish a manifest readers would refuse: records carried over from `.build/done`
    or an earlier manifest are data on disk, so they go through the same validation."""
    try:
        parse_manifest(dumps(manifest), str(out / MANIFEST))
    except ManifestError as e:
        raise BuildError(f"{e} (from an earlier, damaged build record: build into a new folder)") from None


def _manifest(out: Path, disc, config: dict, done: dict, failed: dict, group_files) -> dict:
    files = [f for pid in sorted(done) for f in done[pid]["files"]]
    for p in group_files:
        files.append({"path": p.relative_to(out).as_posix(), "bytes": p.stat().st_size,
                      "sha256": sha256_file(p), "patient": None, "split": None, "format": "zarr"})
    patients = {}
    for pid in sorted(done):
        rec = {k: v for k, v in done[pid].items() if k not in ("files", "pid", "stamps")}
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
