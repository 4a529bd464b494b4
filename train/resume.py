"""`train --resume`: which options a resumed run takes, and a last.pt checked before it is trusted.

The rule for options: every option not given on the command line is the checkpoint's. An option
given that differs from the checkpoint is refused, naming it, unless it is one of `MAY_CHANGE`
(the new total of epochs, where and how fast the run goes, what it logs); all the others fix the
run (architecture, data, targets, optimizer, schedule, seed), and changing one half-way would
give weights no straight run gives. `--num-workers` may change only at an epoch's end: the
order of an epoch's slices depends on the worker count, so a mid-epoch position is refused
with another one.

A last.pt may come from a killed run, an older version or someone else: every field a resume
reads is checked first (types, ranges, lengths), each refusal one line naming the file and the
field, and nothing is written into the run folder before all of them pass.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from pathlib import Path

import torch

from shards.errors import BratsShardsError
from shards.source import ShardSource
from train import checkpoint
from train.config import TrainConfig
from train.data import FOLD_RULE
from train.postprocess import PostprocessConfig
from train.errors import TrainError

# options a resume may change; every other TrainConfig field fixes the run
MAY_CHANGE = ("epochs", "num_workers", "device", "compile", "log_samples", "checkpoint_every")
# TrainConfig fields whose option is not named after them
_OPTION = {"fmt": "--format"}
MAX_EPOCHS = 100_000  # more epochs than any run has: a checkpoint claiming more is tampered
MAX_COLUMNS = 1000  # metrics columns of one history row
MAX_KEY_CHARS = 1000  # a sample key or a metrics column name


class ResumeError(TrainError):
    """A refused resume: the one-line message names the checkpoint field or the option at fault."""


def option_name(field: str) -> str:
    return _OPTION.get(field, "--" + field.replace("_", "-"))


def merged_config(cfg, old, given: dict[str, str] | None, path: Path):
    """The resumed run's config: `cfg`'s values for the options given (`given` maps a field to
    the option that set it; None: every field was given, as a library caller passes a whole
    config), the checkpoint's config `old` for the rest. A given option that differs from the
    checkpoint and fixes the run is refused, all of them named at once."""
    given = {f.name: option_name(f.name) for f in dataclasses.fields(cfg)} if given is None else given
    changed = []
    for f in dataclasses.fields(cfg):
        name, new, was = f.name, getattr(cfg, f.name), getattr(old, f.name)
        if name in given and name not in MAY_CHANGE and new != was and not (name == "fmt" and new == ""):
            opt = given[name]
            changed.append(f"{opt} {new} ({name}: the checkpoint has {was})" if opt == option_name(name)
                           else f"{opt} sets {name} {new} (the checkpoint has {was})")
    if changed:
        raise ResumeError(f"--resume: {path} was trained with other options, which fix the run: {'; '.join(changed)}; "
                          f"leave them out to continue with the checkpoint's, or train into another --out")
    keep = {f.name: getattr(cfg, f.name) if f.name in given else getattr(old, f.name) for f in dataclasses.fields(cfg)}
    if keep["fmt"] == "":  # not given, and the checkpoint's is the one the set held then
        keep["fmt"] = old.fmt
    return type(cfg)(**keep)


# ---------------------------------------------------------------- the checkpoint's fields

def _fail(path: Path, field: str, what: str) -> ResumeError:
    return ResumeError(f"--resume: {path}: {field} {what}; the file is damaged or not from this run "
                       f"(train again with --overwrite, or resume from a good copy)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _finite(v) -> bool:
    return _is_number(v) and math.isfinite(v)


def check_rng(path: Path, field: str, rng) -> None:
    """A CPU generator state: a flat uint8 tensor of the length torch's own state has."""
    want = torch.get_rng_state()
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == want.shape):
        got = f"{rng.dtype} {tuple(rng.shape)}" if isinstance(rng, torch.Tensor) else type(rng).__name__
        raise _fail(path, field, f"is not a torch RNG state (uint8 of {want.numel()} bytes), but {got}")


def check_history(path: Path, history, epoch: int) -> None:
    """One metrics row per finished epoch (`epoch` + 1 of them), numbered 1, 2, ..., each a
    mapping of column names to finite numbers."""
    if not isinstance(history, list):
        raise _fail(path, "history", f"is {type(history).__name__}, not a list of metrics rows")
    if len(history) != epoch + 1:
        raise _fail(path, "history", f"holds {len(history)} rows for {epoch + 1} finished epochs")
    for i, row in enumerate(history):
        if not isinstance(row, dict) or not 0 < len(row) <= MAX_COLUMNS:
            raise _fail(path, f"history row {i + 1}", "is not a metrics row (a mapping of columns to numbers)")
        if row.get("epoch") != i + 1 or not _is_int(row.get("epoch")):
            raise _fail(path, f"history row {i + 1}", f"has epoch {row.get('epoch')!r}, not {i + 1}")
        for k, v in row.items():
            if not isinstance(k, str) or len(k) > MAX_KEY_CHARS:
                raise _fail(path, f"history row {i + 1}", "has a column name that is not a short text")
            if not _finite(v):
                raise _fail(path, f"history row {i + 1} column {k}", f"is {v!r}, not a finite number")


def check_fields(path: Path, ck) -> None:
    """The resume fields of last.pt other than the loader position (which needs the stream)."""
    if not isinstance(ck, dict):
        raise ResumeError(f"--resume: {path} is not a checkpoint (a mapping of fields)")
    missing = [k for k in ("model", "optimizer", "scheduler", "scaler", "epoch", "config", "rng", "history",
                           "best_dice", "manifest_sha256") if k not in ck]
    if missing:
        raise _fail(path, "the fields", f"{', '.join(missing)} are missing")
    epoch = ck["epoch"]
    if not _is_int(epoch) or not -1 <= epoch < MAX_EPOCHS:
        raise _fail(path, "epoch", f"is {epoch!r}, not a finished epoch in [-1, {MAX_EPOCHS})")
    best = ck["best_dice"]
    if not _finite(best) or not -1.0 <= best <= 1.0:
        raise _fail(path, "best_dice", f"is {best!r}, not a Dice in [-1, 1] (-1: none yet)")
    check_history(path, ck["history"], epoch)
    check_rng(path, "rng", ck["rng"])
    post = ck.get("postprocess") or {}
    if not isinstance(post, dict):
        raise _fail(path, "postprocess", f"is {type(post).__name__}, not a mapping of thresholds")
    if post:
        try:
            PostprocessConfig.from_dict(post)
        except (TypeError, ValueError) as e:
            raise _fail(path, "postprocess", f"holds bad thresholds ({e})") from None
    for key in ("model", "optimizer", "scheduler", "scaler"):
        if not isinstance(ck[key], dict):
            raise _fail(path, key, f"is {type(ck[key]).__name__}, not a state dict")


def check_position(path: Path, position, epoch: int, batches: int, batch_size: int, workers: tuple[int, int],
                   world: int = 1):
    """The mid-epoch loader position of last.pt, or None: it resumes epoch `epoch` + 1, after
    `batch` of the epoch's `batches` batches of `batch_size` slices, with a finite running loss.
    `workers`: (the checkpoint's, this run's) --num-workers; `world`: this run's process count
    (torchrun); the epoch's order depends on both."""
    if position is None:
        return None
    where = "position"
    if not isinstance(position, dict):
        raise _fail(path, where, f"is {type(position).__name__}, not the loader's position")
    missing = [k for k in ("epoch", "batch", "loss_sum", "n_seen", "keys", "rng") if k not in position]
    if missing:
        raise _fail(path, where, f"lacks {', '.join(missing)}")
    if position["epoch"] != epoch + 1 or not _is_int(position["epoch"]):
        raise _fail(path, "position.epoch", f"is {position['epoch']!r}, not the epoch after the "
                                            f"checkpoint's ({epoch + 1}, counted from 0)")
    if workers[0] != workers[1]:
        raise ResumeError(f"--resume: {path} stopped in the middle of an epoch trained with --num-workers "
                          f"{workers[0]}, and the order of an epoch's slices depends on it: resume with "
                          f"--num-workers {workers[0]} (or leave it out); it may change at an epoch's end")
    if position.get("world", 1) != world:  # positions written before it was recorded come from one process
        raise ResumeError(f"--resume: {path} stopped in the middle of an epoch trained by {position.get('world')!r} "
                          f"processes, and the order of an epoch's slices depends on it: resume with as many "
                          f"(torchrun --nproc-per-node), or from an epoch's end")
    b = position["batch"]
    if not _is_int(b) or not 0 <= b <= batches:
        raise _fail(path, "position.batch", f"is {b!r}, not a batch in [0, {batches}] of the epoch")
    if not _finite(position["loss_sum"]) or position["loss_sum"] < 0:
        raise _fail(path, "position.loss_sum", f"is {position['loss_sum']!r}, not a finite sum >= 0")
    n = position["n_seen"]
    if not _is_int(n) or not 0 <= n <= b * batch_size:
        raise _fail(path, "position.n_seen", f"is {n!r}, not a slice count in [0, {b * batch_size}]")
    keys = position["keys"]
    if (not isinstance(keys, list) or len(keys) > n
            or not all(isinstance(k, str) and len(k) <= MAX_KEY_CHARS for k in keys)):
        raise _fail(path, "position.keys", f"is not a list of at most {n} sample keys")
    check_rng(path, "position.rng", position["rng"])
    return position


def check_fold_rule(path: Path, ck: dict, folds: int) -> None:
    """Folds were once drawn from (seed, patient id); now from the id alone. A fold run of the
    old rule held out other patients than a resume would: refused, not continued on others."""
    if folds and ck.get("fold_rule") != FOLD_RULE:
        raise ResumeError(f"--resume: {path} is a --folds run from before folds were fixed by the patient id "
                          f"alone; its held-out patients differ from this version's: train the fold again "
                          f"into another --out (or with --overwrite)")


# a checkpoint's config is read before the model and the loader are built from it: these bound
# what it can make this process allocate or start (the defaults are 32 channels, depth 4, 2 workers)
MAX_WIDTH = 4096  # channels of the model's widest level, base_channels * 2**depth
MAX_DEPTH = 12
MAX_CONTEXT = 32
MAX_WORKERS = 256


def check_config(path: Path, old) -> None:
    """The checkpoint's config, before a model or a loader is built from it: each field of the
    kind its default is (a flag, a whole number, a finite number), the sizes bounded."""
    for f in dataclasses.fields(old):
        v, default = getattr(old, f.name), f.default
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, int):
            ok = _is_int(v)
        elif isinstance(default, float):
            ok = _finite(v)
        else:
            continue
        if not ok:
            raise _fail(path, f"config.{f.name}", f"is {v!r}, not a {type(default).__name__} like {default!r}")
    for name, value, limit in (("depth", old.depth, MAX_DEPTH), ("context", old.context, MAX_CONTEXT),
                               ("num_workers", old.num_workers, MAX_WORKERS),
                               ("base_channels", old.base_channels * 2 ** min(old.depth, MAX_DEPTH), MAX_WIDTH)):
        if not _is_int(value) or value > limit:
            what = "base_channels * 2**depth" if name == "base_channels" else name
            raise _fail(path, f"config.{name}", f"gives {what} {value!r}, more than {limit}")


# ---------------------------------------------------------------- loading states

def load_states(path: Path, ck: dict, parts: dict) -> None:
    """Each object's state from the checkpoint, a failure named by its field. The scheduler's
    load takes any keys (it updates its own attributes with them): only its own keys, of the
    same kinds, are let in."""
    check_scheduler(path, ck["scheduler"], parts["scheduler"].state_dict())
    for key in ("model", "optimizer", "scheduler", "scaler"):
        try:
            parts[key].load_state_dict(ck[key])
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
            raise _fail(path, key, f"does not fit this run's {key} ({type(e).__name__}: {e})") from None
    for group in parts["optimizer"].param_groups:  # hyper-parameters come back with the state
        bad = [k for k, v in group.items() if k != "params" and _is_number(v) and not math.isfinite(v)]
        if bad:
            raise _fail(path, "optimizer", f"holds a non-finite {', '.join(bad)}")
    check_optimizer_state(path, parts["optimizer"])


def check_optimizer_state(path: Path, opt) -> None:
    """torch checks only the number of parameters: a momentum of another shape would fail at the
    first step (a traceback), a NaN one would make every weight NaN without a word."""
    for i, (param, state) in enumerate(opt.state.items()):
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                if _is_number(v) and not math.isfinite(v):
                    raise _fail(path, f"optimizer state {i} {k}", f"is {v!r}")
                continue
            if v.ndim and v.shape != param.shape:
                raise _fail(path, f"optimizer state {i} {k}", f"has shape {tuple(v.shape)}, its parameter "
                                                             f"{tuple(param.shape)}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise _fail(path, f"optimizer state {i} {k}", "holds NaN or infinite values")


def check_scheduler(path: Path, state, fresh: dict) -> None:
    if not isinstance(state, dict) or set(state) != set(fresh):
        raise _fail(path, "scheduler", "does not hold the plateau scheduler's fields")
    for k, v in state.items():
        want = fresh[k]
        if _is_number(want) and not (_is_number(v) and (math.isfinite(v) or v == want)):
            raise _fail(path, f"scheduler.{k}", f"is {v!r}, not a number")
        if isinstance(want, str) and not isinstance(v, str):
            raise _fail(path, f"scheduler.{k}", f"is {v!r}, not {type(want).__name__}")
        if isinstance(want, list) and not (isinstance(v, list) and len(v) == len(want) and all(map(_finite, v))):
            raise _fail(path, f"scheduler.{k}", "is not a list of finite numbers, one per parameter group")


def resumed_config(path: Path, source: ShardSource, cfg: TrainConfig, given: dict | None) -> tuple[dict, TrainConfig]:
    """(the checkpoint at `path`, its fields checked, the config the resume runs with): refused
    unless it comes from this shard set and the options given agree with it (train/resume.py)."""
    if not path.exists():
        raise TrainError(f"--resume: no checkpoint at {path}")
    try:  # bounded, a regular file (a FIFO would block), torch's stored zip (no bomb), weights only
        ck = checkpoint.read_raw(path)[0]
    except BratsShardsError as e:
        raise TrainError(f"--resume: {e}") from None
    check_fields(path, ck)
    try:  # then what predict and export check (weights against the config on the meta device, channels,
        checkpoint.check(ck, path)  # output mode, thresholds): one schema, so a resume refuses what they do
    except BratsShardsError as e:
        raise TrainError(f"--resume: {e}") from None
    if ck["manifest_sha256"] != source.manifest_sha256:
        raise TrainError(f"--resume: {path} was trained on another shard set (manifest hash differs)")
    try:
        old = TrainConfig.from_dict(ck["config"])
    except (TypeError, ValueError) as e:
        raise ResumeError(f"--resume: {path}: its config is not a training config ({e})") from None
    check_config(path, old)
    check_fold_rule(path, ck, old.folds)
    return ck, merged_config(cfg, old, given, path)


def restore(path: Path, ck: dict, parts: dict) -> tuple:
    """Load a checked checkpoint into `parts` (and the torch RNG): (history, next epoch, best
    mean Dice, post-processing chosen so far)."""
    load_states(path, ck, parts)
    torch.set_rng_state(ck["rng"])
    post = {"config": ck["postprocess"]} if ck.get("postprocess") else {}
    return ck["history"], ck["epoch"] + 1, float(ck["best_dice"]), post
