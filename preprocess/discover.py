"""Find the patients of a BraTS release on disk and resolve each one's files.

Handles every release of `shards.domain.RELEASES`: 2020 (`BraTS20_Training_001_t1ce.nii.gz`),
2021 (`BraTS2021_00000_t1ce.nii.gz`), 2023+ (`BraTS-GLI-00000-000-t1c.nii.gz`, and the MEN, MET,
SSA, PED and post-treatment GLI sets named alike, told apart by their ids), MEN-RT
(`BraTS-MEN-RT-0000-1_t1c.nii.gz` + `_gtv`), `.nii` or `.nii.gz`, patient folders at any depth;
and the Medical Segmentation Decathlon's Task01 (`imagesTr/BRATS_001.nii.gz` 4D, `labelsTr/`,
`imagesTs/`). The convention is read from the file names (or named: `release=`), never from label
values. One input holds one release: a mix is refused naming two patients of different ones. Files that are not NIfTI (csv tables, readme) are ignored. Known quirk: one BraTS 2020
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

from shards.domain import RELEASES, SEG, Release
from shards.errors import BratsShardsError
from shards.names import patient_id_problem

_NII = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")
IMAGE4D = "4d"  # the `files` key of an MSD patient's 4D image
MSD_FOLDERS = ("imagesTr", "imagesTs")


class DiscoveryError(BratsShardsError, ValueError):
    """The input folder as a whole cannot be used (empty, mixed conventions)."""


@dataclass(frozen=True)
class PatientFiles:
    pid: str
    convention: str  # the release's name in shards.domain.RELEASES ("2020" also covers 2021)
    files: dict[str, Path]  # canonical modality ("t1", "t1gd", "t2", "flair", "seg"; MSD: "4d") -> path
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
             need_seg: bool, rel: Release) -> str | None:
    """Why this folder cannot be used as a patient (None: it can), naming the files at fault."""
    if why := patient_id_problem(pid):
        return why
    if dupes:
        m, ps = sorted(dupes.items())[0]
        return f"two files for {m}: {' and '.join(p.name for p in ps)}; remove the one that does not belong"
    need = list(rel.modalities) + ([SEG] if need_seg else [])
    missing = [m for m in need if m not in files]
    if missing:
        names = ", ".join(sorted(p.name for p in niftis))
        return (f"missing {', '.join(missing)} (found: {names or 'no NIfTI files'}"
                + (f"; unrecognised: {', '.join(p.name for p in unclaimed)}" if unclaimed else "") + ")")
    if extra:
        return f"files of two naming conventions in one folder: {', '.join(sorted(extra))}"
    return None


def _candidates(pid: str, forced: str | None) -> list[str]:
    """Releases a folder named `pid` may hold: the named one, or those (detectable, per-folder)
    whose id pattern the id matches."""
    if forced:
        return [forced]
    return [n for n, r in RELEASES.items() if r.layout == "folders" and r.detect and r.matches_id(pid)]


def _resolve(folder: Path, niftis: list[Path], need_seg: bool, forced: str | None = None) -> PatientFiles:
    pid = folder.name
    found: dict[str, dict[str, list[Path]]] = {name: {} for name in _candidates(pid, forced)}  # release -> modality -> files
    unclaimed = []
    for path in niftis:
        suffix = _split_name(_NII.match(path.name)["stem"], pid)
        claimed = False
        for name in found:
            rel = RELEASES[name]
            if suffix in rel.suffixes:
                found[name].setdefault(rel.suffixes[suffix], []).append(path)
                claimed = True
        if not claimed:
            unclaimed.append(path)
    # "t1" and "seg" exist in several namings: the one with the most matches wins, ties going to
    # a release whose id pattern named the patient, then to the earlier release of the table (max
    # keeps the first of equals)
    conv = max(found, key=lambda c: (len(found[c]), bool(RELEASES[c].id_pattern)))
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
    problem = _problem(pid, files, niftis, unclaimed, dupes, extra, need_seg, RELEASES[conv])
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


def _msd(root: Path, need_seg: bool) -> list[PatientFiles]:
    """MSD Task01: each imagesTr/<id>.nii.gz (4D) with labelsTr/<id>.nii.gz; imagesTs/ (no labels)
    too when no segmentation is needed (predict). Hidden files (`._BRATS_001.nii.gz`, as the
    archive ships) are skipped."""
    patients = []
    for folder in MSD_FOLDERS if not need_seg else MSD_FOLDERS[:1]:
        for path in sorted((root / folder).glob("*.nii*")) if (root / folder).is_dir() else []:
            if path.name.startswith(".") or not (m := _NII.match(path.name)):
                continue
            pid, files = m["stem"], {IMAGE4D: path}
            label = next((p for p in (root / "labelsTr" / path.name,) if p.is_file()), None)
            if label is not None and folder == "imagesTr":
                files[SEG] = label
            problem = patient_id_problem(pid) or (f"no label file labelsTr/{path.name}"
                                                  if need_seg and SEG not in files else None)
            patients.append(PatientFiles(pid=pid, convention="msd", files=files, problem=problem))
    return patients


def _one_release(patients: list[PatientFiles], folders: dict, need_seg: bool) -> list[PatientFiles]:
    """The patients, all of one release: those of a release absorbed by another present one are
    re-read as that one; any other mix is refused naming two patients of different releases."""
    present = {p.convention for p in patients}
    for name in sorted(present):
        for absorbed in set(RELEASES[name].absorbs) & present:
            patients = [_resolve(folders[p.pid][0], folders[p.pid][1], need_seg, name)
                        if p.convention == absorbed else p for p in patients]
    first = patients[0]
    other = next((p for p in patients if p.convention != first.convention), None)
    if other is not None:
        raise DiscoveryError(f"input mixes releases: {first.pid} is {first.convention}, {other.pid} is "
                             f"{other.convention}; build each release separately")
    return patients


def _named_only(patients: list[PatientFiles]) -> None:
    """Refuse ids that several releases share with different labels (BraTS-PED 2023 and 2024)."""
    for p in patients:
        shared = [r.name for r in RELEASES.values() if not r.detect and r.id_pattern and r.matches_id(p.pid)]
        if shared:
            raise DiscoveryError(f"{p.pid}: releases {' and '.join(shared)} name their files alike but label "
                                 f"them differently; name the one this is (--release {shared[0]} or {shared[-1]})")


def discover(root: str | Path, need_seg: bool = True, release: str | None = None) -> Discovery:
    """Every folder holding NIfTI files is a patient, its id the folder name; sorted by id.
    `release`: read every patient as this release of `shards.domain.RELEASES` (default: told by
    the file names; `Discovery.convention` says which was detected)."""
    root = Path(root)
    if not root.is_dir():
        raise DiscoveryError(f"input folder {root} does not exist or is not a folder")
    if release is not None and release not in RELEASES:
        raise DiscoveryError(f"unknown release {release!r}; known: {', '.join(RELEASES)}")
    if any((root / f).is_dir() for f in MSD_FOLDERS) and release in (None, "msd"):
        patients = _msd(root, need_seg)
        if not patients:
            raise DiscoveryError(f"no MSD images (imagesTr/*.nii.gz) found under {root}")
        return Discovery(root=root, patients=patients)
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
    patients = [_resolve(folder, sorted(files), need_seg, release) for folder, files in by_folder.items()]
    patients.sort(key=lambda p: p.pid)
    ids = [p.pid for p in patients]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DiscoveryError(f"patient ids appear in more than one folder: {', '.join(dupes)}")
    if not patients:
        raise DiscoveryError(f"no patient folders with NIfTI files found under {root}")
    if release is None:
        _named_only(patients)
        folders = {folder.name: (folder, sorted(files)) for folder, files in by_folder.items()}
        patients = _one_release(patients, folders, need_seg)
    return Discovery(root=root, patients=patients)
