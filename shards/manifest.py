"""A shard set's manifest, both sides. Assembled here from what the build hands over: its
`config_section`, its `source_section`, one record per finished patient (`patient_entry` plus the
build's own fields, BUILD_ONLY, among them its `file_entry`s) and the failures (`assemble`); read
back here: load (local or remote), validate, summarise, and the records again (`records_of`) for a
re-run. Verifying the files against it: shards/verify.py.

A manifest may come from a colleague or a URL: it is untrusted data. `parse_manifest` checks
its whole structure before anything else reads it: every relative path stays inside the set,
every patient id is a plain name, every count and size is a bounded integer, every reference
(split -> patient, file -> patient) resolves. Readers then bound each read by what it promises.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST, layout
from shards.atomic import NotRegularFile, open_regular, read_bounded, sha256_file
from shards.domain import MASK_CHANNELS, MODALITIES, Release
from shards.errors import BratsShardsError
from shards import manifest_rules
from shards.manifest_rules import file_plane, set_planes  # noqa: F401 (readers import both from here)

SPLITS, LAYOUTS = layout.SPLITS, layout.LAYOUTS
MAX_MANIFEST_BYTES = 256 * 2**20


class ManifestError(BratsShardsError, ValueError):
    pass


DEFAULT_MODALITIES = manifest_rules.DEFAULT_MODALITIES
DEFAULT_MASK_CHANNELS = {"subregions": ("NCR/NET", "ED", "ET"), "regions": ("WT", "TC", "ET")}


def set_channels(m: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(image modalities, mask channel names) of a shard set: M and K of its (S, M, H, W) images
    and (S, K, H, W) masks."""
    c = m["config"]
    return (tuple(c.get("modalities", DEFAULT_MODALITIES)),
            tuple(c.get("mask_channels", DEFAULT_MASK_CHANNELS[c["preprocess"]["mask"]])))


def _config_channels(rel: Release, mask: str) -> dict:
    """The set's image and mask channels, for the manifest's config: written only where they differ
    from the 2018-2023 glioma sets' (4 modalities; [NCR/NET, ED, ET] or [WT, TC, ET]), so those
    sets keep their bytes; `set_channels` reads both."""
    mods, chans = list(rel.modalities), list(rel.channels(mask))
    if mods == list(MODALITIES) and chans == list(MASK_CHANNELS[mask]):
        return {}
    return {"modalities": mods, "mask_channels": chans}


def config_section(build_config: dict, convention: str, rel: Release) -> dict:
    """The manifest's `config`: the build's config (`BuildConfig.to_dict()`), the input's file
    naming convention, and the release's channels where they differ from the defaults. A re-run
    into the same folder compares it whole: another config is another set."""
    return dict(build_config, convention=convention, **_config_channels(rel, build_config["preprocess"]["mask"]))


def source_section(convention: str, n_found: int, kind: str, note: str | None = None) -> dict:
    """The manifest's `source`: what the build read (patients found, the input's layout kind)."""
    return {"convention": convention, "n_patients_found": n_found, "kind": kind, **({"note": note} if note else {})}


def _slices_entry(slice_index: list[int], mask) -> dict:
    """One plane's slices: count, source indices along the plane's axis, per-channel mask pixel
    counts over `pixels` (from `mask`, (S, K, H, W))."""
    s, k = mask.shape[:2]
    return {"n_slices": len(slice_index), "slice_index": slice_index,
            "mask_pixels": [int(c) for c in mask.reshape(s, k, -1).sum(axis=(0, 2))],
            "pixels": int(s * mask.shape[2] * mask.shape[3])}


def patient_entry(*, split: str, slice_index: list[int], mask, label_voxels, sources, geometry: dict,
                  nonfinite_voxels, notes, planes: dict | None = None) -> dict:
    """A finished patient's entry in `patients`: its split, its axial slices (count and source
    indices), its per-channel mask pixel counts over `pixels`, its per-label voxel counts, its source
    files and their checksums, its geometry and what the build noted; with further `planes` (name ->
    that plane's `PatientSlices`), `planes` holds each one's slices and geometry
    (`manifest_rules.PLANE_FIELDS`)."""
    sl = _slices_entry(slice_index, mask)
    entry = {
        "split": split, "n_slices": sl["n_slices"], "slice_index": slice_index, "label_voxels": label_voxels,
        "mask_pixels": sl["mask_pixels"], "pixels": sl["pixels"],
        "sources": sources, "geometry": geometry, "nonfinite_voxels": nonfinite_voxels, "notes": list(notes),
    }
    if planes:
        entry["planes"] = {p: dict(_slices_entry(ps.slice_index, ps.mask), geometry=ps.geometry.to_dict())
                           for p, ps in planes.items()}
    return entry


def file_entry(out: Path, path: Path, pid: str | None, split: str | None, fmt: str, sha256: str | None = None,
               plane: str = "axial") -> dict:
    """The manifest's entry of one file of the set at `out` (hashed unless `sha256` is given);
    the zarr group metadata shared by all patients has no patient and no split. A further plane's
    file names its plane (an axial file's entry is as it always was)."""
    entry = {"path": path.relative_to(out).as_posix(), "bytes": path.stat().st_size,
             "sha256": sha256 or sha256_file(path), "patient": pid, "split": split, "format": fmt}
    if plane != "axial":
        entry["plane"] = plane
    return entry


def plane_entry(p: dict, plane: str) -> dict:
    """A validated patient entry as its `plane` slices' entry (axial: the entry itself)."""
    if plane == "axial":
        return p
    return {**{k: v for k, v in p.items() if k != "planes"}, **p["planes"][plane]}


def plane_view(m: dict, plane: str) -> dict:
    """A validated manifest as a set of one plane's slices: every patient's entry with that plane's
    slices and geometry (`manifest_rules.PLANE_FIELDS`), `config.preprocess.plane` naming it (what a checkpoint
    records for predict). Axial: the manifest as it is. Unknown or missing planes: ManifestError."""
    if plane == "axial":
        return m
    if plane not in set_planes(m):
        raise ManifestError(f"the shard set holds {', '.join(set_planes(m))} slices, not {plane}: build it with "
                            f"--planes {','.join(q for q in layout.PLANES if q in set_planes(m) or q == plane)}")
    patients = {pid: plane_entry(p, plane) for pid, p in m["patients"].items()}
    config = dict(m["config"], preprocess=dict(m["config"]["preprocess"], plane=plane))
    return dict(m, config=config, patients=patients)


# fields of the build's per-patient records that are the build's own, not the manifest's
BUILD_ONLY = ("files", "pid", "stamps")


def assemble(config: dict, source: dict, records: dict, failed: dict, shared_files: list[dict]) -> dict:
    """The manifest of a build: `records` pid -> the build's record of a finished patient (its
    fields, less BUILD_ONLY, are its manifest entry; its `files` the file entries), `failed`
    pid -> reason, `shared_files` the entries of files of no patient, `source` what was read."""
    files = [f for pid in sorted(records) for f in records[pid]["files"]] + list(shared_files)
    patients = {pid: {k: v for k, v in records[pid].items() if k not in BUILD_ONLY} for pid in sorted(records)}
    return {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION, "layouts": list(config["formats"])},
        "config": config,
        "source": source,
        "patients": patients,
        "splits": {s: [p for p in sorted(records) if records[p]["split"] == s] for s in SPLITS},
        "files": sorted(files, key=lambda f: f["path"]),
        "failed": [{"patient": p, "reason": failed[p]} for p in sorted(failed)],
    }


def records_of(m: dict) -> dict[str, dict]:
    """`assemble` read backwards, for a validated manifest: pid -> the record of a finished patient
    (its entry, with `pid` and its `files`; no `stamps`, which the manifest never holds)."""
    files = {pid: [] for pid in m["patients"]}
    for f in m["files"]:
        if f.get("patient") in files:
            files[f["patient"]].append(f)
    return {pid: dict(p, pid=pid, files=files[pid]) for pid, p in m["patients"].items()}


def listed_paths(m: dict) -> set[str]:
    """The relative paths of every file a manifest lists."""
    return {f["path"] for f in m["files"]}


def check_format(m: dict, where: str = "") -> dict:
    fmt = m.get("format") if isinstance(m, dict) else None
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT_NAME:
        raise ManifestError(f"{where or 'manifest'} is not a {FORMAT_NAME} manifest")
    if fmt.get("version") != FORMAT_VERSION:
        raise ManifestError(f"{where or 'manifest'} has format version {fmt.get('version')!r}; "
                            f"this version of brats-shards reads version {FORMAT_VERSION} only")
    return m


def parse_manifest(raw: bytes, where: str) -> dict:
    """Bytes of a manifest.json -> the validated manifest dict; ManifestError naming `where`."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{where} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; refusing it")
    try:
        m = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting or integers
        raise ManifestError(f"{where} is not valid JSON: {str(e)[:120]}") from None
    check_format(m, where)
    for why in manifest_rules.problems(m):
        raise ManifestError(f"{where}: {why}")
    return m


def read_local(path: Path, limit: int) -> bytes:
    """A regular file's bytes, at most `limit` of them (a FIFO, a device or /dev/zero is refused
    before anything is read; a file that grows past `limit` is refused, not buffered)."""
    try:
        fd, _ = open_regular(path)
    except FileNotFoundError:
        raise
    except OSError as e:  # NotRegularFile included
        raise ManifestError(f"{path} {e.strerror}" if isinstance(e, NotRegularFile)
                            else f"cannot open {path}: {e.strerror}") from None
    data = read_bounded(fd, limit)
    if data is None:
        raise ManifestError(f"{path} is larger than {limit} bytes; refusing it")
    return data


def missing_manifest(path: Path) -> str:
    """The one line for a shard-set folder without manifest.json; for a folder of NIfTI files (a
    release given where a shard set is meant), the command that makes a set of it."""
    why = f"{path} not found: not a shard set, or its build has not finished"
    if _holds_nifti(path.parent):
        why += f"; {path.parent} holds NIfTI files: build a shard set from it first " \
               f"(python cli.py build-shards {path.parent} SHARDS)"
    return why


def _holds_nifti(folder: Path, most: int = 2000) -> bool:
    """Whether `folder` or a folder directly in it holds a .nii/.nii.gz file (at most `most`
    entries looked at; links not followed)."""
    todo, seen = [folder], 0
    for depth in range(2):
        nxt = []
        for d in todo:
            try:
                with os.scandir(d) as it:
                    for e in it:
                        seen += 1
                        if seen > most:
                            return False
                        if e.name.endswith((".nii", ".nii.gz")) and e.is_file(follow_symlinks=False):
                            return True
                        if depth == 0 and e.is_dir(follow_symlinks=False):
                            nxt.append(e.path)
            except OSError:
                continue
        todo = nxt
    return False


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    try:
        raw = read_local(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ManifestError(missing_manifest(path)) from None
    return parse_manifest(raw, str(path))


def summary(m: dict) -> dict:
    """Patients and slices per split, class balance, bytes on disk, build config."""
    n_chan = max((len(p["mask_pixels"]) for p in m["patients"].values()), default=3)
    splits = {}
    for s, pids in m["splits"].items():
        pix = sum(m["patients"][p]["pixels"] for p in pids)
        chans = [sum(m["patients"][p]["mask_pixels"][c] for p in pids if c < len(m["patients"][p]["mask_pixels"]))
                 for c in range(n_chan)]
        splits[s] = {"patients": len(pids), "slices": sum(m["patients"][p]["n_slices"] for p in pids),
                     "mask_fraction": [c / pix if pix else 0.0 for c in chans]}
    by_format = {}
    for f in m["files"]:
        by_format[f["format"]] = by_format.get(f["format"], 0) + f["bytes"]
    channels = list(set_channels(m)[1])
    channels = (channels + [f"channel {c}" for c in range(len(channels), n_chan)])[:n_chan]
    planes = {q: sum(plane_entry(p, q)["n_slices"] for p in m["patients"].values()) for q in set_planes(m)}
    return {"format": m["format"], "splits": splits, "mask_channels": channels, "bytes": by_format,
            "failed": m["failed"], "config": m["config"], "planes": planes}


def plain(v, limit: int = 200) -> str:
    """Text from a manifest, safe for a terminal line: control characters escaped, length bounded."""
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


def format_summary(s: dict) -> str:
    fmt = s["format"]
    lines = [f"shard set format {plain(fmt['name'])} v{plain(fmt['version'])} "
             f"({', '.join(plain(x) for x in fmt['layouts'])})"]
    for split, d in s["splits"].items():
        frac = ", ".join(f"{c} {100 * v:.3f}%" for c, v in zip(s["mask_channels"], d["mask_fraction"]))
        lines.append(f"  {plain(split):5s}: {d['patients']:5d} patients {d['slices']:7d} slices   mask pixels: {frac}")
    if len(s.get("planes", {})) > 1:  # the splits' figures above are the axial slices'
        lines.append("  planes: " + ", ".join(f"{plain(q)} {n} slices" for q, n in s["planes"].items())
                     + " (train --plane NAME)")
    lines.append("  bytes: " + ", ".join(f"{plain(k)} {v / 1e6:.1f} MB" for k, v in sorted(s["bytes"].items())))
    c = s["config"]
    lines.append(f"  config: {plain(c.get('preprocess'), 400)} "
                 + " ".join(f"{k}={plain(c.get(k), 60)}" for k in ("val_fraction", "split_seed", "codec", "convention")))
    if s["failed"]:
        lines.append(f"  failed: {len(s['failed'])} patient(s): "
                     + "; ".join(f"{plain(f['patient'], 80)}: {plain(f['reason'])}" for f in s["failed"]))
    return "\n".join(lines)
