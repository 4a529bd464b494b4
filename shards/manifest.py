"""Reading a shard set's manifest: load (local or remote), verify, summarise."""

from __future__ import annotations

import json
from pathlib import Path

from shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST
from shards.atomic import sha256_file


class ManifestError(ValueError):
    pass


def check_format(m: dict, where: str = "") -> dict:
    fmt = m.get("format", {})
    if fmt.get("name") != FORMAT_NAME:
        raise ManifestError(f"{where or 'manifest'} is not a {FORMAT_NAME} manifest")
    if fmt.get("version") != FORMAT_VERSION:
        raise ManifestError(f"{where or 'manifest'} has format version {fmt.get('version')}; "
                            f"this version of brats-shards reads version {FORMAT_VERSION} only")
    return m


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise ManifestError(f"{path} not found: not a shard set, or its build has not finished")
    return check_format(json.loads(path.read_text()), str(path))


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
