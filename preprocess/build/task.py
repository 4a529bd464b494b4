"""One patient's build task, run on a Dask worker (or in process): read and preprocess it, write
its Zarr group and its tar, and queue its done record behind the fsync of its files."""

from __future__ import annotations

import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from preprocess import nifti
from preprocess.build.config import BuildConfig, writing
from preprocess.build.durable import DEFERRED_FSYNCS, done_path, refuse_link_on_the_way
from preprocess.build.plan import plan_paths, source_stamps
from preprocess.discover import PatientFiles
from preprocess.errors import InputError
from preprocess.pipeline import process_planes
from shards import wds_io, zarr_io
from shards.layout import PLANES
from shards.manifest import file_entry, patient_entry


def build_patient(pf: PatientFiles, in_root: str, out: str, split: str, cfg: BuildConfig) -> dict:
    """Process and write one patient; returns a small dict (also saved as its done record).
    Bad input is returned as {'pid', 'error'}; the build records it and carries on."""
    t0 = time.perf_counter()
    out = Path(out)
    stamps = source_stamps(pf, Path(in_root))  # before reading: a change while it is read shows next time
    try:
        if not pf.problem:  # from the headers alone: volumes each legal alone may not fit together
            nifti.check_patient_footprint(pf.files.values())
        slices = process_planes(pf, cfg.preprocess.for_split(split), cfg.planes, Path(in_root))  # val: every brain slice
    except Exception as e:  # recorded in the manifest's `failed`, never swallowed
        reason = str(e) if isinstance(e, InputError) else " ".join(f"{type(e).__name__}: {e}".split())
        return {"pid": pf.pid, "error": reason}
    paths = plan_paths(pf.pid, split, cfg.planes)
    for fmt in cfg.formats:  # a link planted since the build checked its output (`refuse_links`)
        for rel in paths[fmt]:
            refuse_link_on_the_way(out, rel)
    ps = slices["axial"]
    attrs = {p: _zarr_attrs(pf, split, ps_p, cfg) for p, ps_p in slices.items()}
    further = {p: (slices[p].image, slices[p].mask, attrs[p]) for p in cfg.planes[1:]}
    files = []
    # The tars are assembled, hashed and written on a second thread while this one encodes the Zarr
    # arrays (the copies, sha256, blosc and the writes release the GIL). Both threads only read
    # the slices; each writes its own files atomically, unflushed (fsynced by `DEFERRED_FSYNCS`, below).
    with ThreadPoolExecutor(1, thread_name_prefix="tar") as pool:
        tars = pool.submit(_write_tars, out, paths["wds"], pf.pid, split, slices) if "wds" in cfg.formats else None
        if "zarr" in cfg.formats:
            group = out / paths["zarr"][0]
            with writing(group):
                written = zarr_io.write_patient(group, ps.image, ps.mask, attrs["axial"], cfg.codec, further)
            for p in written:
                files.append(file_entry(out, p, pf.pid, split, "zarr", plane=_plane_of(group, p)))
        if tars is not None:
            for plane, (p, digest) in tars.result().items():
                files.append(file_entry(out, p, pf.pid, split, "wds", digest, plane=plane))
    entry = patient_entry(split=split, slice_index=ps.slice_index, mask=ps.mask, label_voxels=ps.label_voxels,
                          sources=ps.sources, geometry=ps.geometry.to_dict(), nonfinite_voxels=ps.nonfinite_voxels,
                          notes=pf.notes, planes={p: slices[p] for p in cfg.planes[1:]})
    record = dict(entry, pid=pf.pid, files=files, stamps=stamps)  # + the build's own fields (BUILD_ONLY)
    # The files were renamed into place without waiting for the disk; a background thread now
    # fsyncs them and only then writes the done record that a re-run trusts (`fsync_then_record`).
    DEFERRED_FSYNCS.add(out, [out / f["path"] for f in files], done_path(out, pf.pid), record)
    # measurements, not part of the done record (they vary run to run)
    return dict(record, seconds=time.perf_counter() - t0,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _zarr_attrs(pf: PatientFiles, split: str, ps, cfg: BuildConfig) -> dict:
    """A plane's group attributes: who, where from, and the way back (`plane` in its geometry)."""
    return {"patient": pf.pid, "split": split, "slice_index": ps.slice_index, "geometry": ps.geometry.to_dict(),
            "modalities": list(pf.release.modalities), "mask_channels": list(pf.release.channels(cfg.preprocess.mask))}


def _plane_of(group: Path, path: Path) -> str:
    """The plane a file of the patient's zarr group belongs to (a further plane's sits in its folder)."""
    first = path.relative_to(group).parts[0]
    return first if first in PLANES else "axial"


def _write_tars(out: Path, rels: list[str], pid: str, split: str, slices: dict) -> dict[str, tuple[Path, str]]:
    """One tar per plane, in `rels`' order (the planes' order): plane -> (path, sha256)."""
    done = {}
    for rel, (plane, ps) in zip(rels, slices.items()):
        path = out / rel
        with writing(path):
            done[plane] = wds_io.write_patient(path, pid, split, ps.image, ps.mask, ps.slice_index, sync=False,
                                               plane=plane)
    return done
