"""Atomic file writes, hashing, and bounded reads of untrusted files: nothing half-written is
ever under a final name, and nothing is read from a FIFO, a device or past a stated size.

Every atomic file write of the project goes through `atomic_path`: the content is written under
`tmp_name(path)` (`.{name}.{pid}.tmp`, in the same folder, so the rename never crosses a file
system), flushed to disk, then renamed over `path`. The build's shard files are the exception:
written with `sync=False` (and Zarr groups renamed as folders), they are flushed on a background
thread before their patient is recorded as finished (the deferred fsyncs of
`preprocess/build/durable.py`). `TMP_NAME` matches those names, so a build can sweep exactly the
leftovers of its own interrupted writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFDIR: "a folder", stat.S_IFSOCK: "a socket"}


class NotRegularFile(OSError):
    """The path is a FIFO, a device, a folder or a socket: never read (its .strerror says which)."""


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """Open `path` for reading if it is a regular file (after symlinks): (fd, its stat).
    O_NONBLOCK so that opening a FIFO returns at once, to be refused, instead of waiting for a
    writer. Raises FileNotFoundError, NotRegularFile or another OSError; the caller names it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a file")
        raise NotRegularFile(0, f"is {kind}, not a regular file", str(path))
    return fd, st


def read_bounded(fd: int, limit: int) -> bytes | None:
    """At most `limit` bytes from an open file, then closes it; None when it holds more. Read in
    chunks: `read(limit + 1)` would allocate the whole limit up front, even for a small file."""
    chunks, got = [], 0
    with open(fd, "rb") as f:
        while got <= limit and (chunk := f.read(min(1 << 24, limit + 1 - got))):
            chunks.append(chunk)
            got += len(chunk)
    return None if got > limit else b"".join(chunks)


TMP_NAME = re.compile(r"^\.(?P<name>.+)\.\d+\.tmp(\.[A-Za-z0-9]+)*$")  # what tmp_name gives


def tmp_name(path: Path, suffix: str = "") -> Path:
    """The temporary name of `path` while this process writes it: `.{name}.{pid}.tmp{suffix}`
    (`suffix` for writers that pick the format by extension, e.g. `.nii.gz`)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk (for writers that renamed it into place unsynced)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", sync: bool = True) -> Iterator[Path]:
    """Yield the temporary file path to write `path`'s content to; when the block ends normally
    it is flushed to disk and renamed over `path` (its folder is created first). If the block
    raises, the temporary file is removed and `path` is left as it was.

    `sync=False` renames without waiting for the disk: still never half-written under its final
    name if the process dies, but after a power loss it may be; the caller then owns durability
    (the build flushes such files with `fsync_file` before recording them as finished)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path, suffix)
    try:
        yield tmp
        if sync:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(path: str | os.PathLike, data, sync: bool = True) -> None:
    """`data` (bytes or any buffer) as the whole content of `path`, atomically (`sync`: see
    `atomic_path`)."""
    with atomic_path(path, sync=sync) as tmp, open(tmp, "wb") as f:
        f.write(data)


def dumps(obj) -> bytes:
    """Canonical JSON: sorted keys, fixed separators, so equal content gives equal bytes."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


def write_json(path: str | os.PathLike, obj) -> None:
    write_bytes(path, dumps(obj))


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
