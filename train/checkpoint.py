"""Checkpoints: written atomically, loaded with weights_only=True (safe for files from others)."""

from __future__ import annotations

from pathlib import Path

import torch

from shards.atomic import atomic_path


def save(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: Path, map_location="cpu") -> dict:
    if not Path(path).exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
