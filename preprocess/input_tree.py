"""Walking an input folder that may be careless or hostile: no recursion, bounded in depth and in
size, each real folder once. Used by `preprocess.discover`, which re-exports `DiscoveryError`."""

from __future__ import annotations

import os
from pathlib import Path

from shards.errors import BratsShardsError


class DiscoveryError(BratsShardsError, ValueError):
    """The input folder as a whole cannot be used (empty, mixed conventions, a loop, too deep)."""


MAX_DEPTH = 100  # folder levels below the input; real releases nest patients 1-3 deep
MAX_FOLDERS = 200_000  # folders one input may hold (a link to / would otherwise walk the whole disk)


def _shown(root: Path, path: str) -> str:
    """A path below `root` short enough for an error line (a deep one as its ends)."""
    parts = Path(path).relative_to(root).parts
    return str(root / Path(*parts)) if len(parts) <= 6 else f"{root / Path(*parts[:3])}/.../{Path(*parts[-2:])}"


def walk(root: Path):
    """(folder, file names) of every folder below `root`, following symlinked folders (patient
    folders may be links). An explicit stack, not os.walk, which recurses on Python 3.11: a tree
    deeper than the recursion limit raised RecursionError. Refused with a DiscoveryError, named:
    a folder that cannot be listed; a tree deeper than MAX_DEPTH; a symlink to one of its own
    ancestors (a loop); a folder reached twice through links (links to links can make 2**N paths
    with no loop; and a patient read twice is two patients of one scan)."""
    def refuse(msg: str):
        raise DiscoveryError(msg)

    seen: dict[str, str] = {}  # real folder -> the path it was first reached by
    seen[os.path.realpath(root)] = str(root)
    stack = [(str(root), (os.path.realpath(root),))]  # (path, real paths of it and its ancestors)
    while stack:
        path, chain = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            refuse(f"cannot list {_shown(root, path)}: {e.strerror}")
        folders = [e for e in entries if _is_dir(e)]
        yield path, [e.name for e in entries if not _is_dir(e)]
        if folders and len(chain) > MAX_DEPTH:
            refuse(f"folders nested deeper than {MAX_DEPTH} levels in the input, at {_shown(root, folders[0].path)}; "
                   f"give the folder that holds the patient folders as the input")
        for e in reversed(folders):
            real = os.path.realpath(e.path)
            if e.is_symlink() and real in chain:
                refuse(f"symlink loop in the input: {e.path} points to {real}, a folder that contains it; "
                       f"remove the link")
            if real in seen:
                refuse(f"{_shown(root, e.path)} and {_shown(root, seen[real])} are the same folder {real} (through a "
                       f"symbolic link); an input must hold each folder once: remove the link")
            seen[real] = e.path
            if len(seen) > MAX_FOLDERS:
                refuse(f"more than {MAX_FOLDERS} folders under {root} (a link to a large tree?); "
                       f"give the folder that holds the patient folders as the input")
            stack.append((e.path, chain + (real,)))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a link: a symlinked patient folder is a folder
    except OSError:  # a link that cannot be resolved is a file here, unreadable later (named then)
        return False
