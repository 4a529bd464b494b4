"""nnU-Net v2's own 2D recipe as a peer for bench/quality.py, on the same slices and budget.

Runs in a Python that has nnunetv2 (not a project dependency: it pulls timm and with it a
torchvision wheel that does not load against the CPU build of torch; see BENCHMARKS.md):

    python -m venv --system-site-packages /tmp/nnv
    /tmp/nnv/bin/pip install -c constraints-cpu.txt nnunetv2==2.8.1 && /tmp/nnv/bin/pip uninstall -y torchvision
    /tmp/nnv/bin/python bench/quality.py --only nnunet/s0,nnunet/s1,nnunet/s2

What nnU-Net is given, and what is its own:
  * Data: the shard set's patients, each as a pseudo-volume: its stored slices (S, M, H, W) as
    one NIfTI per modality, H x W x S, spacing 1 x 1 x 5 so that nnU-Net's 2d configuration
    slices along S (it cuts 2D slices across its largest-spacing axis). Labels in nnU-Net's BraTS
    convention: 1 ED, 2 NCR/NET, 3 ET, with regions WT (1, 2, 3), TC (2, 3), ET (3) and
    regions_class_order (1, 2, 3), as its Dataset137_BraTS21 conversion sets them.
    fold 0 = the set's train/val split (splits_final.json).
  * Changed from nnU-Net's defaults, for the comparison only: the network's widths and depth
    (PlainConvUNet, base * 2**level for `depth` downsamplings, capped at 256 as nnU-Net caps
    2D at 512: the compared recipes' size), the batch size, and the budget: num_epochs x
    num_iterations_per_epoch x batch = the slices the compared recipes see (nnU-Net's poly
    schedule then runs over that budget); 5 validation iterations per epoch (its pseudo-Dice
    log only; nothing is selected by it); nnUNet_n_proc_DA = 2 (the machine has 2 cores).
  * Its own: planning and preprocessing (its z-score, its patch size), region-based DC + BCE
    with batch Dice, deep supervision and its weights, SGD (Nesterov 0.99, lr 1e-2, weight
    decay 3e-5) with its poly schedule, its augmentation, 33 % foreground oversampling, and
    the final checkpoint (nnU-Net predicts with checkpoint_final). No test-time mirroring: the
    compared recipes use none.
  * Scoring, end to end like the other recipes: each test case is prepared by
    `train.predict.prepare_patient` (the shard set's recipe, every brain slice), predicted by
    nnU-Net's predictor as a pseudo-volume, its nested labels read back as regions (WT: any
    label, TC: 2 or 3, ET: 3), mapped to the source grid by the same inverse as `predict`, and
    written in the release's labels for `train.evaluate`.

    python bench/nnunet_peer.py --shards S --test T --work W --seed 0 --slices 5120 --batch 16 \
        --base 16 --depth 4     # prints one JSON line: {"pred_dir", "train_seconds", "slices_per_s"}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

DATASET_ID, DATASET = 501, "Dataset501_BratsShards"
SLICE_SPACING = 5.0  # the pseudo-volume's S axis: the largest spacing, so nnU-Net's 2D slices are ours
NNUNET_LABEL = {"ED": 1, "NCR/NET": 2, "ET": 3}  # nnU-Net's BraTS convention
REGIONS = {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}  # dataset.json's labels
REGIONS_CLASS_ORDER = [1, 2, 3]  # nnU-Net writes region k as this label, later regions over earlier ones


def pseudo_volume(images: Path, case: str, image: np.ndarray, labels: np.ndarray | None = None,
                  label_dir: Path | None = None) -> None:
    """(S, M, H, W) slices -> images/case_000m.nii.gz (H, W, S) per modality; labels (S, H, W) ->
    label_dir/case.nii.gz."""
    import nibabel as nib

    affine = np.diag([1.0, 1.0, SLICE_SPACING, 1.0])
    for m in range(image.shape[1]):
        vol = np.ascontiguousarray(np.moveaxis(image[:, m].astype(np.float32), 0, -1))
        nib.save(nib.Nifti1Image(vol, affine), str(images / f"{case}_{m:04d}.nii.gz"))
    if labels is not None:
        vol = np.ascontiguousarray(np.moveaxis(labels.astype(np.uint8), 0, -1))
        nib.save(nib.Nifti1Image(vol, affine), str(label_dir / f"{case}.nii.gz"))


def nnunet_labels(mask: np.ndarray, channels: list[str]) -> np.ndarray:
    """A sub-region mask (S, 3, H, W) of the glioma channels -> nnU-Net's labels (S, H, W)."""
    out = np.zeros((mask.shape[0],) + mask.shape[2:], np.uint8)
    for name in ("ED", "NCR/NET", "ET"):  # disjoint sub-regions
        out[mask[:, channels.index(name)].astype(bool)] = NNUNET_LABEL[name]
    return out


def regions_of_nested(lab: np.ndarray) -> np.ndarray:
    """nnU-Net's nested output labels (S, H, W) -> the regions (S, 3, H, W) [WT, TC, ET]: a voxel
    labelled with region k's REGIONS_CLASS_ORDER value is in region k and in every earlier one."""
    return np.stack([lab >= REGIONS_CLASS_ORDER[k] for k in range(3)], axis=1) & (lab > 0)[:, None]


def export_raw(shards: str, raw: Path) -> dict:
    """The shard set as nnU-Net's raw dataset; returns its splits (fold 0)."""
    from shards.manifest import set_channels
    from shards.source import ShardSource

    src = ShardSource(shards)
    _, channels = set_channels(src.manifest)
    if list(channels) != ["NCR/NET", "ED", "ET"]:
        raise SystemExit(f"the nnU-Net peer needs a glioma sub-region set, not {list(channels)}")
    root = raw / DATASET
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "val": []}
    for split in ("train", "val"):
        for pid in src.patients(split):
            image, mask, _ = src.read_patient(pid, "zarr")
            case = pid.replace("-", "_")
            pseudo_volume(root / "imagesTr", case, image, nnunet_labels(mask, list(channels)), root / "labelsTr")
            splits[split].append(case)
    n = len(splits["train"]) + len(splits["val"])
    dataset = {"channel_names": {"0": "T1", "1": "T1Gd", "2": "T2", "3": "FLAIR"},
               "labels": {"background": 0, **REGIONS}, "regions_class_order": REGIONS_CLASS_ORDER,
               "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return splits


def plan(work: Path, splits: dict, batch: int, base: int, depth: int) -> None:
    """nnU-Net's fingerprint, plan and 2d preprocessing; the plan's network and batch set to the
    compared recipes'; fold 0 = the set's split."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)

    extract_fingerprints([DATASET_ID], num_processes=2, check_dataset_integrity=True)
    plan_experiments([DATASET_ID])
    pre = work / "nnUNet_preprocessed" / DATASET
    plans_path = pre / "nnUNetPlans.json"
    plans = json.loads(plans_path.read_text())
    c = plans["configurations"]["2d"]
    c["batch_size"] = batch
    kw = c["architecture"]["arch_kwargs"]
    stages = depth + 1
    if kw["n_stages"] < stages:
        raise SystemExit(f"nnU-Net planned {kw['n_stages']} stages for these slices; the peer needs {stages}")
    kw.update(n_stages=stages, features_per_stage=[min(base * 2 ** i, 256) for i in range(stages)],
              kernel_sizes=kw["kernel_sizes"][:stages], strides=kw["strides"][:stages],
              n_conv_per_stage=kw["n_conv_per_stage"][:stages], n_conv_per_stage_decoder=kw["n_conv_per_stage_decoder"][:depth])
    plans_path.write_text(json.dumps(plans, indent=1))
    preprocess([DATASET_ID], configurations=("2d",), num_processes=(2,))
    (pre / "splits_final.json").write_text(json.dumps([splits]))


def train_nnunet(work: Path, seed: int, slices: int, batch: int) -> dict:
    """nnU-Net's trainer, its recipe, over the compared recipes' slice budget; its final checkpoint."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    pre = work / "nnUNet_preprocessed" / DATASET
    plans, dataset = load_json(str(pre / "nnUNetPlans.json")), load_json(str(pre / "dataset.json"))
    plans["continue_training"] = False  # what nnU-Net's run_training sets before making the trainer
    trainer = nnUNetTrainer(plans, "2d", 0, dataset, device=torch.device("cpu"))
    iterations = 80
    trainer.num_epochs = max(1, round(slices / (iterations * batch)))
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = 5
    t0 = time.perf_counter()
    trainer.run_training()
    seconds = time.perf_counter() - t0
    seen = trainer.num_epochs * iterations * batch
    return {"train_seconds": seconds, "slices": seen, "slices_per_s": seen / seconds,
            "model_dir": str(Path(trainer.output_folder).parent)}


def predict_test(model_dir: str, shards: str, test: str, out: Path, tmp: Path) -> None:
    """Each test case end to end: prepared as `predict` prepares it, predicted by nnU-Net as a
    pseudo-volume, its regions mapped back to the source grid, written in the release's labels."""
    import nibabel as nib
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from preprocess.config import PreprocessConfig
    from preprocess.discover import discover
    from preprocess.nifti import save_volume
    from shards.domain import to_labels
    from shards.source import ShardSource
    from train.predict import prepare_patient

    pre = PreprocessConfig.from_dict(ShardSource(shards).manifest["config"]["preprocess"]).for_split("test")
    for sub in ("images", "seg"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    cases = {}
    for pf in discover(Path(test), need_seg=False).patients:
        ps, affine = prepare_patient(pf, pre)
        case = pf.pid.replace("-", "_")
        pseudo_volume(tmp / "images", case, ps.image)
        cases[case] = (pf, ps, affine)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_dir, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    lists = [[str(tmp / "images" / f"{c}_{m:04d}.nii.gz") for m in range(4)] for c in cases]
    predictor.predict_from_files(lists, [str(tmp / "seg" / c) for c in cases], save_probabilities=False,
                                 overwrite=True, num_processes_preprocessing=1, num_processes_segmentation_export=1)
    out.mkdir(parents=True, exist_ok=True)
    for case, (pf, ps, affine) in cases.items():
        lab = np.moveaxis(np.asarray(nib.load(str(tmp / "seg" / f"{case}.nii.gz")).dataobj), -1, 0)  # (S, H, W)
        regions = regions_of_nested(lab).astype(np.float32)
        source = ps.geometry.inverse(regions, ps.slice_index) > 0.5  # (3, X, Y, Z), as predict maps back
        save_volume(out / f"{pf.pid}.nii.gz", to_labels(source, "regions", pf.release), affine)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("--shards", "--test", "--work"):
        ap.add_argument(name, required=True)
    for name, default in (("--seed", 0), ("--slices", 5120), ("--batch", 16), ("--base", 16), ("--depth", 4)):
        ap.add_argument(name, type=int, default=default)
    a = ap.parse_args()
    work = Path(a.work)
    os.environ.update(nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
                      nnUNet_results=str(work / f"nnUNet_results_s{a.seed}"), nnUNet_n_proc_DA="2")
    if not (work / "nnUNet_preprocessed" / DATASET / "splits_final.json").exists():  # once per shard set
        splits = export_raw(a.shards, work / "nnUNet_raw")
        plan(work, splits, a.batch, a.base, a.depth)
    r = train_nnunet(work, a.seed, a.slices, a.batch)
    pred_dir = work / f"pred_s{a.seed}"
    predict_test(r.pop("model_dir"), a.shards, a.test, pred_dir, work / f"test_s{a.seed}")
    print(json.dumps({"pred_dir": str(pred_dir), **r}))


if __name__ == "__main__":
    sys.exit(main())
