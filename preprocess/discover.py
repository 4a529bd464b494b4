"""Find the patients of a BraTS release on disk and resolve each one's five files.

Handles 2020 (`BraTS20_Training_001_t1ce.nii.gz`), 2021 (`BraTS2021_00000_t1ce.nii.gz`) and
2023+ (`BraTS-GLI-00000-000-t1c.nii.gz`) naming, `.nii` or `.nii.gz`, patient folders at any
depth. Files that are not NIfTI (csv tables, readme) are ignored. Known quirk: one BraTS 2020
case ships its segmentation as `W39_1998.09.19_Segm.nii`; a folder whose only unclaimed NIfTI
file has "seg" in its name uses that file as its segmentation, and says so.

Folder and file names are untrusted:
  * a patient id (its folder's name) must pass `shards.names.patient_id_problem` (plain
    characters, at most 80 long, because it becomes file and tar member names); a folder that
    fails is a failed patient (`problem`), the others build;
  * two files for one modality (`P_t1.nii` next to a stale `P_t1.nii.gz`) fail that patient,
    naming both: choosing one silently could mix two patients' scans;
  * symlinked folders are followed, but a symlink that points back to one of its own
    ancestors (a loop) refuses the whole input with a DiscoveryError naming the link; a
    folder that cannot be listed (permissions) refuses it too, naming the folder: skipping
    either would silently drop patients.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from shards.domain import MODALITIES, RELEASES, SEG, Release
from shards.errors import BratsShardsError
from shards.names import patient_id_problem

_NII = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")


class DiscoveryError(BratsShardsError, ValueError):
    """The input folder as a whole cannot be used (empty, mixed conventions)."""


@dataclass(frozen=True)
class PatientFiles:
    pid: str
    convention: str  # the release's name in shards.domain.RELEASES ("2020" also covers 2021)
    files: dict[str, Path]  # canonical modality ("t1", "t1gd", "t2", "flair", "seg") -> path
    notes: tuple[str, ...] = ()
    problem: str | None = None  # why this patient cannot be used, naming the file(s)
    slices: tuple = ()  # HDF5 slice export only: ((slice index, path), ...)

    @property
    def kind(self) -> str:
        return "h5-slices" if self.slices else "nifti"

    @property
    def release(self) -> Release:
        return RELEASES[self.convention]

    @property
    def labels(self) -> tuple[int, ...]:
        return self.release.label_values


@dataclass
class Discovery:
    root: Path
    patients: list[PatientFiles] = field(default_factory=list)

    @property
    def convention(self) -> str:
        conv = {p.convention for p in self.patients}
        return conv.pop() if len(conv) == 1 else "mixed"

    @property
    def kind(self) -> str:
        return self.patients[0].kind if self.patients else "nifti"


def _split_name(stem: str, pid: str) -> str | None:
    """Return the suffix after the patient id (`pid_t1ce` -> `t1ce`), or None."""
    if stem.startswith(pid) and len(stem) > len(pid) + 1 and stem[len(pid)] in "_-":
        return stem[len(pid) + 1:].lower()
    return None


def _problem(pid: str, files: dict, niftis: list[Path], unclaimed: list[Path], dupes: dict, extra: set,
             need_seg: bool) -> str | None:
    """Why this folder cannot be used as a patient (None: it can), naming the files at fault."""
    if why := patient_id_problem(pid):
        return why
    if dupes:
        m, ps = sorted(dupes.items())[0]
        return f"two files for {m}: {' and '.join(p.name for p in ps)}; remove the one that does not belong"
    need = list(MODALITIES) + ([SEG] if need_seg else [])
    missing = [m for m in need if m not in files]
    if missing:
        names = ", ".join(sorted(p.name for p in niftis))
        return (f"missing {', '.join(missing)} (found: {names or 'no NIfTI files'}"
                + (f"; unrecognised: {', '.join(p.name for p in unclaimed)}" if unclaimed else "") + ")")
    if extra:
        return f"files of two naming conventions in one folder: {', '.join(sorted(extra))}"
    return None


def _resolve(folder: Path, niftis: list[Path], need_seg: bool) -> PatientFiles:
    pid = folder.name
    found: dict[str, dict[str, list[Path]]] = {name: {} for name in RELEASES}  # release -> modality -> files
    unclaimed = []
    for path in niftis:
        suffix = _split_name(_NII.match(path.name)["stem"], pid)
        claimed = False
        for name, rel in RELEASES.items():
            if suffix in rel.suffixes:
                found[name].setdefault(rel.suffixes[suffix], []).append(path)
                claimed = True
        if not claimed:
            unclaimed.append(path)
    # "t1" and "seg" exist in several namings: the one with the most matches wins, ties going to
    # the earlier release of the table (max keeps the first of equals)
    conv = max(found, key=lambda c: len(found[c]))
    files = {m: ps[0] for m, ps in found[conv].items()}
    dupes = {m: ps for m, ps in found[conv].items() if len(ps) > 1}  # `P_t1.nii` and `P_t1.nii.gz`
    extra = set().union(*(found[c] for c in found if c != conv)) - set(files)  # only other namings matched
    notes = []
    if SEG not in files:
        segs = [p for p in unclaimed if "seg" in p.name.lower()]
        if len(segs) == 1:
            files[SEG] = segs[0]
            unclaimed.remove(segs[0])
            notes.append(f"segmentation taken from non-standard file name {segs[0].name}")
    problem = _problem(pid, files, niftis, unclaimed, dupes, extra, need_seg)
    return PatientFiles(pid=pid, convention=conv, files=files, notes=tuple(notes), problem=problem)


def _walk(root: Path):
    """os.walk following symlinked folders (patient folders may be links), yielding (folder,
    file names). Refuses, naming the link, a symlink to one of its own ancestors: os.walk would
    follow it until the path is too long. A folder it cannot list refuses the input, named."""
    def refuse(e: OSError):
        raise DiscoveryError(f"cannot list {e.filename}: {e.strerror}")

    for dirpath, dirnames, names in os.walk(root, followlinks=True, onerror=refuse):
        links = [os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        if links:  # the real folders this path runs through, root included
            rel = Path(dirpath).relative_to(root)
            chain = {os.path.realpath(root / p) for p in (rel, *rel.parents)}
            for link in links:
                if (target := os.path.realpath(link)) in chain:
                    raise DiscoveryError(f"symlink loop in the input: {link} points to {target}, "
                                         f"a folder that contains it; remove the link")
        yield dirpath, names


def discover(root: str | Path, need_seg: bool = True) -> Discovery:
    """Every folder holding NIfTI files is a patient, its id the folder name; sorted by id."""
    root = Path(root)
    if not root.is_dir():
        raise DiscoveryError(f"input folder {root} does not exist or is not a folder")
    by_folder: dict[Path, list[Path]] = {}
    for dirpath, names in _walk(root):
        for name in names:
            if _NII.match(name) and not name.startswith("."):
                by_folder.setdefault(Path(dirpath), []).append(Path(dirpath) / name)
    if not by_folder:  # the seed's per-slice HDF5 export?
        from preprocess.h5slices import RELEASE, find_volumes

        volumes = find_volumes(root)
        if volumes:
            return Discovery(root=root, patients=[
                PatientFiles(pid=v, convention=RELEASE, files={}, slices=tuple(s)) for v, s in volumes.items()])
    if root in by_folder:
        loose = ", ".join(sorted(p.name for p in by_folder[root])[:3])
        raise DiscoveryError(f"NIfTI files directly in {root} ({loose}, ...): expected one folder per patient")
    patients = [_resolve(folder, sorted(files), need_seg) for folder, files in by_folder.items()]
    patients.sort(key=lambda p: p.pid)
    ids = [p.pid for p in patients]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DiscoveryError(f"patient ids appear in more than one folder: {', '.join(dupes)}")
    if not patients:
        raise DiscoveryError(f"no patient folders with NIfTI files found under {root}")
    d = Discovery(root=root, patients=patients)
    if d.convention == "mixed":
        counts = {c: sum(p.convention == c for p in patients) for c in RELEASES}
        raise DiscoveryError(f"input mixes the file names of several releases ({counts}); build them separately")
    return d
