"""Shared fixtures: tiny synthetic releases written on the fly (no real data, no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from preprocess.synthetic import make_demo_data

TINY = (48, 48, 24)


@pytest.fixture(scope="session")
def release_2020(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats2020")
    make_demo_data(root, 6, shape=TINY, release="2020", seed=1)
    return root


@pytest.fixture(scope="session")
def release_2023(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats2023")
    make_demo_data(root, 3, shape=TINY, release="2023", seed=2)
    return root


@pytest.fixture
def release_copy(release_2020, tmp_path) -> Path:
    """A private copy a test may damage."""
    dst = tmp_path / "input"
    shutil.copytree(release_2020, dst)
    return dst


@pytest.fixture(scope="session")
def shard_set(release_2020, tmp_path_factory) -> Path:
    """A small built shard set (both formats, 32x32 slices, 6 patients)."""
    from preprocess.pipeline import PreprocessConfig
    from preprocess.build import BuildConfig, build

    out = tmp_path_factory.mktemp("shards") / "set"
    build(release_2020, out, BuildConfig(preprocess=PreprocessConfig(size=32), val_fraction=0.2), workers=0,
          progress=False)
    return out
