"""`train`: stream a shard set into a 2D U-Net; checkpoint, resume, metrics, plots, DDP.

Read `train` top to bottom: setup -> (resume) -> per epoch: train steps, validate, schedule,
record. The helpers below it each do one of those steps.
Determinism: the data order depends on (seed, epoch) only, augmentation draws on (seed, epoch,
step), the learning rate on (epoch, step), and the torch RNG is reseeded from (seed, epoch) at the
start of every epoch, so a run killed and resumed from its last checkpoint reaches the same
weights as a straight run. Mid-epoch: every `checkpoint_every` steps last.pt also holds the
loader's position (epoch, steps done, the epoch's running loss); a resume replays that epoch's
stream from its start and skips the batches already trained on (reading them again, not
training on them: the loader runs far faster than training), then goes on as the straight run did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from shards.domain import MODALITY_NAMES, Release
from shards.manifest import set_channels
from shards.redact import redact
from shards.source import ShardSource
from train import checkpoint, plots, recipe, runfolder, tracking
from train.augment import AugmentConfig, augment_batch
from train.config import TrainConfig, chooses_postprocess, model_channels, release_of_set
from train.data import SliceStream, StreamConfig, derive_seed, fold_patients
from train.errors import TrainError
from train.model import build_model, init_he
from train.resume import check_position, restore, resumed_config
from train.runfolder import read_val_patients, refuse_existing_run, refuse_links, start_run_folder, write_metrics, \
    write_val_patients
from train.runlock import RunLock
from train.runtime import autocast, barrier, dist_env, loader, pick_device, progress_bar, to_device
from train.validate import check_geometries, choose_postprocess, epoch_record, reduce, summary, thinned_validation, validate


@dataclass
class Run:
    """One training run while it runs: where it writes, what it trains on and with, and what it
    has reached (history, next epoch, best mean Dice, post-processing, a mid-epoch position)."""
    out: Path
    cfg: TrainConfig
    source: ShardSource
    rank: int
    world: int
    device: torch.device
    parts: dict  # checkpoint.STATEFUL: model, optimizer, scheduler, scaler
    net: torch.nn.Module  # the model as trained: wrapped by DDP and/or compiled
    loss_fn: Callable
    train_ds: SliceStream
    val_ds: SliceStream
    rel: Release
    set_mode: str  # the set's mask mode: 'subregions' or 'regions'
    output_mode: str  # the outputs' mask mode
    names: list[str]  # the output channels
    groups: torch.Tensor  # the modality of each input channel (augmentation draws per modality)
    history: list = field(default_factory=list)
    start: int = 0
    best: float = -1.0
    post: dict = field(default_factory=dict)
    position: dict | None = None

    @property
    def last_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    def state(self, epoch: int, position: dict | None = None) -> dict:
        return checkpoint.state(self.parts, epoch, self.cfg, self.source, self.names, self.history, self.best,
                                self.output_mode, self.post, position)


@dataclass
class Tally:
    """An epoch's training so far: batches read, loss summed over slices, slices, keys seen.
    `skip`: the batches a mid-epoch resume replays without training on them."""
    skip: int = 0
    batches: int = 0
    loss_sum: float = 0.0
    n_seen: int = 0
    keys: list = field(default_factory=list)
    seconds: float = 0.0


def train(shards: str, out: str | Path, cfg: TrainConfig, resume: bool = False, progress: bool = True,
          cache_dir: str | None = None, storage_options: dict | None = None,
          cache_bytes: int = 20 * 2**30, overwrite: bool = False, remote_timeout: float = 60.0,
          log: tuple[str, ...] = (), run_name: str | None = None, given: dict[str, str] | None = None) -> list[dict]:
    """Train into OUT. OUT holding a run needs `resume` (continue it) or `overwrite` (replace it).
    `log`: experiment trackers besides metrics.csv and the plots ("tensorboard", "mlflow").
    `given` (resume): the options the user gave, field -> option; the others are the
    checkpoint's (train/resume.py; None: all of `cfg` was given). One run at a time holds OUT
    (train/runlock.py): a second one is refused before it reads or writes anything there."""
    tracking.require(list(log))  # on every rank, before anything is written: a missing package is refused up front
    rank, _, distributed = dist_env()
    with RunLock(Path(out)) if rank == 0 else contextlib.nullcontext():
        # -- setup (and resume)
        run = setup(shards, Path(out), cfg, resume, overwrite, given,
                    dict(cache_dir=cache_dir, storage_options=storage_options, cache_bytes=cache_bytes,
                         timeout=remote_timeout))
        cfg, opt = run.cfg, run.parts["optimizer"]
        if rank == 0 and (note := thinned_validation(run.source.manifest["config"], cfg.folds)):
            print(note, file=sys.stderr, flush=True)
        trackers = start_recording(run, shards, overwrite, log, run_name, quiet=not progress) if rank == 0 else []
        if rank == 0:
            plots.load()  # a Ctrl-C in a later first import would not read as one (plots.load)
        ok = False
        try:  # the trackers are closed however the loop ends (MLflow marks a failed run)
            for epoch in range(run.start, cfg.epochs):
                # -- train steps (from a mid-epoch position when resuming one)
                tally = train_epoch(run, epoch, progress)

                # -- validate
                val = validate(run.net, loader(run.val_ds, run.val_ds.num_workers), run.loss_fn, run.device,
                               (cfg.targets, run.set_mode), keep=4 if rank == 0 else 0,
                               collect=cfg.postprocess and chooses_postprocess(run.rel), rel=run.rel)
                stats = reduce(tally.loss_sum, tally.n_seen, val, distributed)
                row = epoch_record(epoch, stats, run.names, opt.param_groups[0]["lr"], tally.seconds,
                                   tally.n_seen * run.world, run.rel)

                # -- schedule
                if cfg.schedule == "plateau":
                    run.parts["scheduler"].step(row["mean_dice"])
                run.history.append(row)
                is_best = row["mean_dice"] > run.best
                run.best = max(run.best, row["mean_dice"])
                if is_best and cfg.postprocess and chooses_postprocess(run.rel):  # the best model's thresholds
                    run.post = choose_postprocess(val["stacks"], run.source)  # on this rank's validation patients

                # -- record (rank 0 alone writes)
                if rank == 0:
                    record_epoch(run, epoch, row, val, stats["patients"], is_best, trackers)
                    if progress:
                        print(summary(row, run.names, tuple(run.rel.regions)), flush=True)
            ok = True
        finally:
            tracking.close_all(trackers, ok)
        if distributed:
            barrier(run.device)
        return run.history


# ---------------------------------------------------------------- setup

def setup(shards: str, out: Path, cfg: TrainConfig, resume: bool, overwrite: bool, given: dict | None,
          source_options: dict) -> Run:
    """Refuse an OUT that is not ours to write, open the shard set, take the options of the
    checkpoint when resuming, and build the model, optimizer, streams and loss; a resume loads
    its checkpoint's state and mid-epoch position into them."""
    rank, world, distributed = dist_env()
    device = pick_device(cfg.device)
    refuse_existing_run(out, resume, overwrite)
    refuse_links(out)
    if distributed:  # every rank has looked at OUT before rank 0 writes anything there
        barrier(device)
    source = ShardSource(shards, **source_options)
    ck = None
    if resume:  # the options a resume runs with come from the checkpoint, before anything is built
        ck, cfg = resumed_config(out / "checkpoints" / "last.pt", source, cfg, given)
        device = pick_device(cfg.device)
    source.select_plane(cfg.plane)  # the plane's slices and geometry; what the checkpoint records for predict
    check_geometries(source)
    cfg = dataclasses.replace(cfg, fmt=cfg.fmt or ("zarr" if "zarr" in source.layouts() else "wds"))
    set_mode, rel = set_mode_of(source), release_of_set(source.manifest["config"])
    n_mod = len(set_channels(source.manifest)[0])
    train_pids, val_pids = split_patients(source, cfg, shards)
    parts = training_parts(cfg, device, *model_channels(source.manifest["config"], cfg))
    loss_fn = recipe.make_recipe_loss(cfg.loss, cfg.dice_smooth)
    run = Run(out, cfg, source, rank, world, device, parts, parts["model"], loss_fn,
              *streams(source, cfg, rank, world, train_pids, val_pids), rel, set_mode,
              recipe.output_mode(cfg.targets, set_mode), recipe.output_names(cfg.targets, set_mode, rel),
              torch.arange(cfg.input_channels(n_mod)) % n_mod)
    if ck is not None:
        run.history, run.start, run.best, run.post = restore(run.last_path, ck, parts)
    if distributed:
        run.net = torch.nn.parallel.DistributedDataParallel(run.net, device_ids=[device.index]
                                                            if device.type == "cuda" else None)
    if cfg.compile:
        run.net = torch.compile(run.net)
    if ck is not None:
        resume_position(run, ck)
    return run


def resume_position(run: Run, ck: dict) -> None:
    """The checkpoint's mid-epoch position, checked against this run's stream and workers; the
    validation patients' file checked before training (it is appended to after the first epoch)."""
    cfg = run.cfg
    workers = (TrainConfig.from_dict(ck["config"]).num_workers, cfg.num_workers)  # (the checkpoint's, now)
    run.position = check_position(run.last_path, ck.get("position"), ck["epoch"],
                                  min(run.train_ds.batches_per_epoch(run.start), cfg.max_batches or 2**62),
                                  cfg.batch_size, workers, run.world)
    if run.rank == 0:
        read_val_patients(run.out / "val_patients.csv", tuple(run.rel.regions))
        if run.start >= cfg.epochs:
            print(f"run already has {run.start} epochs; pass --epochs > {run.start} to extend it")


def start_recording(run: Run, shards: str, overwrite: bool, log, run_name: str | None, quiet: bool = False) -> list:
    """The run folder (config.json, a cleared folder when overwriting) and the experiment trackers."""
    start_run_folder(run.out, run.cfg, shards, run.source, overwrite)
    return tracking.make_trackers(run.out, list(log), {"train": run.cfg.to_dict(), "shards": redact(shards),
                                  "manifest_sha256": run.source.manifest_sha256}, run_name, start_step=run.start + 1,
                                  quiet=quiet)


def set_mode_of(source: ShardSource) -> str:
    """The mask mode of a shard set: 'subregions' or 'regions'."""
    return source.manifest["config"]["preprocess"]["mask"]


def training_parts(cfg: TrainConfig, device: torch.device, in_channels: int | None = None,
                   out_channels: int = 3) -> dict:
    """Model, optimizer, LR schedule and loss scaler, keyed as in STATEFUL. The initial weights
    depend on the seed alone. Channels: `model_channels` of the set (default: 4 modalities, 3 outputs)."""
    torch.manual_seed(cfg.seed)
    in_channels = cfg.in_channels if in_channels is None else in_channels
    model = build_model(cfg.model, cfg.base_channels, cfg.depth, in_channels, out_channels, cfg.norm, cfg.act,
                        cfg.deep_supervision)
    if cfg.init == "he":
        init_he(model)
    model = model.to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = recipe.make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.plateau_factor,
                                                       patience=cfg.plateau_patience)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    return {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}


def split_patients(source: ShardSource, cfg: TrainConfig, shards: str) -> tuple[tuple, tuple]:
    """(training, validation) patients: the set's splits, or with --folds the training split
    divided by patient hash (`fold_patients`), fold `cfg.fold` held out for validation."""
    train_pids, val_pids = tuple(source.patients("train")), tuple(source.patients("val"))
    if cfg.folds:
        train_pids, val_pids = fold_patients(train_pids, cfg.folds, cfg.fold)  # seed-free: folds partition
    if not train_pids or not val_pids:
        what = f"fold {cfg.fold} of {cfg.folds}" if cfg.folds else "both splits"
        raise TrainError(f"{shards} needs training and validation patients in {what} "
                         f"(train {len(train_pids)}, validation {len(val_pids)})")
    return train_pids, val_pids


def streams(source: ShardSource, cfg: TrainConfig, rank: int, world: int, train_pids: tuple,
            val_pids: tuple) -> tuple[SliceStream, SliceStream]:
    """The training stream (shuffled, equal quotas per rank, oversampled) and the validation stream
    (all, in order)."""
    common = dict(fmt=cfg.fmt, batch_size=cfg.batch_size, seed=cfg.seed, buffer_size=cfg.buffer_size,
                  context=cfg.context)
    train_ds = SliceStream(source, StreamConfig(split="train", train=True, augment=cfg.augment == "light",
                                                patients=train_pids, fg_fraction=cfg.fg_fraction,
                                                fg_balance=cfg.fg_balance, **common),
                           rank, world, cfg.num_workers)
    val_split = "train" if cfg.folds else "val"
    val_ds = SliceStream(source, StreamConfig(split=val_split, train=False, patients=val_pids, **common), rank, world,
                         cfg.num_workers)
    if train_ds.batches_per_epoch(0) == 0:
        raise TrainError(f"too few training slices per worker for batch size {cfg.batch_size}: "
                         f"lower --batch-size or --num-workers")
    return train_ds, val_ds


# ---------------------------------------------------------------- one epoch

def train_epoch(run: Run, epoch: int, progress: bool) -> Tally:
    """Train on one epoch of the stream; a resumed mid-epoch position replays the batches trained
    on before the checkpoint (read again, not trained on) and goes on from there. Every
    `checkpoint_every` steps last.pt also holds the position."""
    cfg = run.cfg
    torch.manual_seed(derive_seed(cfg.seed, epoch, "torch") % 2**63)
    run.train_ds.set_epoch(epoch)
    t0 = time.perf_counter()
    run.net.train()
    tally = resumed_tally(run.position, epoch)
    n_total = min(run.train_ds.batches_per_epoch(), cfg.max_batches or float("inf"))
    bar = progress_bar(n_total, f"epoch {epoch + 1}/{cfg.epochs}", progress and run.rank == 0)
    bar.update(tally.skip)
    for step, batch in enumerate(loader(run.train_ds, cfg.num_workers)):
        if cfg.max_batches and step >= cfg.max_batches:
            break
        tally.batches = step + 1
        if step < tally.skip:  # trained on before the checkpoint: replayed, not trained on
            continue
        loss = train_step(run, epoch, step, n_total, batch)
        tally.loss_sum += loss * len(batch["keys"])
        tally.n_seen += len(batch["keys"])
        if cfg.log_samples:
            tally.keys.extend(batch["keys"])
        if run.rank == 0 and cfg.checkpoint_every and tally.batches % cfg.checkpoint_every == 0 \
                and tally.batches < n_total:
            save_position(run, epoch, tally)
        bar.update()
        bar.set_postfix(loss=f"{tally.loss_sum / tally.n_seen:.4f}",
                        slices_s=f"{tally.n_seen / (time.perf_counter() - t0):.0f}")
    bar.close()
    tally.seconds = time.perf_counter() - t0
    if cfg.log_samples:
        runfolder.log_samples(run.out, run.rank, epoch, tally.batches, tally.keys)
    return tally


def train_step(run: Run, epoch: int, step: int, n_total: int, batch: dict) -> float:
    """One optimizer step on `batch`; its loss. The learning rate comes from (epoch, step) alone
    and the augmentation draws from (seed, epoch, step, rank), so a resume lands on the same ones."""
    cfg, opt, scaler = run.cfg, run.parts["optimizer"], run.parts["scaler"]
    if cfg.schedule != "plateau":
        recipe.set_lr(opt, cfg.lr, recipe.lr_factor(cfg.schedule, (epoch + step / n_total) / cfg.epochs,
                                                    cfg.warmup_epochs / cfg.epochs))
    x, y = to_device(batch, run.device)  # (B, M(2k+1), H, W), (B, K, H, W)
    y = recipe.to_targets(y, cfg.targets, run.set_mode, run.rel)
    if cfg.augment == "nnunet":  # on the training device
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, step, run.rank, "aug") % 2**63)
        x, y = augment_batch(x, y, gen, AugmentConfig(), run.groups.to(x.device))
    with autocast(run.device):
        loss = run.loss_fn(run.net(x), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip:  # nnU-Net clips the gradient norm at 12 (on unscaled gradients)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(run.net.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss.item()


def resumed_tally(position: dict | None, epoch: int) -> Tally:
    """Where epoch `epoch` starts: from nothing, or from the checkpoint's mid-epoch position in it
    (whose torch RNG state is restored)."""
    if not position or position["epoch"] != epoch:
        return Tally()
    torch.set_rng_state(position["rng"])
    return Tally(skip=position["batch"], loss_sum=position["loss_sum"], n_seen=position["n_seen"],
                 keys=list(position["keys"]))


def save_position(run: Run, epoch: int, tally: Tally) -> None:
    """last.pt as of the previous epoch's end, plus the position within epoch `epoch`."""
    pos = {"epoch": epoch, "batch": tally.batches, "loss_sum": tally.loss_sum, "n_seen": tally.n_seen,
           "keys": tally.keys, "rng": torch.get_rng_state(), "world": run.world}
    checkpoint.save(run.last_path, run.state(epoch - 1, pos))


def record_epoch(run: Run, epoch: int, row: dict, val: dict, patients: dict, is_best: bool, trackers) -> None:
    """Checkpoints, metrics.csv, val_patients.csv, the plots and the trackers, after an epoch."""
    state = run.state(epoch)
    checkpoint.save(run.last_path, state)
    if is_best:
        checkpoint.save(run.out / "checkpoints" / "best.pt", state)
    write_metrics(run.out, run.history)
    write_val_patients(run.out, patients, epoch, tuple(run.rel.regions))
    plots.curves(run.history, run.names, run.out / "plots")
    if val["samples"]:
        plots.predictions(val["samples"], run.names, run.out / "plots", title=f"epoch {epoch + 1}",
                          grey=MODALITY_NAMES[run.rel.modalities[-1]])
    tracking.log_epoch(trackers, row, val["samples"], run.names)
