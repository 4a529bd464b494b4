"""The BraTS vocabulary, as data: releases, modalities, label values, channel sets, and the label
algebra (labels -> sub-region channels -> regions -> labels), written once.

Every folder imports it: `preprocess/` to read a release and encode masks, `shards/` to name
channels in the contract, `train/` to score and to write predictions back. Adding a release is
adding a `Release` entry to `RELEASES`; nothing else branches on release names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

# canonical modality keys, in the channel order of every shard set, and their display names
MODALITIES = ("t1", "t1gd", "t2", "flair")
MODALITY_NAMES = MappingProxyType({"t1": "T1", "t1gd": "T1Gd", "t2": "T2", "flair": "FLAIR"})
SEG = "seg"

# channel sets, one spelling each. Sub-regions are what annotators draw; regions are what the
# challenge scores: whole tumour = all three, tumour core = necrosis + enhancing, enhancing.
SUBREGIONS = ("NCR/NET", "ED", "ET")
REGIONS = ("WT", "TC", "ET")
MASK_CHANNELS = MappingProxyType({"subregions": SUBREGIONS, "regions": REGIONS})


GLIOMA_REGIONS = {"WT": ("NCR/NET", "ED", "ET"), "TC": ("NCR/NET", "ET"), "ET": ("ET",)}
_POST = {"WT": ("NETC", "SNFH", "ET"), "TC": ("NETC", "ET"), "ET": ("ET",), "RC": ("RC",)}


@dataclass(frozen=True)
class Release:
    """One naming and labelling convention of a BraTS release (or of a BraTS-derived set)."""

    name: str
    description: str  # what it is, and where its conventions come from
    suffixes: MappingProxyType  # file-name suffix after the patient id -> modality key (or SEG)
    labels: MappingProxyType  # label value -> sub-region it marks (0, background, is implicit)
    case_id: str  # format of the i-th patient id, as the release names its cases: .format(index=i)
    separator: str  # between the patient id and the file suffix ("PID_t1.nii.gz", "PID-t1n.nii.gz")
    modalities: tuple = MODALITIES  # the images a case has, in the canonical order of MODALITIES
    subregions: tuple = SUBREGIONS  # the sub-region channels, in channel order
    regions: MappingProxyType = field(default_factory=lambda: MappingProxyType(GLIOMA_REGIONS))  # scored region -> its sub-regions
    id_pattern: str = ""  # regex a patient id must match (full match); "" = any id
    layout: str = "folders"  # "folders": a folder per patient; "msd": imagesTr/ + labelsTr/ 4D files
    detect: bool = True  # False: never chosen from file names alone (needs --release)
    absorbs: tuple = ()  # releases whose patients, in an input holding this one's, are read as this one

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every value a segmentation of this release may hold, background first."""
        return (0,) + tuple(sorted(self.labels))

    def label_of(self, subregion: str) -> int:
        (value,) = [v for v, s in self.labels.items() if s == subregion]
        return value

    @property
    def et_label(self) -> int:
        return self.label_of("ET")

    def channels(self, mode: str) -> tuple[str, ...]:
        """Mask channel names of a shard set of this release in `mode` ("subregions"/"regions")."""
        if mode not in MASK_CHANNELS:
            raise ValueError(f"unknown mask mode {mode!r}; choose {' or '.join(MASK_CHANNELS)}")
        return tuple(self.subregions) if mode == "subregions" else tuple(self.regions)

    def file_suffix(self, modality: str) -> str:
        (suffix,) = [s for s, m in self.suffixes.items() if m == modality]
        return suffix

    def file_name(self, pid: str, modality: str, ext: str = ".nii.gz") -> str:
        """The release's name of one patient's file: `file_name("P", "t1gd")` -> "P_t1ce.nii.gz"."""
        return f"{pid}{self.separator}{self.file_suffix(modality)}{ext}"

    def matches_id(self, pid: str) -> bool:
        return not self.id_pattern or re.fullmatch(self.id_pattern, pid) is not None


def _release(name: str, description: str, suffixes: dict, labels: dict, case_id: str, separator: str,
             **kw) -> Release:
    kw = {k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in kw.items()}
    return Release(name, description, MappingProxyType(suffixes), MappingProxyType(labels), case_id, separator, **kw)


_NEW = {"t1n": "t1", "t1c": "t1gd", "t2w": "t2", "t2f": "flair", "seg": SEG}  # 2023+ file suffixes
_EVAL = "brats-evaluation 0.0.10 (pip), brats_evaluation/configs/"  # the official scorer's label groups

# Detection (preprocess/discover.py): a patient's release is the one whose file suffixes match
# most of its files, among those whose `id_pattern` its id matches; ties go to a release with an
# id pattern, then to the earlier entry. An input holding patients of a release that `absorbs`
# another reads those too as its own (2024 GLI ships its pre-treatment -000 cases under 2023's
# names). Entries with detect=False share their names with another entry and are used only
# when named (--release): their ids alone are refused.
RELEASES = MappingProxyType({
    "2020": _release(
        "2020", "BraTS 2018-2021 (BraTS20_Training_001_t1ce.nii.gz, BraTS2021_00000_t1ce.nii.gz)",
        {"t1": "t1", "t1ce": "t1gd", "t2": "t2", "flair": "flair", "seg": SEG},
        {1: "NCR/NET", 2: "ED", 4: "ET"}, "BraTS20_Training_{index:03d}", "_"),
    "2023": _release(
        "2023", "BraTS 2023 adult glioma (BraTS-GLI-00000-000-t1c.nii.gz); also a 2024 GLI folder holding "
        "only pre-treatment (-000) cases, whose labels 1-3 mean the same. Labels: Kazerooni/Baid BraTS 2023 "
        "GLI data page; " + _EVAL + "config_GoAT.yaml (et 3, tc 1+3, wt 1+2+3)",
        _NEW, {1: "NCR/NET", 2: "ED", 3: "ET"}, "BraTS-GLI-{index:05d}-000", "-"),
    "gli-2024": _release(
        "gli-2024", "BraTS 2024-25 adult glioma, pre- and post-treatment (BraTS-GLI-02073-100-t1c.nii.gz; "
        "timepoint 000 pre, 100+ post; MNI152 grid 182x218x182). Labels 1 NETC, 2 SNFH, 3 ET, 4 RC "
        "(resection cavity, kept as its own channel and scored on its own): " + _EVAL + "config_gli.yaml "
        "(netc 1, snfh 2, et 3, rc 4, tc 1+3, wt 1+2+3); de Verdier et al., arXiv 2405.18368",
        _NEW, {1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"}, "BraTS-GLI-{index:05d}-100", "-",
        subregions=("NETC", "SNFH", "ET", "RC"), regions=_POST, id_pattern=r"BraTS-GLI-\d+-(?!000)\d{3}",
        absorbs=("2023",)),
    "men": _release(
        "men", "BraTS 2023 meningioma (BraTS-MEN-00000-000-t1c.nii.gz). Labels 1 NETC, 2 SNFH, 3 ET: "
        "LaBella et al., arXiv 2305.07642; " + _EVAL + "config_MenPre.yaml (et 3, tc 1+3, wt 1+2+3)",
        _NEW, {1: "NETC", 2: "SNFH", 3: "ET"}, "BraTS-MEN-{index:05d}-000", "-",
        subregions=("NETC", "SNFH", "ET"), regions={"WT": ("NETC", "SNFH", "ET"), "TC": ("NETC", "ET"),
                                                    "ET": ("ET",)}, id_pattern=r"BraTS-MEN-\d+-\d+"),
    "met": _release(
        "met", "BraTS 2023-25 brain metastases (BraTS-MET-00001-000-t1c.nii.gz). Labels 1 NETC, 2 SNFH, "
        "3 ET (Moawad et al., arXiv 2306.00838), 4 RC from 2025: " + _EVAL + "config_mets.yaml "
        "(et 3, rc 4, tc 1+3, wt 1+2+3); a 2023 case simply has no label 4",
        _NEW, {1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"}, "BraTS-MET-{index:05d}-000", "-",
        subregions=("NETC", "SNFH", "ET", "RC"), regions=_POST, id_pattern=r"BraTS-MET-\d+-\d+"),
    "ssa": _release(
        "ssa", "BraTS 2023-24 sub-Saharan Africa glioma (BraTS-SSA-00002-000-t1c.nii.gz). Labels as the "
        "2023 adult glioma: 1 NETC, 2 SNFH, 3 ET (Adewole et al., arXiv 2305.19369; " + _EVAL
        + "config_GoAT.yaml)",
        _NEW, {1: "NETC", 2: "SNFH", 3: "ET"}, "BraTS-SSA-{index:05d}-000", "-",
        subregions=("NETC", "SNFH", "ET"), regions={"WT": ("NETC", "SNFH", "ET"), "TC": ("NETC", "ET"),
                                                    "ET": ("ET",)}, id_pattern=r"BraTS-SSA-\d+-\d+"),
    "ped-2024": _release(
        "ped-2024", "BraTS 2024-25 paediatric (BraTS-PED-00001-000-t1c.nii.gz; defaced, not skull-stripped). "
        "Labels 1 ET, 2 NETC, 3 CC (cystic component), 4 ED: Kazerooni et al., arXiv 2404.15009; " + _EVAL
        + "config_ped.yaml (et 1, netc 2, cc 3, ed 4, tc 1+2+3, wt 1+2+3+4). The 2023 PED release uses the "
        "same file names with other labels: a BraTS-PED folder needs --release ped-2024 or ped-2023",
        _NEW, {1: "ET", 2: "NETC", 3: "CC", 4: "ED"}, "BraTS-PED-{index:05d}-000", "-",
        subregions=("ET", "NETC", "CC", "ED"),
        regions={"WT": ("ET", "NETC", "CC", "ED"), "TC": ("ET", "NETC", "CC"), "ET": ("ET",), "NETC": ("NETC",),
                 "CC": ("CC",), "ED": ("ED",)}, id_pattern=r"BraTS-PED-\d+-\d+", detect=False),
    "ped-2023": _release(
        "ped-2023", "BraTS 2023 paediatric (BraTS-PED-00001-000-t1c.nii.gz; defaced). Labels as the 2023 adult "
        "glioma: 1 NETC (necrosis, cyst, non-enhancing), 2 SNFH, 3 ET (Kazerooni et al., arXiv 2305.17033)",
        _NEW, {1: "NETC", 2: "SNFH", 3: "ET"}, "BraTS-PED-{index:05d}-000", "-",
        subregions=("NETC", "SNFH", "ET"), regions={"WT": ("NETC", "SNFH", "ET"), "TC": ("NETC", "ET"),
                                                    "ET": ("ET",)}, id_pattern=r"BraTS-PED-\d+-\d+", detect=False),
    "men-rt": _release(
        "men-rt", "BraTS 2024 meningioma radiotherapy (BraTS-MEN-RT-0000-1_t1c.nii.gz, ..._gtv.nii.gz): one "
        "modality, T1Gd, in native space, defaced; one label, 1 = GTV (gross tumour volume with any at-risk "
        "post-operative site): LaBella et al., arXiv 2405.18383; " + _EVAL + "config_MenRT.yaml (gtv 1)",
        {"t1c": "t1gd", "gtv": SEG}, {1: "GTV"}, "BraTS-MEN-RT-{index:04d}-1", "_",
        modalities=("t1gd",), subregions=("GTV",), regions={"GTV": ("GTV",)}, id_pattern=r"BraTS-MEN-RT-\d+-\d+"),
    "msd": _release(
        "msd", "Medical Segmentation Decathlon Task01_BrainTumour (imagesTr/BRATS_001.nii.gz, one 4D volume "
        "FLAIR, T1w, T1Gd, T2w; labelsTr/BRATS_001.nii.gz): labels 1 oedema, 2 non-enhancing tumour, "
        "3 enhancing tumour, per the task's dataset.json (Antonelli et al., Nat. Commun. 13, 4128, 2022)",
        {}, {1: "ED", 2: "NET", 3: "ET"},
        "BRATS_{index:03d}", "",
        subregions=("NET", "ED", "ET"), regions={"WT": ("NET", "ED", "ET"), "TC": ("NET", "ET"), "ET": ("ET",)},
        id_pattern=r"BRATS_\d+", layout="msd"),
})
MSD_ORDER = ("flair", "t1", "t1gd", "t2")  # the modalities of an MSD 4D volume, in its 4th axis (dataset.json)


# other names of an entry: BraTS 2018, 2019 and 2021 ship the 2020 file names and labels
ALIASES = MappingProxyType({"2018": "2020", "2019": "2020", "2021": "2020"})


def release_name(name: str | None) -> str | None:
    """The table's name for a release name a user may type (2018, 2019, 2021 -> 2020)."""
    return ALIASES.get(name, name) if isinstance(name, str) else name


def release(name: str) -> Release:
    try:
        return RELEASES[release_name(name)]
    except KeyError:
        raise ValueError(f"unknown release {name!r}; known: {', '.join(RELEASES)}") from None


def release_of_values(values) -> Release:
    """The release of a label map that comes without file names to tell it, between the 2018-2021
    and 2023 glioma conventions only (the one whose enhancing-tumour label is among `values`,
    e.g. 3 present, 4 absent -> 2023; otherwise 2020). Every other release is told by its names
    (`release_of_id`) or named (--release): label 4 is ET in 2020 but RC in gli-2024."""
    present = set(values)
    hits = [r for r in (RELEASES["2020"], RELEASES["2023"]) if r.et_label in present]
    return hits[0] if len(hits) == 1 else RELEASES["2020"]


def release_of_id(pid: str) -> Release | None:
    """The release a patient id alone names (post-treatment GLI, MEN, MET, SSA, MEN-RT, MSD), or
    None when the id does not tell (2018-2021 and 2023 GLI ids, PED ids, anything else)."""
    hits = [r for r in RELEASES.values() if r.detect and r.id_pattern and r.matches_id(pid)]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------- the label algebra
# Written for any release: sub-regions are disjoint label sets; regions are unions of sub-regions
# (`Release.regions`). For the 2018-2023 glioma sets these are [NCR/NET, ED, ET] and [WT, TC, ET].

GLIOMA = None  # set below: the release whose channels the functions assume when none is given


def subregion_channels(seg: np.ndarray, rel: Release) -> np.ndarray:
    """Label map (...) -> bool (K, ...): one channel per sub-region of `rel`, in its order."""
    return np.stack([seg == rel.label_of(s) for s in rel.subregions])


def _members(rel: Release) -> list[list[int]]:
    """Per region, the channel indices of its sub-regions."""
    return [[rel.subregions.index(s) for s in subs] for subs in rel.regions.values()]


def regions_of(subregions: np.ndarray, axis: int = 0, rel: Release | None = None) -> np.ndarray:
    """Sub-region channels along `axis` -> regions (bool), each the union of its sub-regions
    (glioma: [NCR/NET, ED, ET] -> [WT, TC, ET])."""
    rel = rel or GLIOMA
    sub = [np.take(subregions, i, axis=axis).astype(bool) for i in range(len(rel.subregions))]
    out = []
    for idx in _members(rel):
        r = sub[idx[0]].copy()
        for i in idx[1:]:
            r |= sub[i]
        out.append(r)
    return np.stack(out, axis=axis)


def _smallest_region(rel: Release) -> list[int]:
    """Per sub-region, the index of the smallest region holding it (glioma: NCR/NET -> TC,
    ED -> WT, ET -> ET); each sub-region must have its own (the table's regions are chosen so)."""
    sizes = [len(subs) for subs in rel.regions.values()]
    regs = list(rel.regions.values())
    return [min((i for i, subs in enumerate(regs) if s in subs), key=lambda i: sizes[i]) for s in rel.subregions]


def _inner(rel: Release, r: int) -> list[int]:
    """The regions strictly inside region `r` that no other such region contains (glioma: WT -> [TC],
    TC -> [ET])."""
    regs = [set(v) for v in rel.regions.values()]
    inside = [i for i, g in enumerate(regs) if g < regs[r]]
    return [i for i in inside if not any(regs[i] < regs[j] for j in inside)]


def subregions_of(regions: np.ndarray, axis: int = 0, rel: Release | None = None) -> np.ndarray:
    """Regions along `axis` -> sub-regions (bool): each sub-region is its smallest region less the
    largest regions inside that one (glioma: NCR/NET = TC - ET, ED = WT - TC, ET = ET). The
    inverse of `regions_of` on nested regions."""
    rel = rel or GLIOMA
    reg = [np.take(regions, i, axis=axis).astype(bool) for i in range(len(rel.regions))]
    out = []
    for r in _smallest_region(rel):
        s = reg[r].copy()
        for i in _inner(rel, r):
            s &= ~reg[i]
        out.append(s)
    return np.stack(out, axis=axis)


def encode_mask(seg: np.ndarray, rel: Release, mode: str = "subregions") -> np.ndarray:
    """Label map (...) -> uint8 channels (K, ...) of `rel.channels(mode)`."""
    rel.channels(mode)  # ValueError for an unknown mode
    sub = subregion_channels(seg, rel)
    return (sub if mode == "subregions" else regions_of(sub, 0, rel)).astype(np.uint8)


def to_regions(channels: np.ndarray, mode: str, axis: int = 0, rel: Release | None = None) -> np.ndarray:
    """Channels of a shard set's mask mode, along `axis` -> the release's regions (bool)."""
    return channels.astype(bool) if mode == "regions" else regions_of(channels, axis, rel)


def to_labels(positive: np.ndarray, mode: str, rel: Release) -> np.ndarray:
    """Bool channels (K, ...) of `rel.channels(mode)` -> uint8 label map. A voxel takes the label of
    its most specific positive channel: a sub-region is positive where its smallest region is
    (regions mode), and sub-regions are painted from the largest smallest-region to the smallest,
    later ones winning (glioma: ET > NCR/NET (TC) > ED (WT); gli-2024: RC and ET over NETC over SNFH)."""
    lab = np.zeros(positive.shape[1:], np.uint8)
    smallest = _smallest_region(rel)
    for i in paint_order(rel):
        ch = positive[i] if mode == "subregions" else positive[smallest[i]]
        lab[ch.astype(bool)] = rel.label_of(rel.subregions[i])
    return lab


def paint_order(rel: Release) -> list[int]:
    """The sub-region indices in the order `to_labels` paints them, later ones winning: by the
    size of their smallest region, largest first (stable: ties keep the table's order)."""
    smallest = _smallest_region(rel)
    sizes = [len(v) for v in rel.regions.values()]
    return sorted(range(len(rel.subregions)), key=lambda i: -sizes[smallest[i]])


def label_rule(rel: Release, mode: str) -> str:
    """In words, how `to_labels` turns bool channels of `rel.channels(mode)` into a label map (the
    label values of the sub-regions are the release's)."""
    subs, regs = list(rel.subregions), list(rel.regions)
    first = " > ".join(subs[i] for i in reversed(paint_order(rel)))
    if mode == "regions":
        smallest = _smallest_region(rel)
        first += "; a sub-region is positive where its smallest region is (" + ", ".join(
            f"{subs[i]}: {regs[smallest[i]]}" for i in range(len(subs))) + ")"
    return f"a voxel takes the label of its most specific positive sub-region: {first}; else 0"


GLIOMA = RELEASES["2020"]
