"""`make-demo-data`: which generator writes which release."""

from __future__ import annotations

from pathlib import Path

from preprocess.synthetic.realistic import make_realistic_data
from preprocess.synthetic.releases import write_release
from preprocess.synthetic.toy import make_demo_data
from shards.domain import RELEASES, release_name

KINDS = ("realistic", "toy")
TOY_GLIOMA = ("2020", "2023")  # the toy glioma's own layouts (other releases: preprocess.synthetic.releases)
DEFACED = ("ped-2023", "ped-2024", "men-rt")  # toy cases of these get a scalp (not skull-stripped)


def write_demo_data(out: Path, patients: int, shape, release: str = "2020", kind: str = "realistic",
                    seed: int = 0, orientation: str = "lps", start: int = 1, progress: bool = False) -> list[str]:
    """Write `patients` synthetic cases of `release` (any release of the table), realistic or toy
    (LPS storage beyond 2020/2023). ValueError, before anything is written, for a kind, release or
    orientation that does not fit."""
    release = release_name(release)
    if orientation not in ("lps", "ras"):
        raise ValueError(f"--orientation must be lps or ras, not {orientation!r}")
    if kind not in KINDS:
        raise ValueError(f"--kind must be realistic or toy, not {kind!r}")
    if release not in RELEASES:
        raise ValueError(f"unknown release {release!r}; known: {', '.join(RELEASES)}")
    if kind == "toy" and release not in TOY_GLIOMA:
        return write_release(out, release, patients, shape=shape, seed=seed, start=start, defaced=release in DEFACED)
    make = make_realistic_data if kind == "realistic" else make_demo_data
    return make(out, patients, shape=shape, release=release, seed=seed, orientation=orientation, start=start,
                progress=progress)
