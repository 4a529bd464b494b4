"""What keeps a build safe to kill and to re-run: the output lock, the deferred fsyncs that
write a patient's done record only once its files are on disk, and the rules of what a build
may touch in its output folder (links refused, foreign folders refused, only its own files swept).

Waiting for the disk inside a task (an fsync of ~35 MB per patient: ~65 ms here) would stall the
worker; instead each process fsyncs its finished patients' files on one background thread, in
order, and writes each patient's done record only after its files are on disk. A re-run therefore
never trusts a patient whose files a power loss could have emptied. Before the manifest, the driver
waits for the deferred fsyncs of its output folder in every process (`drain_deferred_fsyncs`), then
fsyncs itself any patient of this run whose done record is still missing (its worker died after
returning it).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from preprocess.build.config import BuildError, writing
from shards import MANIFEST, layout
from shards.atomic import TMP_NAME, fsync_file, write_json
from shards.names import relpath_problem

SPLITS = layout.SPLITS


class DeferredFsyncs:
    """This process's pending fsyncs (each followed by its done record), per output folder: a
    build drains only its own."""

    def __init__(self):
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child has no fsync thread

    def _reset(self):
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.pending: dict[str, list] = {}

    def add(self, out: Path, files: list[Path], done_path: Path, record: dict) -> None:
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="fsync")
            self.pending.setdefault(str(out), []).append(self.pool.submit(fsync_then_record, files, done_path, record))

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


DEFERRED_FSYNCS = DeferredFsyncs()


def fsync_then_record(files: list[Path], done_path: Path, record: dict) -> None:
    """Flush `files` to disk, then write the done record that says they are complete."""
    for p in files:
        with writing(p):
            fsync_file(p)
    with writing(done_path):
        write_json(done_path, record)


def drain_deferred_fsyncs(out: str) -> list[str]:
    """Wait for this process's pending fsyncs of output folder `out`; returns the one-line
    reasons of those that failed (run on every Dask worker by the driver)."""
    return DEFERRED_FSYNCS.drain(str(out))


def raise_fsync_errors(errors: list[str]) -> None:
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise BuildError(errors[0] + more)


def done_path(out: Path, pid: str) -> Path:
    return out / ".build" / "done" / f"{pid}.json"


class OutputLock:
    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        with writing(self.path):  # a read-only output folder fails here, first
            # O_NOFOLLOW: a `.lock` planted as a link never truncates the file it points to
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise BuildError(f"another build is writing to {self.path.parent} (lock {self.path} is held)") from None
        try:
            with writing(self.path):
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


def refuse_link_on_the_way(out: Path, rel: str) -> None:
    """Refuse to write `out/rel` when a folder on the way to it (or it) is a symbolic link."""
    if link := layout.symlink_on_the_way(out, rel):
        raise BuildError(f"{out / link} is a symbolic link (planted during the build): a build writes only inside "
                         f"its output folder and never follows a link there; remove the link and re-run")


# what a build writes or deletes in its output folder (anything else there is the user's)
_MANAGED = (".lock", ".build", MANIFEST, layout.ZARR_ROOT, layout.WDS_ROOT)


def refuse_links(out: Path) -> None:
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


def deletable(rel) -> bool:
    """A relative path a build may delete (if it wrote it): safe, under zarr/ or wds/."""
    return relpath_problem(rel) is None and rel.split("/")[0] in layout.LAYOUTS


def file_paths(rec: dict) -> set[str]:
    """The paths a done record (or a manifest) lists that could be ours to delete."""
    paths = {f.get("path") for f in rec.get("files", []) if isinstance(f, dict)}
    return {p for p in paths if deletable(p)}


def check_output(out: Path) -> None:
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
    where += [(out / layout.WDS_ROOT / p, our_tar) for p in layout.PLANES[1:]]  # further planes' tars
    where += [(out / layout.zarr_split(s), pids.__contains__) for s in SPLITS]
    for folder, is_ours in where:
        if folder.is_dir() and not folder.is_symlink():
            for p in sorted(folder.iterdir()):
                m = TMP_NAME.match(p.name)
                if m and is_ours(m["name"]):
                    yield p


def sweep(out: Path, keep: set[str], owned: set[str], pids: set[str]) -> None:
    """Remove temporaries and files we wrote that the new manifest does not list (leftovers of a
    crash, of a patient that now fails or moved split), then folders that leaves empty."""
    emptied = set()
    for p in _our_temporaries(out, pids):
        with writing(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    for rel in sorted(owned - keep):
        p = out / rel
        if deletable(rel) and (p.is_file() or p.is_symlink()):
            with writing(p):
                p.unlink()
            emptied.add(p.parent)
    for d in sorted(emptied, key=lambda d: len(d.parts), reverse=True):
        while d != out and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent
