"""Training-step throughput on this machine, and the loader's headroom over it.

    python bench/train_step.py [--shards SHARDS] [--size 128] [--batch 16] [--steps 10]

For `unet` and `attention-unet` (base 32, depth 4): slices/s of forward + backward + Adam step.
With --shards, the loader's slices/s per process is measured in the same run and
headroom = loader slices/s / model slices/s. Last line: JSON.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="shard set for the loader headroom figure")
    ap.add_argument("--format", default="zarr")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    res = {"device": "cpu", "threads": torch.get_num_threads(), "size": args.size, "batch": args.batch, "models": {}}
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
