"""One training run per run folder at a time: `train` holds an exclusive lock on OUT itself.

Two runs started together into one --out would both write checkpoints/last.pt and metrics.csv,
and one of them would be lost without a word. The lock is `flock` on the folder's own file
descriptor, so it writes nothing into OUT (a refused run leaves OUT as it found it, not even a
lock file) and the kernel releases it when the process dies, however it dies: a killed run never
blocks the next one. DataLoader workers forked while it is held share it and exit with the run.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from shards.errors import BratsShardsError


class RunLockError(BratsShardsError):
    """Another process trains into this run folder: the message names the folder."""


class RunLock:
    """`with RunLock(out):` the run folder OUT (created if missing) is this process's until the
    block ends. A second holder is refused at once, not queued: a run waiting silently for
    another to finish is not what the user who started it expects."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.fd: int | None = None
        self.created: list[Path] = []  # the folders this lock made, deepest first

    def __enter__(self) -> "RunLock":
        folder = self.out
        while not folder.exists() and folder != folder.parent:
            self.created.append(folder)
            folder = folder.parent
        self.out.mkdir(parents=True, exist_ok=True)
        # O_DIRECTORY: OUT planted as a link to a file or a FIFO is refused, never opened for reading
        self.fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise RunLockError(f"--out {self.out}: another train run is writing to this folder; wait for it "
                               f"to end or choose another --out") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        for folder in self.created:  # a run refused before writing anything leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there
                break
