"""Training-step throughput on this machine, and the loader's headroom over it.

    python bench/train_step.py [--shards SHARDS] [--size 128] [--batch 16] [--steps 10]

For `unet` and `attention-unet` (base 32, depth 4): slices/s of forward + backward + Adam step.
With --shards, the loader's slices/s per process is measured in the same run and
headroom = loader slices/s / model slices/s. With --recipes: the training step of the seed
recipe against the default recipe (instance norm, deep supervision, SGD, batch augmentation on
the device) and the default with --context 1, at --base/--depth, ratios to the seed's in the
same run. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from train.metrics import make_loss
from train.model import MODELS, build_model


def step_rate(name: str, size: int, batch: int, steps: int, device: str) -> float:
    torch.manual_seed(0)
    model = build_model(name, 32, 4).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = make_loss("dice-bce")
    x = torch.randn(batch, 4, size, size, device=device)
    y = (torch.rand(batch, 3, size, size, device=device) > 0.95).float()
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def recipe_rate(cfg, size: int, steps: int) -> float:
    """Slices/s of the loop's training step for TrainConfig `cfg`: targets, augmentation, forward,
    the recipe's loss, backward, optimiser step."""
    from train.augment import AugmentConfig, augment_batch
    from train.loop import training_parts
    from train import recipe

    parts = training_parts(cfg, torch.device("cpu"))
    model, opt = parts["model"], parts["optimizer"]
    loss_fn = recipe.make_recipe_loss(cfg.loss)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, cfg.in_channels, size, size)
    y = (torch.rand(cfg.batch_size, 3, size, size, generator=gen) > 0.9).float()
    groups = torch.arange(cfg.in_channels) % 4
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        xb, yb = x, recipe.to_targets(y, cfg.targets, "subregions")  # (B, C, H, W), (B, 3, H, W)
        if cfg.augment == "nnunet":
            xb, yb = augment_batch(xb, yb, gen, AugmentConfig(), groups)
        loss = loss_fn(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cfg.batch_size * steps / (time.perf_counter() - t0)


def recipes(size: int, batch: int, steps: int, base: int, depth: int) -> dict:
    import dataclasses

    from train.loop import TrainConfig
    from train.recipe import SEED_RECIPE

    default = TrainConfig(base_channels=base, depth=depth, batch_size=batch)
    configs = {"seed": dataclasses.replace(default, **SEED_RECIPE), "default": default,
               "default+context1": dataclasses.replace(default, context=1)}
    rates = {name: recipe_rate(cfg, size, steps) for name, cfg in configs.items()}
    out = {name: {"slices_per_s": round(r, 1), "vs_seed": round(r / rates["seed"], 2)} for name, r in rates.items()}
    for name, r in out.items():
        print(f"{name:18s} {r['slices_per_s']:8.1f} slices/s  {r['vs_seed']:.2f}x the seed recipe", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="shard set for the loader headroom figure")
    ap.add_argument("--format", default="zarr")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--recipes", action="store_true", help="seed vs default recipe step rate (at --base/--depth)")
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    args = ap.parse_args()
    res = {"device": "cpu", "threads": torch.get_num_threads(), "size": args.size, "batch": args.batch, "models": {}}
    if args.recipes:
        res["recipes"] = recipes(args.size, args.batch, args.steps, args.base, args.depth)
        print(json.dumps(res))
        return
    for name in MODELS:
        r = step_rate(name, args.size, args.batch, args.steps, "cpu")
        res["models"][name] = {"slices_per_s": round(r, 1)}
        print(f"{name:15s} {r:8.1f} slices/s (CPU, {torch.get_num_threads()} threads)", flush=True)
    if args.shards:
        from loader import time_stream  # bench/loader.py: a script's own folder is first on sys.path
        from shards.source import ShardSource

        torch.set_num_threads(1)
        loader, _ = time_stream(ShardSource(args.shards), args.format, 32, 10000)
        res["loader_slices_per_s"] = round(loader)
        for name, m in res["models"].items():
            m["loader_headroom"] = round(loader / m["slices_per_s"], 1)
            print(f"{name:15s} loader headroom {m['loader_headroom']}x (loader {loader:.0f} slices/s per process)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
