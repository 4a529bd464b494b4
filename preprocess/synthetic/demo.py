"""`make-demo-data`: which generator writes which release."""

from __future__ import annotations

from pathlib import Path

from preprocess.synthetic.realistic import make_realistic_data
from preprocess.synthetic.releases import write_release
from preprocess.synthetic.toy import make_demo_data
from shards.domain import RELEASES, release_name

KINDS = ("realistic", "toy")
REALISTIC = ("2020", "2023")  # the glioma layouts the realistic generator's labels are
DEFACED = ("ped-2023", "ped-2024", "men-rt")  # releases whose scans are not skull-stripped


def write_demo_data(out: Path, patients: int, shape, release: str = "2020", kind: str = "realistic",
                    seed: int = 0, orientation: str = "lps", start: int = 1, progress: bool = False) -> list[str]:
    """Write `patients` synthetic cases of `release`: realistic glioma cases (2020 or 2023 layout) or
    toy ones (any release of the table; LPS storage beyond 2020/2023). ValueError, before anything
    is written, for a kind, release or orientation that does not fit."""
    release = release_name(release)
    if orientation not in ("lps", "ras"):
        raise ValueError(f"--orientation must be lps or ras, not {orientation!r}")
    if kind not in KINDS:
        raise ValueError(f"--kind must be realistic or toy, not {kind!r}")
    if kind == "realistic" and release in RELEASES and release not in REALISTIC:
        raise ValueError(f"--kind realistic writes the {' and '.join(REALISTIC)} glioma layouts only (its tumours have "
                         f"no resection cavity, cystic component or GTV); for {release} use --kind toy")
    if kind == "toy" and release not in REALISTIC:
        if release not in RELEASES:
            raise ValueError(f"unknown release {release!r}; known: {', '.join(RELEASES)}")
        return write_release(out, release, patients, shape=shape, seed=seed, start=start, defaced=release in DEFACED)
    make = make_realistic_data if kind == "realistic" else make_demo_data
    return make(out, patients, shape=shape, release=release, seed=seed, orientation=orientation, start=start,
                progress=progress)
