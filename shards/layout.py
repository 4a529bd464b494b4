"""Where each file of a shard set lives: the path templates, written once.

Paths are relative to the set's root, '/'-separated (the manifest's `files[].path`). Writers
(preprocess/build/, zarr_io, wds_io) put files here and every reader looks them up here; nothing
else spells a shard path.

    zarr/zarr.json, zarr/{split}/zarr.json             group metadata (root, one per split)
    zarr/{split}/{pid}/zarr.json                       one patient's group (geometry in attributes)
    zarr/{split}/{pid}/{image,mask}/zarr.json          its arrays' metadata
    zarr/{split}/{pid}/{image,mask}/c/0/0/0/0          their one storage shard each
    wds/{split}-{pid}.tar                              one patient's tar, named by its split and id
  a set built with more planes than axial (`build-shards --planes`) also holds, per further plane:
    zarr/{split}/{pid}/{plane}/...                     that plane's group inside the patient's
    wds/{plane}/{split}-{pid}.tar                      that plane's tar, in a folder of its own
  (the axial files stay where they always were, so plain readers of `wds/*.tar` and of a
  patient's `image`/`mask` read axial slices, as in any other set)

Every patient's files are named from its own id (never from its position among the others), so
adding or removing patients leaves the other patients' files untouched (incremental builds).
"""

from __future__ import annotations

import os
import re

from shards.tree import walk  # not os.walk: it recurses, and a planted tree can be deep

SPLITS = ("train", "val")
PLANES = ("axial", "coronal", "sagittal")  # the slicing planes; axial is every set's own
LAYOUTS = ("zarr", "wds")
ARRAYS = ("image", "mask")
ZARR_ROOT, WDS_ROOT = "zarr", "wds"  # the folders of the two layouts
ZARR_META = "zarr.json"
MAX_META_BYTES = 1 << 20  # one zarr.json (the group's holds the geometry: a few kB)
# the key of chunk (0, 0, 0, 0): with one storage shard holding the whole array, its only file
ZARR_SHARD = "c/0/0/0/0"
# a file name `wds_tar` gives, inside wds/ (pid: a plain name, see shards.names.patient_id_problem)
WDS_NAME = re.compile(r"^(?P<split>train|val)-(?P<pid>[A-Za-z0-9][A-Za-z0-9._-]*)\.tar$")


def zarr_split(split: str) -> str:
    return f"{ZARR_ROOT}/{split}"


def zarr_group(split: str, pid: str) -> str:
    """The patient's zarr group (a folder)."""
    return f"{zarr_split(split)}/{pid}"


def zarr_plane_group(split: str, pid: str, plane: str = "axial") -> str:
    """The group of the patient's `plane` slices: the patient's group itself for axial."""
    g = zarr_group(split, pid)
    return g if plane == "axial" else f"{g}/{plane}"


def zarr_array_meta(group: str, name: str) -> str:
    """`name`'s zarr.json inside `group` (any prefix: relative path, folder or URL)."""
    return f"{group}/{name}/{ZARR_META}"


def zarr_array_shard(group: str, name: str) -> str:
    return f"{group}/{name}/{ZARR_SHARD}"


def zarr_patient_files(split: str, pid: str, plane: str = "axial") -> tuple[str, ...]:
    """Every file a patient's group of `plane` may hold (the shard files are absent for 0 slices)."""
    g = zarr_plane_group(split, pid, plane)
    return (f"{g}/{ZARR_META}",) + tuple(p for a in ARRAYS for p in (zarr_array_meta(g, a), zarr_array_shard(g, a)))


def zarr_group_meta(splits=SPLITS) -> tuple[str, ...]:
    """The root's and each split's group metadata."""
    return (f"{ZARR_ROOT}/{ZARR_META}",) + tuple(f"{zarr_split(s)}/{ZARR_META}" for s in splits)


def wds_tar(split: str, pid: str, plane: str = "axial") -> str:
    """The tar of patient `pid` in `split` (named from the patient, so it never moves when other
    patients are added or removed); a further plane's in `wds/{plane}/`."""
    return f"{WDS_ROOT}/{split}-{pid}.tar" if plane == "axial" else f"{WDS_ROOT}/{plane}/{split}-{pid}.tar"


def symlink_inside(root, names) -> str | None:
    """The first symbolic link among `root/name` for `names` and everything below them (links
    never followed), as a '/'-separated path relative to `root`; None when there is none.

    A writer that followed such a link would write, or delete, outside the folder its user
    named (`OUTPUT/wds` -> someone else's folder), so callers refuse the whole folder instead."""
    for name in names:
        top = os.path.join(root, name)
        if os.path.islink(top):
            return name
        for dirpath, dirnames, filenames in walk(top):  # never descends into a linked folder
            for n in sorted(dirnames + filenames):
                if os.path.islink(os.path.join(dirpath, n)):
                    return os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/")
    return None


def symlink_on_the_way(root, rel: str) -> str | None:
    """The first of `rel`'s parts (a '/'-separated path inside `root`) that is a symbolic link,
    as a path relative to `root`; None when there is none."""
    parts = rel.split("/")
    for k in range(1, len(parts) + 1):
        if os.path.islink(os.path.join(root, *parts[:k])):
            return "/".join(parts[:k])
    return None
