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
import os
import time
from pathlib import Path

import numpy as np
import torch

from shards.domain import REGIONS, RELEASES, Release, subregions_of, to_regions
from shards.errors import BratsShardsError
from shards.manifest import set_channels
from shards.redact import redact
from shards.source import ShardSource
from train import checkpoint, plots, recipe, resume as resuming, runfolder, tracking
from train.augment import AugmentConfig, augment_batch
from train.config import TrainConfig, chooses_postprocess, model_channels, release_of_set
from train.data import SliceStream, StreamConfig, derive_seed, fold_patients
from train.metrics import confusion, scores
from train.model import build_model
from train.postprocess import PostprocessConfig, choose
from train.resume import TrainError  # noqa: F401 - train.loop.TrainError, as before
from train.runfolder import read_val_patients, refuse_existing_run, refuse_links, start_run_folder, write_metrics, \
    write_val_patients
from train.runlock import RunLock


# the objects whose state a checkpoint holds, under these keys
STATEFUL = ("model", "optimizer", "scheduler", "scaler")


def set_mode_of(source: ShardSource) -> str:
    """The mask mode of a shard set: 'subregions' or 'regions'."""
    return source.manifest["config"]["preprocess"]["mask"]


def train(shards: str, out: str | Path, cfg: TrainConfig, resume: bool = False, progress: bool = True,
          cache_dir: str | None = None, storage_options: dict | None = None,
          cache_bytes: int = 20 * 2**30, overwrite: bool = False, remote_timeout: float = 60.0,
          log: tuple[str, ...] = (), run_name: str | None = None, given: dict[str, str] | None = None) -> list[dict]:
    """Train into OUT. OUT holding a run needs `resume` (continue it) or `overwrite` (replace it).
    `log`: experiment trackers besides metrics.csv and the plots ("tensorboard", "mlflow").
    `given` (resume): the options the user gave, field -> option; the others are the
    checkpoint's (train/resume.py; None: all of `cfg` was given). One run at a time holds OUT
    (train/runlock.py): a second one is refused before it reads or writes anything there."""
    rank = _dist()[0]
    with RunLock(Path(out)) if rank == 0 else contextlib.nullcontext():
        return _train(shards, Path(out), cfg, resume, progress, cache_dir, storage_options, cache_bytes, overwrite,
                      remote_timeout, log, run_name, given)


def _train(shards, out: Path, cfg: TrainConfig, resume, progress, cache_dir, storage_options, cache_bytes,
           overwrite, remote_timeout, log, run_name, given) -> list[dict]:
    # -- setup
    rank, world, distributed = _dist()
    device = pick_device(cfg.device)
    refuse_existing_run(out, resume, overwrite)
    refuse_links(out)
    if distributed:  # every rank has looked at OUT before rank 0 writes anything there
        _barrier(device)
    source = ShardSource(shards, cache_dir=cache_dir, storage_options=storage_options, cache_bytes=cache_bytes,
                         timeout=remote_timeout)
    last_path = out / "checkpoints" / "last.pt"
    ck = None
    if resume:  # the options a resume runs with come from the checkpoint, before anything is built
        ck, cfg = resumed_config(last_path, source, cfg, given)
        device = pick_device(cfg.device)
    cfg = dataclasses.replace(cfg, fmt=cfg.fmt or ("zarr" if "zarr" in source.layouts() else "wds"))
    set_mode, rel = set_mode_of(source), release_of_set(source.manifest["config"])
    mask_mode, names = recipe.output_mode(cfg.targets, set_mode), recipe.output_names(cfg.targets, set_mode, rel)
    n_mod = len(set_channels(source.manifest)[0])
    train_pids, val_pids = split_patients(source, cfg, shards)
    parts = training_parts(cfg, device, *model_channels(source.manifest["config"], cfg))
    model, opt, sched, scaler = (parts[k] for k in STATEFUL)

    # -- resume
    history, start, best, position, post = [], 0, -1.0, None, {}
    if ck is not None:
        history, start, best, post = restore(last_path, ck, parts)
    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(model,
                                                        device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    loss_fn = recipe.make_recipe_loss(cfg.loss)
    train_ds, val_ds = streams(source, cfg, rank, world, train_pids, val_pids)
    if ck is not None:
        workers = (TrainConfig.from_dict(ck["config"]).num_workers, cfg.num_workers)  # (the checkpoint's, now)
        position = resuming.check_position(last_path, ck.get("position"), ck["epoch"],
                                           min(train_ds.batches_per_epoch(start), cfg.max_batches or 2**62),
                                           cfg.batch_size, workers, world)
        if rank == 0:  # appended to after the first epoch: a damaged one is refused before training
            read_val_patients(out / "val_patients.csv", tuple(rel.regions))
        if start >= cfg.epochs and rank == 0:
            print(f"run already has {start} epochs; pass --epochs > {start} to extend it")
    aug_cfg, groups = AugmentConfig(), torch.arange(cfg.input_channels(n_mod)) % n_mod  # intensity draws per modality
    trackers = []
    if rank == 0:
        start_run_folder(out, cfg, shards, source, overwrite)
        trackers = tracking.make_trackers(out, list(log), {"train": cfg.to_dict(), "shards": redact(shards),
                                          "manifest_sha256": source.manifest_sha256}, run_name, start_step=start + 1)
    ok = False
    try:  # the trackers are closed however the loop ends (MLflow marks a failed run)
        for epoch in range(start, cfg.epochs):
            torch.manual_seed(derive_seed(cfg.seed, epoch, "torch") % 2**63)
            train_ds.set_epoch(epoch)

            # -- train steps (from a mid-epoch position when resuming one)
            t0 = time.perf_counter()
            net.train()
            done = position if position and position["epoch"] == epoch else None
            loss_sum, n_seen, skip, seen_keys = ((done["loss_sum"], done["n_seen"], done["batch"], list(done["keys"]))
                                                 if done else (0.0, 0, 0, []))
            if done:
                torch.set_rng_state(done["rng"])
            n_batches = 0
            n_total = min(train_ds.batches_per_epoch(), cfg.max_batches or float("inf"))
            bar = _bar(n_total, f"epoch {epoch + 1}/{cfg.epochs}", progress and rank == 0)
            bar.update(skip)
            for batch in _loader(train_ds, cfg.num_workers):
                if cfg.max_batches and n_batches >= cfg.max_batches:
                    break
                if n_batches < skip:  # trained on before the checkpoint: replayed, not trained on
                    n_batches += 1
                    continue
                if cfg.schedule != "plateau":  # per step, from (epoch, step) alone: a resume lands on the same LR
                    recipe.set_lr(opt, cfg.lr, recipe.lr_factor(cfg.schedule, (epoch + n_batches / n_total) / cfg.epochs,
                                                                cfg.warmup_epochs / cfg.epochs))
                x, y = to_device(batch, device)  # (B, M(2k+1), H, W), (B, K, H, W)
                y = recipe.to_targets(y, cfg.targets, set_mode, rel)
                if cfg.augment == "nnunet":  # on the training device; draws from (seed, epoch, step, rank)
                    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, n_batches, rank, "aug") % 2**63)
                    x, y = augment_batch(x, y, gen, aug_cfg, groups.to(x.device))
                with autocast(device):
                    loss = loss_fn(net(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                loss_sum += loss.item() * len(batch["keys"])
                n_seen += len(batch["keys"])
                n_batches += 1
                if cfg.log_samples:
                    seen_keys.extend(batch["keys"])
                if rank == 0 and cfg.checkpoint_every and n_batches % cfg.checkpoint_every == 0 and n_batches < n_total:
                    pos = {"epoch": epoch, "batch": n_batches, "loss_sum": loss_sum, "n_seen": n_seen, "keys": seen_keys,
                           "rng": torch.get_rng_state(), "world": world}
                    checkpoint.save(last_path, checkpoint_state(parts, epoch - 1, cfg, source, names, history, best,
                                                                mask_mode, post, pos))
                bar.update()
                bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}", slices_s=f"{n_seen / (time.perf_counter() - t0):.0f}")
            bar.close()
            train_seconds = time.perf_counter() - t0
            if cfg.log_samples:
                runfolder.log_samples(out, rank, epoch, n_batches, seen_keys)

            # -- validate
            val = validate(net, _loader(val_ds, val_ds.num_workers), loss_fn, device, (cfg.targets, set_mode),
                           keep=4 if rank == 0 else 0, collect=cfg.postprocess and chooses_postprocess(rel), rel=rel)
            stats = _reduce(loss_sum, n_seen, val, distributed)
            row = epoch_record(epoch, stats, names, opt.param_groups[0]["lr"], train_seconds, n_seen * world, rel)

            # -- schedule
            if cfg.schedule == "plateau":
                sched.step(row["mean_dice"])
            history.append(row)
            is_best = row["mean_dice"] > best
            best = max(best, row["mean_dice"])
            if is_best and cfg.postprocess and chooses_postprocess(rel):  # thresholds of the best model, on this rank's validation patients
                post = choose_postprocess(val["stacks"], source)

            # -- record (rank 0 alone writes)
            if rank == 0:
                state = checkpoint_state(parts, epoch, cfg, source, names, history, best, mask_mode, post)
                checkpoint.save(last_path, state)
                if is_best:
                    checkpoint.save(out / "checkpoints" / "best.pt", state)
                write_metrics(out, history)
                write_val_patients(out, stats["patients"], epoch, tuple(rel.regions))
                plots.curves(history, names, out / "plots")
                if val["samples"]:
                    plots.predictions(val["samples"], names, out / "plots", title=f"epoch {epoch + 1}")
                tracking.log_epoch(trackers, row, val["samples"], names)
                if progress:
                    print(_summary(row, names, tuple(rel.regions)), flush=True)
        ok = True
    finally:
        tracking.close_all(trackers, ok)
    if distributed:
        _barrier(device)
    return history


# ---------------------------------------------------------------- setup

def _dist():
    """(rank, world, is_distributed) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), world, True
    return 0, 1, False


def _barrier(device: torch.device) -> None:
    import torch.distributed as dist

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


def training_parts(cfg: TrainConfig, device: torch.device, in_channels: int | None = None,
                   out_channels: int = 3) -> dict:
    """Model, optimizer, LR schedule and loss scaler, keyed as in STATEFUL. The initial weights
    depend on the seed alone. Channels: `model_channels` of the set (default: 4 modalities, 3 outputs)."""
    torch.manual_seed(cfg.seed)
    in_channels = cfg.in_channels if in_channels is None else in_channels
    model = build_model(cfg.model, cfg.base_channels, cfg.depth, in_channels, out_channels, cfg.norm, cfg.act,
                        cfg.deep_supervision).to(device)
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
                                                patients=train_pids, fg_fraction=cfg.fg_fraction, **common),
                           rank, world, cfg.num_workers)
    val_split = "train" if cfg.folds else "val"
    val_ds = SliceStream(source, StreamConfig(split=val_split, train=False, patients=val_pids, **common), rank, world,
                         cfg.num_workers)
    if train_ds.batches_per_epoch(0) == 0:
        raise TrainError(f"too few training slices per worker for batch size {cfg.batch_size}: "
                         f"lower --batch-size or --num-workers")
    return train_ds, val_ds


def _bar(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=None if enabled else True, leave=False)


def _loader(ds, num_workers):
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=4 if num_workers else None, pin_memory=torch.cuda.is_available())


# ---------------------------------------------------------------- resume and checkpoint

def resumed_config(path: Path, source: ShardSource, cfg: TrainConfig, given: dict | None) -> tuple[dict, TrainConfig]:
    """(the checkpoint at `path`, its fields checked, the config the resume runs with): refused
    unless it comes from this shard set and the options given agree with it (train/resume.py)."""
    if not path.exists():
        raise TrainError(f"--resume: no checkpoint at {path}")
    try:  # bounded, a regular file (a FIFO would block), torch's stored zip (no bomb), weights only
        ck = checkpoint.read_raw(path)[0]
    except BratsShardsError as e:
        raise TrainError(f"--resume: {e}") from None
    resuming.check_fields(path, ck)
    try:  # then what predict and export check (weights against the config on the meta device, channels,
        checkpoint.check(ck, path)  # output mode, thresholds): one schema, so a resume refuses what they do
    except BratsShardsError as e:
        raise TrainError(f"--resume: {e}") from None
    if ck["manifest_sha256"] != source.manifest_sha256:
        raise TrainError(f"--resume: {path} was trained on another shard set (manifest hash differs)")
    try:
        old = TrainConfig.from_dict(ck["config"])
    except (TypeError, ValueError) as e:
        raise resuming.ResumeError(f"--resume: {path}: its config is not a training config ({e})") from None
    resuming.check_config(path, old)
    resuming.check_fold_rule(path, ck, old.folds)
    return ck, resuming.merged_config(cfg, old, given, path)


def restore(path: Path, ck: dict, parts: dict) -> tuple:
    """Load a checked checkpoint into `parts` (and the torch RNG): (history, next epoch, best
    mean Dice, post-processing chosen so far)."""
    resuming.load_states(path, ck, parts)
    torch.set_rng_state(ck["rng"])
    post = {"config": ck["postprocess"]} if ck.get("postprocess") else {}
    return ck["history"], ck["epoch"] + 1, float(ck["best_dice"]), post


def checkpoint_state(parts: dict, epoch: int, cfg: TrainConfig, source: ShardSource, names: list[str],
                     history: list[dict], best: float, mask_mode: str, post: dict, position: dict | None = None) -> dict:
    """What a checkpoint holds: the state of `parts`, the epoch and RNG a resume continues from,
    the config and shard set it was trained with, and what predict needs (preprocess, output
    channels and their mask mode, context, post-processing thresholds); mid-epoch, the loader
    `position` (epoch under way, steps done, running loss, keys seen, torch RNG)."""
    return {**{key: parts[key].state_dict() for key in STATEFUL}, "epoch": epoch, "config": cfg.to_dict(),
            "manifest_sha256": source.manifest_sha256, "preprocess": source.manifest["config"],
            "channels": names, "output_mode": mask_mode, "postprocess": post.get("config", {}),
            "rng": torch.get_rng_state(), "history": history, "best_dice": best, "position": position,
            "fold_rule": resuming.FOLD_RULE}


def choose_postprocess(stacks: dict, source: ShardSource) -> dict:
    """Post-processing thresholds that maximise the validation patients' region Dice (3D, on the
    stored slices), volumes in mm^3 from each patient's geometry."""
    cases = [(pred, ref, slice_voxel_mm3(source.manifest["patients"][pid]["geometry"], pred.shape[-1]))
             for pid, (pred, ref) in stacks.items()]
    return choose(cases) if cases else {"config": PostprocessConfig().to_dict(), "dice_before": 0.0,
                                         "dice_after": 0.0}


def slice_voxel_mm3(geometry: dict, size: int) -> float:
    """Volume of one voxel of a patient's resized slices: the source spacing scaled by crop/size."""
    sx, sy, sz = geometry["spacing"]
    x0, x1, y0, y1 = geometry["crop_box"]
    return sx * (x1 - x0) / size * sy * (y1 - y0) / size * sz


# ---------------------------------------------------------------- validate

@torch.no_grad()
def validate(net, batches, loss_fn, device: torch.device, modes: tuple[str, str], keep: int = 0,
             collect: bool = False, rel: Release = RELEASES["2020"]) -> dict:
    """Loss, per-channel confusion over all slices, per-patient region confusion (3D Dice), up to
    `keep` slices for the overlay figure and, with `collect`, each patient's predicted and true
    regions (3, S, H, W) for choosing post-processing. `modes`: (targets, the set's mask mode)."""
    net.eval()
    targets, set_mode = modes
    mask_mode = recipe.output_mode(targets, set_mode)
    conf = torch.zeros(len(recipe.output_names(targets, set_mode, rel)), 3, dtype=torch.long)
    sub_conf = torch.zeros(len(rel.subregions), 3, dtype=torch.long)  # the sub-regions, whatever the outputs are
    patients: dict[str, np.ndarray] = {}  # pid -> (3 regions, TP/FP/FN)
    samples: dict[str, dict] = {}
    slices: dict[str, list] = {}
    loss_sum, n = 0.0, 0
    for batch in batches:
        x, y = to_device(batch, device)
        y = recipe.to_targets(y, targets, set_mode, rel)
        with autocast(device):
            logits = net(x)
        loss_sum += loss_fn(logits, y).item() * len(batch["keys"])
        n += len(batch["keys"])
        pred, truth = (logits.float() > 0).cpu(), y.bool().cpu()  # (B, K, H, W) bool
        conf += confusion(pred, truth)
        pr, tr = to_regions(pred.numpy(), mask_mode, 1, rel), to_regions(truth.numpy(), mask_mode, 1, rel)  # once
        sub_conf += confusion(torch.from_numpy(subregions_of(pr, 1, rel)), torch.from_numpy(subregions_of(tr, 1, rel)))
        _count_patient_regions(patients, pr, tr, batch["patients"])
        if keep:
            _keep_largest_tumour(samples, batch, pred, truth, len(rel.modalities))
        if collect:
            for i, pid in enumerate(batch["patients"]):
                slices.setdefault(pid, []).append((pr[i], tr[i]))
    samples = sorted(samples.values(), key=lambda s: s["key"])[:keep]
    stacks = {pid: (np.stack([p for p, _ in v], axis=1), np.stack([t for _, t in v], axis=1))
              for pid, v in slices.items()}  # pid -> (pred, truth) regions (3, S, H, W)
    return {"loss_sum": loss_sum, "n": n, "confusion": conf, "sub_confusion": sub_conf, "patients": patients,
            "samples": samples, "stacks": stacks}


def _count_patient_regions(patients: dict, pred_regions: np.ndarray, true_regions: np.ndarray,
                           pids: list[str]) -> None:
    """Add a batch's region (TP, FP, FN), from bool (B, R, H, W) regions, to each patient's counts."""
    n = pred_regions.shape[1]
    pr = pred_regions.reshape(len(pids), n, -1)  # (B, R regions, H*W)
    tr = true_regions.reshape(len(pids), n, -1)
    for pid, p, t in zip(pids, pr, tr):  # ids come with the batch: keys map '.' to '_' and cannot give them
        c = patients.setdefault(pid, np.zeros((n, 3), np.int64))
        c[:, 0] += (p & t).sum(1)
        c[:, 1] += (p & ~t).sum(1)
        c[:, 2] += (~p & t).sum(1)


def _keep_largest_tumour(samples: dict, batch: dict, pred: torch.Tensor, truth: torch.Tensor, n_mod: int = 4) -> None:
    """Keep, per patient, the slice with the most tumour seen so far (its own M modalities)."""
    area = truth.flatten(1).sum(1)
    for i, (key, pid) in enumerate(zip(batch["keys"], batch["patients"])):
        if area[i] > 0 and (pid not in samples or area[i] > samples[pid]["area"]):
            image = batch["image"][i].numpy()
            mid = (image.shape[0] - n_mod) // 2  # with context: the centre slice's modalities
            samples[pid] = {"key": key, "image": image[mid:mid + n_mod], "mask": truth[i].numpy(),
                            "pred": pred[i].numpy(), "area": int(area[i])}


def _reduce(loss_sum, n_seen, val, distributed) -> dict:
    """Sum counts over ranks; gather per-patient region counts."""
    patients = val["patients"]
    if distributed:
        import torch.distributed as dist

        t = torch.tensor([loss_sum, n_seen, val["loss_sum"], val["n"]], dtype=torch.float64)
        dist.all_reduce(t)
        loss_sum, n_seen, vl, vn = t.tolist()
        conf = val["confusion"].clone()
        dist.all_reduce(conf)
        sub_conf = val["sub_confusion"].clone()
        dist.all_reduce(sub_conf)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, patients)
        patients = {k: v for g in gathered for k, v in g.items()}
    else:
        vl, vn, conf, sub_conf = val["loss_sum"], val["n"], val["confusion"], val["sub_confusion"]
    return {"train_loss": loss_sum / max(n_seen, 1), "val_loss": vl / max(vn, 1), "confusion": conf,
            "sub_confusion": sub_conf, "patients": patients}


# ---------------------------------------------------------------- record

def epoch_record(epoch: int, stats: dict, names: list[str], lr: float, seconds: float, slices: int,
                 rel: Release = RELEASES["2020"]) -> dict:
    """One metrics.csv row: losses, per-channel slice Dice/precision/recall, per-patient region Dice."""
    row = {"epoch": epoch + 1, "train_loss": stats["train_loss"], "val_loss": stats["val_loss"]}
    per = [scores(*stats["confusion"][c].tolist()) for c in range(len(names))]
    row["mean_dice"] = float(np.mean([p["dice"] for p in per]))
    for key, metric in (("dice", "dice"), ("prec", "precision"), ("recall", "recall")):
        for name, p in zip(names, per):
            row[f"{key}_{name}"] = p[metric]
    for name, c in zip(rel.subregions, stats["sub_confusion"]):
        row[f"dice_sub_{name}"] = scores(*c.tolist())["dice"]
    for r, region in enumerate(rel.regions):
        d = [scores(*c[r].tolist())["dice"] for c in stats["patients"].values()]
        row[f"patient_dice_{region}"] = float(np.mean(d)) if d else float("nan")
    row.update(lr=lr, seconds=seconds, slices_per_s=slices / seconds if seconds else 0.0)
    return row


def _summary(row: dict, names: list[str], regions: tuple = REGIONS) -> str:
    per = " ".join(f"{n} {row[f'dice_{n}']:.3f}" for n in names)
    reg = " ".join(f"{r} {row[f'patient_dice_{r}']:.3f}" for r in regions)
    return (f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} val loss {row['val_loss']:.4f} "
            f"mean Dice {row['mean_dice']:.3f} ({per}) | per-patient 3D Dice {reg} | "
            f"{row['slices_per_s']:.0f} slices/s, lr {row['lr']:.2g}")
