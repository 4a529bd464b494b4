"""The build's driver: discover the input, plan, run one task per patient (serially or on a Dask
cluster), then publish: the manifest assembled (shards/manifest.py) and written last, after the
files it lists are on disk and what it no longer lists is swept."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from preprocess import kernel, nifti
from preprocess.build.config import BuildConfig, BuildError, BuildResult, writing
from preprocess.build.durable import (OutputLock, check_output, done_path, drain_deferred_fsyncs, file_paths,
                                      fsync_then_record, raise_fsync_errors, refuse_links, sweep)
from preprocess.build.plan import assign_splits, changed_sources, previous_records, val_fallback, valid_done
from preprocess.build.task import build_patient
from preprocess.discover import DiscoveryError, discover
from preprocess.h5slices import NOTE as H5_NOTE
from shards import MANIFEST, layout, zarr_io
from shards.atomic import dumps, write_json
from shards.manifest import (ManifestError, assemble, config_section, file_entry, listed_paths, parse_manifest,
                             source_section)


def build(input_dir: str | Path, output_dir: str | Path, cfg: BuildConfig, workers: int | None = None,
          scheduler: str | None = None, progress: bool = True, release: str | None = None) -> BuildResult:
    """Build (or complete) a shard set; returns a BuildResult (the manifest and this run's figures).
    Raises BuildError if it cannot start or cannot write; a patient whose input is bad is recorded
    in `failed`.

    When the val patients all fail, the val split would be empty: then (see `val_fallback`) the
    successful patient with the lowest split score is rebuilt into val (its files move to the val
    names, e.g. `wds/val-{pid}.tar`)."""
    in_root, out, disc = _start(input_dir, output_dir, release)
    workers = os.cpu_count() if workers is None else workers
    config = config_section(cfg.to_dict(), disc.convention, disc.patients[0].release)
    with OutputLock(out):
        plan = _plan(in_root, out, disc, cfg, config)
        group_files = []
        if "zarr" in cfg.formats:
            with writing(out / layout.ZARR_ROOT):
                group_files = zarr_io.write_group_meta(out, sorted(set(plan["splits"].values())))
        built, failed, timings = _run(plan, disc, in_root, out, cfg, (workers, scheduler, progress))
        done = plan["done"]
        source = source_section(disc.convention, len(disc.patients), disc.kind,
                                H5_NOTE if disc.kind == "h5-slices" else None)
        manifest = assemble(config, source, done, failed,
                            [file_entry(out, p, None, None, "zarr") for p in group_files])
        _publish(out, manifest, plan["owned"], set(plan["splits"]) | set(plan["previous"]))
    return BuildResult(manifest, built=len(built & set(done)), reused=len(set(done) - built),
                       task_seconds=[t for t, _ in timings], peak_rss_mb=[m for _, m in timings],
                       changed=sorted(plan["changed"]))


def _start(input_dir, output_dir, release: str | None):
    """(input root, output folder, discovery): the input read, the output checked and created."""
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
    check_output(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create output folder {out}: {e.strerror or e}") from None
    refuse_links(out)
    return in_root, out, disc


def _plan(in_root: Path, out: Path, disc, cfg: BuildConfig, config: dict) -> dict:
    """Under the lock: the splits, the patients an earlier run finished (`done`, reused as they
    are) and those to build (`todo`), the files earlier runs wrote (`owned`: what may be deleted)."""
    previous, owned = previous_records(out, config)
    with writing(out / ".build" / "config.json"):
        write_json(out / ".build" / "config.json", config)
    splits = assign_splits([p.pid for p in disc.patients], cfg.val_fraction, cfg.split_seed)
    done, todo = {}, []
    reusable = {pf.pid: previous[pf.pid] for pf in disc.patients if pf.pid in previous and not pf.problem
                and valid_done(out, previous[pf.pid], splits[pf.pid], cfg)}
    changed = changed_sources(in_root, disc.patients, reusable)  # never "already done" on old input
    for pf in disc.patients:
        rec = previous.get(pf.pid)
        if pf.pid in reusable and pf.pid not in changed:
            done[pf.pid] = rec
        else:  # its done record, if any, no longer describes what will be on disk
            todo.append((pf, splits[pf.pid]))
            if rec:
                with writing(done_path(out, pf.pid)):
                    done_path(out, pf.pid).unlink(missing_ok=True)
    return {"previous": previous, "owned": owned, "splits": splits, "done": done, "todo": todo, "changed": changed}


def _run(plan: dict, disc, in_root: Path, out: Path, cfg: BuildConfig, how: tuple) -> tuple[set, dict, list]:
    """Build the plan's `todo` (and the val fallback), recording each result into its `done`;
    returns (patients built, failed pid -> reason, per-patient (seconds, peak RSS)). Every
    patient built is on disk with its done record when this returns."""
    done, owned = plan["done"], plan["owned"]
    failed, built, timings = {}, set(), []

    def record(res):
        if "error" in res:
            failed[res["pid"]] = res["error"]
            done.pop(res["pid"], None)
            return
        timings.append((res.pop("seconds"), res.pop("peak_rss_mb")))
        done[res["pid"]] = res
        built.add(res["pid"])
        owned.update(file_paths(res))  # ours even if a later rebuild moves the patient

    try:
        for res in run_tasks(plan["todo"], (str(in_root), str(out), cfg), *how):
            record(res)
        if (pid := val_fallback(done, cfg)) is not None:
            pf = next(p for p in disc.patients if p.pid == pid)
            record(build_patient(pf, str(in_root), str(out), "val", cfg))
    finally:  # this process's deferred fsyncs end inside the lock, whatever happened
        errors = drain_deferred_fsyncs(str(out))
    raise_fsync_errors(errors)
    for pid in sorted(built & set(done)):  # a worker that died after returning a patient
        if not done_path(out, pid).is_file():
            fsync_then_record([out / f["path"] for f in done[pid]["files"]], done_path(out, pid), done[pid])
    return built, failed, timings


def _publish(out: Path, manifest: dict, owned: set, pids: set) -> None:
    """Check the manifest, sweep what it no longer lists, then write it (last) and drop `.build`."""
    check_own_manifest(manifest, out)  # before the sweep: it deletes what the manifest omits
    refuse_links(out)
    sweep(out, listed_paths(manifest), owned, pids)
    with writing(out / MANIFEST):
        write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / ".build", ignore_errors=True)


def check_own_manifest(manifest: dict, out: Path) -> None:
    """Refuse to publish a manifest readers would refuse: records carried over from `.build/done`
    or an earlier manifest are data on disk, so they go through the same validation."""
    try:
        parse_manifest(dumps(manifest), str(out / MANIFEST))
    except ManifestError as e:
        raise BuildError(f"{e} (from an earlier, damaged build record: build into a new folder)") from None


def run_tasks(todo, args, workers: int, scheduler: str | None, progress: bool):
    """Yield results of build_patient over `todo` (serially, or on a Dask cluster)."""
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
        # (a worker that cannot answer: `build` fsyncs its patients itself)
        drained = client.run(drain_deferred_fsyncs, str(args[1]), on_error="return")
        raise_fsync_errors([e for errs in drained.values() if isinstance(errs, list) for e in errs])
    finally:
        if drained is None:  # stopped early: the workers' fsyncs end before the lock is released
            with contextlib.suppress(Exception):
                client.run(drain_deferred_fsyncs, str(args[1]), on_error="ignore")
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
