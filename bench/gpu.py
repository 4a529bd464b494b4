"""Ready for a GPU in one command: the default recipe's training step under each speed setting,
the loader's delivered rate next to it, and a DDP run on every visible GPU.

    python bench/gpu.py [--shards SHARDS] [--out DIR]      # on a GPU machine
    python bench/gpu.py --smoke                            # anywhere (CI): tiny sizes, CPU, gloo

Measured (slices/s of forward + the recipe's loss + backward + optimiser step, the default recipe
at base 32 / depth 4 with deep supervision, random inputs, after warm-up steps):
  * step: at 128^2 and 192^2, batch 32, 64 and 128, for fp32, AMP fp16 (with the loss scaler),
    AMP bf16, each of those with channels_last, and torch.compile on the fastest of them. A
    setting that does not fit in memory or is not supported is reported with its reason.
  * loader: slices/s the streaming loader delivers from SHARDS with 0, 2, 4, 8 ... workers (up
    to the CPU count), beside the fastest step rate at the set's slice size: the share of the
    model's appetite the loader covers.
  * ddp: `torchrun --nproc_per_node N cli.py train SHARDS` on the N visible GPUs (NCCL) for a few
    batches: wall time and slices/s.
--smoke: the same code paths at 32^2, batch 4, 2 steps, on the CPU (fp32, bf16, channels_last;
fp16 and compile reported as skipped), a toy shard set built on the fly, DDP as 2 CPU processes
(gloo). Numbers from --smoke say the paths run, nothing about speed. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def settings() -> list[dict]:
    """Precision x memory format (compile is added on the fastest of them)."""
    out = []
    for amp in ("fp32", "fp16", "bf16"):
        for channels_last in (False, True):
            out.append({"amp": amp, "channels_last": channels_last, "compile": False})
    return out


def step_rate(size: int, batch: int, setting: dict, device: torch.device, steps: int, base: int, depth: int) -> float:
    """Slices/s of the default recipe's training step at one setting."""
    from train import recipe
    from train.config import TrainConfig
    from train.loop import training_parts

    cfg = TrainConfig(base_channels=base, depth=depth, batch_size=batch)
    parts = training_parts(cfg, device)
    model, opt = parts["model"], parts["optimizer"]
    model = model.to(memory_format=torch.channels_last if setting["channels_last"] else torch.contiguous_format)
    if setting["compile"]:
        model = torch.compile(model)
    loss_fn = recipe.make_recipe_loss(cfg.loss)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(setting["amp"])
    scaler = torch.amp.GradScaler(device.type, enabled=setting["amp"] == "fp16")
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, size, size, device=device, generator=gen)
    if setting["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 3, size, size, device=device, generator=gen) > 0.9).float()
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps (compile's happen here)
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def steps_table(device: torch.device, smoke: bool, steps: int, base: int, depth: int) -> list[dict]:
    sizes, batches = ((32,), (4,)) if smoke else ((128, 192), (32, 64, 128))
    rows = []
    for size in sizes:
        for batch in batches:
            best = None
            for s in settings():
                row = {"size": size, "batch": batch, **s}
                if device.type != "cuda" and s["amp"] == "fp16":
                    rows.append({**row, "skipped": "fp16 autocast is for CUDA"})
                    continue
                rows.append(_measure(row, size, batch, s, device, steps, base, depth))
                if "slices_per_s" in rows[-1] and (best is None or rows[-1]["slices_per_s"] > best[1]):
                    best = (s, rows[-1]["slices_per_s"])
            if best is not None:
                s = dict(best[0], compile=True)
                row = {"size": size, "batch": batch, **s}
                rows.append(_measure(row, size, batch, s, device, steps, base, depth) if device.type == "cuda"
                            else {**row, "skipped": "compile measured on CUDA only (minutes of CPU compilation)"})
    return rows


def _measure(row, size, batch, s, device, steps, base, depth) -> dict:
    try:
        rate = step_rate(size, batch, s, device, steps, base, depth)
    except (RuntimeError, torch.OutOfMemoryError) as e:  # out of memory, an unsupported dtype
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "skipped": " ".join(str(e).split())[:200]}
    print(f"{size}px batch {batch} {s['amp']}{' channels_last' if s['channels_last'] else ''}"
          f"{' compile' if s['compile'] else ''}: {rate:.0f} slices/s", flush=True)
    return {**row, "slices_per_s": round(rate, 1)}


def loader_rates(shards: str, batch: int, max_batches: int, workers: list[int]) -> list[dict]:
    """Slices/s the training stream delivers with each worker count (the loop's own loader)."""
    from shards.source import ShardSource
    from train.data import SliceStream, StreamConfig
    from train.runtime import loader

    out = []
    for n in workers:
        ds = SliceStream(ShardSource(shards), StreamConfig(batch_size=batch), num_workers=n)
        t0, seen = time.perf_counter(), 0
        for i, b in enumerate(loader(ds, n)):
            seen += len(b["keys"])
            if i + 1 >= max_batches:
                break
        rate = seen / (time.perf_counter() - t0)
        print(f"loader, {n} workers: {rate:.0f} slices/s", flush=True)
        out.append({"workers": n, "slices_per_s": round(rate, 1)})
    return out


def ddp_run(shards: str, n: int, smoke: bool, out: Path) -> dict:
    """A few batches of `train` on n processes (one per GPU, NCCL; --smoke: CPU, gloo)."""
    run = out / "ddp-run"
    batches, batch = (2, 4) if smoke else (50, 64)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(REPO / "cli.py"), "train", shards, "--out", str(run), "--overwrite", "--epochs", "1",
           "--max-batches", str(batches), "--batch-size", str(batch), "--quiet", "--num-workers", "0" if smoke else "4"]
    if smoke:
        cmd += ["--base-channels", "4", "--depth", "2", "--device", "cpu"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:  # the command's own one-line error, else the end of what it printed
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        return {"processes": n, "failed": errors[0] if errors else " ".join(done.stderr.split())[-300:]}
    backend = "gloo" if smoke else "nccl"
    print(f"ddp: {n} processes ({backend}), {seconds:.1f} s", flush=True)
    return {"processes": n, "backend": backend, "seconds": round(seconds, 1),
            "slices_per_s_with_startup": round(n * batches * batch / seconds, 1)}


def smoke_set(tmp: Path) -> str:
    """A toy shard set of 6 patients at 32 px, built in-process."""
    from preprocess.build import BuildConfig, build
    from preprocess.config import PreprocessConfig
    from preprocess.synthetic.toy import make_demo_data

    make_demo_data(tmp / "in", 6, shape=(48, 48, 32), seed=0)
    build(tmp / "in", tmp / "shards", BuildConfig(preprocess=PreprocessConfig(size=32), val_fraction=0.34),
          workers=0, progress=False)
    return str(tmp / "shards")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", help="shard set for the loader and DDP figures (default with --smoke: a toy set)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the code paths, not speed")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for the DDP run (default: a temporary one)")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    tmp = Path(a.out or tempfile.mkdtemp(prefix="brats-shards-gpu-"))
    base, depth, steps = (4, 2, a.steps or 2) if a.smoke else (32, 4, a.steps or 20)
    res = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "smoke": a.smoke,
           "torch": torch.__version__, "step": steps_table(device, a.smoke, steps, base, depth)}
    shards = a.shards or (smoke_set(tmp) if a.smoke else None)
    if shards:
        cpus = os.cpu_count() or 1
        workers = [0, 1] if a.smoke else [n for n in (0, 2, 4, 8, 16, 32) if n <= cpus]
        res["loader"] = loader_rates(shards, 4 if a.smoke else 64, 3 if a.smoke else 100, workers)
        measured = [r["slices_per_s"] for r in res["step"] if "slices_per_s" in r]
        res["loader_covers"] = round(max(r["slices_per_s"] for r in res["loader"]) / max(measured), 2) if measured else None
        n = 2 if a.smoke else torch.cuda.device_count()
        res["ddp"] = ddp_run(shards, n, a.smoke, tmp) if n else {"skipped": "no GPU visible"}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
