"""Walking a folder tree that may be deep: `os.walk` recurses on Python 3.11, so a tree more
than ~1,000 levels deep (planted in a shard set or an output folder) raises RecursionError. This
walk keeps its own stack. Like `os.walk(top)`: top-down, symbolic links listed (a link to a folder
among the folders) but never followed, and a caller may prune by removing names from `dirnames`;
folders that cannot be listed are skipped."""

from __future__ import annotations

import os
from collections.abc import Iterator


def walk(top: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    stack = [os.fspath(top)]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = list(it)
        except OSError:
            continue
        dirnames, filenames, links = [], [], set()
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            (dirnames if is_dir else filenames).append(e.name)
            if e.is_symlink():
                links.add(e.name)
        yield here, dirnames, filenames
        stack.extend(os.path.join(here, d) for d in reversed(dirnames) if d not in links)
