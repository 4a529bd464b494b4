"""Experiment tracking (`train --log tensorboard,mlflow`): each epoch's metrics row as scalars
and the validation overlays as one image, sent to TensorBoard event files and/or MLflow.

Everything here is optional: `make_trackers(out, [])` imports neither TensorBoard nor MLflow,
and a kind whose package is missing is refused with the pip extra that installs it. Only
rank 0 tracks; the loop calls `log_epoch` after it has written metrics.csv and `close_all` at
the end, failed or not.

Resume: a resumed run passes `start_step`, the step (1-based epoch) it logs first.
TensorBoard then purges the events at steps >= start_step that a killed run left after its
last checkpoint; MLflow continues the same run (its id kept in OUT/mlflow_run.json) and the
re-logged steps become the latest values there (MLflow cannot delete logged points).
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import sys
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from shards import atomic
from shards.errors import BratsShardsError
from shards.redact import redact
from train import palette
from train.plots import overlay  # the run figures' overlay: the same grey, the same colours

KINDS = ("tensorboard", "mlflow")
RUN_FILE = "mlflow_run.json"  # OUT/mlflow_run.json: the MLflow run a resume continues
EXPERIMENT = "brats-shards"  # MLflow experiment unless MLFLOW_EXPERIMENT_NAME names one
RUN_FILE_BYTES = 64 * 1024  # far more than {"tracking_uri", "run_id"} needs: a larger file is not ours
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # an MLflow run id (32 hex digits), never a path or a query


class TrackingError(BratsShardsError):
    """A --log kind that cannot run here: the message names the pip extra that installs it."""


class Tracker(Protocol):
    def epoch(self, row: dict, step: int) -> None: ...

    def images(self, samples: list[dict], names: list[str], step: int) -> None: ...

    def close(self, ok: bool = True) -> None: ...


def make_trackers(out: Path, kinds: list[str], config: dict, run_name: str | None = None,
                  start_step: int = 1, quiet: bool = False) -> list[Tracker]:
    """One tracker per --log kind. TensorBoard: event files under OUT/tensorboard/. MLflow: the
    store MLFLOW_TRACKING_URI names or, by default, a local SQLite store OUT/mlflow.db (artifacts
    under OUT/mlartifacts/): never a server unless the user set one. `start_step` > 1 is a resume.
    `quiet` (--quiet): the trackers' own INFO lines too are not printed, only their warnings."""
    require(kinds)
    if quiet:
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(out)
    made: list[Tracker] = []
    try:
        for kind in dict.fromkeys(kinds):  # once each, in the order given
            make = TensorBoardTracker if kind == "tensorboard" else MLflowTracker
            made.append(make(out, config, run_name or out.resolve().name, start_step))
    except BaseException:
        close_all(made, ok=False)
        raise
    return made


def log_epoch(trackers: list[Tracker], row: dict, samples: list[dict], names: list[str]) -> None:
    """The loop's one call per epoch: the metrics row and, where there are any, the overlays;
    the step is the row's (1-based) epoch."""
    for t in trackers:
        t.epoch(row, row["epoch"])
        if samples:
            t.images(samples, names, row["epoch"])


def close_all(trackers: list[Tracker], ok: bool = True) -> None:
    """Close every tracker. After a failure (`ok` False) an error while closing is printed, not
    raised, so that it cannot hide the failure that ended the run."""
    first = None
    for t in trackers:
        try:
            t.close(ok)
        except Exception as e:  # noqa: BLE001 - the others still get closed
            if ok and first is None:
                first = e
            else:
                print(f"warning: closing {type(t).__name__} failed: {e}", file=sys.stderr)
    if first is not None:
        raise first


# ---------------------------------------------------------------- pure helpers

# metrics.csv column prefix -> tag group; longest match first (patient_dice_ before dice_)
_GROUPS = (("patient_dice_", "patient_dice/"), ("dice_sub_", "dice_sub/"), ("dice_", "dice/"),
           ("prec_", "precision/"), ("recall_", "recall/"))
_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "mean_dice": "dice/mean", "lr": "lr",
         "seconds": "throughput/epoch_seconds", "slices_per_s": "throughput/slices_per_s"}


def scalar_tags(row: dict) -> dict[str, float]:
    """The numeric values of a metrics row under grouped tags ('dice_WT' -> 'dice/WT'); the
    epoch is the step, not a scalar. A column not known here keeps its own name."""
    tags = {}
    for key, value in row.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        tag = _TAGS.get(key) or next((group + key[len(p):] for p, group in _GROUPS if key.startswith(p)), key)
        tags[tag] = float(value)
    return tags


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{'train': {'lr': 0.01}} -> {'train.lr': '0.01'}: nested keys joined by '.', values as text."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return flat


def overlay_grid(samples: list[dict], names: list[str], alpha: float = 0.45, pad: int = 4,
                 min_side: int = 240) -> np.ndarray:
    """The validation samples as one RGB image (H, W, 3) uint8, as the run figures draw them: a row
    per sample; columns: the grey modality, the truth, the prediction, each channel in its colour
    (`train.palette`, outermost first); anterior up, the subject's right to the right. Each panel
    is enlarged by a whole factor (nearest neighbour) to at least `min_side` pixels a side."""
    rows = []
    for s in samples:
        no_mask = np.zeros_like(s["mask"][:0])
        panels = [overlay(s["image"], m, names, alpha) for m in (no_mask, s["mask"], s["pred"])]
        k = max(1, -(-min_side // min(panels[0].shape[:2])))  # ceil
        rows.append(_join([np.repeat(np.repeat(p.transpose(1, 0, 2)[::-1], k, 0), k, 1) for p in panels],
                          axis=1, pad=pad))  # (Y, X, 3), y running up
    grid = _join(rows, axis=0, pad=pad)
    return np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)


def _join(parts: list[np.ndarray], axis: int, pad: int) -> np.ndarray:
    """Concatenate images along `axis` with `pad` white pixels between them."""
    gap_shape = list(parts[0].shape)
    gap_shape[axis] = pad
    gap = np.ones(gap_shape, np.float32)
    out = [parts[0]]
    for p in parts[1:]:
        out += [gap, p]
    return np.concatenate(out, axis=axis)


def legend(samples: list[dict], names: list[str]) -> str:
    return (f"rows: {', '.join(s['key'] for s in samples)}; columns: grey image, truth, prediction; "
            f"{palette.legend(names)}")


def mlflow_uri(out: Path) -> str:
    """MLFLOW_TRACKING_URI where the user set one, else a SQLite store inside OUT."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}"


def require(kinds: list[str]) -> None:
    """Refuse unknown kinds and kinds whose packages are missing, before any work is done:
    `train` calls this first (on every rank), so a run never starts to fail at its first epoch."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise TrackingError(f"--log {','.join(unknown)}: unknown, choose from {', '.join(KINDS)}")
    for kind in kinds:
        if kind == "tensorboard":
            _import_tensorboard()
        else:
            _import_mlflow()


def _import_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise _missing("tensorboard", "the tensorboard package", e) from None
    return SummaryWriter


def _import_mlflow():
    try:
        from mlflow.tracking import MlflowClient
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # the local SQLite store's packages (beside mlflow-skinny)
            import alembic  # noqa: F401
            import sqlalchemy  # noqa: F401
    except ImportError as e:
        raise _missing("mlflow", "mlflow (with sqlalchemy and alembic for the local store)", e) from None
    return MlflowClient


def _missing(kind: str, package: str, err: ImportError) -> TrackingError:
    return TrackingError(f"--log {kind} needs {package}, which is not installed ({err}): "
                         f"pip install 'brats-shards[{kind}]'")


# ---------------------------------------------------------------- TensorBoard

class TensorBoardTracker:
    """Event files under OUT/tensorboard/; `tensorboard --logdir OUT/tensorboard` shows them."""

    def __init__(self, out: Path, config: dict, run_name: str, start_step: int = 1):
        SummaryWriter = _import_tensorboard()
        # purge_step: TensorBoard drops the events at steps >= start_step that earlier files
        # hold, i.e. the epochs a killed run logged after its last checkpoint
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step)
        table = "\n".join(f"| {k} | {v} |" for k, v in flatten(config).items())
        self.writer.add_text("config", f"run **{run_name}**\n\n| option | value |\n|---|---|\n{table}", start_step)
        self.writer.flush()

    def epoch(self, row: dict, step: int) -> None:
        for tag, value in scalar_tags(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed run keeps every epoch it finished

    def images(self, samples: list[dict], names: list[str], step: int) -> None:
        self.writer.add_image("predictions", overlay_grid(samples, names), step, dataformats="HWC")
        self.writer.add_text("predictions/legend", legend(samples, names), step)
        self.writer.flush()

    def close(self, ok: bool = True) -> None:
        self.writer.close()


# ---------------------------------------------------------------- MLflow

class MLflowTracker:
    """One MLflow run per training run (a resume continues it): params = the flattened config,
    metrics with step = epoch, the overlays as images with step."""

    def __init__(self, out: Path, config: dict, run_name: str, start_step: int = 1):
        uri, MlflowClient = mlflow_uri(out), _import_mlflow()
        from mlflow.entities import Param

        # a resume reads OUT/mlflow_run.json first: a damaged one is refused before the store is touched
        kept = read_run_file(out / RUN_FILE) if start_step > 1 else None
        self.client, self.run_file, self.closed = MlflowClient(tracking_uri=uri), out / RUN_FILE, False
        params = flatten(config)
        self.run_id = self._resumed_run(uri, kept) if kept else None
        if self.run_id:  # params are write-once: log the new ones, tag the changed ones
            old = self.client.get_run(self.run_id).data.params
            for k, v in params.items():
                if k in old and old[k] != _param_value(v):
                    self.client.set_tag(self.run_id, f"resumed_at_step_{start_step}.{k}", _param_value(v))
            params = {k: v for k, v in params.items() if k not in old}
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self._experiment(out)
            self.run_id = self.client.create_run(experiment, run_name=run_name,
                                                 tags={"out": str(out.resolve())}).info.run_id
            # the store's address as it is shown, never with a password in it (a server's URL may hold one)
            atomic.write_json(self.run_file, {"tracking_uri": redact(uri), "run_id": self.run_id})
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _experiment(self, out: Path) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        found = self.client.get_experiment_by_name(name)
        if found:
            if found.lifecycle_stage == "deleted":  # a deleted experiment takes no runs until restored
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        local = not os.environ.get("MLFLOW_TRACKING_URI")  # our store: artifacts beside it, not in the CWD
        return self.client.create_experiment(name, artifact_location=(out / "mlartifacts").resolve().as_uri()
                                             if local else None)

    def _resumed_run(self, uri: str, kept: dict) -> str | None:
        """The run OUT/mlflow_run.json (`kept`) names, if it lives in this store."""
        if kept["tracking_uri"] != redact(uri):
            return None
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(kept["run_id"]).info.run_id
        except MlflowException:  # deleted from the store since
            return None

    def epoch(self, row: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, step) for tag, value in scalar_tags(row).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def images(self, samples: list[dict], names: list[str], step: int) -> None:
        self.client.log_image(self.run_id, overlay_grid(samples, names), key="predictions", step=step)
        self.client.set_tag(self.run_id, "predictions.legend", legend(samples, names))

    def close(self, ok: bool = True) -> None:
        if not self.closed:
            self.closed = True
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def read_run_file(path: Path) -> dict | None:
    """OUT/mlflow_run.json as {"tracking_uri": str, "run_id": a plain id}, None where there is
    none (a run that never logged to MLflow). Anything else there is refused naming the file:
    continuing some other run, or silently starting a new one, would misfile the metrics."""
    def bad(what: str) -> TrackingError:
        return TrackingError(f"{path}: {what}; it should name the MLflow run this run logs to: delete it "
                             f"to log the resumed epochs to a new MLflow run")

    try:
        fd, _ = atomic.open_regular(path)
    except FileNotFoundError:
        return None
    except atomic.NotRegularFile as e:
        raise bad(e.strerror) from None
    data = atomic.read_bounded(fd, RUN_FILE_BYTES)
    if data is None:
        raise bad(f"is larger than {RUN_FILE_BYTES} bytes")
    try:
        kept = json.loads(data.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError is a ValueError too
        raise bad(f"is not JSON ({e})") from None
    if not isinstance(kept, dict):
        raise bad(f"holds a JSON {type(kept).__name__}, not an object")
    if not isinstance(kept.get("tracking_uri"), str):
        raise bad("has no tracking_uri text")
    run_id = kept.get("run_id")
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise bad("has a run_id that is not a plain MLflow run id")
    return kept


def _param_value(v: str) -> str:
    return v[:500]  # the oldest supported MLflow's limit on a param value
