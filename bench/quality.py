"""Model quality, side by side: the seed recipe, the default recipe, its ablations and a MONAI peer.

    python bench/quality.py [--setting cpu|full] [--work DIR] [--only NAME,...] [--device auto]

Data: realistic synthetic cases (`preprocess.synthetic.realistic`, BraTS 240x240x155 1 mm grid): a shard set
of `patients` cases with the build's fixed hash split (train/val), and separate test cases
(other indices, never in the set). Every recipe sees the same number of training slices
(epochs x batches x batch size); the MONAI peer gets the same budget.

Scoring, end to end: each model's labels for the test cases are written as NIfTI on the source
grid by `train.predict` (the code `python cli.py predict` runs: `prepare_planes` once per case and
recipe, the members averaged on the source grid), then `train.evaluate.evaluate` scores them as `python cli.py evaluate`
does: per-patient Dice and HD95 of WT/TC/ET. Reported per recipe: mean and standard deviation over
test patients, training slices/s, and for the recipes run with two seeds the seed-to-seed spread.

Recipes:
  seed        the seed notebook's recipe (`train.recipe.SEED_RECIPE`), seeds 0 and 1
  default     TrainConfig's defaults, seeds 0 and 1
  -<part>     the default with one ingredient switched back to the seed's (seed 0)
  -postprocess  the default's seed-0 model predicted without post-processing (no retraining)
  +context    the default with one neighbouring slice on each side (when the default has none),
              seeds 0 and 1
  +fg-balance the default with nnU-Net's class-balanced foreground sampling, seeds 0, 1, 2
  +grad-clip  the default with nnU-Net's gradient clipping (norm 12), seeds 0, 1, 2
  monai       MONAI's DynUNet 2D recipe (bench/monai_peer.py; `pip install -e ".[bench]"`)
  coronal/sK, sagittal/sK  the default trained on one other plane's slices (a set built with
              --planes axial,coronal,sagittal: WORK/shards{size}-planes, whose axial files are the
              axial set's), seeds 0, 1, 2
  triplanar/sK  default/sK, coronal/sK and sagittal/sK averaged in 3D (predict --ensemble)
  axial-ensemble  default/s0, s1 and s2 averaged the same way: three models of one plane
  nnunet/sK   nnU-Net v2's own 2d configuration (bench/nnunet_peer.py, in a Python with nnunetv2:
              --nnunet-python), the same patients, split, model size and slices; seeds 0, 1, 2

Results are kept per recipe under WORK/results/, so a stopped run continues where it was. Last
line: JSON with every recipe's summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from preprocess.build import BuildConfig, build
from preprocess.discover import discover
from preprocess.nifti import save_volume
from preprocess.config import PreprocessConfig
from preprocess.synthetic.realistic import make_realistic_data
from shards.domain import REGIONS
from shards.layout import PLANES
from train.evaluate import evaluate
from train.loop import TrainConfig, train
from train.predict import check_ensemble, ensemble_probabilities, label_map, load_checkpoint
from train.recipe import SEED_RECIPE

SETTINGS = {
    # ~40 minutes on 2 CPU cores (12 trainings of 5,120 slices, each scored on 12 test cases)
    "cpu": dict(patients=40, test=12, size=96, tumour_free=0.5, base=16, depth=4, batch=16, epochs=4,
                max_batches=80),
    # the same data and model, 3x the slices (15,360): seed vs default only, ~25 minutes on 2 cores
    "cpu-long": dict(patients=40, test=12, size=96, tumour_free=0.5, base=16, depth=4, batch=16, epochs=12,
                     max_batches=80),
    # for a GPU: larger slices, a wider model, longer
    "full": dict(patients=64, test=24, size=128, tumour_free=0.5, base=32, depth=5, batch=32, epochs=40,
                 max_batches=0),
}
ABLATIONS = {  # the ingredient switched off -> the TrainConfig fields that do it (the seed's values)
    "regions": dict(targets="channels"),
    "deep-supervision": dict(deep_supervision=False),
    "instance-norm": dict(norm="batch", act="relu"),
    "sgd-poly": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="plateau"),
    "augmentation": dict(augment="off"),
    "oversampling": dict(fg_fraction=0.0),
    "context": dict(context=0),
}


def prepare_data(work: Path, s: dict) -> tuple[Path, Path]:
    """The shard set and the test folder (made once; a marker file says they are complete)."""
    data, test, shards = work / "data", work / "test", work / f"shards{s['size']}"
    if not (data / "name_mapping.csv").exists():
        make_realistic_data(data, s["patients"], seed=0, progress=True)
    if not (test / "name_mapping.csv").exists():
        make_realistic_data(test, s["test"], seed=0, start=1001, progress=True)
    if not (shards / "manifest.json").exists():
        build(data, shards, build_config(s), workers=2)
    return shards, test


def build_config(s: dict, planes=("axial",)) -> BuildConfig:
    pre = PreprocessConfig(size=s["size"], crop=True, tumour_free_fraction=s["tumour_free"])
    return BuildConfig(preprocess=pre, val_fraction=0.25, planes=planes)


def planes_set(work: Path, s: dict) -> Path:
    """The same build with coronal and sagittal slices too (`build-shards --planes`), made on first
    use; its axial files are the axial set's, byte for byte (checked here)."""
    shards, tri = work / f"shards{s['size']}", work / f"shards{s['size']}-planes"
    if not (tri / "manifest.json").exists():
        build(work / "data", tri, build_config(s, PLANES), workers=2)
    axial = {f["path"]: f["sha256"] for f in json.loads((shards / "manifest.json").read_text())["files"]}
    both = {f["path"]: f["sha256"] for f in json.loads((tri / "manifest.json").read_text())["files"]}
    if any(both.get(p) != h for p, h in axial.items()):
        raise SystemExit(f"{tri}: its axial files differ from {shards}'s")
    return tri


def recipes(s: dict, default: TrainConfig, extra: set[str] = frozenset()) -> dict[str, tuple[TrainConfig | None, str | None]]:
    """name -> (training config, or None for a predict-only variant; the model it reuses).
    `extra`: names like "-deep-supervision/s1" -- an ablation trained with another seed."""
    common = dict(base_channels=s["base"], depth=s["depth"], batch_size=s["batch"], epochs=s["epochs"],
                  max_batches=s["max_batches"], num_workers=1)
    seed_cfg = dataclasses.replace(TrainConfig(**common), **SEED_RECIPE)
    base = dataclasses.replace(default, **common)
    out = {}
    for seed in (0, 1):
        out[f"seed/s{seed}"] = (dataclasses.replace(seed_cfg, seed=seed), None)
    for seed in (0, 1, 2):
        out[f"default/s{seed}"] = (dataclasses.replace(base, seed=seed), None)
    for part, fields in ABLATIONS.items():
        cfg = dataclasses.replace(base, **fields)
        if cfg != base:  # an ingredient the default does not use has nothing to ablate
            out[f"-{part}"] = (cfg, None)
    if base.context == 0:  # measured as an addition instead, with both seeds
        for seed in (0, 1):
            out[f"+context/s{seed}"] = (dataclasses.replace(base, context=1, seed=seed), None)
    if not base.fg_balance:  # nnU-Net's class-balanced foreground sampling, as an addition, 3 seeds
        for seed in (0, 1, 2):
            out[f"+fg-balance/s{seed}"] = (dataclasses.replace(base, fg_balance=True, seed=seed), None)
    if not base.grad_clip:  # nnU-Net's gradient clipping (norm 12), as an addition, 3 seeds
        for seed in (0, 1, 2):
            out[f"+grad-clip/s{seed}"] = (dataclasses.replace(base, grad_clip=12.0, seed=seed), None)
    if not base.deep_supervision:  # nnU-Net's deep supervision, as an addition, 3 seeds
        for seed in (0, 1, 2):
            out[f"+deep-supervision/s{seed}"] = (dataclasses.replace(base, deep_supervision=True, seed=seed), None)
    for seed in (0, 1, 2):  # nnU-Net's initialisation and Dice smoothing, as additions, 3 seeds
        out[f"+he-init/s{seed}"] = (dataclasses.replace(base, init="he", seed=seed), None)
        out[f"+smooth/s{seed}"] = (dataclasses.replace(base, dice_smooth=1e-5, seed=seed), None)
    for seed in (0, 1, 2):  # triplanar 2D: a model per plane, then the three averaged in 3D (predict --ensemble)
        for plane in PLANES[1:]:
            out[f"{plane}/s{seed}"] = (dataclasses.replace(base, plane=plane, seed=seed), None)
        out[f"triplanar/s{seed}"] = (None, [f"{p}/s{seed}" for p in ("default",) + PLANES[1:]])
    # the control: as many axial models (the 3 seeds) averaged, so the planes' share of a gain shows
    out["axial-ensemble"] = (None, [f"default/s{seed}" for seed in (0, 1, 2)])
    out["-postprocess"] = (None, "default/s0")
    for name in sorted(extra):
        part, _, seed = name.rpartition("/s")
        like = out.get(part, out.get(f"{part}/s0", (None, None)))[0]
        if name not in out and like is not None and seed.isdigit():
            out[name] = (dataclasses.replace(like, seed=int(seed)), None)
    return out


def score(work: Path, name: str, members: list, output_mode: str, post, test: Path, device) -> dict:
    """Write every test case's labels as NIfTI and evaluate them against the references.
    `members`: (model, context, preprocess) -- several: an ensemble, as `predict --ensemble` runs it."""
    pred_dir = work / "pred" / name.replace("/", "_")
    pred_dir.mkdir(parents=True, exist_ok=True)
    for pf in discover(test, need_seg=False).patients:
        prob, affine = ensemble_probabilities(pf, members, device)
        save_volume(pred_dir / f"{pf.pid}.nii.gz", label_map(prob, output_mode, pf.release, affine, post), affine)
    return score_folder(pred_dir, test)


def score_folder(pred_dir: Path, test: Path) -> dict:
    """`evaluate` of a folder of test predictions: mean and sd over patients of Dice and HD95."""
    r = evaluate(pred_dir, test, pred_dir / "metrics.csv", progress=False)
    summary = {}
    for metric in ("dice", "hd95"):
        for region in REGIONS:
            v = np.array([row[f"{metric}_{region}"] for row in r["rows"]], dtype=float)
            summary[f"{metric}_{region}"] = {"mean": float(v.mean()), "std": float(v.std(ddof=1))}
    return summary


def run_ensemble(work: Path, name: str, names: list[str], test: Path, device) -> dict:
    """A predict-only ensemble of trained recipes' best checkpoints (post-processing: the first's)."""
    ms = [load_checkpoint(work / "runs" / n.replace("/", "_") / "checkpoints" / "best.pt", device) for n in names]
    check_ensemble(ms)
    scores = score(work, name, [(m["model"], m["context"], m["preprocess"]) for m in ms], ms[0]["output_mode"],
                   ms[0]["postprocess"], test, device)
    return {"recipe": name, "members": names, "scores": scores}


def run_recipe(work: Path, name: str, cfg, reuse, shards: Path, test: Path, device) -> dict:
    if isinstance(reuse, list):
        return run_ensemble(work, name, reuse, test, device)
    run = work / "runs" / (reuse or name).replace("/", "_")
    if cfg is not None:
        t0 = time.perf_counter()
        history = train(str(shards), run, cfg, overwrite=True, progress=False)
        seconds = time.perf_counter() - t0
        slices_per_s = float(np.mean([h["slices_per_s"] for h in history]))
        slices = int(sum(h["slices_per_s"] * h["seconds"] for h in history))
    m = load_checkpoint(run / "checkpoints" / "best.pt", device)
    post = m["postprocess"] if cfg is None or cfg.postprocess else None
    if reuse:  # predict-only: the same model without post-processing
        post = None
    result = {"recipe": name, "scores": score(work, name, [(m["model"], m["context"], m["preprocess"])],
                                               m["output_mode"], post, test, device)}
    if cfg is not None:
        result.update(train_seconds=seconds, slices_per_s=slices_per_s, slices=slices, config=cfg.to_dict(),
                      postprocess=m["postprocess"].to_dict())
    return result


def run_peer(work: Path, s: dict, shards: Path, test: Path, device) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from monai_peer import train_peer

    slices = s["epochs"] * s["max_batches"] * s["batch"] if s["max_batches"] else None
    if slices is None:
        from train.data import SliceStream, StreamConfig
        from shards.source import ShardSource

        ds = SliceStream(ShardSource(str(shards)), StreamConfig(batch_size=s["batch"]))
        slices = s["epochs"] * ds.batches_per_epoch(0) * s["batch"]
    # the same widths as the compared recipes (base * 2**level), so capacity is not what differs
    r = train_peer(str(shards), work / "runs" / "monai", slices, seed=0, batch_size=s["batch"], device=str(device),
                   base_filters=s["base"])
    pre = dataclasses.replace(PreprocessConfig.from_dict(r["preprocess"]), tumour_free_fraction=1.0)
    scores = score(work, "monai", [(r["model"], 0, pre)], r["output_mode"], None, test, device)
    return {"recipe": "monai", "scores": scores, "train_seconds": r["seconds"], "slices_per_s": r["slices_per_s"],
            "slices": slices}


def run_nnunet(work: Path, s: dict, shards: Path, test: Path, seed: int, python: str) -> dict:
    """nnU-Net v2's 2d recipe (bench/nnunet_peer.py) in `python`, scored like the others."""
    import subprocess

    slices = s["epochs"] * s["max_batches"] * s["batch"]
    cmd = [python, str(Path(__file__).parent / "nnunet_peer.py"), "--shards", str(shards), "--test", str(test),
           "--work", str(work / "nnunet"), "--seed", str(seed), "--slices", str(slices), "--batch", str(s["batch"]),
           "--base", str(s["base"]), "--depth", str(s["depth"])]
    log = work / "nnunet" / f"log_s{seed}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    lines = log.read_text().strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"nnU-Net peer failed (exit {done.returncode}); see {log}")
    r = json.loads(lines[-1])
    return {"recipe": f"nnunet/s{seed}", "scores": score_folder(Path(r["pred_dir"]), test),
            "train_seconds": r["train_seconds"], "slices_per_s": r["slices_per_s"], "slices": r["slices"]}


def table(results: dict) -> str:
    """Markdown: Dice (mean +- sd over test patients) and HD95 per region, slices/s."""
    head = ("| recipe | " + " | ".join(f"Dice {r}" for r in REGIONS) + " | " + " | ".join(f"HD95 {r}" for r in REGIONS)
            + " | train slices/s |\n|---|" + "---|" * 7 + "\n")
    rows = []
    for name, r in results.items():
        sc = r["scores"]
        dice = " | ".join(f"{sc[f'dice_{g}']['mean']:.3f} ± {sc[f'dice_{g}']['std']:.3f}" for g in REGIONS)
        hd = " | ".join(f"{sc[f'hd95_{g}']['mean']:.1f}" for g in REGIONS)
        rate = f"{r['slices_per_s']:.0f}" if "slices_per_s" in r else "—"
        rows.append(f"| {name} | {dice} | {hd} | {rate} |")
    return head + "\n".join(rows)


def seed_spread(results: dict) -> dict:
    """For recipes run with several seeds (seed 0 of an ablation is its plain name): mean Dice per
    region over the seeds, half the range (max - min) / 2, and the number of seeds."""
    groups = {}
    for name, r in results.items():
        base, _, seed = name.rpartition("/s")
        if base and seed.isdigit():
            groups.setdefault(base, {})[int(seed)] = r
    for base in groups:
        if 0 not in groups[base] and base in results:
            groups[base][0] = results[base]
    out = {}
    for base, runs in groups.items():
        if len(runs) < 2:
            continue
        d = {g: [r["scores"][f"dice_{g}"]["mean"] for r in runs.values()] for g in REGIONS}
        out[base] = {g: {"mean": float(np.mean(v)), "half_range": float((max(v) - min(v)) / 2), "seeds": len(v)}
                     for g, v in d.items()}
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    ap.add_argument("--work", default="/tmp/brats-shards-quality")
    ap.add_argument("--only", default="", help="comma-separated recipe names (default: all, then monai); "
                    "an ablation with another seed is NAME/sK; names starting with '-' need the = form: "
                    "--only=-deep-supervision,-deep-supervision/s1")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-peer", action="store_true", help="skip the MONAI peer")
    ap.add_argument("--nnunet-python", default=sys.executable,
                    help="a Python with nnunetv2 for the nnunet/sK peers (see bench/nnunet_peer.py)")
    a = ap.parse_args()
    s = SETTINGS[a.setting]
    work = Path(a.work) / a.setting
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    shards, test = prepare_data(work, s)
    only = set(filter(None, a.only.split(",")))
    todo = recipes(s, TrainConfig(), only)
    results = {}
    (work / "results").mkdir(parents=True, exist_ok=True)
    names = list(todo) + ([] if a.no_peer else ["monai"]) + [f"nnunet/s{k}" for k in range(3)
                                                             if f"nnunet/s{k}" in only]
    for name in names:
        path = work / "results" / f"{name.replace('/', '_')}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
            continue
        if only and name not in only:
            continue
        print(f"== {name}", flush=True)
        if name == "monai":
            r = run_peer(work, s, shards, test, device)
        elif name.startswith("nnunet/s"):
            r = run_nnunet(work, s, shards, test, int(name[len("nnunet/s"):]), a.nnunet_python)
        else:
            cfg, reuse = todo[name]
            on = planes_set(work, s) if cfg is not None and cfg.plane != "axial" else shards
            r = run_recipe(work, name, cfg, reuse, on, test, device)
        path.write_text(json.dumps(r, indent=1))
        results[name] = r
        print(json.dumps({name: {k: v["mean"] for k, v in r["scores"].items()}}), flush=True)
    print(table(results))
    print(json.dumps({"setting": a.setting, "device": str(device), "spread": seed_spread(results),
                      "recipes": {n: {"scores": r["scores"], "slices_per_s": r.get("slices_per_s")}
                                  for n, r in results.items()}}))


if __name__ == "__main__":
    main()
