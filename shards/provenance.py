"""Do a shard set's source files still hold what it was built from?

The manifest records, per patient, each source file's path (relative to the input folder), its
size and its sha256 (`patients[pid].sources`). Two users of that record:
  * a re-run of the build, which must rebuild a patient whose input changed instead of calling it
    done (`source_problems`, with the size and mtime a done record kept as a shortcut: equal size
    and mtime are trusted, anything else is re-hashed);
  * `verify --sources INPUT`, which re-hashes every source and names each that no longer matches
    (`verify_sources`).

Size and mtime are never written into the manifest: it must stay byte-identical on any machine,
and a copy of a release has other mtimes. A finished set therefore re-hashes its sources on a
re-run (sha256 reads at disk speed; the inflate a rebuild costs is several times that).

Source paths come from a manifest, which may be someone else's: a path that is absolute or climbs
out of the input folder is reported, never opened; only regular files are read, and never more
bytes than the manifest records.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from shards.atomic import NotRegularFile, open_regular

_MAX_PATH = 1024


def stamp(path: str | os.PathLike) -> list[int] | None:
    """[size, mtime in ns] of a file (after symlinks), None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _inside(root: Path, rel) -> Path | None:
    """`root/rel` when `rel` is a relative path that stays inside `root` (lexically), else None."""
    if not isinstance(rel, str) or not rel or len(rel) > _MAX_PATH or "\0" in rel or "\\" in rel:
        return None
    if rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
        return None
    return root / rel


def _hash_problem(fd: int, size: int, want: str) -> str | None:
    h = hashlib.sha256()
    with open(fd, "rb") as f:  # never more than the recorded size (+1 tells a file that grew)
        left = size + 1
        while left > 0 and (chunk := f.read(min(left, 1 << 20))):
            h.update(chunk)
            left -= len(chunk)
    if left <= 0:
        return "grew while being read"
    return None if h.hexdigest() == want else "its sha256 differs from the one recorded (content changed)"


def source_problem(root: Path, entry, known: list | None = None) -> str | None:
    """Why the source file `entry` ({path, bytes, sha256}) no longer matches under `root` (None: it
    matches). `known`: the [size, mtime_ns] seen when it was last read; equal means unchanged."""
    if not isinstance(entry, dict):
        return "its record is not an object"
    if not isinstance(entry.get("path"), str):
        return "its record names no path"
    path = _inside(root, entry.get("path"))
    if path is None:
        return "is absolute or leads outside the input folder: not read"
    size, digest = entry.get("bytes"), entry.get("sha256")
    if type(size) is not int or not isinstance(digest, str):
        return "its record has no size and sha256 to compare with"
    try:
        fd, st = open_regular(path)
    except FileNotFoundError:
        return "missing"
    except NotRegularFile as e:
        return str(e.strerror)
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if st.st_size != size:
        os.close(fd)
        return f"is {st.st_size} bytes, {size} recorded (content changed)"
    if known is not None and list(known) == [st.st_size, st.st_mtime_ns]:
        os.close(fd)
        return None
    return _hash_problem(fd, size, digest)


def source_paths(sources) -> set:
    """The paths of a patient's per-file source entries (see `_checkable`)."""
    return {e.get("path") for e in _checkable(sources).values() if isinstance(e, dict)}


def _checkable(sources) -> dict:
    """The per-file source entries (an HDF5 slice folder, recorded as one combined digest of many
    files, is left out: its files are not named one by one). Entries that are not objects are kept,
    to be reported."""
    if not isinstance(sources, dict):
        return {}
    return {str(k): e for k, e in sources.items() if not (isinstance(e, dict) and "files" in e)}


def source_problems(root: Path, sources, stamps=None) -> list[str]:
    """'{file}: {why}' for each of a patient's source files that no longer matches its record (a
    record that is not an object of records is itself a problem: never read as 'nothing to check')."""
    if sources is not None and not isinstance(sources, dict):
        return ["sources: the record is not an object of per-file records"]
    stamps = stamps if isinstance(stamps, dict) else {}
    out = []
    for key, entry in sorted(_checkable(sources).items()):
        rel = entry.get("path") if isinstance(entry, dict) else None
        why = source_problem(root, entry, stamps.get(rel) if isinstance(rel, str) else None)
        if why is not None:
            out.append(f"{str(rel if isinstance(rel, str) else key)[:120]}: {why}")
    return out


def changed_patients(root: Path, records: dict, threads: int | None = None) -> dict[str, list[str]]:
    """{pid: problems} of the records ({pid: {sources, stamps?}}) whose sources changed, hashing
    several patients at once (sha256 releases the GIL)."""
    threads = threads or min(8, os.cpu_count() or 1)
    pids = sorted(records)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        found = pool.map(lambda p: source_problems(root, records[p].get("sources"), records[p].get("stamps")), pids)
        return {p: probs for p, probs in zip(pids, found) if probs}
