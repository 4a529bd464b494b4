"""`verify`: a local shard set checked against its manifest, every byte re-hashed; and with
`--sources`, the input files the manifest records checked against the input folder."""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

from shards import layout
from shards.atomic import sha256_file
from shards.contract import ShardFormatError
from shards.manifest import LAYOUTS, ManifestError, file_plane, load_manifest, plain, plane_entry, read_local, \
    set_planes
from shards.provenance import changed_patients
from shards.tree import walk
from shards.layout import symlink_on_the_way
from shards.wds_io import scan_tar
from shards.zarr_io import read_zarr_patient


def verify(root: str | Path) -> list[str]:
    """Check a local shard set against its manifest; returns the problems (one line each).

    Every listed file: a regular file of the listed size and sha256. Nothing else under zarr/ or
    wds/ (a file dropped into a patient group, a stray tar). Every patient: listed once in its
    split, and its files hold exactly what the contract allows (`_check_counts`). Raises
    ManifestError only when the manifest itself is unusable."""
    root = Path(root)
    m = load_manifest(root)
    problems, bad = [], set()
    for f in m["files"]:
        why = _file_problem(root, f)
        if why is not None:
            problems.append(f"{f['path']}: {why}")
            bad.add(f["path"])
    problems += _unlisted(root, m)
    problems += _check_counts(root, m, bad)
    return problems


def _file_problem(root: Path, f: dict) -> str | None:
    p = root / f["path"]
    if link := symlink_on_the_way(root, f["path"]):
        return f"{link} is a symbolic link: a shard set's files are its own (a link may lead anywhere)"
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size != f["bytes"]:
            return f"{st.st_size} bytes, manifest says {f['bytes']}"
        if sha256_file(p) != f["sha256"]:
            return "sha256 differs from the manifest"
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    return None


_MAX_LISTED = 100


def _unlisted(root: Path, m: dict) -> list[str]:
    """Entries under zarr/ and wds/ that the manifest does not list (readers never look at
    them, but other tools would: a pickle dropped into a patient group, a stray tar)."""
    listed = {f["path"] for f in m["files"]}
    found = []
    for top in LAYOUTS:
        base = root / top
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in walk(base):  # not os.walk: it recurses on deep trees
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for d in list(dirnames):
                if os.path.islink(os.path.join(dirpath, d)):  # never followed: report it
                    found.append(f"{rel_dir}/{d}")
                    dirnames.remove(d)
            found += [f"{rel_dir}/{n}" for n in filenames if f"{rel_dir}/{n}" not in listed]
    found.sort()
    out = [f"{plain(r)}: not listed in the manifest (a shard set holds only the files its manifest lists)"
           for r in found[:_MAX_LISTED]]
    if len(found) > _MAX_LISTED:
        out.append(f"... and {len(found) - _MAX_LISTED} more files not listed in the manifest")
    return out


def _check_counts(root: Path, m: dict, bad: set | frozenset = frozenset()) -> list[str]:
    """Each patient's files hold what the manifest promises and nothing the contract does not
    allow: zarr metadata and chunks that decode to exactly `n_slices` contract slices (the
    metadata is read as JSON and checked before anything is allocated), tars holding exactly the
    contract's members in order. Patients with a file in `bad` (already reported) are skipped."""
    listed = {f["path"]: f for f in m["files"]}

    def read(rel):
        f = listed.get(rel)
        return None if f is None else read_local(root / rel, f["bytes"])

    problems = [f"patient {pid} is listed {k} times in split {split}"
                for split, pids in m["splits"].items() for pid, k in sorted(Counter(pids).items()) if k > 1]
    wds_files, zarr_files = _files_by_patient(m, problems)
    for pid, p in m["patients"].items():
        if pid not in m["splits"].get(p["split"], []):
            problems.append(f"patient {pid} is not listed in split {p['split']}")
        for plane in set_planes(m):
            _check_plane(read, m, pid, plane, (wds_files.get((pid, plane), []), zarr_files.get(pid, [])), bad,
                         problems)
    return problems


def _check_plane(read, m: dict, pid: str, plane: str, files: tuple[list, list], bad, problems: list) -> None:
    """One patient's files of one plane against the manifest (`_check_counts`)."""
    p = plane_entry(m["patients"][pid], plane)
    tars, zarr_files = files
    try:
        if "zarr" in m["format"]["layouts"] and not bad.intersection(zarr_files):
            _check_zarr_patient(read, layout.zarr_plane_group(p["split"], pid, plane), p["n_slices"], problems)
        if "wds" in m["format"]["layouts"]:
            if len(tars) != 1:
                problems.append(f"patient {pid}: {len(tars)} {plane} WebDataset shards in the manifest; one per "
                                f"patient and plane")
            for rel in tars:
                if rel not in bad:
                    scan_tar(read(rel), rel, p["n_slices"], pid, strict=True, copy=False)
    except (ShardFormatError, ManifestError) as e:
        problems.append(str(e))
    except FileNotFoundError as e:
        problems.append(f"{e.filename}: missing")
    except OSError as e:
        problems.append(f"{e.filename or pid}: cannot read: {e.strerror or e}")


def _files_by_patient(m: dict, problems: list) -> tuple[dict, dict]:
    """(patient -> its tars, patient -> its zarr files) of the manifest's file list; a file that
    is not where the layout puts it is a problem."""
    wds_files, zarr_files = {}, {}
    for f in m["files"]:
        if f["format"] == "wds" and f.get("patient") is not None:
            wds_files.setdefault((f["patient"], file_plane(f)), []).append(f["path"])
        elif f["format"] == "zarr":
            pid = f.get("patient")
            if pid is None:
                ok = f["path"] in layout.zarr_group_meta()
            else:
                ok = f["path"] in layout.zarr_patient_files(m["patients"][pid]["split"], pid, file_plane(f))
                zarr_files.setdefault(pid, []).append(f["path"])
            if not ok:
                problems.append(f"{f['path']}: not a file of the zarr layout")
        elif f["format"] == "wds":
            problems.append(f"{f['path']}: a WebDataset shard that names no patient")
    return wds_files, zarr_files


def _check_zarr_patient(read, prefix: str, n: int, problems: list) -> None:
    """A patient's zarr group (of one plane): its group metadata, then both arrays decoded
    (`read_zarr_patient`)."""
    group_meta = f"{prefix}/{layout.ZARR_META}"
    group = read(group_meta)
    if group is None:
        problems.append(f"{group_meta}: missing from the manifest")
    else:
        try:
            g = json.loads(bytes(group))
        except (ValueError, RecursionError):
            g = None
        if not (isinstance(g, dict) and g.get("zarr_format") == 3 and g.get("node_type") == "group"):
            problems.append(f"{group_meta}: not the metadata of a zarr v3 group")
    read_zarr_patient(read, prefix, n_slices=n)


def verify_sources(shards: str | Path, input_dir: str | Path) -> list[str]:
    """'{pid}: {file}: {why}' for each source file named in the set's manifest that no longer
    matches under `input_dir` (missing, other size, other sha256, outside the folder)."""
    m = load_manifest(shards)
    records = {pid: {"sources": p.get("sources")} for pid, p in m["patients"].items()}
    changed = changed_patients(Path(input_dir), records)
    for pid, r in records.items():  # nothing recorded is nothing checked: said, never an OK
        if not r["sources"] and pid not in changed:
            changed[pid] = ["the manifest records no source files for this patient: not checked"]
    return [f"{pid}: {why}" for pid in sorted(changed) for why in changed[pid]]
