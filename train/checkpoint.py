"""The one checkpoint schema: written atomically, read with weights_only=True (safe for files from
others) and checked field by field before anything is built from it.

`read(path)` is what predict, export and show use (and what a resume may use): the file is read
once, loaded without pickles, and every field a model is built from is checked against sane
bounds and against the stored tensors, the model's parameter shapes computed on the `meta`
device (nothing allocated), so a small file can never make us allocate gigabytes or build a
model its weights do not fit. Every refusal is a `CheckpointError` naming the file and field.
`load(path)` (the raw, unchecked dict) and `save(path, state)` keep their old contracts.
"""

from __future__ import annotations

import errno
import hashlib
import io
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from preprocess.config import PreprocessConfig
from shards.atomic import NotRegularFile, atomic_path, open_regular, read_bounded
from shards.domain import RELEASES
from shards.errors import BratsShardsError
from shards.manifest import set_channels
from train import recipe
from train.config import TrainConfig, model_channels, release_of_set
from train.data import FOLD_RULE
from train.model import build_model
from train.postprocess import PostprocessConfig

if TYPE_CHECKING:  # annotation only: predict and export need no shard source
    from shards.source import ShardSource

# the objects whose state a checkpoint holds, under these keys
STATEFUL = ("model", "optimizer", "scheduler", "scaler")
MAX_BYTES = 4 * 2**30  # a 2D U-Net of MAX_PARAMS float32 weights, its optimizer state and history
MAX_PARAMS = 200_000_000  # parameters of the model a checkpoint describes (the recipe's: ~8 M)
BOUNDS = {"base_channels": (1, 256), "depth": (1, 7), "context": (0, 8)}  # config ints: the widest sane
REQUIRED = ("model", "config", "preprocess")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # weights load_state_dict casts
# base_channels x size^2: the width of the full-size activation maps, what a forward pass holds
# several of; the largest recipe (64 at 256^2, 32 at 512^2) is well inside. Small weights at a
# huge slice size (256 channels at 1024^2: ~10 GB per forward) are refused by it.
MAX_ACTIVATION = 32 * 512 * 512


class CheckpointError(BratsShardsError, ValueError):
    """A checkpoint that cannot be used: the one-line message names the file and the field."""


def save(path: Path, state: dict) -> None:
    """`state` to `path` atomically: a failed write (full disk) leaves the old file and no
    temporary, and is one error naming the file."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError "file write failed"
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "write failed" in str(e)
        why = "the disk is full or the write failed" if full else "the write failed"
        raise CheckpointError(f"could not write checkpoint {path}: {why} ({type(e).__name__}: {e}); "
                              f"the previous file, if any, is unchanged") from None


def state(parts: dict, epoch: int, cfg: TrainConfig, source: ShardSource, names: list[str],
          history: list[dict], best: float, output_mode: str, post: dict, position: dict | None = None) -> dict:
    """What a checkpoint holds: the state of `parts`, the epoch and RNG a resume continues from,
    the config and shard set it was trained with, and what predict needs (preprocess, output
    channels and their mask mode, context, post-processing thresholds); mid-epoch, the loader
    `position` (epoch under way, steps done, running loss, keys seen, torch RNG)."""
    return {**{key: parts[key].state_dict() for key in STATEFUL}, "epoch": epoch, "config": cfg.to_dict(),
            "manifest_sha256": source.manifest_sha256, "preprocess": source.manifest["config"],
            "channels": names, "output_mode": output_mode, "postprocess": post.get("config", {}),
            "rng": torch.get_rng_state(), "history": history, "best_dice": best, "position": position,
            "fold_rule": FOLD_RULE}


def load(path: Path, map_location="cpu") -> dict:
    """The raw checkpoint dict, unchecked (resume reads its own fields); weights_only."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


# ------------------------------------------------------------------ reading a file from anyone


def _not_ours(path, why: str) -> CheckpointError:
    return CheckpointError(f"not a brats-shards checkpoint: {path} is not a usable checkpoint ({why})")


def _read_bytes(path: Path) -> bytes:
    """The whole file, refusing a missing file, a folder (a run folder given for its checkpoint),
    a FIFO or device, and anything larger than MAX_BYTES."""
    try:
        fd, _ = open_regular(path)
    except FileNotFoundError:
        raise _not_ours(path, "no such file") from None
    except NotRegularFile as e:
        hint = "; give a checkpoint file or a run folder (its checkpoints/best.pt)" if Path(path).is_dir() else ""
        raise _not_ours(path, f"it {e.strerror}{hint}") from None
    except OSError as e:
        raise _not_ours(path, e.strerror or type(e).__name__) from None
    data = read_bounded(fd, MAX_BYTES)
    if data is None:
        raise _not_ours(path, f"larger than {MAX_BYTES:,} bytes")
    return data


def in_run(path: str | Path) -> Path:
    """What a user means by a run folder given for a checkpoint: its checkpoints/best.pt, else its
    checkpoints/last.pt; any other path (a folder holding neither included) as it is."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
    return path


def _check_archive(path: Path, data: bytes) -> None:
    """torch.save writes a zip archive of stored (uncompressed) records. Anything else is refused
    before torch reads it: the old non-zip format and deflated records both let a small file
    declare storages far larger than itself (a zip bomb), allocated before a byte is checked."""
    try:
        infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except Exception:  # noqa: BLE001: whatever zipfile makes of it, it is no archive torch.save wrote
        raise _not_ours(path, "not a torch zip archive; checkpoints are written by torch.save") from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size \
                or info.header_offset + info.file_size > len(data):
            raise _not_ours(path, f"its record {info.filename[:80]!r} is compressed or larger than the file; "
                                  f"torch.save never writes that")


def _unpickle(path: Path, data: bytes) -> dict:
    """torch.load with weights_only=True; torch's own message is not repeated: it may advise
    weights_only=False, which must never be done with a file from someone else."""
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the refusal below says all there is
            warnings.simplefilter("ignore")
            ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001: any unloadable file is the same refusal
        why = ("it holds Python objects beyond tensors and plain data, which are never unpickled"
               if "Unsupported global" in str(e)
               else f"not a torch file, or a truncated or damaged one ({type(e).__name__})")
        raise _not_ours(path, why) from None
    if not isinstance(ck, dict) or any(k not in ck for k in REQUIRED):
        raise _not_ours(path, f"not a mapping with the fields {', '.join(REQUIRED)}")
    return ck


def read_raw(path: str | Path) -> tuple[dict, bytes]:
    """(loaded dict, its bytes) of a checkpoint file, safely (a regular file, bounded, torch's zip
    of stored records, weights_only, the REQUIRED fields present) but its fields unchecked: for
    a resume, which checks its own fields. CheckpointError naming the file otherwise."""
    path = Path(path)
    data = _read_bytes(path)
    _check_archive(path, data)
    return _unpickle(path, data), data


def read(path: str | Path) -> dict:
    """A checked checkpoint record (see `check`), plus "raw" (the loaded dict), "path" and
    "sha256" (of the bytes that were loaded); `path` may be a run folder (`in_run`). Raises
    CheckpointError naming the file and field."""
    path = in_run(path)
    raw, data = read_raw(path)
    record = check(raw, path)
    return {**record, "raw": raw, "path": str(path), "sha256": hashlib.sha256(data).hexdigest()}


def build(record: dict, device="cpu") -> torch.nn.Module:
    """The eval-mode model of a `read` record, its weights loaded (their shapes were checked)."""

    model = build_model(**record["model_args"])
    model.load_state_dict(record["state_dict"])
    return model.to(device).eval()


# ------------------------------------------------------------------ the fields


def check(ck: dict, path) -> dict:
    """The record predict and export need from a loaded checkpoint dict: config (TrainConfig),
    set (the shard set's build config), preprocess (PreprocessConfig), release, output_mode,
    channels, postprocess (PostprocessConfig), model_args, state_dict. Old checkpoints (fields
    missing that later versions added) read as before: `TrainConfig.from_dict`."""

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a usable checkpoint: {field} {why}")

    for field in REQUIRED:
        if field not in ck:
            raise bad(field, "is missing")
    for field in ("config", "preprocess", "channels", "output_mode", "postprocess", "epoch", "manifest_sha256"):
        if field in ck and (where := _not_plain(ck[field], field)):
            raise bad(where, "is not plain data (numbers, text, lists, mappings with text keys)")
    cfg = _train_config(ck["config"], bad, TrainConfig)
    built, pre = _set_config(ck["preprocess"], bad)
    rel = release_of_set(built)
    set_mode = pre.mask
    n_in, n_out = model_channels(built, cfg)
    expected_mode = recipe.output_mode(cfg.targets, set_mode)
    mode = ck.get("output_mode", expected_mode)  # older checkpoints: what their targets give
    if mode != expected_mode:
        raise bad("output_mode", f"(the outputs' mask mode) {str(mode)[:40]!r} contradicts config.targets {cfg.targets!r} on a "
                                 f"{set_mode} set (expected {expected_mode!r})")
    names = recipe.output_names(cfg.targets, set_mode, rel)
    channels = names if ck.get("channels") is None else ck["channels"]  # absent: older checkpoint; [] is a claim
    if not (isinstance(channels, list) and channels == names):
        raise bad("channels", f"{str(channels)[:80]} are not the model's {n_out} outputs for "
                              f"{rel.name} {mode}: {names}")
    post = {} if ck.get("postprocess") is None else ck["postprocess"]  # absent: older checkpoint
    try:
        if not isinstance(post, dict):
            raise ValueError(f"is a {type(post).__name__}, not a mapping of thresholds")
        post = PostprocessConfig.from_dict(post)
    except (ValueError, TypeError) as e:
        raise bad("postprocess", str(e)) from None
    if cfg.base_channels * pre.size**2 > MAX_ACTIVATION:
        raise bad("config.base_channels", f"{cfg.base_channels} at preprocess size {pre.size} makes activation maps "
                                          f"of {cfg.base_channels * pre.size**2:,} values, more than "
                                          f"{MAX_ACTIVATION:,}")
    args = {"name": cfg.model, "base_channels": cfg.base_channels, "depth": cfg.depth, "in_channels": n_in,
            "out_channels": n_out, "norm": cfg.norm, "act": cfg.act, "deep_supervision": cfg.deep_supervision}
    _check_weights(ck["model"], args, bad)
    for field, ok in (("epoch", lambda v: type(v) is int and -1 <= v < 10**6),  # -1: mid-way through the first
                      ("manifest_sha256", lambda v: isinstance(v, str) and len(v) <= 128)):
        if ck.get(field) is not None and not ok(ck[field]):
            raise bad(field, f"{str(ck[field])[:40]!r} is out of range or of the wrong type")
    return {"config": cfg, "set": built, "preprocess": pre, "release": rel, "output_mode": mode,
            "channels": list(channels), "postprocess": post, "context": cfg.context, "model_args": args,
            "state_dict": ck["model"]}


def _not_plain(v, where: str, depth: int = 0) -> str | None:
    """Where `v` stops being JSON-like data (what train writes in these fields: no tensors,
    nothing nested past 8 levels), as a field path; None when it is plain."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return None
    items = enumerate(v) if isinstance(v, (list, tuple)) else v.items() if isinstance(v, dict) else None
    if items is None or depth >= 8:
        return where
    for k, x in items:
        if isinstance(v, dict) and not isinstance(k, str):
            return where
        if (inner := _not_plain(x, f"{where}.{k}" if isinstance(k, str) else f"{where}[{k}]", depth + 1)):
            return inner
    return None


def _train_config(d, bad, TrainConfig):
    """config: a mapping whose fields TrainConfig accepts, the sizes that build the model bounded
    and of the right type (a bool or float where an int belongs is refused, not rounded)."""
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        raise bad("config", "is not a mapping of option names")
    for name, (lo, hi) in BOUNDS.items():
        if name in d and not (type(d[name]) is int and lo <= d[name] <= hi):
            raise bad(f"config.{name}", f"is {str(d[name])[:40]!r}; it must be an integer in [{lo}, {hi}]")
    for name in ("deep_supervision",):
        if name in d and type(d[name]) is not bool:
            raise bad(f"config.{name}", f"is {str(d[name])[:40]!r}, not true or false")
    try:
        return TrainConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise bad("config", str(e)) from None


def _set_config(built, bad):
    """preprocess: the shard set's build config; its preprocess fields valid, its release known,
    its modalities and mask channels those of the release."""
    if not isinstance(built, dict) or not isinstance(built.get("preprocess"), dict):
        raise bad("preprocess", "is not the shard set's build config (a mapping with 'preprocess')")
    p = built["preprocess"]
    for name, kind in (("size", int), ("mask", str), ("normalize", str), ("crop", bool), ("seed", int)):
        if name in p and type(p[name]) is not kind:
            raise bad(f"preprocess.preprocess.{name}", f"is {str(p[name])[:40]!r}, not a {kind.__name__}")
    if type(p.get("tumour_free_fraction", 1.0)) not in (int, float):
        raise bad("preprocess.preprocess.tumour_free_fraction", "is not a number")
    try:
        pre = PreprocessConfig.from_dict(p)
    except (ValueError, TypeError) as e:
        raise bad("preprocess.preprocess", str(e)) from None
    conv = built.get("convention")
    if conv is not None and not (isinstance(conv, str) and conv in RELEASES):
        raise bad("preprocess.convention", f"{str(conv)[:40]!r} is not a release of the table")
    rel = RELEASES.get(conv, RELEASES["2020"])
    try:
        mods, chans = set_channels({"config": built})
    except (KeyError, TypeError) as e:
        raise bad("preprocess", f"has unreadable modalities or mask channels ({e})") from None
    if mods != tuple(rel.modalities) or chans != tuple(rel.channels(pre.mask)):
        raise bad("preprocess.modalities", f"{list(mods)[:8]} -> {list(chans)[:16]} are not {rel.name}'s "
                                           f"{list(rel.modalities)} -> {list(rel.channels(pre.mask))}")
    return built, replace_fraction(pre)


def replace_fraction(pre):
    """As predict applies the preprocessing: every brain slice kept."""

    return replace(pre, tumour_free_fraction=1.0)


def _check_weights(state, args: dict, bad) -> None:
    """model: exactly the tensors (names, shapes, float or integer) of the model the config
    builds, computed on the meta device so nothing is allocated; finite; bounded in size."""

    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise bad("model", "is not a mapping of tensor names to tensors")
    with torch.device("meta"):
        expected = build_model(**args).state_dict()
    n = sum(t.numel() for t in expected.values())
    if n > MAX_PARAMS:
        raise bad("config", f"describes a model of {n:,} values, more than {MAX_PARAMS:,}")
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise bad("model", f"does not match config ({args['name']}, base_channels {args['base_channels']}, depth "
                           f"{args['depth']}): missing {missing[:3]}, unexpected {extra[:3]}")
    for name, want in expected.items():
        got = state[name]
        kinds = FLOATS if want.is_floating_point() else (want.dtype,)
        if tuple(got.shape) != tuple(want.shape) or got.dtype not in kinds or got.layout != torch.strided \
                or got.device.type != "cpu":  # map_location="cpu": anything else (meta) holds no weights
            raise bad(f"model[{name!r}]", f"is {tuple(got.shape)} {got.dtype} ({got.layout}, {got.device.type}); config "
                                          f"({args['name']}, base_channels {args['base_channels']}, depth "
                                          f"{args['depth']}, {args['in_channels']} in, {args['out_channels']} out) "
                                          f"builds {tuple(want.shape)} {want.dtype} (strided, cpu)")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise bad(f"model[{name!r}]", "holds NaN or infinite weights")
