"""What a shard set is built with (`BuildConfig`, saved in the manifest, and its validators),
what a build returns, and the one error that stops it."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

from preprocess.config import PreprocessConfig
from shards.codecs import parse_codec_spec
from shards.errors import BratsShardsError
from shards.layout import PLANES

Format = Literal["zarr", "wds"]


class BuildError(BratsShardsError, RuntimeError):
    """The build cannot start or go on (locked or foreign output, config mismatch, bad input
    folder, output not writable); nothing more is done (exit 2)."""


@contextlib.contextmanager
def writing(path: Path):
    """Turn an OSError while writing `path` into a one-line BuildError naming it: a full disk
    or a read-only folder stops the whole build (every patient would fail the same way)."""
    try:
        yield
    except OSError as e:
        raise BuildError(f"cannot write {e.filename or path}: {e.strerror or e}") from None


def parse_formats(value) -> tuple[Format, ...]:
    """A non-empty sequence of distinct layouts, in the given order (the manifest keeps it)."""
    allowed = get_args(Format)
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value \
            or any(v not in allowed for v in value) or len(set(value)) != len(value):
        raise ValueError(f"formats must be zarr, wds or both (each once), not {value!r}")
    return tuple(value)


def parse_planes(value) -> tuple[str, ...]:
    """The slicing planes of a build: axial (every set's own slices) and coronal and/or sagittal,
    each once, in any order given; kept in the order axial, coronal, sagittal (one config)."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or "axial" not in value \
            or any(not isinstance(v, str) or v not in PLANES for v in value) or len(set(value)) != len(value):
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        raise ValueError(f"planes must list axial and any of coronal, sagittal, each once "
                         f"(e.g. axial,coronal,sagittal), not {shown[:80]!r}")
    return tuple(p for p in PLANES if p in value)


def parse_val_fraction(value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"val_fraction must be a number in [0, 1], not {value!r}")
    return value


def parse_seed(value) -> int:
    if type(value) is not int:
        raise ValueError(f"split_seed must be an integer, not {value!r}")
    return value


@dataclass(frozen=True)
class BuildConfig:
    """What a shard set is built with; validated at construction, saved in the manifest."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    val_fraction: float = 0.2
    split_seed: int = 0
    formats: tuple[Format, ...] = ("zarr", "wds")
    codec: str = "blosc-lz4:5"  # `shards.codecs.CodecName[:level]`; chosen by bench/codecs.py + bench/loader.py
    planes: tuple[str, ...] = ("axial",)  # slicing planes; a set's config lists them when not axial only

    def __post_init__(self):
        if not isinstance(self.preprocess, PreprocessConfig):
            raise ValueError(f"preprocess must be a PreprocessConfig, not {type(self.preprocess).__name__}")
        object.__setattr__(self, "formats", parse_formats(self.formats))
        object.__setattr__(self, "planes", parse_planes(self.planes))
        parse_val_fraction(self.val_fraction)
        parse_seed(self.split_seed)
        parse_codec_spec(self.codec)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["formats"] = list(self.formats)
        d["planes"] = list(self.planes)
        if self.planes == ("axial",):  # an axial set's config, as it always was
            del d["planes"]
        d["preprocess"] = self.preprocess.to_dict()  # its own record (a thinned set says whom it thins)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BuildConfig":
        """The inverse of `to_dict` (keys it does not write, e.g. a manifest's `convention`, are ignored)."""
        return cls(preprocess=PreprocessConfig.from_dict(d["preprocess"]), val_fraction=d["val_fraction"],
                   split_seed=d["split_seed"], formats=tuple(d["formats"]), codec=d["codec"],
                   planes=tuple(d.get("planes", ("axial",))))


@dataclass(frozen=True)
class BuildResult:
    """What `build` returns: the manifest it wrote, and measurements of this run (not in the manifest)."""
    manifest: dict
    built: int  # patients processed by this run
    reused: int  # patients whose files an earlier run into the folder had finished
    task_seconds: list[float] = field(default_factory=list)  # per patient built
    peak_rss_mb: list[float] = field(default_factory=list)  # per patient built: its worker's peak RSS
    changed: list[str] = field(default_factory=list)  # patients rebuilt because their sources changed
