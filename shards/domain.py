"""The BraTS vocabulary, as data: releases, modalities, label values, channel sets, and the label
algebra (labels -> sub-region channels -> regions -> labels), written once.

Every folder imports it: `preprocess/` to read a release and encode masks, `shards/` to name
channels in the contract, `train/` to score and to write predictions back. Adding a release is
adding a `Release` entry to `RELEASES`; nothing else branches on release names.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Release:
    """One naming and labelling convention of a BraTS release."""

    name: str
    description: str
    suffixes: MappingProxyType  # file-name suffix after the patient id -> modality key (or SEG)
    labels: MappingProxyType  # label value -> sub-region it marks (0, background, is implicit)
    case_id: str  # format of the i-th patient id, as the release names its cases: .format(index=i)
    separator: str  # between the patient id and the file suffix ("PID_t1.nii.gz", "PID-t1n.nii.gz")

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

    def file_suffix(self, modality: str) -> str:
        (suffix,) = [s for s, m in self.suffixes.items() if m == modality]
        return suffix

    def file_name(self, pid: str, modality: str, ext: str = ".nii.gz") -> str:
        """The release's name of one patient's file: `file_name("P", "t1gd")` -> "P_t1ce.nii.gz"."""
        return f"{pid}{self.separator}{self.file_suffix(modality)}{ext}"


def _release(name: str, description: str, suffixes: dict, labels: dict, case_id: str, separator: str) -> Release:
    return Release(name, description, MappingProxyType(suffixes), MappingProxyType(labels), case_id, separator)


RELEASES = MappingProxyType({
    "2020": _release(
        "2020", "BraTS 2018-2021 (BraTS20_Training_001_t1ce.nii.gz, BraTS2021_00000_t1ce.nii.gz)",
        {"t1": "t1", "t1ce": "t1gd", "t2": "t2", "flair": "flair", "seg": SEG},
        {1: "NCR/NET", 2: "ED", 4: "ET"}, "BraTS20_Training_{index:03d}", "_"),
    "2023": _release(
        "2023", "BraTS 2023 adult glioma (BraTS-GLI-00000-000-t1c.nii.gz)",
        {"t1n": "t1", "t1c": "t1gd", "t2w": "t2", "t2f": "flair", "seg": SEG},
        {1: "NCR/NET", 2: "ED", 3: "ET"}, "BraTS-GLI-{index:05d}-000", "-"),
})


def release(name: str) -> Release:
    try:
        return RELEASES[name]
    except KeyError:
        raise ValueError(f"unknown release {name!r}; known: {', '.join(RELEASES)}") from None


def release_of_values(values) -> Release:
    """The release of a label map that comes without file names to tell it: the one release whose
    enhancing-tumour label is among `values` (e.g. 3 present, 4 absent -> 2023); otherwise the
    first release of the table."""
    present = set(values)
    hits = [r for r in RELEASES.values() if r.et_label in present]
    return hits[0] if len(hits) == 1 else next(iter(RELEASES.values()))


# ---------------------------------------------------------------- the label algebra

def subregion_channels(seg: np.ndarray, rel: Release) -> np.ndarray:
    """Label map (...) -> bool (3, ...): [NCR/NET, ED, ET]."""
    return np.stack([seg == rel.label_of(s) for s in SUBREGIONS])


def regions_of(subregions: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sub-region channels [NCR/NET, ED, ET] along `axis` -> regions [WT, TC, ET] (bool)."""
    ncr, ed, et = (np.take(subregions, i, axis=axis).astype(bool) for i in range(3))
    return np.stack([ncr | ed | et, ncr | et, et], axis=axis)


def subregions_of(regions: np.ndarray, axis: int = 0) -> np.ndarray:
    """Nested regions [WT, TC, ET] along `axis` -> sub-regions [NCR/NET, ED, ET] (bool): NCR/NET =
    TC - ET, ED = WT - TC. The inverse of `regions_of` on nested regions."""
    wt, tc, et = (np.take(regions, i, axis=axis).astype(bool) for i in range(3))
    return np.stack([tc & ~et, wt & ~tc, et], axis=axis)


def encode_mask(seg: np.ndarray, rel: Release, mode: str = "subregions") -> np.ndarray:
    """Label map (...) -> uint8 channels (3, ...) of MASK_CHANNELS[mode]."""
    if mode not in MASK_CHANNELS:
        raise ValueError(f"unknown mask mode {mode!r}; choose {' or '.join(MASK_CHANNELS)}")
    sub = subregion_channels(seg, rel)
    return (sub if mode == "subregions" else regions_of(sub)).astype(np.uint8)


def to_regions(channels: np.ndarray, mode: str, axis: int = 0) -> np.ndarray:
    """Channels of a shard set's mask mode, along `axis` -> regions [WT, TC, ET] (bool)."""
    return channels.astype(bool) if mode == "regions" else regions_of(channels, axis)


def to_labels(positive: np.ndarray, mode: str, rel: Release) -> np.ndarray:
    """Bool channels (3, ...) -> uint8 label map. A voxel takes the label of its most specific
    positive channel: sub-regions ET > NCR/NET > ED; nested regions ET > TC (-> NCR/NET) > WT
    (-> ED)."""
    lab = np.zeros(positive.shape[1:], np.uint8)
    a, b, et = positive  # (NCR/NET, ED) for sub-regions, (WT, TC) for regions
    ncr, ed = (a, b) if mode == "subregions" else (b, a)
    lab[ed] = rel.label_of("ED")
    lab[ncr] = rel.label_of("NCR/NET")
    lab[et] = rel.et_label
    return lab
