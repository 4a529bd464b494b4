"""Find the patients of a BraTS release on disk and resolve each one's files.

Handles every release of `shards.domain.RELEASES`: 2020 (`BraTS20_Training_001_t1ce.nii.gz`),
2021 (`BraTS2021_00000_t1ce.nii.gz`), 2023+ (`BraTS-GLI-00000-000-t1c.nii.gz`, and the MEN, MET,
SSA, PED and post-treatment GLI sets named alike, told apart by their ids), MEN-RT
(`BraTS-MEN-RT-0000-1_t1c.nii.gz` + `_gtv`), `.nii` or `.nii.gz`, patient folders up to 100
levels deep; and the Medical Segmentation Decathlon's Task01 (`imagesTr/BRATS_001.nii.gz` 4D,
`labelsTr/`, `imagesTs/`). The convention is read from the file names (or named: `release=`),
never from label values. One input holds one release: a mix is refused naming two patients of
different ones, but a stray folder (a lone segmentation, an `atlas/`: files that name no other
release better) is read as the others' release and fails as one patient, named. Files that are
not NIfTI (csv tables, readme) are ignored. Known quirk: one BraTS 2020 case ships its
segmentation as `W39_1998.09.19_Segm.nii`; a folder whose only unclaimed NIfTI file has "seg"
in its name uses that file as its segmentation, and says so.

A named release (`--release`) must fit the input, or the input is refused before anything is
written, suggesting the release its names say: the layout (MSD's imagesTr/ or a folder per
patient), and each patient folder's names (`_misfit`: GLI ids read as PED would store GLI's ET
as PED's CC).

Folder and file names are untrusted:
  * a patient id (its folder's name) must pass `shards.names.patient_id_problem` (plain
    characters, at most 80 long, because it becomes file and tar member names); a folder that
    fails is a failed patient (`problem`), the others build;
  * two files for one modality (`P_t1.nii` next to a stale `P_t1.nii.gz`), or for one MSD id
    (`.nii` beside `.nii.gz`, imagesTr/ and imagesTs/, two labels), fail that patient, naming
    both: choosing one silently could mix two patients' scans, and predict would write both to
    one file;
  * the tree is walked by `preprocess.input_tree.walk` (no recursion; symlinked folders
    followed): a symlink loop, a folder reached twice through links, a tree deeper than 100
    levels or a folder that cannot be listed refuse the whole input with a DiscoveryError
    naming the path: skipping any would silently drop patients.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from preprocess.h5slices import RELEASE, find_volumes
from preprocess.input_tree import DiscoveryError, walk
from shards.domain import RELEASES, SEG, Release, release_name
from shards.names import patient_id_problem

_NII = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")
IMAGE4D = "4d"  # the `files` key of an MSD patient's 4D image
MSD_FOLDERS = ("imagesTr", "imagesTs")


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


def _msd_files(root: Path, folder: str) -> dict[str, list[Path]]:
    """id -> its NIfTI files in root/folder (`BRATS_001.nii` and `BRATS_001.nii.gz` are one id).
    Hidden files (`._BRATS_001.nii.gz`, as the archive ships) are skipped."""
    by_id: dict[str, list[Path]] = {}
    for path in sorted((root / folder).glob("*.nii*")) if (root / folder).is_dir() else []:
        if not path.name.startswith(".") and (m := _NII.match(path.name)):
            by_id.setdefault(m["stem"], []).append(path)
    return by_id


def _msd(root: Path, need_seg: bool) -> list[PatientFiles]:
    """MSD Task01: each imagesTr/<id>.nii.gz (4D) with labelsTr/<id>.nii(.gz); imagesTs/ (no
    labels) too when no segmentation is needed (predict). An id with two images (`.nii` beside
    `.nii.gz`, or in both imagesTr/ and imagesTs/) or two labels fails that patient naming both
    files: picking one could pair a scan with another's labels, and predict names its output
    from the id, so one prediction would overwrite the other."""
    images: dict[str, list[Path]] = {}
    for folder in MSD_FOLDERS if not need_seg else MSD_FOLDERS[:1]:
        for pid, paths in _msd_files(root, folder).items():
            images.setdefault(pid, []).extend(paths)
    labels = _msd_files(root, "labelsTr")
    patients = []
    for pid in sorted(images):
        paths = images[pid]
        segs = labels.get(pid, []) if paths[0].parent.name == "imagesTr" else []  # imagesTs/ has none
        files = {IMAGE4D: paths[0], **({SEG: segs[0]} if segs else {})}
        twice = paths if len(paths) > 1 else segs if len(segs) > 1 else None
        problem = patient_id_problem(pid) or (
            f"two files for {pid}: {' and '.join(str(p.relative_to(root)) for p in twice)}; remove the one that "
            f"does not belong" if twice else
            f"no label file labelsTr/{paths[0].name}" if need_seg and SEG not in files else None)
        patients.append(PatientFiles(pid=pid, convention="msd", files=files, problem=problem))
    return _msd_strays(root, patients)


def _msd_strays(root: Path, patients: list[PatientFiles]) -> list[PatientFiles]:
    """A folder of NIfTI files beside imagesTr/ (an atlas, patient folders copied in) is not read
    in an MSD layout: each is a failed entry, named, rather than silently left out."""
    by_pid = {p.pid: p for p in patients}
    for folder in sorted(root.iterdir()):
        if folder.name in (*MSD_FOLDERS, "labelsTr") or folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            if not any(_NII.match(f.name) for f in folder.iterdir()):
                continue
        except OSError as e:  # as the folder walk does: skipping it could drop patients unsaid
            raise DiscoveryError(f"cannot list {folder}: {e.strerror}") from None
        why = f"{folder.name}/ is a folder beside imagesTr/ in an MSD layout and is not read; move it out of the input"
        old = by_pid.get(folder.name)
        by_pid[folder.name] = PatientFiles(pid=folder.name, convention="msd", files=old.files if old else {},
                                           problem=f"{old.problem or ''} {why}".strip() if old else why)
    return [by_pid[pid] for pid in sorted(by_pid)]


def _claimed(pid: str, niftis: list[Path], rel: Release) -> int:
    """How many of a folder's files `rel`'s naming claims for patient `pid`."""
    return sum(_split_name(_NII.match(p.name)["stem"], pid) in rel.suffixes for p in niftis)


def _strays_as(patients: list[PatientFiles], folders: dict, need_seg: bool) -> list[PatientFiles]:
    """When every usable patient is of one release, a folder that fails and whose files name no
    other release better (a lone segmentation, an `atlas/`: a tie or nothing claimed) is read as
    that release, so it fails as one patient, named, instead of making the input a "mix"."""
    usable = {p.convention for p in patients if not p.problem}
    if len(usable) != 1:
        return patients
    (name,) = usable
    out = []
    for p in patients:
        if p.problem and p.convention != name:
            folder, niftis = folders[p.pid]
            if _claimed(p.pid, niftis, RELEASES[name]) >= _claimed(p.pid, niftis, p.release):
                p = _resolve(folder, niftis, need_seg, name)
        out.append(p)
    return out


def _one_release(patients: list[PatientFiles], folders: dict, need_seg: bool) -> list[PatientFiles]:
    """The patients, all of one release: those of a release absorbed by another present one are
    re-read as that one, stray folders as the release of the others (`_strays_as`); any other mix
    is refused naming two patients of different releases."""
    present = {p.convention for p in patients}
    for name in sorted(present):
        for absorbed in set(RELEASES[name].absorbs) & present:
            patients = [_resolve(folders[p.pid][0], folders[p.pid][1], need_seg, name)
                        if p.convention == absorbed else p for p in patients]
    patients = _strays_as(patients, folders, need_seg)
    first = patients[0]
    other = next((p for p in patients if p.convention != first.convention), None)
    if other is not None:
        odd = next((p for p in (other, first) if p.problem), None)  # an unusable folder: say why, too
        raise DiscoveryError(f"input mixes releases: {first.pid} is {first.convention}, {other.pid} is "
                             f"{other.convention}" + (f" ({odd.pid} cannot be used as it is: {odd.problem})" if odd else "")
                             + "; build each release separately, or move the folder that does not belong out")
    return patients


def _misfit(pid: str, niftis: list[Path], given: str, need_seg: bool, folder: Path) -> str | None:
    """The release a folder's names say, when they contradict `--release given` (None: they fit,
    or the folder is named after no release's case, e.g. `atlas/`, and fails as a patient later).
    They contradict when the id is one another release's pattern names and `given`'s does not
    (GLI ids read as PED would store GLI's ET as PED's CC), when `given` has an id pattern the id
    fails (unless a release it absorbs takes it: 2024 GLI over 2023's -000 cases), or when the
    detected release's suffixes claim more of the files (2023's t1n read as 2020)."""
    rel = RELEASES[given]
    detected = _resolve(folder, niftis, need_seg).release
    if not _claimed(pid, niftis, detected):
        return None
    confirmed = bool(rel.id_pattern) and rel.matches_id(pid)
    named = [r.name for r in RELEASES.values() if r.id_pattern and r.layout == rel.layout and r.matches_id(pid)
             and r.name != given and r.name not in rel.absorbs]
    if named and not confirmed:
        return " or ".join(named)
    if rel.id_pattern and not confirmed and not any(RELEASES[a].matches_id(pid) for a in rel.absorbs):
        return detected.name
    if _claimed(pid, niftis, rel) < _claimed(pid, niftis, detected):
        return detected.name
    return None


def _refuse_misfits(folders: dict, given: str, need_seg: bool) -> None:
    """Refuse a `--release` that contradicts the folders' names, before anything is written,
    naming the first folder, how many, and the release their names say."""
    misfits = {pid: r for pid, (folder, niftis) in sorted(folders.items())
               if (r := _misfit(pid, niftis, given, need_seg, folder))}
    if misfits:
        pid, says = next(iter(misfits.items()))
        more = f" (and {len(misfits) - 1} more of {len(folders)} folders)" if len(misfits) > 1 else ""
        detectable = all(RELEASES[n].detect for n in says.split(" or "))  # PED is never told by names alone
        raise DiscoveryError(f"--release {given} does not fit {pid}{more}: its names are those of {says} "
                             f"(a {given} case is named like {RELEASES[given].case_id.format(index=1)}); "
                             f"use --release {says}" + (", or leave --release out to detect it" if detectable else ""))


def _refuse_wrong_layout(root: Path, release: str | None, msd_here: bool) -> None:
    """A `--release` of the other layout (a folder per patient vs MSD's imagesTr/) is refused
    before anything is written: read the other way, every patient fails (or imagesTr/ and
    labelsTr/ become two "patients") and an empty shard set would be written."""
    if release is None:
        return
    layout = RELEASES[release].layout
    if layout == "msd" and not msd_here:
        raise DiscoveryError(f"--release {release} reads a Medical Segmentation Decathlon layout (imagesTr/, "
                             f"labelsTr/), but {root} has no imagesTr/ folder; leave --release out to detect "
                             f"the release of its patient folders")
    if layout != "msd" and msd_here:
        raise DiscoveryError(f"{root} is a Medical Segmentation Decathlon layout (imagesTr/), but --release "
                             f"{release} reads a folder per patient; use --release msd, or leave --release out")


def _msd_below(root: Path) -> Path | None:
    """An MSD layout as its archive unpacks (`Task01_BrainTumour/imagesTr/`): the one folder in
    `root`, when `root` holds nothing else but hidden entries, and that folder holds imagesTr/
    or imagesTs/."""
    try:
        entries = [e for e in root.iterdir() if not e.name.startswith(".")]
    except OSError:
        return None
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() \
            and any((entries[0] / f).is_dir() for f in MSD_FOLDERS):
        return entries[0]
    return None


def _refuse_nested_msd(root: Path, by_folder: dict) -> None:
    """An MSD layout below the input beside other things (Task01_BrainTumour/imagesTr/ next to
    patient folders), or deeper, would be read as patients named imagesTr and labelsTr: name
    the folder to give instead (alone, one level down, it is found: `_msd_below`)."""
    for folder in sorted(by_folder):
        if folder.name in (*MSD_FOLDERS, "labelsTr") and folder != root:
            raise DiscoveryError(f"{folder.parent} holds a Medical Segmentation Decathlon layout ({folder.name}/): "
                                 f"give {folder.parent} as the input")


def _named_only(patients: list[PatientFiles]) -> None:
    """Refuse ids that several releases share with different labels (BraTS-PED 2023 and 2024).
    A folder none of whose files is named after its id (an atlas in a folder named as a case)
    is not a patient of either: it fails on its own."""
    for p in patients:
        if not p.files:
            continue
        shared = [r.name for r in RELEASES.values() if not r.detect and r.id_pattern and r.matches_id(p.pid)]
        if shared:
            raise DiscoveryError(f"{p.pid}: releases {' and '.join(shared)} name their files alike but label "
                                 f"them differently; name the one this is (--release {shared[0]} or {shared[-1]})")


def discover(root: str | Path, need_seg: bool = True, release: str | None = None) -> Discovery:
    """Every folder holding NIfTI files is a patient, its id the folder name; sorted by id.
    `release`: read every patient as this release of `shards.domain.RELEASES` (default: told by
    the file names; `Discovery.convention` says which was detected)."""
    root, release = Path(root), release_name(release)
    if not root.is_dir():
        raise DiscoveryError(f"input folder {root} does not exist or is not a folder")
    if release is not None and release not in RELEASES:
        raise DiscoveryError(f"unknown release {release!r}; known: {', '.join(RELEASES)}")
    msd = root if any((root / f).is_dir() for f in MSD_FOLDERS) else _msd_below(root)
    _refuse_wrong_layout(root, release, msd is not None)
    if msd is not None:
        patients = _msd(msd, need_seg)
        if not patients:
            raise DiscoveryError(f"no MSD images (imagesTr/*.nii.gz) found under {msd}")
        return Discovery(root=root, patients=patients)
    by_folder: dict[Path, list[Path]] = {}
    for dirpath, names in walk(root):
        for name in names:
            if _NII.match(name) and not name.startswith("."):
                by_folder.setdefault(Path(dirpath), []).append(Path(dirpath) / name)
    if not by_folder:  # the seed's per-slice HDF5 export?
        volumes = find_volumes(root)
        if volumes and release not in (None, RELEASE):  # the export's masks are 2020's channels
            raise DiscoveryError(f"{root} is an HDF5 slice export (volume_*_slice_*.h5), always read as {RELEASE}; "
                                 f"--release {release} does not fit it: leave --release out")
        if volumes:
            return Discovery(root=root, patients=[
                PatientFiles(pid=v, convention=RELEASE, files={}, slices=tuple(s)) for v, s in volumes.items()])
    if root in by_folder:
        loose = ", ".join(sorted(p.name for p in by_folder[root])[:3])
        raise DiscoveryError(f"NIfTI files directly in {root} ({loose}, ...): expected one folder per patient")
    _refuse_nested_msd(root, by_folder)
    if release is not None:
        _refuse_misfits({f.name: (f, sorted(files)) for f, files in by_folder.items()}, release, need_seg)
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
