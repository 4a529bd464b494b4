"""Planning a build: which split each patient goes to, where its files go, and which patients an
earlier run into the same folder already finished (their done records, checked against the
files on disk and against the input, which may have changed since)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from preprocess.build.config import BuildConfig, BuildError
from preprocess.build.durable import file_paths
from preprocess.discover import PatientFiles
from shards import MANIFEST, layout, provenance
from shards.manifest import ManifestError, load_manifest, records_of
from shards.names import patient_id_problem


def split_score(pid: str, seed: int) -> float:
    """A patient's fixed point in [0, 1): depends on its id and the seed only."""
    h = hashlib.sha256(f"{seed}:{pid}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def assign_splits(pids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Patient-level split. A patient's split depends only on (id, seed, fraction), so adding
    patients never moves existing ones. Exception, for tiny sets: if the rule gives no val
    patient while val_fraction > 0 and there are >= 2 patients, the lowest-scoring one is val.
    `build` applies the same exception again after the run, to the patients that succeeded
    (see `val_fallback`)."""
    scores = {p: split_score(p, seed) for p in pids}
    split = {p: "val" if s < val_fraction else "train" for p, s in scores.items()}
    if val_fraction > 0 and len(pids) >= 2 and "val" not in split.values():
        split[min(pids, key=scores.get)] = "val"
    return split


def val_fallback(done: dict, cfg: BuildConfig) -> str | None:
    """The patient to move to val when every val patient failed: `assign_splits`' tiny-set rule
    applied to the patients that succeeded (val_fraction > 0, no successful val patient, at least
    two successes: the lowest split score moves). Deterministic: it depends on which patients
    succeeded only, so a resumed build ends where a fresh one does."""
    if cfg.val_fraction <= 0 or len(done) < 2 or any(r["split"] == "val" for r in done.values()):
        return None
    return min(sorted(done), key=lambda p: split_score(p, cfg.split_seed))


def plan_paths(pid: str, split: str, planes: tuple[str, ...] = ("axial",)) -> dict[str, list[str]]:
    """Where a patient's files go: its zarr group (every plane inside it) and one tar per plane,
    named from its id and split only, so adding or removing other patients never moves them (a
    re-run builds only new patients and drops only removed ones)."""
    return {"zarr": [layout.zarr_group(split, pid)], "wds": [layout.wds_tar(split, pid, p) for p in planes]}


def valid_done(out: Path, rec: dict, split: str, cfg: BuildConfig) -> bool:
    """A finished patient counts only if its files sit where this plan puts them, complete, for
    every plane of this build."""
    want = plan_paths(rec["pid"], split, cfg.planes)
    if rec.get("split") != split or sorted(rec.get("planes", {})) != sorted(cfg.planes[1:]):
        return False
    for f in rec["files"]:
        p = out / f["path"]
        if not (p.is_file() and p.stat().st_size == f["bytes"]):
            return False
        if not (f["path"].startswith(want["zarr"][0] + "/") or f["path"] in want["wds"]):
            return False
    tars = [f["path"] for f in rec["files"] if f["format"] == "wds"]
    return {f["format"] for f in rec["files"]} == set(cfg.formats) and sorted(tars) == sorted(
        want["wds"] if "wds" in cfg.formats else [])


def _load_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise BuildError(f"cannot read {path}: {str(e)[:120]}; build into a new folder") from None


def previous_records(out: Path, config: dict) -> tuple[dict[str, dict], set[str]]:
    """Done records from an interrupted build or a finished manifest with the same config, and
    every file path those name (what earlier runs wrote, so what this run may delete)."""

    records, owned = {}, set()
    if (out / MANIFEST).exists():
        try:
            m = load_manifest(out)  # validated: paths stay inside the set, ids are plain names
        except ManifestError as e:
            raise BuildError(f"{e}; build into a new folder") from None
        if m.get("config") != config:
            raise BuildError(f"{out} holds a shard set built with another config; build into a new folder")
        owned |= file_paths(m)
        records.update(records_of(m))
    build = out / ".build"
    if (build / "config.json").exists():
        if _load_json(build / "config.json") != config:
            raise BuildError(f"{out} holds an unfinished build with another config; "
                             f"re-run with the same options or build into a new folder")
        for p in sorted((build / "done").glob("*.json")):
            rec = _load_json(p)
            if not (isinstance(rec, dict) and patient_id_problem(rec.get("pid")) is None
                    and isinstance(rec.get("files"), list)):
                raise BuildError(f"{p} is not a done record of this build; build into a new folder")
            records[rec["pid"]] = rec
            owned |= file_paths(rec)
    return records, owned


def _relative(path, root: Path) -> str:
    """A source's path as the manifest records it (pipeline.load_patient: relative to the input)."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def source_stamps(pf: PatientFiles, root: Path) -> dict:
    """{source path: [size, mtime_ns]}: kept in the done record only (never in the manifest, which
    must not depend on the machine), so a resumed build trusts an unchanged file without re-hashing."""
    return {_relative(p, root): provenance.stamp(p) for p in pf.files.values()}


def changed_sources(root: Path, patients, reusable: dict) -> dict[str, list[str]]:
    """{pid: why} of the patients whose done records no longer describe their input: other files
    than those it was built from, or a file whose size, then sha256, differs (`shards.provenance`)."""
    moved = {}
    for pf in patients:
        if pf.pid in reusable and not pf.slices:
            now = {_relative(p, root) for p in pf.files.values()}
            if now != provenance.source_paths(reusable[pf.pid].get("sources")):
                moved[pf.pid] = ["its source files are not the ones it was built from"]
    rest = {pid: rec for pid, rec in reusable.items() if pid not in moved}
    return moved | provenance.changed_patients(root, rest)
