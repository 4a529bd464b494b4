"""Losses and metrics for multi-label (sigmoid) segmentation.

Conventions (BraTS): Dice of an empty reference and an empty prediction is 1; of an empty
reference and a non-empty prediction (or the reverse) 0. Precision with no predicted positives
and recall with no reference positives follow the same rule (1 if the other side is empty too).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

THRESHOLD = 0.5  # an output is positive where its probability exceeds this (validation, predict, export)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over channels of soft Dice, sums over batch and pixels. (B, C, H, W)."""
    p = torch.sigmoid(logits.float())
    t = target.float()
    dims = (0, 2, 3)
    inter = (p * t).sum(dims)
    denom = p.sum(dims) + t.sum(dims)
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


def make_loss(name: str, smooth: float = 1.0):
    """`smooth`: the Dice's eps (nnU-Net: 1e-5)."""
    if name == "dice":
        return lambda logits, target: soft_dice_loss(logits, target, smooth)
    if name == "dice-bce":
        return lambda logits, target: soft_dice_loss(logits, target, smooth) + F.binary_cross_entropy_with_logits(
            logits.float(), target.float())
    raise ValueError(f"unknown loss {name!r}; choose dice or dice-bce")


def confusion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-channel (TP, FP, FN) counts of binary (B, C, H, W) tensors -> (C, 3) int64."""
    pred, target = pred.bool(), target.bool()
    dims = (0, 2, 3)
    tp = (pred & target).sum(dims)
    fp = (pred & ~target).sum(dims)
    fn = (~pred & target).sum(dims)
    return torch.stack([tp, fp, fn], dim=1).long()


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else num / den


def scores(tp: float, fp: float, fn: float) -> dict:
    """Dice, precision, recall from counts, with the empty-set conventions above."""
    return {"dice": _ratio(2 * tp, 2 * tp + fp + fn), "precision": _ratio(tp, tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0),
            "recall": _ratio(tp, tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)}


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    pred, ref = pred.astype(bool), ref.astype(bool)
    return scores(int((pred & ref).sum()), int((pred & ~ref).sum()), int((~pred & ref).sum()))["dice"]
