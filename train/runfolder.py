"""The run folder (`--out`): what a run writes there, refusing to clobber another run or to write
through a link, `--overwrite`'s clean-up, config.json, and the CSVs and sample logs a run appends to."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from shards import atomic
from shards.domain import REGIONS
from shards.manifest import ManifestError, read_local
from shards.redact import redact
from train.metrics import scores
from train.errors import TrainError

if TYPE_CHECKING:  # annotations only
    from shards.source import ShardSource
    from train.config import TrainConfig


# any of these in OUT means it already holds a run that a fresh start would clobber
RUN_MARKERS = ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.csv", "config.json")
# what a run writes into OUT: all --overwrite removes, with the temporaries of their atomic writes
_RUN_FILES = ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.csv", "val_patients.csv", "config.json",
              "plots/loss.png", "plots/dice.png", "plots/predictions.png")
_SAMPLE_LOG = re.compile(r"samples_rank\d+\.jsonl")


def refuse_existing_run(out: Path, resume: bool, overwrite: bool) -> None:
    """Starting afresh over a run would replace its checkpoints and metrics: ask which was meant."""
    if resume and overwrite:
        raise TrainError("--resume and --overwrite contradict each other: pass one of them")
    if resume or overwrite:
        return
    found = [m for m in RUN_MARKERS if (out / m).exists()]
    if found:
        raise TrainError(f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it "
                         f"or --overwrite to replace it")


# what a run writes into, or opens in place, inside OUT: a link there would take its writes (and
# --overwrite's deletions) to a folder the user never named
_IN_PLACE = ("checkpoints", "plots", "tensorboard", "mlartifacts", "mlflow.db", "samples_rank*.jsonl")


def refuse_links(out: Path) -> None:
    """Refuse a run folder where a link stands in the place of a folder or file the run writes in place."""
    for pattern in _IN_PLACE:
        for path in out.glob(pattern):
            if path.is_symlink():
                raise TrainError(f"{path} is a link (to {os.readlink(path)}): a run writes there, and would write "
                                 f"outside --out {out}; remove the link or choose another --out")


def run_files(out: Path) -> list[Path]:
    """The files of OUT that a run wrote (its own names, their temporaries, the sample logs);
    the user's own files there are not among them."""
    names = {Path(n).parent: set() for n in _RUN_FILES}
    for n in _RUN_FILES:
        names[Path(n).parent].add(Path(n).name)
    found = []
    for folder, own in names.items():
        if (out / folder).is_dir():
            for p in (out / folder).iterdir():
                tmp = atomic.TMP_NAME.match(p.name)
                if p.is_file() and (p.name in own or (tmp and tmp["name"] in own)
                                    or (folder == Path(".") and _SAMPLE_LOG.fullmatch(p.name))):
                    found.append(p)
    return found


def clear_run(out: Path) -> None:
    """--overwrite: an old run's val_patients.csv rows and sample logs would otherwise mix with
    the new run's (both are appended to), so its files go before the new run writes any."""
    for path in run_files(out):
        path.unlink(missing_ok=True)
    if (out / "tensorboard").is_dir():  # the event files a run's --log tensorboard wrote
        for path in (out / "tensorboard").glob("events.out.tfevents.*"):
            path.unlink(missing_ok=True)


def start_run_folder(out: Path, cfg: TrainConfig, shards: str, source: ShardSource, overwrite: bool) -> None:
    """Rank 0, once every refusal is behind: clear an old run (--overwrite), write config.json."""
    if overwrite:  # only now: a refusal above (bad shard set, options) leaves the old run intact
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "config.json", {"train": cfg.to_dict(), "shards": redact(shards),
                                            "manifest_sha256": source.manifest_sha256})


def _csv_bytes(columns: list[str], rows: list[dict]) -> bytes:
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    return text.getvalue().encode()


def write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.csv: one row per epoch so far, floats to 6 significant digits."""
    rows = [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in h.items()} for h in history]
    atomic.write_bytes(out / "metrics.csv", _csv_bytes(list(history[0]), rows))


MAX_VAL_PATIENTS_BYTES = 2**30  # a thousand epochs of a thousand patients is ~60 MB


def read_val_patients(path: Path, regions: tuple = REGIONS) -> list[dict]:
    """The rows of an earlier run's val_patients.csv (none if there is none). A resume reads it
    before it writes anything: a file that is not what `write_val_patients` writes (other
    columns, an epoch that is not a number, a FIFO, too large) is refused, named, instead of
    failing after an epoch of training."""
    try:
        fd, st = atomic.open_regular(path)
    except FileNotFoundError:
        return []
    if st.st_size > MAX_VAL_PATIENTS_BYTES:
        os.close(fd)
        raise TrainError(f"{path}: {st.st_size} bytes, more than a run's per-patient Dice table holds; "
                         f"move it away to resume")
    with open(fd, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        columns = ["epoch", "patient"] + [f"dice_{r}" for r in regions]
        if reader.fieldnames != columns:
            raise TrainError(f"{path}: columns {reader.fieldnames}, not {columns}; move it away to resume")
        rows = list(reader)
    for i, r in enumerate(rows, start=2):
        if None in r or None in r.values() or not r["epoch"].isdigit():
            raise TrainError(f"{path}: line {i} is not an epoch's row; move the file away to resume")
    return rows


def write_val_patients(out: Path, patients: dict, epoch: int, regions: tuple = REGIONS) -> None:
    """val_patients.csv: per epoch and validation patient, the 3D Dice of each region. Earlier
    epochs' rows are kept; rows of this epoch left by a killed run are replaced."""
    path = out / "val_patients.csv"
    rows = [r for r in read_val_patients(path, regions) if int(r["epoch"]) < epoch + 1]
    for pid in sorted(patients):
        c = patients[pid]
        rows.append({"epoch": epoch + 1, "patient": pid,
                     **{f"dice_{r}": f"{scores(*c[i].tolist())['dice']:.6g}" for i, r in enumerate(regions)}})
    atomic.write_bytes(path, _csv_bytes(["epoch", "patient"] + [f"dice_{r}" for r in regions], rows))


def log_samples(out: Path, rank: int, epoch: int, n_batches: int, keys: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a link planted since the start is refused here too, never appended through
    fd = os.open(out / f"samples_rank{rank}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with open(fd, "a") as f:
        f.write(json.dumps({"epoch": epoch + 1, "batches": n_batches, "keys": keys}) + "\n")


MAX_RUN_CONFIG_BYTES = 1 << 20


def read_run_config(run: Path) -> dict:
    """RUN/config.json read bounded (a FIFO or device is refused unread), as data: its 'shards' a
    location string, its 'train' a mapping (checked by whoever builds a TrainConfig from it)."""
    path = Path(run) / "config.json"
    try:
        raw = read_local(path, MAX_RUN_CONFIG_BYTES)
    except FileNotFoundError:
        raise TrainError(f"{path} not found: not a training run folder") from None
    except ManifestError as e:
        raise TrainError(str(e)) from None
    try:
        conf = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise TrainError(f"{path} is not valid JSON: {str(e)[:100]}") from None
    shards = conf.get("shards") if isinstance(conf, dict) else None
    if not (isinstance(shards, str) and shards and len(shards) <= 4096 and shards.isprintable()):
        raise TrainError(f"{path}: 'shards' is not a shard-set location (a non-empty string)")
    return conf
