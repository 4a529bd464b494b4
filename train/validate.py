"""Validation of one epoch and its record: the loss, per-channel slice Dice/precision/recall,
per-sub-region Dice, per-patient 3D region Dice (summed over ranks), the slices the overlay figure
shows, the post-processing thresholds chosen on the validation patients, and the metrics.csv row."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from shards.domain import REGIONS, RELEASES, Release, subregion_channels, subregions_of, to_labels, to_regions
from preprocess.geometry import Geometry
from shards.source import ShardSetError, ShardSource
from train import recipe
from train.metrics import THRESHOLD, confusion, scores
from train.postprocess import PostprocessConfig, choose
from train.runtime import autocast, to_device


@torch.no_grad()
def validate(net, batches, loss_fn, device: torch.device, modes: tuple[str, str], keep: int = 0,
             collect: bool = False, rel: Release = RELEASES["2020"]) -> dict:
    """Loss, per-channel confusion over all slices, per-patient region confusion (3D Dice), up to
    `keep` slices for the overlay figure and, with `collect`, each patient's predicted and true
    regions (3, S, H, W) for choosing post-processing. `modes`: (targets, the set's mask mode)."""
    net.eval()
    targets, set_mode = modes
    output_mode = recipe.output_mode(targets, set_mode)
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
        pred, truth = (torch.sigmoid(logits.float()) > THRESHOLD).cpu(), y.bool().cpu()  # (B, K, H, W), as predict
        conf += confusion(pred, truth)
        pr, tr = labelled_regions(pred.numpy(), output_mode, rel), to_regions(truth.numpy(), output_mode, 1, rel)
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


def labelled_regions(pred: np.ndarray, mode: str, rel: Release) -> np.ndarray:
    """Bool outputs (B, K, H, W) -> the regions (B, R, H, W) of the label map `predict` writes from
    them (`to_labels`), as `evaluate` reads them: a TC predicted outside WT is also WT, and so on.
    The per-patient figures are then `evaluate`'s on the same slices."""
    labels = to_labels(np.moveaxis(pred, 1, 0), mode, rel)  # (B, H, W)
    return np.moveaxis(to_regions(subregion_channels(labels, rel), "subregions", 0, rel), 0, 1)


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


def reduce(loss_sum, n_seen, val, distributed) -> dict:
    """Sum counts over ranks; gather per-patient region counts."""
    patients = val["patients"]
    if distributed:
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


def summary(row: dict, names: list[str], regions: tuple = REGIONS) -> str:
    per = " ".join(f"{n} {row[f'dice_{n}']:.3f}" for n in names)
    reg = " ".join(f"{r} {row[f'patient_dice_{r}']:.3f}" for r in regions)
    return (f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} val loss {row['val_loss']:.4f} "
            f"mean Dice {row['mean_dice']:.3f} ({per}) | per-patient 3D Dice {reg} | "
            f"{row['slices_per_s']:.0f} slices/s, lr {row['lr']:.2g}")


def choose_postprocess(stacks: dict, source: ShardSource) -> dict:
    """Post-processing thresholds that maximise the validation patients' region Dice (3D, on the
    stored slices), volumes in mm^3 from each patient's geometry."""
    cases = [(pred, ref, slice_voxel_mm3(source.manifest["patients"][pid]["geometry"], pred.shape[-1]))
             for pid, (pred, ref) in stacks.items()]
    return choose(cases) if cases else {"config": PostprocessConfig().to_dict(), "dice_before": 0.0,
                                         "dice_after": 0.0}


def thinned_validation(config: dict, folds: int) -> str | None:
    """A line saying the validation patients' figures miss slices, where they do: sets built with
    --tumour-free-fraction before it spared validation patients (no `tumour_free_thins` in their
    config), and --folds, whose validation patients come from the thinned training split."""
    pre = config["preprocess"]
    fraction = pre.get("tumour_free_fraction", 1.0)
    if fraction >= 1.0:
        return None
    if "tumour_free_thins" not in pre:
        return (f"note: this set was built with --tumour-free-fraction {fraction:g} before validation patients "
                f"kept every slice: the per-patient figures skip their dropped tumour-free slices (false "
                f"positives there are not counted); rebuild the set to count them")
    if folds:
        return (f"note: with --folds the validation patients come from the set's training split, thinned by "
                f"--tumour-free-fraction {fraction:g}: the per-patient figures skip their dropped tumour-free "
                f"slices; build with --tumour-free-fraction 1 to count them")
    return None


def slice_voxel_mm3(geometry: dict, size: int) -> float:
    """Volume of one voxel of a patient's resized slices: the source spacing scaled by crop/size."""
    return float(np.prod(Geometry.from_dict(geometry).slice_spacing(size)))


def check_geometries(source: ShardSource) -> None:
    """Every patient's geometry of the plane read (`source.plane`), checked before training uses it
    (its validation and post-processing volumes): a tampered record is refused, named, not a
    traceback at the end of an epoch or a volume silently off."""
    for pid, p in source.manifest["patients"].items():
        try:
            geo = Geometry.from_dict(p["geometry"])
        except (ValueError, TypeError, KeyError) as e:
            raise ShardSetError(f"{source.location}: patient {pid} ({source.plane} slices): {e}") from None
        if geo.plane != source.plane or (p["slice_index"] and p["slice_index"][-1] >= geo.view_shape[2]):
            raise ShardSetError(f"{source.location}: patient {pid}: its geometry is not that of its {source.plane} "
                                f"slices (plane {geo.plane}, {geo.view_shape[2]} slices, slice_index up to "
                                f"{p['slice_index'][-1] if p['slice_index'] else None})")
