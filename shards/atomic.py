"""Atomic file writes, hashing, and bounded reads of untrusted files: nothing half-written is
ever under a final name, and nothing is read from a FIFO, a device or past a stated size."""

from __future__ import annotations

import hashlib
import json
import os
import stat
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
    """At most `limit` bytes from an open file, then closes it; None when it holds more."""
    with open(fd, "rb") as f:
        data = f.read(limit + 1)
    return None if len(data) > limit else data


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dumps(obj) -> bytes:
    """Canonical JSON: sorted keys, fixed separators, so equal content gives equal bytes."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


def write_json(path: Path, obj) -> None:
    write_bytes(path, dumps(obj))


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
