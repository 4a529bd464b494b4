"""The training recipe's parts that are not the loop: targets, loss with deep supervision,
optimiser, learning-rate schedule.

Two recipes are named here. `SEED_RECIPE` is the seed notebook's (batch norm + ReLU, the set's own
mask channels, Adam with plateau decay, no augmentation, no oversampling, no context, no
post-processing); a checkpoint written before these options existed is read with it. The defaults
of `TrainConfig` are the field's 2D recipe after nnU-Net (Isensee et al. 2021, and its BraTS 2020
entry): region targets WT/TC/ET with sigmoid outputs, instance norm + leaky ReLU, SGD with
Nesterov momentum 0.99 and the poly schedule, batch augmentation on the device, one third of each
batch with tumour, and post-processing thresholds chosen on validation. nnU-Net's deep
supervision is an option, off: the benchmark measured the recipe better without it (and no worse
at 3x the slices). The quality benchmark (bench/quality.py, BENCHMARKS.md) measures each
ingredient against them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shards.domain import RELEASES, Release
from train.metrics import make_loss

# the seed notebook's recipe, as TrainConfig field values
SEED_RECIPE = {"norm": "batch", "act": "relu", "deep_supervision": False, "targets": "channels",
               "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "plateau",
               "augment": "off", "fg_fraction": 0.0, "fg_balance": False, "context": 0, "postprocess": False}


# ---------------------------------------------------------------- targets

def output_mode(targets: str, set_mode: str) -> str:
    """Mask mode of the model's outputs: 'regions' when training on regions, else the set's own."""
    return "regions" if targets == "regions" else set_mode


def output_names(targets: str, set_mode: str, rel: Release = RELEASES["2020"]) -> list[str]:
    """The model's output channels: the release's regions (glioma [WT, TC, ET]; gli-2024 adds RC,
    which is scored on its own; MEN-RT [GTV]) or the set's own mask channels."""
    return list(rel.regions) if targets == "regions" else list(rel.channels(set_mode))


def to_targets(mask: torch.Tensor, targets: str, set_mode: str, rel: Release = RELEASES["2020"]) -> torch.Tensor:
    """Batch masks (B, K, H, W) of the set's mode -> the training targets: with 'regions', the
    release's regions derived from its sub-regions at train time, each the union (max) of its
    members (glioma: [NCR/NET, ED, ET] -> [WT, TC, ET])."""
    if targets != "regions" or set_mode == "regions":
        return mask
    idx = [[rel.subregions.index(s) for s in subs] for subs in rel.regions.values()]
    return torch.stack([mask[:, i].amax(dim=1) for i in idx], dim=1)


# ---------------------------------------------------------------- loss

def ds_weights(n: int) -> list[float]:
    """Deep-supervision weights of n outputs (full size first): 1, 1/2, 1/4, ..., summing to 1."""
    w = [0.5**i for i in range(n)]
    return [x / sum(w) for x in w]


def make_recipe_loss(name: str, smooth: float = 1.0):
    """The loss of one output or, for a list (deep supervision), the weighted sum over outputs,
    each against the target averaged down to its size (area pooling: soft targets at the edges)."""
    base = make_loss(name, smooth)

    def loss(outputs, target):
        if isinstance(outputs, torch.Tensor):
            return base(outputs, target)
        total = 0.0
        for w, out in zip(ds_weights(len(outputs)), outputs):
            t = target if out.shape[-2:] == target.shape[-2:] else F.adaptive_avg_pool2d(target, out.shape[-2:])
            total = total + w * base(out, t)
        return total

    return loss


# ---------------------------------------------------------------- optimiser and schedule

def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":  # nnU-Net: momentum 0.99, Nesterov
        return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay)


def lr_factor(schedule: str, progress: float, warmup: float = 0.0) -> float:
    """Multiplier of the base LR at `progress` (epochs done, fractional) / total epochs, in [0, 1].
    poly: (1 - p)^0.9 (nnU-Net); cosine: linear warm-up over the first `warmup` share, then
    half a cosine to 0; plateau: 1 (ReduceLROnPlateau acts on the base LR instead)."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "poly":
        return (1.0 - p) ** 0.9
    if schedule == "cosine":
        if warmup > 0 and p < warmup:
            return (p + 1e-3) / warmup
        q = (p - warmup) / max(1.0 - warmup, 1e-9)
        return 0.5 * (1.0 + math.cos(math.pi * q))
    return 1.0


def set_lr(opt: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = base_lr * factor
