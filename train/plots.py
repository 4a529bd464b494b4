"""Figures of a run, refreshed each epoch: loss curves, per-class Dice, prediction overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.atomic import atomic_path
from train import palette


def _plt():
    """pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load() -> None:
    """Import matplotlib now: the trainer calls this before its first step, because a Ctrl-C that
    lands inside matplotlib's first import (at the end of epoch 1 otherwise) surfaces as an
    ImportError from a C extension's initialisation, not as the KeyboardInterrupt that says how
    to resume."""
    _plt()


def _save(fig, path: Path) -> Path:
    with atomic_path(path, ".png") as tmp:  # matplotlib picks the format by the extension
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    return path


def curves(history: list[dict], channels: list[str], out: Path) -> list[Path]:
    """Loss and validation Dice per epoch (whole epochs on the x axis)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator  # matplotlib loads with the figures, not the module
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    ax.grid(alpha=0.3)
    a = _save(fig, out / "loss.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in channels:
        ax.plot(ep, [h[f"dice_{c}"] for h in history], "o-", label=c, color=palette.line_colour(c))
    ax.plot(ep, [h["mean_dice"] for h in history], "k--", label="mean")
    for key in [k for k in history[0] if k.startswith("patient_dice_")]:  # the release's regions
        region = key[len("patient_dice_"):]
        ax.plot(ep, [h[key] for h in history], ":", label=f"{region} (3D, per patient)",
                color=palette.line_colour(region))
    ax.set(xlabel="epoch", ylabel="Dice", title="Validation Dice", ylim=(0, 1))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    b = _save(fig, out / "dice.png")
    plt.close(fig)
    return [a, b]


def overlay(image: np.ndarray, mask: np.ndarray, channels, alpha: float = 0.45) -> np.ndarray:
    """The last modality (FLAIR; MEN-RT's T1Gd) in grey with the mask channels (named `channels`)
    painted over it in their colours, outermost first (`train.palette`): (H, W, 3) RGB."""
    g = image[-1].astype(np.float32)
    brain = np.any(image != 0, axis=0)
    lo, hi = np.percentile(g[brain], [1, 99]) if brain.any() else (0.0, 1.0)
    g = np.where(brain, np.clip((g - lo) / (hi - lo + 1e-6), 0, 1), 0)  # background black
    grey = np.repeat(g[..., None], 3, axis=-1)
    rgb = grey.copy()
    for c in palette.paint_order(list(channels)[:mask.shape[0]]):
        m = mask[c].astype(bool)
        rgb[m] = (1 - alpha) * grey[m] + alpha * palette.colour(channels[c])
    return rgb


def predictions(samples: list[dict], channels: list[str], out: Path, name: str = "predictions.png",
                title: str = "", grey: str = "FLAIR") -> Path:
    """Rows: validation slices; columns: the grey modality (`grey`: the set's last), truth overlay,
    prediction overlay."""
    plt = _plt()
    n = len(samples)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for row, s in zip(axes, samples):
        # arrays are (x, y) in RAS order: transpose so y (anterior) runs up, x (right) to the right
        row[0].imshow(overlay(s["image"], np.zeros_like(s["mask"]), channels).transpose(1, 0, 2), origin="lower")
        row[1].imshow(overlay(s["image"], s["mask"], channels).transpose(1, 0, 2), origin="lower")
        row[2].imshow(overlay(s["image"], s["pred"], channels).transpose(1, 0, 2), origin="lower")
        row[0].set_ylabel(s["key"], fontsize=7)
        for ax, t in zip(row, (grey, "truth", "prediction")):
            ax.set_title(t, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            for text, x, y in (("L", 0.05, 0.5), ("R", 0.95, 0.5), ("P", 0.5, 0.06), ("A", 0.5, 0.94)):
                ax.text(x, y, text, transform=ax.transAxes, color="white", fontsize=6, ha="center", va="center")
    fig.suptitle(f"{title}\n{palette.legend(channels)}", fontsize=9)
    p = _save(fig, out / name)
    plt.close(fig)
    return p
