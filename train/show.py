"""`show`: the figures the seed notebook drew by hand, from a raw release or a shard set,
and prediction-vs-truth overlays for a training run. Returns the PNG paths written.

Patient ids become file names: every one (from --patient, a manifest or a release's folder
names) must be a plain name (`shards.names.patient_id_problem`), and every PNG path must resolve
inside `out`. Shards are read bounded by the manifest (`n_slices`); a run's config.json is read
bounded, and its `shards` value is only ever a location string.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shards.domain import MODALITIES, encode_mask
from shards.errors import BratsShardsError
from shards.names import patient_id_problem
from train.plots import _plt, _save, overlay

MODALITY_NAMES = ("T1", "T1Gd", "T2", "FLAIR")
MAX_RUN_CONFIG_BYTES = 1 << 20
MASK_CHANNELS = 3  # the overlays colour three channels


class ShowError(BratsShardsError, ValueError):
    """A refused `show` request or input; one line naming the patient or file."""


def _check_pid(pid, what: str = "patient") -> str:
    why = patient_id_problem(pid)
    if why is not None:
        raise ShowError(f"{what}: {why}")
    return pid


def _png(out: Path, name: str) -> Path:
    """`out / name`, refused unless it resolves to a file directly inside `out`."""
    path = out / name
    if Path(name).name != name or path.resolve().parent != out.resolve():
        raise ShowError(f"refusing to write {path}: it resolves outside {out}")
    return path


def _grey(img: np.ndarray) -> np.ndarray:
    """(X, Y) in RAS order -> (Y, X) for imshow with origin='lower': anterior up, right to the right."""
    return img.T


def _imshow(ax, img, title, cmap="gray"):
    ax.imshow(img, cmap=cmap, origin="lower")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _volume_from_raw(src: Path, patient: str | None):
    from preprocess import steps
    from preprocess.discover import discover
    from preprocess.pipeline import load_patient, validate
    from preprocess.steps import InputError

    disc = discover(src, need_seg=False)
    if not disc.patients:
        raise ShowError(f"no patients found in {src}")
    pf = next((p for p in disc.patients if p.pid == patient), None) if patient else disc.patients[0]
    if pf is None:
        raise ShowError(f"patient {patient} not found in {src}")
    if pf.problem:  # a bad id, a missing or doubled modality: what discovery found
        raise ShowError(f"{pf.pid}: {pf.problem}")
    try:
        vols, _ = load_patient(pf)
        validate(pf, vols)
    except InputError as e:
        raise ShowError(f"{pf.pid}: {e}") from None
    rel = pf.release
    if rel.modalities != MODALITIES or len(rel.subregions) != MASK_CHANNELS:
        raise ShowError(f"{pf.pid} is {rel.name} ({len(rel.modalities)} modalities, {len(rel.subregions)} "
                        f"sub-regions); show draws the four-modality, three-channel sets")
    ornt = steps.canonical_ornt(vols["t1"].affine)
    images = np.stack([steps.apply_ornt(vols[m].data, ornt) for m in ("t1", "t1gd", "t2", "flair")])
    seg = steps.apply_ornt(vols["seg"].data, ornt) if "seg" in vols else np.zeros(images.shape[1:], np.uint8)
    mask = encode_mask(seg, rel)  # (3, X, Y, Z)
    return pf.pid, images.astype(np.float32), mask, disc


def _read_patient(s, pid: str, location):
    """(image (S, 4, H, W), mask (S, 3, H, W)) of one patient of ShardSource `s` (at `location`),
    read bounded by the manifest's n_slices (zarr when the set has it); refused if it has no
    slices or not the three mask channels drawn."""
    if s.n_slices(pid) == 0:
        raise ShowError(f"patient {pid} has no slices in the shard set {location}")
    image, mask, _ = s.read_patient(pid, "zarr" if "zarr" in s.layouts() else "wds")
    if mask.shape[1] != MASK_CHANNELS:
        raise ShowError(f"patient {pid}: {mask.shape[1]} mask channels; show draws {MASK_CHANNELS}")
    return image, mask


def _volume_from_shards(src: Path, patient: str | None):
    from shards.source import ShardSource

    s = ShardSource(src)
    pids = s.patients("train") + s.patients("val")
    if patient is None and not pids:
        raise ShowError(f"the shard set {src} has no patients")
    pid = patient or pids[0]
    if pid not in s.manifest["patients"]:
        raise ShowError(f"patient {pid} not in the shard set {src}")
    image, mask = _read_patient(s, pid, src)
    # (S, C, H, W) -> (C, H, W, S): slices stacked back along z
    return pid, np.moveaxis(image.astype(np.float32), 0, -1), np.moveaxis(mask, 0, -1), s


def figures(src: str | Path, out: str | Path, patient: str | None = None) -> list[Path]:
    """Modalities, planes, overlay, histograms and class balance for one patient of `src`."""
    src, out = Path(src), Path(out)
    if patient is not None:
        _check_pid(patient, "--patient")
    is_shards = (src / "manifest.json").exists() or (src / "manifest.json").is_symlink()
    pid, images, mask, ctx = (_volume_from_shards if is_shards else _volume_from_raw)(src, patient)
    tumour = mask.any(axis=0)  # (X, Y, Z)
    per_z = tumour.sum(axis=(0, 1))
    z = int(per_z.argmax()) if per_z.any() else images.shape[-1] // 2
    if tumour.any():
        cx, cy, _ = (int(v) for v in np.argwhere(tumour).mean(axis=0))
    else:
        cx, cy = images.shape[1] // 2, images.shape[2] // 2
    plt = _plt()
    paths = []
    kind = "shards (normalised)" if is_shards else "raw input"

    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, img, name in zip(axes, images, MODALITY_NAMES):
        _imshow(ax, _grey(img[:, :, z]), name)
    fig.suptitle(f"{pid}, axial slice {z} — {kind}", fontsize=10)
    paths.append(_save(fig, _png(out, f"{pid}_modalities.png")))
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    planes = [("axial", images[:, :, :, z], mask[:, :, :, z]),
              ("coronal", images[:, :, cy, :], mask[:, :, cy, :]),
              ("sagittal", images[:, cx, :, :], mask[:, cx, :, :])]
    for ax, (name, img, m) in zip(axes, planes):
        ax.imshow(overlay(img, m).transpose(1, 0, 2), origin="lower", aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{pid}: three planes through the tumour (FLAIR; NCR/NET red, ED green, ET yellow)", fontsize=9)
    paths.append(_save(fig, _png(out, f"{pid}_planes.png")))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    _imshow(axes[0], _grey(images[3][:, :, z]), "FLAIR")
    axes[1].imshow(overlay(images[:, :, :, z], mask[:, :, :, z]).transpose(1, 0, 2), origin="lower")
    axes[1].set_title("mask overlay: NCR/NET red, ED green, ET yellow", fontsize=8)
    axes[1].set_xticks([])
    axes[1].set_yticks([])
    paths.append(_save(fig, _png(out, f"{pid}_overlay.png")))
    plt.close(fig)

    paths.append(_histograms(images, pid, out, normalised_input=is_shards))
    paths.append(_class_balance(ctx, is_shards, out))
    return paths


def _histograms(images: np.ndarray, pid: str, out: Path, normalised_input: bool) -> Path:
    plt = _plt()
    brain = np.any(images != 0, axis=0)
    rows = [("normalised (as stored in the shards)", images)] if normalised_input else [("raw", images)]
    if not normalised_input:
        norm = np.zeros_like(images)
        for c in range(4):
            v = images[c][brain]
            norm[c][brain] = (v - v.mean()) / (v.std() + 1e-8)
        rows.append(("after z-score over the brain", norm))
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 2.8 * len(rows)), squeeze=False)
    for r, (label, arr) in enumerate(rows):
        for c in range(4):
            axes[r][c].hist(arr[c][brain], bins=100, color="C0")
            axes[r][c].set_title(f"{MODALITY_NAMES[c]} — {label}", fontsize=8)
            axes[r][c].tick_params(labelsize=7)
    fig.suptitle(f"{pid}: intensity histograms of brain voxels", fontsize=10)
    fig.tight_layout()
    p = _save(fig, _png(out, f"{pid}_histograms.png"))
    plt.close(fig)
    return p


def _class_balance(ctx, is_shards: bool, out: Path) -> Path:
    """Tumour sub-region voxels as a share of brain voxels, per patient."""
    plt = _plt()
    names, fractions = [], []
    if is_shards:
        for pid, p in sorted(ctx.manifest["patients"].items()):
            names.append(pid)
            fractions.append([c / max(p["pixels"], 1) for c in (p["mask_pixels"] + [0, 0, 0])[:3]])
        what = "share of slice pixels (shards)"
    else:
        from tqdm import tqdm

        from preprocess.nifti import load_volume
        from preprocess.pipeline import load_patient

        for pf in tqdm(ctx.patients, desc="class balance", unit="patient", disable=None):
            if pf.slices:  # HDF5 slice export: the volume comes whole
                vols, _ = load_patient(pf)
                seg, flair = vols["seg"].data, vols["flair"].data
            elif "seg" in pf.files and "flair" in pf.files:
                seg, flair = load_volume(pf.files["seg"]).data, load_volume(pf.files["flair"]).data
            else:
                continue
            brain = max(int(np.count_nonzero(flair)), 1)
            names.append(pf.pid)
            fractions.append([np.count_nonzero(seg == lab) / brain for lab in (1, 2, pf.labels[-1])])
        what = "share of brain voxels (raw input)"
    f = np.array(fractions).reshape(-1, 3) * 100
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 4))
    bottom = np.zeros(len(names))
    for c, (label, colour) in enumerate(zip(("NCR/NET", "ED", "ET"), ("C3", "C2", "C1"))):
        ax.bar(range(len(names)), f[:, c], bottom=bottom, label=label, color=colour)
        bottom += f[:, c]
    ax.set_ylim(0, max(bottom.max(), 1e-3) * 1.08)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("%")
    ax.set_title(f"Class imbalance: tumour sub-regions as {what}; the rest is healthy tissue", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = _save(fig, _png(out, "class_balance.png"))
    plt.close(fig)
    return p


def run_figures(run: str | Path, out: str | Path, device: str = "cpu") -> list[Path]:
    """For a training run: truth vs prediction on the most tumorous slice of each validation patient."""
    import torch

    from train.plots import predictions
    from shards.domain import regions_of
    from train.data import with_context
    from train.predict import load_checkpoint, predict_slices
    from shards.source import ShardSource

    run, out = Path(run), Path(out)
    shards = _run_shards(run)
    ck = run / "checkpoints" / ("best.pt" if (run / "checkpoints" / "best.pt").exists() else "last.pt")
    member = load_checkpoint(ck, torch.device(device))
    model, mask_mode, context = member["model"], member["mask_mode"], member["context"]
    src = ShardSource(shards)
    set_mode = src.manifest["config"]["preprocess"]["mask"]
    names = list(member["release"].channels(mask_mode))
    paths = []
    for pid in src.patients("val"):
        if src.n_slices(pid) == 0:
            continue
        image, mask = _read_patient(src, pid, shards)
        _png(out, f"run_{pid}.png")
        if mask_mode != set_mode:  # a region-trained model on a sub-region set: compare regions
            mask = regions_of(mask, 1, member["release"]).astype(np.uint8)
        prob = predict_slices(model, with_context(image, src.manifest["patients"][pid]["slice_index"], context),
                              torch.device(device))
        area = mask.reshape(len(mask), -1).sum(1, dtype=np.int64)
        order = np.argsort(-area, kind="stable")[:3]  # the most tumorous slices
        samples = [{"key": f"{pid} slice {int(i)}", "image": image[i].astype(np.float32), "mask": mask[i],
                    "pred": prob[i] > 0.5} for i in sorted(order)]
        paths.append(predictions(samples, names, out, name=f"run_{pid}.png", title=f"{pid} ({ck.name})"))
    return paths


def _run_shards(run: Path) -> str:
    """The shard-set location a run was trained on, from RUN/config.json read bounded (a FIFO or
    device is refused unread). The value is data: a location string, nothing else."""
    from shards.manifest import ManifestError, read_local

    path = run / "config.json"
    try:
        raw = read_local(path, MAX_RUN_CONFIG_BYTES)
    except FileNotFoundError:
        raise ShowError(f"{path} not found: not a training run folder") from None
    except ManifestError as e:
        raise ShowError(str(e)) from None
    try:
        conf = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ShowError(f"{path} is not valid JSON: {str(e)[:100]}") from None
    shards = conf.get("shards") if isinstance(conf, dict) else None
    if not (isinstance(shards, str) and shards and len(shards) <= 4096 and shards.isprintable()):
        raise ShowError(f"{path}: 'shards' is not a shard-set location (a non-empty string)")
    return shards
