"""`demo`: the whole pipeline on realistic synthetic data, on CPU in a few minutes."""

from __future__ import annotations

from pathlib import Path

from preprocess.build import BuildConfig, build
from preprocess.config import PreprocessConfig
from preprocess.synthetic.realistic import make_realistic_data
from shards.domain import REGIONS
from train.config import TrainConfig
from train.loop import train

# the BraTS field of view at 1.5 mm: realistic cases at a size the demo trains on in minutes
DEMO_SHAPE = (160, 160, 104)


def run_demo(out: Path, patients: int, epochs: int, workers: int, echo=print) -> list[dict]:
    """Data (realistic, written once), shards, a U-Net trained with the default recipe, and its
    validation Dice, told through `echo`; returns the run's history. A second call continues:
    the data is kept, the build completes, the run resumes from its last checkpoint."""
    data, shards, run_dir = out / "data", out / "shards", out / "run"
    if not (data / "name_mapping.csv").exists():
        echo(f"1/3 writing {patients} realistic synthetic patients to {data}")
        make_realistic_data(data, patients, shape=DEMO_SHAPE, seed=0, progress=True)
    echo(f"2/3 building shards in {shards}")
    pre = PreprocessConfig(size=64, crop=True, tumour_free_fraction=0.25)
    m = build(data, shards, BuildConfig(preprocess=pre, val_fraction=0.25), workers=workers).manifest
    echo(f"    {len(m['splits']['train'])} train / {len(m['splits']['val'])} val patients, "
               f"{len(m['failed'])} failed")
    echo(f"3/3 training a U-Net for {epochs} epochs into {run_dir}")
    cfg = TrainConfig(base_channels=16, depth=3, batch_size=16, num_workers=1, epochs=epochs)  # the default recipe
    resume = (run_dir / "checkpoints" / "last.pt").exists()
    # a run stopped before its first checkpoint restarts
    history = train(str(shards), run_dir, cfg, resume=resume, overwrite=not resume)
    last = history[-1]
    names = [k[5:] for k in last if k.startswith("dice_") and not k.startswith("dice_sub_")]
    echo("\nvalidation after epoch {}: mean Dice {:.3f}".format(last["epoch"], last["mean_dice"]))
    echo("  per channel (2D, all slices): " + ", ".join(f"{n} {last['dice_' + n]:.3f}" for n in names))
    echo("  BraTS regions (3D, mean over patients): "
               + ", ".join(f"{r} {last['patient_dice_' + r]:.3f}" for r in REGIONS))
    echo(f"  plots: {run_dir / 'plots'}  metrics: {run_dir / 'metrics.csv'}")
    return history
