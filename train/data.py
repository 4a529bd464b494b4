"""Streaming slices from a shard set: an IterableDataset that yields ready batches.

Each epoch: the split's patients (one shard file each) are shuffled with a seed derived from
(seed, epoch), dealt to ranks, then to DataLoader workers; every worker reads whole patients
(one call per patient) into a bounded shuffle buffer and yields batches of `batch_size`.
Every rank yields the same number of batches (DDP would hang otherwise): worker w of every rank
stops after the same quota, the smallest slice count any rank's worker w holds, rounded down to
whole batches. Same seed, same order. Memory: the buffer plus one patient, whatever the set size.

Recipe options (`StreamConfig`):
  * `patients`: an explicit subset of the split (cross-validation folds, `fold_patients`).
  * `context` K (2.5D): each slice's image carries the slices at source offsets -K..K, M modality
    channels each, in offset order (the slice itself in the middle). Rule for a neighbour that is
    not stored (outside the brain's slice range, or a tumour-free slice dropped at build time): the
    nearest stored slice between it and the centre slice takes its place (at the edges: the edge
    slice repeated). `with_context` is shared with `predict`, which keeps every brain slice.
  * `fg_fraction` (foreground oversampling, nnU-Net's 1/3): each training batch holds at least
    ceil(fg_fraction * batch) slices with tumour. A batch short of them gets tumour slices, drawn
    with replacement from the last `FG_RESERVOIR` tumour slices this worker has read, in place of
    randomly chosen tumour-free ones. Batch counts do not change, so every rank still gets the
    same number of batches, and the draws come from the worker's seeded generator.
  * `fg_balance` (nnU-Net's own sampling): instead, ceil(fg_fraction * batch) slices of every
    batch are drawn from that reservoir, each for a mask channel chosen evenly among those present
    and then a slice weighted by that channel's pixels (`oversample_balanced`).
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

FG_RESERVOIR = 256  # recent tumour slices a worker keeps to oversample from (references, no copies)


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
    augment: bool = False  # the seed recipe's light augmentation, in the loader (`augment`)
    patients: tuple[str, ...] | None = None  # None: the whole split
    context: int = 0  # 2.5D: neighbouring slices on each side, as extra channels
    fg_fraction: float = 0.0  # share of each training batch that holds tumour (at least)
    fg_balance: bool = False  # nnU-Net's sampling: that share always drawn, each for a mask channel chosen evenly

    def __post_init__(self):
        check_choices(self)
        if self.context < 0 or not 0.0 <= self.fg_fraction <= 1.0:
            raise ValueError(f"context must be >= 0 and fg_fraction in [0, 1], not {self.context}, {self.fg_fraction}")
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
        self.patients = sorted(source.patients(cfg.split) if cfg.patients is None else cfg.patients)

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
        if not self.cfg.context:
            return self.source.read_patient(pid, self.cfg.fmt, per_slice=True)
        image, mask, keys = self.source.read_patient(pid, self.cfg.fmt)
        image = with_context(image, self.source.manifest["patients"][pid]["slice_index"], self.cfg.context)
        return [a.copy() for a in image], [m.copy() for m in mask], keys  # each slice owns its memory

    def slices(self, pids):
        """Per patient of `pids`, its slices as (image, mask, key, patient) items."""
        for pid in pids:
            image, mask, keys = self.read_patient(pid)
            # the id travels with each slice: keys rewrite '.' to '_', so they cannot give it back
            yield [(img, m, key, pid) for img, m, key in zip(image, mask, keys)]

    def samples(self, pids, rng):
        """Slices of `pids`, through the shuffle buffer when training (`rng`). Every slice owns its
        memory, so the buffer's size bounds what is held."""
        if rng is None:
            return (item for items in self.slices(pids) for item in items)
        return shuffled(self.slices(pids), self.cfg.buffer_size, rng, self._held)

    def _held(self, n: int) -> None:
        self.peak_buffered = max(self.peak_buffered, n)

    def __iter__(self):
        """The stages: this worker's patients -> their slices (shuffled through the buffer when
        training) -> the worker's quota -> batches -> foreground oversampling -> collated tensors."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_workers:
            raise RuntimeError(f"SliceStream planned for {self.num_workers} workers, DataLoader has {workers}")
        pids = deal(self.order(self.epoch), self.rank, self.world, worker, workers)
        train = self.cfg.train
        rng = np.random.default_rng(derive_seed(self.cfg.seed, self.epoch, self.rank, worker)) if train else None
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.epoch, self.rank, worker, "aug") % 2**63)
        items = self.samples(pids, rng)
        if train:  # every rank's worker w yields the same number of whole batches
            items = take(items, self.quota(self.epoch, worker))
        batches = batched(items, self.cfg.batch_size, keep_last=not train)
        if train and self.cfg.fg_fraction:
            batches = with_foreground(batches, self.cfg.fg_fraction, rng, self.cfg.fg_balance)
        for batch in batches:
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


def shuffled(groups, buffer_size: int, rng, held=None):
    """Items of `groups` (lists, a patient's slices each) in a shuffled order: each group joins a
    buffer, from which random items leave while it holds more than `buffer_size`; what is left
    at the end leaves shuffled. `held(n)` is told the buffer's size after each group joins."""
    buf = []
    for group in groups:
        buf.extend(group)
        if held is not None:
            held(len(buf))
        while len(buf) > buffer_size:
            j = rng.integers(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def take(items, n: int):
    """The first `n` of `items`."""
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def batched(items, size: int, keep_last: bool):
    """Lists of `size` items; the last, shorter one too when `keep_last`."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch and keep_last:
        yield batch


def with_foreground(batches, fraction: float, rng, balance: bool = False):
    """Each batch with at least ceil(fraction * len) tumour slices (`oversample`), drawn from the
    last FG_RESERVOIR tumour slices of the stream so far (this batch's included); with `balance`,
    ceil(fraction * len) of its slices always drawn, class-balanced (`oversample_balanced`)."""
    reservoir, areas = [], []  # areas: each reservoir slice's pixels per mask channel (balance only)
    for batch in batches:
        new = [item for item in batch if item[1].any()]
        reservoir.extend(new)
        del reservoir[:-FG_RESERVOIR]
        if balance:  # counted once per slice, as it enters
            areas.extend(channel_areas(item[1]) for item in new)
            del areas[:-FG_RESERVOIR]
            oversample_balanced(batch, reservoir, fraction, rng, np.array(areas))
        else:
            oversample(batch, reservoir, fraction, rng)
        yield batch


def channel_areas(mask: np.ndarray) -> np.ndarray:
    """Pixels of each channel of a slice's mask (K, H, W) -> (K,) int64."""
    return mask.reshape(mask.shape[0], -1).sum(1, dtype=np.int64)


def oversample_balanced(batch: list, reservoir: list, fraction: float, rng, areas: np.ndarray | None = None) -> None:
    """In place, as nnU-Net samples foreground: ceil(fraction * len) randomly placed slices of the
    batch are replaced by draws from `reservoir`, each for a mask channel chosen evenly among those
    the reservoir holds, then a slice with probability proportional to that channel's pixels in it
    (nnU-Net: a foreground class or region, then one of its voxels). Rare classes (ET) get their
    share of the drawn slices however small they are. `areas` (R, K): `channel_areas` of the
    reservoir's slices, when the caller keeps them."""
    n = int(np.ceil(fraction * len(batch) - 1e-9))
    if n <= 0 or not reservoir:
        return
    if areas is None:
        areas = np.array([channel_areas(item[1]) for item in reservoir])  # (R, K)
    present = np.flatnonzero(areas.sum(0))
    for i in rng.choice(len(batch), size=min(n, len(batch)), replace=False):
        c = present[rng.integers(len(present))]
        batch[i] = reservoir[rng.choice(len(reservoir), p=areas[:, c] / areas[:, c].sum())]


def oversample(batch: list, reservoir: list, fraction: float, rng) -> None:
    """In place: give `batch` at least ceil(fraction * len) tumour slices, replacing randomly chosen
    tumour-free ones by draws (with replacement) from `reservoir`."""
    need = int(np.ceil(fraction * len(batch) - 1e-9)) - sum(bool(b[1].any()) for b in batch)
    empty = [i for i, b in enumerate(batch) if not b[1].any()]
    if need <= 0 or not reservoir or not empty:
        return
    for i in rng.choice(empty, size=min(need, len(empty)), replace=False):
        batch[i] = reservoir[rng.integers(len(reservoir))]


def neighbour_rows(slice_index, k: int) -> np.ndarray:
    """(S, 2k+1) row numbers: for stored slice i (source index z) and offset d, the stored row of
    source slice z+d, or, when that slice is not stored, of the nearest stored slice between it
    and z (see the module docstring)."""
    z = np.asarray(slice_index, dtype=np.int64)
    row_of = {int(v): i for i, v in enumerate(z)}
    out = np.empty((len(z), 2 * k + 1), np.int64)
    for i, zi in enumerate(z):
        for j, d in enumerate(range(-k, k + 1)):
            step = -1 if d > 0 else 1
            t = int(zi) + d
            while t not in row_of:  # walk back towards the centre slice, which is stored
                t += step
            out[i, j] = row_of[t]
    return out


def with_context(image: np.ndarray, slice_index, k: int) -> np.ndarray:
    """(S, C, H, W) -> (S, C*(2k+1), H, W): each slice with its neighbours at offsets -k..k."""
    if k == 0:
        return image
    rows = neighbour_rows(slice_index, k)  # (S, 2k+1)
    S, C = image.shape[:2]
    return image[rows].reshape(S, C * (2 * k + 1), *image.shape[2:])


FOLD_RULE = "patient-id"  # the fold rule of `fold_of`, recorded in checkpoints (train/resume.py)


def fold_of(pid: str, folds: int, seed: int | None = None) -> int:
    """The cross-validation fold of a patient: from the hash of its id alone, as the build's split
    is, so a patient keeps its fold when others are added, and the K runs of `--folds K` hold
    every patient out exactly once whatever `--seed` each was given (a seed in the hash would
    let two runs with different seeds hold one patient out twice and another never). `seed` is
    not used: it is kept so that old callers still run, and gives the same folds."""
    return int(derive_seed("fold", pid) / 2**64 * folds)


def fold_patients(train_pids, folds: int, fold: int,
                  seed: int | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training patients, held-out patients) of fold `fold` of the training split (`fold_of`:
    by patient id alone, so the folds partition the patients whatever the seed)."""
    held = tuple(sorted(p for p in train_pids if fold_of(p, folds) == fold))
    return tuple(sorted(p for p in train_pids if fold_of(p, folds) != fold)), held


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
