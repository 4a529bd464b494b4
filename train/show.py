"""`show`: the figures the seed notebook drew by hand, from a raw release or a shard set,
and prediction-vs-truth overlays for a training run. Returns the PNG paths written.

Patient ids become file names: every one (from --patient, a manifest or a release's folder
names) must be a plain name (`shards.names.patient_id_problem`), and every PNG path must resolve
inside `out`. Shards are read bounded by the manifest (`n_slices`); a run's config.json is read
bounded, and its `shards` value is only ever a location string.
"""

from __future__ import annotations

from pathlib import Path

from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from preprocess.geometry import Geometry
from preprocess.discover import discover
from preprocess.nifti import load_volume
from preprocess.pipeline import load_patient, validate
from preprocess.errors import InputError
from shards.domain import MODALITY_NAMES, SEG, encode_mask, regions_of
from shards.errors import BratsShardsError
from shards.manifest import set_channels
from shards.names import patient_id_problem
from shards.source import ShardSource
from train.data import with_context
from train import palette
from train.plots import _plt, _save, overlay, predictions
from train.predict import load_checkpoint, predict_slices
from train.runfolder import read_run_config



class Names(NamedTuple):
    """What a figure calls the images and the mask channels it draws, and the voxel size."""
    modalities: tuple  # display names, in channel order
    channels: tuple  # mask channel names, in channel order
    spacing: tuple = (1.0, 1.0, 1.0)  # mm along the drawn arrays' x (R), y (A), z (S)


# per plane: the axes of the (X, Y, Z) RAS array it shows as (columns, rows), and the labels of
# its (left, right, bottom, top) edges: the subject's right on the viewer's right (neurological)
PLANES = {"axial": ((0, 1), "LRPA"), "coronal": ((0, 2), "LRIS"), "sagittal": ((1, 2), "PAIS")}


def plane_aspect(plane: str, spacing) -> float:
    """imshow's aspect (a pixel's height / width) that draws `plane` at its true proportions."""
    (col, row), _ = PLANES[plane]
    return float(spacing[row]) / float(spacing[col])


def _marks(ax, plane: str) -> None:
    """The plane's orientation letters at the middle of its four edges."""
    left, right, bottom, top = PLANES[plane][1]
    style = dict(transform=ax.transAxes, color="white", fontsize=7, fontweight="bold", ha="center", va="center")
    for text, x, y in ((left, 0.04, 0.5), (right, 0.96, 0.5), (bottom, 0.5, 0.04), (top, 0.5, 0.96)):
        ax.text(x, y, text, **style)


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


def _imshow(ax, img, title, plane: str = "axial", spacing=(1.0, 1.0, 1.0), cmap="gray"):
    """`img` drawn as `plane` at the voxels' true proportions, with its orientation letters."""
    ax.imshow(img, cmap=cmap, origin="lower", aspect=plane_aspect(plane, spacing))
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    _marks(ax, plane)


def _volume_from_raw(src: Path, patient: str | None, release: str | None = None):
    """(pid, images (M, X, Y, Z) float32, sub-region channels (K, X, Y, Z), names, discovery) of one
    patient of a release folder, in canonical RAS order."""
    disc = discover(src, need_seg=False, release=release)
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
    ref = vols[rel.modalities[0]]
    geo = Geometry.of_source(ref.affine, ref.data.shape, pf.convention)
    images = np.stack([geo.to_canonical(vols[m].data) for m in rel.modalities])
    seg = geo.to_canonical(vols[SEG].data) if SEG in vols else np.zeros(images.shape[1:], np.uint8)
    names = Names(tuple(MODALITY_NAMES[m] for m in rel.modalities), tuple(rel.subregions), geo.canonical_spacing)
    return pf.pid, images.astype(np.float32), encode_mask(seg, rel), names, disc


def _read_patient(s: ShardSource, pid: str, location):
    """(image (S, M, H, W), mask (S, K, H, W)) of one patient of shard set `s` (at `location`),
    read bounded by the manifest's n_slices (zarr when the set has it)."""
    if s.n_slices(pid) == 0:
        raise ShowError(f"patient {pid} has no slices in the shard set {location}")
    image, mask, _ = s.read_patient(pid, "zarr" if "zarr" in s.layouts() else "wds")
    return image, mask


def _volume_from_shards(src: Path, patient: str | None, release: str | None = None):
    s = ShardSource(src)
    if release is not None and release != s.manifest["config"].get("convention"):
        raise ShowError(f"--release {release}: the shard set {src} holds {s.manifest['config'].get('convention')}")
    pids = s.patients("train") + s.patients("val")
    if patient is None and not pids:
        raise ShowError(f"the shard set {src} has no patients")
    pid = patient or pids[0]
    if pid not in s.manifest["patients"]:
        raise ShowError(f"patient {pid} not in the shard set {src}")
    image, mask = _read_patient(s, pid, src)
    mods, channels = set_channels(s.manifest)
    try:  # manifest data: validated as the record it claims to be
        geo = Geometry.from_dict(s.manifest["patients"][pid]["geometry"])
    except (TypeError, ValueError, KeyError) as e:
        raise ShowError(f"{src}/manifest.json: patient {pid}: {str(e)[:200]}") from None
    names = Names(tuple(MODALITY_NAMES[m] for m in mods), tuple(channels),
                  geo.slice_spacing(s.manifest["config"]["preprocess"]["size"]))
    # (S, C, H, W) -> (C, H, W, S): slices stacked back along z
    return pid, np.moveaxis(image.astype(np.float32), 0, -1), np.moveaxis(mask, 0, -1), names, s


def figures(src: str | Path, out: str | Path, patient: str | None = None, release: str | None = None) -> list[Path]:
    """Modalities, planes, overlay, histograms and class balance for one patient of `src`, a
    release folder (read as `release` when given) or a shard set of any release of the table."""
    src, out = Path(src), Path(out)
    if patient is not None:
        _check_pid(patient, "--patient")
    is_shards = (src / "manifest.json").exists() or (src / "manifest.json").is_symlink()
    pid, images, mask, names, ctx = (_volume_from_shards if is_shards else _volume_from_raw)(src, patient, release)
    tumour = mask.any(axis=0)  # (X, Y, Z)
    per_z = tumour.sum(axis=(0, 1))
    z = int(per_z.argmax()) if per_z.any() else images.shape[-1] // 2
    if tumour.any():
        cx, cy, _ = (int(v) for v in np.argwhere(tumour).mean(axis=0))
    else:
        cx, cy = images.shape[1] // 2, images.shape[2] // 2
    kind = "shards (normalised)" if is_shards else "raw input"
    return [_modalities(images[..., z], names, f"{pid}, axial slice {z} — {kind}", _png(out, f"{pid}_modalities.png")),
            _planes(images, mask, (cx, cy, z), names, pid, _png(out, f"{pid}_planes.png")),
            _overlay(images[..., z], mask[..., z], names, _png(out, f"{pid}_overlay.png")),
            _histograms(images, pid, names, out, normalised_input=is_shards),
            _class_balance(ctx, is_shards, names, out)]


def _legend(names: Names) -> str:
    return palette.legend(names.channels)


def _modalities(images: np.ndarray, names: Names, title: str, path: Path) -> Path:
    """Each modality of one axial slice in grey: images (M, X, Y)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(names.modalities), figsize=(3 * len(names.modalities), 3.4), squeeze=False)
    for ax, img, name in zip(axes[0], images, names.modalities):
        _imshow(ax, _grey(img), name, "axial", names.spacing)
    fig.suptitle(title, fontsize=10)
    return _close(plt, fig, path)


def _planes(images: np.ndarray, mask: np.ndarray, centre: tuple, names: Names, pid: str, path: Path) -> Path:
    """Axial, coronal and sagittal slices through `centre` (x, y, z) with the mask channels over grey."""
    plt = _plt()
    cx, cy, z = centre
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    planes = [("axial", images[:, :, :, z], mask[:, :, :, z]),
              ("coronal", images[:, :, cy, :], mask[:, :, cy, :]),
              ("sagittal", images[:, cx, :, :], mask[:, cx, :, :])]
    for ax, (name, img, m) in zip(axes, planes):
        _imshow(ax, overlay(img, m, names.channels).transpose(1, 0, 2), name, name, names.spacing)
    fig.suptitle(f"{pid}: three planes through the tumour ({names.modalities[-1]}; {_legend(names)})", fontsize=9)
    return _close(plt, fig, path)


def _overlay(images: np.ndarray, mask: np.ndarray, names: Names, path: Path) -> Path:
    """One axial slice: the grey modality alone, and with the mask channels over it."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6))
    _imshow(axes[0], _grey(images[-1]), names.modalities[-1], "axial", names.spacing)
    _imshow(axes[1], overlay(images, mask, names.channels).transpose(1, 0, 2), f"mask overlay: {_legend(names)}", "axial",
            names.spacing)
    axes[1].title.set_fontsize(8)
    return _close(plt, fig, path)


def _close(plt, fig, path: Path) -> Path:
    p = _save(fig, path)
    plt.close(fig)
    return p


def _histograms(images: np.ndarray, pid: str, names: Names, out: Path, normalised_input: bool) -> Path:
    plt = _plt()
    brain = np.any(images != 0, axis=0)
    rows = [("normalised (as stored in the shards)", images)] if normalised_input else [("raw", images)]
    if not normalised_input:
        norm = np.zeros_like(images)
        for c in range(len(images)):
            v = images[c][brain]
            norm[c][brain] = (v - v.mean()) / (v.std() + 1e-8)
        rows.append(("after z-score over the brain", norm))
    m = len(names.modalities)
    fig, axes = plt.subplots(len(rows), m, figsize=(3 * m, 2.8 * len(rows)), squeeze=False)
    for r, (label, arr) in enumerate(rows):
        for c in range(m):
            axes[r][c].hist(arr[c][brain], bins=100, color="C0")
            axes[r][c].set_title(f"{names.modalities[c]} — {label}", fontsize=8)
            axes[r][c].tick_params(labelsize=7)
    fig.suptitle(f"{pid}: intensity histograms of brain voxels", fontsize=10)
    fig.tight_layout()
    return _close(plt, fig, _png(out, f"{pid}_histograms.png"))


def _raw_fractions(patients, names: Names) -> tuple[list, list]:
    """(patient ids, per patient the share of brain voxels of each sub-region) of a release folder;
    the brain is where the grey modality (the release's last) is non-zero."""
    pids, fractions = [], []
    for pf in tqdm(patients, desc="class balance", unit="patient", disable=None):
        rel = pf.release
        if pf.problem or SEG not in pf.files and not pf.slices and rel.layout != "msd":
            continue
        if pf.slices or rel.layout == "msd":  # an HDF5 slice export or a 4D file: the volumes come whole
            vols, _ = load_patient(pf)
            seg, grey = vols[SEG].data if SEG in vols else None, vols[rel.modalities[-1]].data
        else:
            seg, grey = load_volume(pf.files[SEG]).data, load_volume(pf.files[rel.modalities[-1]]).data
        if seg is None or tuple(rel.subregions) != names.channels:
            continue
        brain = max(int(np.count_nonzero(grey)), 1)
        pids.append(pf.pid)
        fractions.append([np.count_nonzero(seg == rel.label_of(s)) / brain for s in rel.subregions])
    return pids, fractions


def _class_balance(ctx, is_shards: bool, names: Names, out: Path) -> Path:
    """Tumour channel voxels as a share of brain voxels (raw) or slice pixels (shards), per patient."""
    plt = _plt()
    k = len(names.channels)
    if is_shards:
        pids = sorted(ctx.manifest["patients"])
        fractions = [[c / max(p["pixels"], 1) for c in p["mask_pixels"][:k]]
                     for p in (ctx.manifest["patients"][pid] for pid in pids)]
        what = "share of slice pixels (shards)"
    else:
        pids, fractions = _raw_fractions(ctx.patients, names)
        what = "share of brain voxels (raw input)"
    f = np.array(fractions, dtype=np.float64).reshape(-1, k) * 100
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(pids)), 4))
    bottom = np.zeros(len(pids))
    used = set()
    for c in palette.paint_order(names.channels):  # the figures' colours; a colour's second channel hatched
        label = names.channels[c]
        rgb = palette.line_colour(label)
        ax.bar(range(len(pids)), f[:, c], bottom=bottom, label=label, color=rgb, hatch="//" if rgb in used else None)
        used.add(rgb)
        bottom += f[:, c]
    ax.set_ylim(0, max(bottom.max(initial=0), 1e-3) * 1.08)
    ax.set_xticks(range(len(pids)))
    ax.set_xticklabels(pids, rotation=90, fontsize=6)
    ax.set_ylabel("%")
    ax.set_title(f"Class imbalance: tumour channels as {what}; "
                 f"the rest is healthy tissue", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _close(plt, fig, _png(out, "class_balance.png"))


def run_figures(run: str | Path, out: str | Path, device: str = "cpu") -> list[Path]:
    """For a training run: truth vs prediction on the most tumorous slice of each validation patient."""
    run, out = Path(run), Path(out)
    shards = read_run_config(run)["shards"]
    ck = run / "checkpoints" / ("best.pt" if (run / "checkpoints" / "best.pt").exists() else "last.pt")
    member = load_checkpoint(ck, torch.device(device))
    model, output_mode, context = member["model"], member["output_mode"], member["context"]
    src = ShardSource(shards).select_plane(member["preprocess"].plane)  # the slices the run was trained on
    set_mode = src.manifest["config"]["preprocess"]["mask"]
    names = list(member["release"].channels(output_mode))
    paths = []
    for pid in src.patients("val"):
        if src.n_slices(pid) == 0:
            continue
        image, mask = _read_patient(src, pid, shards)
        _png(out, f"run_{pid}.png")
        if output_mode != set_mode:  # a region-trained model on a sub-region set: compare regions
            mask = regions_of(mask, 1, member["release"]).astype(np.uint8)
        prob = predict_slices(model, with_context(image, src.manifest["patients"][pid]["slice_index"], context),
                              torch.device(device))
        order = spaced_slices(mask.reshape(len(mask), -1).sum(1, dtype=np.int64), 3)
        samples = [{"key": f"{pid} slice {int(i)}", "image": image[i].astype(np.float32), "mask": mask[i],
                    "pred": prob[i] > 0.5} for i in order]
        paths.append(predictions(samples, names, out, name=f"run_{pid}.png", title=f"{pid} ({ck.name})",
                                 grey=MODALITY_NAMES[member["release"].modalities[-1]]))
    return paths


def spaced_slices(area: np.ndarray, k: int) -> list[int]:
    """Up to `k` slice indices, in order, with the most tumour (`area` per slice) and at least an
    eighth of the stack apart: neighbouring slices look alike and show nothing new."""
    gap = max(1, len(area) // 8)
    chosen = []
    for i in np.argsort(-area, kind="stable"):
        if area[i] > 0 and all(abs(int(i) - j) >= gap for j in chosen):
            chosen.append(int(i))
        if len(chosen) == k:
            break
    return sorted(chosen) or [int(np.argmax(area))] if len(area) else []
