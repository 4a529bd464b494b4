"""The per-patient recipe's options, as a build records them in the manifest and a checkpoint
carries them to predict; validated when made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from shards.config import from_known_fields
from shards.domain import MASK_CHANNELS
from shards.layout import PLANES


THINS = "train"  # `tumour_free_thins` in a set's config: the split --tumour-free-fraction thins


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 128
    normalize: str = "volume"  # "volume" | "slice"
    crop: bool = False
    mask: str = "subregions"  # "subregions" [NCR/NET, ED, ET] | "regions" [WT, TC, ET]
    tumour_free_fraction: float = 1.0  # fraction of tumour-free brain slices kept (training patients)
    seed: int = 0
    plane: str = "axial"  # the slicing plane (a checkpoint's; a build's are BuildConfig.planes)

    def __post_init__(self):
        if self.normalize not in ("volume", "slice"):
            raise ValueError(f"normalize must be 'volume' or 'slice', not {self.normalize!r}")
        if self.mask not in MASK_CHANNELS:
            raise ValueError(f"mask must be {' or '.join(map(repr, MASK_CHANNELS))}, not {self.mask!r}")
        if not 0.0 <= self.tumour_free_fraction <= 1.0:
            raise ValueError("tumour_free_fraction must lie in [0, 1]")
        if not 8 <= self.size <= 1024:
            raise ValueError("size must lie in [8, 1024]")
        if self.plane not in PLANES:
            raise ValueError(f"plane must be one of {', '.join(PLANES)}, not {str(self.plane)[:40]!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.plane == "axial":  # every axial recipe's record, as it always was
            del d["plane"]
        if self.tumour_free_fraction < 1.0:  # the sets that thin say whom: training patients only
            d["tumour_free_thins"] = THINS
        return d

    def for_split(self, split: str) -> "PreprocessConfig":
        """The recipe of a patient of `split`: validation patients keep every brain slice, so
        their per-patient figures count false positives on tumour-free slices too."""
        return self if split == "train" else replace(self, tumour_free_fraction=1.0)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return from_known_fields(cls, d)
