"""Where a training process runs: torchrun's ranks, the device, mixed precision, the DataLoader
and the progress bar. Shared by the training loop and validation."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from train.errors import TrainError


def dist_env() -> tuple[int, int, bool]:
    """(rank, world, is_distributed) from torchrun's environment; joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), world, True
    return 0, 1, False


def barrier(device: torch.device) -> None:
    """Wait for every rank."""
    if device.type == "cuda" and device.index is not None:  # NCCL: name the rank's GPU, none is in use yet
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def pick_device(name: str) -> torch.device:
    """--device auto|cpu|cuda -> the device of this process (its LOCAL_RANK's GPU under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda asked for, but torch sees no CUDA device")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, mask) of a batch on `device`; on CUDA the image channels_last, as the model is."""
    x = batch["image"].to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["mask"].to(device)


def autocast(device: torch.device):
    """Mixed precision (float16) on CUDA, full precision elsewhere: training and validation alike."""
    return torch.autocast(device_type="cuda", dtype=torch.float16, enabled=device.type == "cuda")


def progress_bar(total, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="batch", disable=None if enabled else True, leave=False)


def loader(ds, num_workers: int) -> DataLoader:
    """Batches of a stream (which batches itself), read by `num_workers` processes."""
    return DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=4 if num_workers else None, pin_memory=torch.cuda.is_available())
