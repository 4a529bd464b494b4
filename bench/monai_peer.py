"""A peer recipe for the quality benchmark: MONAI's DynUNet (nnU-Net-like) recipe, in 2D, trained on
our shard sets and scored by our own predict/evaluate.

    python bench/monai_peer.py SHARDS --slices 20000 --out DIR   # one JSON line

Needs the `bench` extra (`monai>=1.4`). The recipe is MONAI's own published DynUNet pipeline
(Project-MONAI/tutorials `modules/dynunet_pipeline`: create_network.py, train.py, trainer.py,
transforms.py, task_params.py for Task01_BrainTumour), carried from 3D patches to 2D slices; the
sigmoid region targets come from MONAI's BraTS tutorial (`3d_segmentation/brats_segmentation_3d.ipynb`).

  * network: `DynUNet(spatial_dims=2, in_channels=4, out_channels=3)`, kernels 3x3 at every level,
    strides from the slice size as `get_kernels_strides` does for isotropic spacing ([1,1] first,
    then [2,2] while the feature map is >= 8 pixels), `upsample_kernel_size=strides[1:]`, MONAI's
    default filters (32, 64, ... capped at 512), instance norm, leaky ReLU, deep supervision with
    `deep_supr_num` 3 (Task01's value; fewer when the slice is too small to have that many levels).
  * loss: `DiceFocalLoss(sigmoid=True)` (MONAI defaults: gamma 2, equal weights) on the region
    channels [WT, TC, ET], summed over the deep-supervision heads with weights 1, 0.5, 0.25, ...
    (trainer.py; DynUNet itself upsamples the heads to full size). Sigmoid because the regions
    overlap, as the BraTS tutorial's DiceLoss does. Not the pipeline's DiceCELoss: for more than one
    channel its CE term is a softmax cross-entropy whatever `sigmoid` says (monai/losses/dice.py), so
    with multi-label targets background pixels (all channels 0) add no CE loss and nothing pushes
    false positives down: measured here, 60 steps gave WT Dice 0.15 with half the pixels called TC,
    against 0.68 with DiceFocal. DiceFocal is MONAI's compound loss whose second term is per-channel
    sigmoid (FocalLoss, use_softmax=False).
  * optimiser: SGD lr 1e-2 (train.py's default; nnU-Net's too), momentum 0.99, nesterov, weight decay
    3e-5; poly schedule lr * (1 - t/T)^0.9 (train.py's `-lr_decay` option), stepped per batch here
    because the budget is counted in slices, not epochs; gradient norm clipped at 12 (trainer.py).
  * augmentation, per sample on the CPU (transforms.py, 3D -> 2D): RandZoomd 0.9-1.2 (bilinear image,
    nearest label) p=0.15; RandGaussianNoised std 0.01 p=0.15; RandGaussianSmoothd sigma 0.5-1.15
    p=0.15; RandScaleIntensityd factors 0.3 p=0.15; RandFlipd on each spatial axis p=0.5.
    The pipeline's cropping/normalisation steps are left out: our shard sets are already cropped,
    resized and z-normalised, the same input every compared recipe gets.

Deterministic for a seed on the CPU: `monai.utils.set_determinism(seed)`, the transforms'
random state from the seed, the slice order from a numpy Generator.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

DEEP_SUPR_NUM = 3  # task_params.py, Task01_BrainTumour
RECIPE = dict(lr=1e-2, momentum=0.99, weight_decay=3e-5, poly_power=0.9, clip_norm=12.0)


def kernels_strides(size: int) -> tuple[list[list[int]], list[list[int]]]:
    """create_network.get_kernels_strides for a square slice at isotropic spacing."""
    kernels, strides, side = [[3, 3]], [[1, 1]], size
    while side >= 8 and side % 2 == 0:
        side //= 2
        kernels.append([3, 3])
        strides.append([2, 2])
    if len(strides) < 3:
        raise ValueError(f"slice size {size}: DynUNet needs two halvings to >= 4 pixels (a size like 16, 32, 96)")
    return kernels, strides


def network_kwargs(size: int, base_filters: int | None = None) -> dict:
    """DynUNet settings; `base_filters` (None: MONAI's 32) sets the widths base * 2**level, capped
    at 512 as MONAI's default is, so the peer can match the compared recipes' widths."""
    kernels, strides = kernels_strides(size)
    # deep_supr_num must stay below the number of upsampling layers (len(strides) - 1)
    kw = dict(spatial_dims=2, in_channels=4, out_channels=3, kernel_size=kernels, strides=strides,
              upsample_kernel_size=strides[1:], norm_name="instance", deep_supervision=True,
              deep_supr_num=min(DEEP_SUPR_NUM, len(strides) - 2))
    if base_filters is not None:
        kw["filters"] = [min(base_filters * 2**i, 512) for i in range(len(strides))]
    return kw


def build_network(kwargs: dict):
    from monai.networks.nets import DynUNet

    return DynUNet(**kwargs)


def load_split(shards: str, split: str = "train") -> tuple[np.ndarray, np.ndarray, dict]:
    """All slices of a split in memory: image (N, 4, H, W) float16, regions [WT, TC, ET] (N, 3, H, W)
    uint8, and the set's preprocess config."""
    from shards.domain import to_regions
    from shards.source import ShardSource

    src = ShardSource(shards)
    pre = src.manifest["config"]["preprocess"]
    fmt = "zarr" if "zarr" in src.layouts() else "wds"
    images, masks = [], []
    for pid in src.patients(split):
        image, mask, _ = src.read_patient(pid, fmt)
        images.append(image)
        masks.append(to_regions(mask, pre["mask"], axis=1).astype(np.uint8))
    if not images or sum(len(i) for i in images) == 0:
        raise ValueError(f"{shards}: no {split} slices to train on")
    return np.concatenate(images), np.concatenate(masks), pre


def augmentation(seed: int):
    """transforms.py's training augmentation, in 2D."""
    import torch
    from monai.transforms import (Compose, EnsureTyped, RandFlipd, RandGaussianNoised, RandGaussianSmoothd,
                                  RandScaleIntensityd, RandZoomd)

    keys = ["image", "label"]
    aug = Compose([
        RandZoomd(keys=keys, min_zoom=0.9, max_zoom=1.2, mode=("bilinear", "nearest"), align_corners=(True, None),
                  prob=0.15),
        RandGaussianNoised(keys=["image"], std=0.01, prob=0.15),
        RandGaussianSmoothd(keys=["image"], sigma_x=(0.5, 1.15), sigma_y=(0.5, 1.15), prob=0.15),
        RandScaleIntensityd(keys=["image"], factors=0.3, prob=0.15),
        RandFlipd(keys=keys, spatial_axis=[0], prob=0.5),
        RandFlipd(keys=keys, spatial_axis=[1], prob=0.5),
        EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float32, track_meta=False),
    ])
    return aug.set_random_state(seed=seed % 2**32)


def batch_of(aug, image: np.ndarray, regions: np.ndarray, idx: np.ndarray):
    """Slices `idx`, each augmented on its own -> x (B, 4, H, W), y (B, 3, H, W) float32 tensors."""
    import torch

    samples = [aug({"image": image[i].astype(np.float32), "label": regions[i].astype(np.float32)}) for i in idx]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples])


def order(n: int, total: int, rng: np.random.Generator) -> np.ndarray:
    """`total` slice indices: whole shuffled passes over the n slices, the last one cut short."""
    return np.concatenate([rng.permutation(n) for _ in range(math.ceil(total / n))])[:total]


def peer_loss():
    from monai.losses import DiceFocalLoss

    return DiceFocalLoss(sigmoid=True)


def deep_supervision_loss(loss_fn, out, y):
    """out (B, 1 + heads, 3, H, W) in train mode: heads weighted 1, 0.5, 0.25, ... (trainer.py)."""
    if out.dim() == y.dim():  # no heads
        return loss_fn(out, y)
    return sum(0.5 ** i * loss_fn(p, y) for i, p in enumerate(out.unbind(1)))


def train_peer(shards: str, out: Path, slices: int, seed: int = 0, batch_size: int = 16, device: str = "cpu",
               lr: float | None = None, progress: bool = False, base_filters: int | None = None) -> dict:
    """Train MONAI's DynUNet 2D recipe on the train split of `shards` until `slices` training slices were seen
    (the same budget the compared recipes get). Writes out/peer.pt (state_dict + the DynUNet kwargs + the
    shard set's preprocess config) and returns {"model": nn.Module in eval mode whose forward gives (B,3,H,W)
    region logits [WT,TC,ET], "slices_per_s": float, "seconds": float, "preprocess": dict, "output_mode": "regions"}
    (plus "losses": the loss of every step, and "slices": how many were seen)."""
    import torch
    from monai.utils import set_determinism
    from tqdm import tqdm

    if slices < 1 or batch_size < 1:
        raise ValueError("slices and batch_size must be positive")
    image, regions, pre = load_split(shards, "train")
    set_determinism(seed=seed)
    kwargs = network_kwargs(image.shape[-1], base_filters)
    model = build_network(kwargs).to(device)
    lr0 = RECIPE["lr"] if lr is None else lr
    opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=RECIPE["momentum"],
                          weight_decay=RECIPE["weight_decay"], nesterov=True)
    steps = math.ceil(slices / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (1 - t / steps) ** RECIPE["poly_power"])
    loss_fn = peer_loss()
    aug = augmentation(seed)
    idx = order(len(image), slices, np.random.default_rng(seed))

    model.train()
    losses = []
    t0 = time.perf_counter()
    for i in tqdm(range(steps), desc="peer", unit="batch", disable=None if progress else True):
        x, y = batch_of(aug, image, regions, idx[i * batch_size: (i + 1) * batch_size])
        x, y = x.to(device), y.to(device)  # (B, 4, H, W), (B, 3, H, W)
        loss = deep_supervision_loss(loss_fn, model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["clip_norm"])
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    model.eval()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = dict(RECIPE, lr=lr0, seed=seed, batch_size=batch_size, slices=slices)
    torch.save({"model": model.state_dict(), "network": kwargs, "preprocess": pre, "recipe": recipe},
               out / "peer.pt")
    return {"model": model, "slices_per_s": slices / seconds, "seconds": seconds, "preprocess": pre,
            "output_mode": "regions", "losses": losses, "slices": slices}


def load_peer(path: str | Path, device: str = "cpu"):
    """(model in eval mode, preprocess dict) from a peer.pt (weights_only load)."""
    import torch

    ck = torch.load(path, map_location=device, weights_only=True)
    model = build_network(ck["network"])
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), ck["preprocess"]


def predict_peer(model, shards_preprocess: dict, input_dir: Path, out_dir: Path, device="cpu", tta=False) -> dict:
    """Write out_dir/<pid>.nii.gz for every patient of input_dir with train.predict.predict_patient
    (output_mode "regions"), exactly as `python cli.py predict` would for our own checkpoints.
    Returns {'written': [...], 'failed': {pid: reason}}."""
    import torch

    from preprocess.discover import discover
    from preprocess.config import PreprocessConfig
    from train.predict import predict_patient, write_predictions

    dev = torch.device(device)
    model = model.to(dev).eval()
    pre = replace(PreprocessConfig.from_dict(shards_preprocess), tumour_free_fraction=1.0)  # every brain slice
    return write_predictions(discover(input_dir, need_seg=False).patients, out_dir, False,
                             lambda pf: predict_patient(model, pre, "regions", pf, dev, 32, tta))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shards")
    p.add_argument("--slices", type=int, required=True, help="training slices to see")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lr", type=float, default=None)
    a = p.parse_args(argv)
    r = train_peer(a.shards, a.out, a.slices, a.seed, a.batch_size, a.device, a.lr, progress=True)
    first, last = np.mean(r["losses"][:10]), np.mean(r["losses"][-10:])
    print(json.dumps({"peer": str(a.out / "peer.pt"), "slices": r["slices"], "seconds": round(r["seconds"], 2),
                      "slices_per_s": round(r["slices_per_s"], 1), "loss_first10": round(float(first), 4),
                      "loss_last10": round(float(last), 4), "output_mode": r["output_mode"]}))


if __name__ == "__main__":
    main()
