"""Reading a shard set's manifest: load (local or remote), validate, verify, summarise.

A manifest may come from a colleague or a URL: it is untrusted data. `parse_manifest` checks
its whole structure before anything else reads it: every relative path stays inside the set,
every patient id is a plain name, every count and size is a bounded integer, every reference
(split -> patient, file -> patient) resolves. Readers then bound each read by what it promises.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST
from shards.atomic import sha256_file
from shards.errors import BratsShardsError
from shards.names import patient_id_problem, relpath_problem

SPLITS = ("train", "val")
LAYOUTS = ("zarr", "wds")
MAX_MANIFEST_BYTES = 256 * 2**20
MAX_SLICES = 100_000  # slices of one patient (BraTS volumes have 155 axial slices)
MAX_FILE_BYTES = 2**36  # one shard file (one patient): 64 GiB
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(BratsShardsError, ValueError):
    pass


def check_format(m: dict, where: str = "") -> dict:
    fmt = m.get("format") if isinstance(m, dict) else None
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT_NAME:
        raise ManifestError(f"{where or 'manifest'} is not a {FORMAT_NAME} manifest")
    if fmt.get("version") != FORMAT_VERSION:
        raise ManifestError(f"{where or 'manifest'} has format version {fmt.get('version')!r}; "
                            f"this version of brats-shards reads version {FORMAT_VERSION} only")
    return m


def _count(v, limit: int) -> bool:
    return type(v) is int and 0 <= v <= limit


def _problems(m: dict):
    """Yield what is wrong with a manifest that passed `check_format` (nothing: it is valid)."""
    layouts = m["format"].get("layouts")
    if not (isinstance(layouts, list) and layouts and set(layouts) <= set(LAYOUTS)):
        yield f"format.layouts {layouts!r} is not a non-empty list of {LAYOUTS}"
        return
    cfg = m.get("config")
    pre = cfg.get("preprocess") if isinstance(cfg, dict) else None
    if not isinstance(pre, dict) or pre.get("mask") not in ("subregions", "regions") \
            or not (type(pre.get("size")) is int and 8 <= pre["size"] <= 1024):
        yield "config.preprocess is missing or has no valid mask/size"
    patients, splits, files, failed = (m.get(k) for k in ("patients", "splits", "files", "failed"))
    if not isinstance(patients, dict) or not isinstance(splits, dict) or not isinstance(files, list) \
            or not isinstance(failed, list):
        yield "patients, splits, files or failed is missing or of the wrong type"
        return
    for pid, p in patients.items():
        if (why := patient_id_problem(pid)) is not None:
            yield why
            return
        if not isinstance(p, dict) or p.get("split") not in SPLITS or not _count(p.get("n_slices"), MAX_SLICES) \
                or not _count(p.get("pixels"), MAX_SLICES * 1024 * 1024):
            yield f"patient {pid}: split, n_slices or pixels missing or out of range"
            return
        mp = p.get("mask_pixels")
        if not (isinstance(mp, list) and 1 <= len(mp) <= 16 and all(_count(c, p["pixels"]) for c in mp)):
            yield f"patient {pid}: mask_pixels is not a list of counts within its pixels"
            return
    for split, pids in splits.items():
        if split not in SPLITS or not isinstance(pids, list) \
                or any(not isinstance(q, str) or patients.get(q, {}).get("split") != split for q in pids):
            yield f"split {split!r} lists patients that are not in `patients` under that split"
            return
    seen = set()
    for f in files:
        yield from _file_problems(f, patients, layouts, seen)
    for f in failed:
        if not (isinstance(f, dict) and isinstance(f.get("patient"), str) and isinstance(f.get("reason"), str)):
            yield "failed holds an entry that is not {patient, reason}"
            return


def _file_problems(f, patients: dict, layouts: list, seen: set):
    if not isinstance(f, dict):
        yield f"files holds a non-object entry {str(f)[:40]!r}"
        return
    path = f.get("path")
    if (why := relpath_problem(path)) is not None:
        yield f"files: {why}"
        return
    if path in seen:
        yield f"files lists {path} twice"
    seen.add(path)
    if f.get("format") not in layouts or not path.startswith(f"{f.get('format')}/"):
        yield f"{path}: format {f.get('format')!r} is not one of the set's layouts, or the path is not under it"
    if not _count(f.get("bytes"), MAX_FILE_BYTES) or not isinstance(f.get("sha256"), str) \
            or not _SHA256.match(f["sha256"]):
        yield f"{path}: bytes or sha256 missing or invalid"
    pid = f.get("patient")
    if pid is not None:
        if pid not in patients:
            yield f"{path}: patient {str(pid)[:40]!r} is not in `patients`"
        elif f["format"] == "zarr" and not path.startswith(f"zarr/{patients[pid]['split']}/{pid}/"):
            yield f"{path}: not under its patient's group zarr/{patients[pid]['split']}/{pid}/"
        elif f["format"] == "wds" and (path.count("/") != 1 or not path.endswith(".tar")):
            yield f"{path}: a WebDataset shard is a .tar file directly under wds/"


def parse_manifest(raw: bytes, where: str) -> dict:
    """Bytes of a manifest.json -> the validated manifest dict; ManifestError naming `where`."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{where} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; refusing it")
    try:
        m = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting or integers
        raise ManifestError(f"{where} is not valid JSON: {str(e)[:120]}") from None
    check_format(m, where)
    for why in _problems(m):
        raise ManifestError(f"{where}: {why}")
    return m


def read_local(path: Path, limit: int) -> bytes:
    """A regular file's bytes, at most `limit` of them (a FIFO, a device or /dev/zero is refused
    before anything is read; a file that grows past `limit` is refused, not buffered)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ManifestError(f"cannot open {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ManifestError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ManifestError(f"{path} is larger than {limit} bytes; refusing it")
    return data


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    try:
        raw = read_local(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ManifestError(f"{path} not found: not a shard set, or its build has not finished") from None
    return parse_manifest(raw, str(path))


def verify(root: str | Path) -> list[str]:
    """Re-hash every file against the manifest and check slice counts; returns the problems."""
    root = Path(root)
    m = load_manifest(root)
    problems = []
    for f in m["files"]:
        p = root / f["path"]
        if not p.is_file():
            problems.append(f"{f['path']}: missing")
        elif p.stat().st_size != f["bytes"]:
            problems.append(f"{f['path']}: {p.stat().st_size} bytes, manifest says {f['bytes']}")
        elif sha256_file(p) != f["sha256"]:
            problems.append(f"{f['path']}: sha256 differs from the manifest")
    if problems:
        return problems
    problems += _check_counts(root, m)
    return problems


def _check_counts(root: Path, m: dict) -> list[str]:
    """Slices in each file agree with the manifest's n_slices."""
    from shards import wds_io

    problems = []
    layouts = m["format"]["layouts"]
    for pid, p in m["patients"].items():
        if "zarr" in layouts:
            import zarr

            g = zarr.open_group(str(root / "zarr" / p["split"] / pid), mode="r")
            for name in ("image", "mask"):
                if g[name].shape[0] != p["n_slices"]:
                    problems.append(f"zarr/{p['split']}/{pid}/{name}: {g[name].shape[0]} slices, manifest says {p['n_slices']}")
    if "wds" in layouts:
        for f in m["files"]:
            if f["format"] != "wds":
                continue
            with open(root / f["path"], "rb") as fh:
                n = sum(1 for _ in wds_io.iter_tar(fh))
            want = m["patients"][f["patient"]]["n_slices"]
            if n != want:
                problems.append(f"{f['path']}: {n} samples, manifest says {want}")
    return problems


def summary(m: dict) -> dict:
    """Patients and slices per split, class balance, bytes on disk, build config."""
    splits = {}
    for s, pids in m["splits"].items():
        pix = sum(m["patients"][p]["pixels"] for p in pids)
        chans = [sum(m["patients"][p]["mask_pixels"][c] for p in pids) for c in range(3)]
        splits[s] = {"patients": len(pids), "slices": sum(m["patients"][p]["n_slices"] for p in pids),
                     "mask_fraction": [c / pix if pix else 0.0 for c in chans]}
    by_format = {}
    for f in m["files"]:
        by_format[f["format"]] = by_format.get(f["format"], 0) + f["bytes"]
    channels = ["NCR/NET", "ED", "ET"] if m["config"]["preprocess"]["mask"] == "subregions" else ["WT", "TC", "ET"]
    return {"format": m["format"], "splits": splits, "mask_channels": channels, "bytes": by_format,
            "failed": m["failed"], "config": m["config"]}


def format_summary(s: dict) -> str:
    lines = [f"shard set format {s['format']['name']} v{s['format']['version']} ({', '.join(s['format']['layouts'])})"]
    for split, d in s["splits"].items():
        frac = ", ".join(f"{c} {100 * v:.3f}%" for c, v in zip(s["mask_channels"], d["mask_fraction"]))
        lines.append(f"  {split:5s}: {d['patients']:5d} patients {d['slices']:7d} slices   mask pixels: {frac}")
    lines.append("  bytes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(s["bytes"].items())))
    c = s["config"]
    lines.append(f"  config: {json.dumps(c['preprocess'], sort_keys=True)} val_fraction={c['val_fraction']} "
                 f"split_seed={c['split_seed']} codec={c['codec']} convention={c['convention']}")
    if s["failed"]:
        lines.append(f"  failed: {len(s['failed'])} patient(s): " + "; ".join(f"{f['patient']}: {f['reason']}" for f in s["failed"]))
    return "\n".join(lines)
