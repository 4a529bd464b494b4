"""The rules a manifest must keep before anything reads it (`problems`: what is wrong, one line
each), and the two accessors of its planes. `shards.manifest.parse_manifest` applies them to every
manifest, local or remote: it is untrusted data."""

from __future__ import annotations

import re

from shards import layout
from shards.names import patient_id_problem, relpath_problem

SPLITS, LAYOUTS = layout.SPLITS, layout.LAYOUTS
MAX_SLICES = 100_000  # slices of one patient (BraTS volumes have 155 axial slices)
MAX_FILE_BYTES = 2**36  # one shard file (one patient): 64 GiB
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# a set without `config.modalities` / `config.mask_channels` is a 2018-2023 glioma set (the build
# writes them only where they differ from these), so older sets read as they always did
DEFAULT_MODALITIES = ("t1", "t1gd", "t2", "flair")
# what a further plane's record in a patient's `planes` holds (the axial ones are the entry's own)
PLANE_FIELDS = ("n_slices", "slice_index", "mask_pixels", "pixels", "geometry")


def set_planes(m: dict) -> tuple[str, ...]:
    """The slicing planes a (validated) shard set holds: axial first."""
    return tuple(m["config"].get("planes", ("axial",)))


def file_plane(f: dict) -> str:
    return f.get("plane", "axial")


def _names_problem(v, allowed: tuple | None, most: int) -> bool:
    return not (isinstance(v, list) and 1 <= len(v) <= most and all(isinstance(x, str) and len(x) <= 40 for x in v)
                and len(set(v)) == len(v) and (allowed is None or all(x in allowed for x in v)))



def _count(v, limit: int) -> bool:
    return type(v) is int and 0 <= v <= limit


def _preprocess_problem(cfg) -> str | None:
    """What is wrong with a manifest's config.preprocess (the fields readers rely on), or None."""
    pre = cfg.get("preprocess") if isinstance(cfg, dict) else None
    if not isinstance(pre, dict) or pre.get("mask") not in ("subregions", "regions") \
            or not (type(pre.get("size")) is int and 8 <= pre["size"] <= 1024):
        return "config.preprocess is missing or has no valid mask/size"
    tff = pre.get("tumour_free_fraction", 1.0)  # training reads it (whom the set thinned)
    if type(tff) not in (int, float) or not 0.0 <= tff <= 1.0:
        return f"config.preprocess.tumour_free_fraction {str(tff)[:40]!r} is not a number in [0, 1]"
    return None


def problems(m: dict):
    """Yield what is wrong with a manifest that passed `check_format` (nothing: it is valid)."""
    layouts = m["format"].get("layouts")
    if not (isinstance(layouts, list) and layouts and all(isinstance(x, str) and x in LAYOUTS for x in layouts)
            and len(set(layouts)) == len(layouts)):
        yield f"format.layouts {layouts!r} is not a non-empty list of {LAYOUTS}"
        return
    cfg = m.get("config")
    if (why := _preprocess_problem(cfg)) is not None:
        yield why
        return
    if "modalities" in cfg and _names_problem(cfg["modalities"], DEFAULT_MODALITIES, 4):
        yield f"config.modalities {str(cfg['modalities'])[:80]!r} is not a list of distinct modalities"
        return
    if "mask_channels" in cfg and _names_problem(cfg["mask_channels"], None, 16):
        yield f"config.mask_channels {str(cfg['mask_channels'])[:80]!r} is not a list of at most 16 names"
        return
    patients, splits, files, failed = (m.get(k) for k in ("patients", "splits", "files", "failed"))
    if not isinstance(patients, dict) or not isinstance(splits, dict) or not isinstance(files, list) \
            or not isinstance(failed, list):
        yield "patients, splits, files or failed is missing or of the wrong type"
        return
    if (why := _planes_problem(cfg)) is not None:
        yield why
        return
    for pid, p in patients.items():
        if (why := patient_id_problem(pid) or _patient_problem(pid, p, set_planes(m)[1:], cfg["preprocess"]["size"])) \
                is not None:
            yield why
            return
    listed = []
    for split, pids in splits.items():
        if split not in SPLITS or not isinstance(pids, list) \
                or any(not isinstance(q, str) or patients.get(q, {}).get("split") != split for q in pids):
            yield f"split {split!r} lists patients that are not in `patients` under that split"
            return
        listed += pids
    if sorted(listed) != sorted(patients):
        yield "splits do not list every patient exactly once"
        return
    seen = set()
    for f in files:
        yield from _file_problems(f, patients, layouts, seen, set_planes(m))
    if "wds" in layouts:  # each patient is exactly one tar per plane: the loader looks it up by patient
        tars = [(str(f.get("patient")), str(f.get("plane", "axial"))) for f in files
                if isinstance(f, dict) and f.get("format") == "wds"]
        if sorted(tars) != sorted((p, q) for p in patients for q in set_planes(m)):
            yield "the WebDataset files are not exactly one tar per patient and plane"
    for f in failed:
        if not (isinstance(f, dict) and isinstance(f.get("patient"), str) and isinstance(f.get("reason"), str)):
            yield "failed holds an entry that is not {patient, reason}"
            return


def _planes_problem(cfg: dict) -> str | None:
    """config.planes, when there: axial first, then coronal and/or sagittal, each once; a set's
    own preprocess names no plane (a plane view's does: `plane_view`)."""
    planes = cfg.get("planes", ["axial"])
    if not (isinstance(planes, list) and planes and all(isinstance(x, str) and x in layout.PLANES for x in planes)
            and planes == [x for x in layout.PLANES if x in planes] and planes[0] == "axial"):
        return f"config.planes {str(planes)[:80]!r} is not axial followed by coronal and/or sagittal, each once, " \
               f"in that order"
    if "plane" in cfg["preprocess"]:
        return "config.preprocess.plane is not a field of a shard set (its planes are config.planes)"
    return None


def _slices_problem(p, size: int, channels: int | None) -> str | None:
    """One plane's slice record: counts in range, `pixels` those of `n_slices` slices of size x
    size, a count per mask channel (`channels`: how many; None: 1 to 16), `slice_index` one
    increasing integer index per slice."""
    if not isinstance(p, dict) or not _count(p.get("n_slices"), MAX_SLICES) \
            or not _count(p.get("pixels"), MAX_SLICES * 1024 * 1024) or p["pixels"] != p["n_slices"] * size * size:
        return "n_slices or pixels missing, out of range, or not n_slices slices of the set's size"
    mp = p.get("mask_pixels")
    if not (isinstance(mp, list) and (len(mp) == channels if channels else 1 <= len(mp) <= 16)
            and all(_count(c, p["pixels"]) for c in mp)):
        return "mask_pixels is not a list of counts, one per mask channel, within its pixels"
    si = p.get("slice_index")
    if "slice_index" in p and not (isinstance(si, list) and len(si) == p["n_slices"]
                                   and all(_count(v, MAX_SLICES) for v in si) and all(a < b for a, b in zip(si, si[1:]))):
        return "slice_index is not one increasing slice index per slice"
    return None


def _patient_problem(pid: str, p, further: tuple[str, ...], size: int) -> str | None:
    """What is wrong with patient `pid`'s entry, or None; `further`: the set's planes after axial,
    each of which the entry's `planes` must hold (PLANE_FIELDS and nothing else, its geometry
    naming the plane; `Geometry.from_dict` checks the rest where a reader uses it)."""
    if not isinstance(p, dict) or p.get("split") not in SPLITS:
        return f"patient {pid}: split missing or not one of {', '.join(SPLITS)}"
    if (why := _slices_problem(p, size, None)) is not None:
        return f"patient {pid}: {why}"
    planes = p.get("planes", {})
    if not isinstance(planes, dict):
        return f"patient {pid}: planes is not a mapping of plane name to its slices"
    if sorted(planes) != sorted(further) or ("planes" in p and not further):
        return f"patient {pid}: planes {str(list(planes))[:60]} are not the set's further planes {list(further)}"
    for name, q in planes.items():
        if (why := _slices_problem(q, size, len(p["mask_pixels"]))) is not None:
            return f"patient {pid}, plane {name}: {why}"
        if sorted(q) != sorted(PLANE_FIELDS):
            return f"patient {pid}, plane {name}: holds {sorted(q)[:8]}, not exactly {list(PLANE_FIELDS)}"
        if not (isinstance(q["geometry"], dict) and q["geometry"].get("plane") == name):
            return f"patient {pid}, plane {name}: its geometry is not of {name}"
    return None


def _file_problems(f, patients: dict, layouts: list, seen: set, planes: tuple[str, ...]):
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
    elif path.endswith(f"/{layout.ZARR_META}") and f["bytes"] > layout.MAX_META_BYTES:
        # bounded here, so no reader (remote downloads included) fetches a huge "metadata" file
        yield f"{path}: {f['bytes']} bytes of zarr metadata; more than {layout.MAX_META_BYTES} is refused"
    pid, plane = f.get("patient"), f.get("plane", "axial")
    if plane not in planes or (plane == "axial" and "plane" in f):
        yield f"{path}: plane {str(plane)[:40]!r} is not one of the set's further planes {list(planes[1:])}"
    elif pid is None and f.get("format") == "wds":
        yield f"{path}: a WebDataset shard names no patient"
    elif pid is not None:
        if not isinstance(pid, str) or pid not in patients:
            yield f"{path}: patient {str(pid)[:40]!r} is not in `patients`"
            return
        group, tar = layout.zarr_plane_group(patients[pid]["split"], pid, plane), \
            layout.wds_tar(patients[pid]["split"], pid, plane)
        if f["format"] == "zarr" and not path.startswith(group + "/"):
            yield f"{path}: not under its patient's {plane} group {group}/"
        elif f["format"] == "wds" and path != tar:
            yield f"{path}: a WebDataset shard is its patient's {tar}" + ("" if plane == "axial" else f" ({plane})")
