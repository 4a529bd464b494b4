"""Streaming slices from a shard set: an IterableDataset that yields ready batches.

Each epoch: the split's patients (one shard file each) are shuffled with a seed derived from
(seed, epoch), dealt to ranks, then to DataLoader workers; every worker reads whole patients
(one call per patient) into a bounded shuffle buffer and yields batches of `batch_size`.
Every rank yields the same number of batches (DDP would hang otherwise): worker w of every rank
stops after the same quota, the smallest slice count any rank's worker w holds, rounded down to
whole batches. Same seed, same order. Memory: the buffer plus one patient, whatever the set size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shards.config import check_choices
from shards.source import ShardSetError


def derive_seed(*parts) -> int:
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little")


@dataclass(frozen=True)
class StreamConfig:
    split: Literal["train", "val"] = "train"
    fmt: Literal["zarr", "wds"] = "zarr"
    batch_size: int = 32
    seed: int = 0
    train: bool = True  # shuffle, equal quotas, augmentation allowed; False: in order, everything
    buffer_size: int = 1024  # slices the shuffle buffer keeps, besides the patient being read
    augment: bool = False

    def __post_init__(self):
        check_choices(self)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if self.buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, not {self.buffer_size}")


def deal(items: list, rank: int, world: int, worker: int, workers: int) -> list:
    return items[rank::world][worker::workers]


class SliceStream(IterableDataset):
    def __init__(self, source, cfg: StreamConfig, rank: int = 0, world: int = 1, num_workers: int = 1):
        super().__init__()
        if cfg.fmt not in source.layouts():
            raise ShardSetError(f"the shard set holds {source.layouts()}, not {cfg.fmt}")
        self.source, self.cfg = source, cfg
        self.rank, self.world, self.num_workers = rank, world, max(num_workers, 1)
        self.epoch = 0
        self.peak_buffered = 0  # most slices held at once by this process (memory bound check)
        self.patients = sorted(source.patients(cfg.split))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- the plan: which patients and how many samples each (rank, worker) gets
    def order(self, epoch: int) -> list[str]:
        pids = list(self.patients)
        if self.cfg.train:
            np.random.default_rng(derive_seed(self.cfg.seed, epoch, "shards")).shuffle(pids)
        return pids

    def quota(self, epoch: int, worker: int) -> int | None:
        """Samples worker `worker` of every rank yields this epoch (None: all, in order)."""
        if not self.cfg.train:
            return None
        pids = self.order(epoch)
        per_rank = [sum(self.source.n_slices(p) for p in deal(pids, r, self.world, worker, self.num_workers))
                    for r in range(self.world)]
        return min(per_rank) // self.cfg.batch_size * self.cfg.batch_size

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        e = self.epoch if epoch is None else epoch
        if self.cfg.train:
            return sum(self.quota(e, w) for w in range(self.num_workers)) // self.cfg.batch_size
        b = self.cfg.batch_size
        return sum(-(-sum(self.source.n_slices(p) for p in deal(self.order(e), self.rank, self.world, w,
                                                               self.num_workers)) // b)
                   for w in range(self.num_workers))

    # -- reading
    def read_patient(self, pid: str):
        """(images, masks, keys) of one patient, one array per slice (`ShardSource.read_patient`:
        read bounded by the manifest, a mismatch is a ShardFormatError naming the file)."""
        return self.source.read_patient(pid, self.cfg.fmt, per_slice=True)

    def samples(self, pids, rng):
        """Slices of `pids`, through the shuffle buffer when training. Every slice owns its
        memory, so the buffer's size bounds what is held."""
        buf = []
        for pid in pids:
            image, mask, keys = self.read_patient(pid)
            # the id travels with each slice: keys rewrite '.' to '_', so they cannot give it back
            items = [(img, m, key, pid) for img, m, key in zip(image, mask, keys)]
            if rng is None:
                yield from items
                continue
            buf.extend(items)
            self.peak_buffered = max(self.peak_buffered, len(buf))
            while len(buf) > self.cfg.buffer_size:
                j = rng.integers(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        if rng is not None:
            rng.shuffle(buf)
            yield from buf

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != self.num_workers:
            raise RuntimeError(f"SliceStream planned for {self.num_workers} workers, DataLoader has {workers}")
        pids = deal(self.order(self.epoch), self.rank, self.world, worker, workers)
        quota = self.quota(self.epoch, worker)
        rng = np.random.default_rng(derive_seed(self.cfg.seed, self.epoch, self.rank, worker)) if self.cfg.train else None
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.epoch, self.rank, worker, "aug") % 2**63)
        batch, n = [], 0
        for item in self.samples(pids, rng):
            if quota is not None and n >= quota:
                break
            batch.append(item)
            n += 1
            if len(batch) == self.cfg.batch_size:
                yield self.collate(batch, gen)
                batch = []
        if batch and quota is None:
            yield self.collate(batch, gen)

    def collate(self, batch, gen):
        # gather and convert to float32 in one pass per sample (torch's vectorised half->float)
        image = torch.empty((len(batch),) + batch[0][0].shape, dtype=torch.float32)  # (B, 4, H, W)
        mask = torch.empty((len(batch),) + batch[0][1].shape, dtype=torch.float32)  # (B, 3, H, W)
        for i, (img, m, _, _) in enumerate(batch):
            image[i].copy_(torch.from_numpy(img))
            mask[i].copy_(torch.from_numpy(m))
        if self.cfg.augment and self.cfg.train:
            image, mask = augment(image, mask, gen)
        return {"image": image, "mask": mask, "keys": [b[2] for b in batch], "patients": [b[3] for b in batch]}


def augment(image: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, max_deg: float = 15.0):
    """Same random flips and rotation (within +-max_deg) for image and mask; intensity
    scale/shift per sample and channel on the brain (nonzero) pixels."""
    import torch.nn.functional as F

    B = image.shape[0]
    flip_h = torch.rand(B, generator=gen) < 0.5
    flip_w = torch.rand(B, generator=gen) < 0.5
    image = torch.where(flip_h[:, None, None, None], image.flip(-2), image)
    mask = torch.where(flip_h[:, None, None, None], mask.flip(-2), mask)
    image = torch.where(flip_w[:, None, None, None], image.flip(-1), image)
    mask = torch.where(flip_w[:, None, None, None], mask.flip(-1), mask)
    theta = (torch.rand(B, generator=gen) * 2 - 1) * np.deg2rad(max_deg)
    c, s = torch.cos(theta), torch.sin(theta)
    affine = torch.zeros(B, 2, 3)
    affine[:, 0, 0], affine[:, 0, 1], affine[:, 1, 0], affine[:, 1, 1] = c, -s, s, c
    grid = F.affine_grid(affine, list(image.shape), align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = F.grid_sample(mask, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    scale = 1 + (torch.rand(B, image.shape[1], 1, 1, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(B, image.shape[1], 1, 1, generator=gen) * 2 - 1) * 0.1
    image = image * scale + shift * (image != 0)
    return image, mask
