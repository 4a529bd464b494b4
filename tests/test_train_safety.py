"""Training refuses to clobber an existing run, and keeps patients apart whose ids differ only by '.'/'_'."""

import csv
import dataclasses
import json
import re

import pytest

from train.data import StreamConfig
from train.config import TrainConfig
from train.errors import TrainError
from train.loop import train

TINY = TrainConfig(base_channels=4, depth=2, batch_size=8, num_workers=0, epochs=1, max_batches=2)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict(dict(TINY.to_dict(), **kw))


@pytest.mark.parametrize("cls,kw,message", [
    (TrainConfig, dict(model="resnet"), "model must be one of unet, attention-unet, not 'resnet'"),
    (TrainConfig, dict(loss="ce"), "loss must be one of dice, dice-bce, not 'ce'"),
    (TrainConfig, dict(optimizer="lamb"), "optimizer must be one of sgd, adam, adamw, not 'lamb'"),
    (TrainConfig, dict(fmt="tar"), "fmt must be one of zarr, wds, not 'tar'"),
    (TrainConfig, dict(device="tpu"), "device must be one of auto, cpu, cuda, not 'tpu'"),
    (TrainConfig, dict(epochs=0), "epochs must be >= 1, not 0"),
    (TrainConfig, dict(num_workers=-1), "num_workers must be >= 0, not -1"),
    (TrainConfig, dict(fg_fraction=1.5), "fg_fraction must lie in [0, 1], not 1.5"),
    (StreamConfig, dict(split="test"), "split must be one of train, val, not 'test'"),
    (StreamConfig, dict(fmt="parquet"), "fmt must be one of zarr, wds, not 'parquet'"),
    (StreamConfig, dict(fmt=""), "fmt must be one of zarr, wds, not ''"),
    (StreamConfig, dict(batch_size=0), "batch_size must be >= 1, not 0"),
    (StreamConfig, dict(buffer_size=-1), "buffer_size must be >= 0, not -1"),
])
def test_configs_refuse_unknown_choices_and_ranges_at_construction(cls, kw, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cls(**kw)


def test_valid_configs_round_trip():
    assert TrainConfig.from_dict(_cfg(fmt="", model="attention-unet").to_dict()) == _cfg(model="attention-unet")
    assert StreamConfig(split="val", fmt="wds", batch_size=1, buffer_size=0).fmt == "wds"


def test_existing_run_is_refused_without_resume_or_overwrite(shard_set, tmp_path):
    run = tmp_path / "run"
    train(str(shard_set), run, _cfg(), progress=False)
    before = {p: (run / p).read_bytes() for p in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.csv",
                                                  "config.json")}
    with pytest.raises(TrainError, match="--resume.*--overwrite") as e:
        train(str(shard_set), run, _cfg(seed=1), progress=False)
    assert str(run) in str(e.value) and "\n" not in str(e.value)
    assert {p: (run / p).read_bytes() for p in before} == before  # nothing touched
    # any one of the files a run leaves marks the folder as a run
    for marker in before:
        only = tmp_path / f"only_{marker.replace('/', '_')}"
        (only / marker).parent.mkdir(parents=True, exist_ok=True)
        (only / marker).write_bytes(b"x")
        with pytest.raises(TrainError, match="already holds a run"):
            train(str(shard_set), only, _cfg(), progress=False)
    with pytest.raises(TrainError, match="contradict"):
        train(str(shard_set), run, _cfg(), resume=True, overwrite=True, progress=False)


def test_overwrite_removes_only_what_a_run_writes(shard_set, tmp_path):
    run = tmp_path / "run"
    train(str(shard_set), run, _cfg(epochs=2, log_samples=True), progress=False)
    assert (run / "samples_rank0.jsonl").exists()
    keep = {"notes.txt": b"mine", "checkpoints/epoch1_copy.pt": b"mine too", "plots/mine.png": b"png",
            "samples_rank_backup.jsonl": b"{}"}
    for name, data in keep.items():
        (run / name).write_bytes(data)
    hist = train(str(shard_set), run, _cfg(seed=3), overwrite=True, progress=False)
    assert len(hist) == 1
    with open(run / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
    assert not (run / "samples_rank0.jsonl").exists()  # the old run's log, not this one's
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 3
    assert {name: (run / name).read_bytes() for name in keep} == keep
    assert not list(run.rglob("*.tmp"))  # atomic writes leave no temporaries behind


def _case_in_val(pid: str) -> bool:
    from preprocess.build import split_score

    return split_score(pid, 0) < 0.5


def test_val_patients_keeps_ids_differing_only_by_dot_and_underscore(tmp_path):
    from preprocess.config import PreprocessConfig
    from preprocess.synthetic.cases import write_case
    from preprocess.synthetic.toy import make_case
    from preprocess.build import BuildConfig, build

    # a pair of ids that both fall in val, and two patients that train
    n = next(n for n in range(1000) if _case_in_val(f"Case{n}.A") and _case_in_val(f"Case{n}_A"))
    val_ids = [f"Case{n}.A", f"Case{n}_A"]
    train_ids = [p for p in (f"Train{m}" for m in range(1000)) if not _case_in_val(p)][:2]
    for i, pid in enumerate(val_ids + train_ids):
        case = dataclasses.replace(make_case(i + 1, (32, 32, 12), seed=7), pid=pid)
        write_case(case, tmp_path / "in")
    build(tmp_path / "in", tmp_path / "s", BuildConfig(preprocess=PreprocessConfig(size=16), val_fraction=0.5),
          workers=0, progress=False)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert sorted(m["splits"]["val"]) == sorted(val_ids)
    run = tmp_path / "run"
    train(str(tmp_path / "s"), run, _cfg(max_batches=1), progress=False)
    with open(run / "val_patients.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["patient"] for r in rows) == sorted(val_ids)
