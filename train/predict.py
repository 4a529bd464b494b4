"""`predict`: a checkpoint applied to a BraTS-layout folder, written back as NIfTI label maps.

For each patient: exactly the preprocessing recorded in the checkpoint (all brain slices kept, in
the plane it was trained on), with the checkpoint's 2.5D context (`train.data.with_context`), the
model over all slices in batches (optionally averaged over in-plane flips; several checkpoints: an
ensemble, their probabilities averaged; checkpoints of different planes -- axial, coronal,
sagittal -- are each mapped back to the source grid and averaged there, in 3D), then the way back: undo the resize (bilinear on probabilities), the crop (zeros outside the box and on the
slices without brain) and the reorientation, so the output has the input's shape and affine.

Channels -> one label map (documented rule):
  * sub-region channels [NCR/NET, ED, ET]: a voxel takes the label of its most specific
    positive channel, in the order ET > NCR/NET > ED (ET and NCR/NET are the tumour core;
    oedema surrounds it), else 0;
  * region channels [WT, TC, ET] (nested): ET -> enhancing label, else TC -> 1, else WT -> 2.
  * any release: the same rule on its own channels (`shards.domain.to_labels`), so gli-2024
    writes RC as 4, MSD writes 1 oedema / 2 non-enhancing / 3 enhancing, MEN-RT 1 = GTV.
Labels follow the input release (`shards.domain.RELEASES`), detected from its names (or
`release=`): enhancing tumour 4 for 2020/2021-style, 3 for 2023-style. An input whose release has
other modalities or channels than the checkpoint's training set is refused per patient, named.
The way back is `Geometry.inverse`; outputs have the input's grid (any shape) and affine.

Post-processing (`train.postprocess`), on the source grid before the labels are written: the
ET->NCR and small-component thresholds the training run chose on its validation patients and
stored in the checkpoint (an ensemble uses the first checkpoint's); `--no-postprocess` skips it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from preprocess.errors import InputError
from preprocess.discover import PatientFiles, discover
from preprocess.nifti import save_volume
from preprocess.geometry import spacing_of
from preprocess.config import PreprocessConfig
from preprocess.pipeline import load_patient, process_volumes, validate
from shards.domain import REGIONS, SEG, to_labels, to_regions
from shards.errors import BratsShardsError
from train import checkpoint as ckpt
from train.data import with_context
from train.postprocess import PostprocessConfig, postprocess
from train.metrics import THRESHOLD



class PredictError(BratsShardsError, ValueError):
    """Checkpoints that cannot be used (alone or together); the message names them."""


def load_checkpoint(path: str | Path, device: torch.device) -> dict:
    """What predicting with a checkpoint needs: the model in eval mode, the preprocessing, the
    output mask mode, the 2.5D context and the post-processing thresholds. The file goes through
    `checkpoint.read` (weights_only, every field checked against its tensors and bounds) before
    a model is built; checkpoints from before these options read as the seed recipe."""
    try:
        rec = ckpt.read(path)
    except ckpt.CheckpointError as e:  # predict's refusals are PredictErrors; the message names file and field
        raise PredictError(str(e)) from None
    return {"model": ckpt.build(rec, device), "preprocess": rec["preprocess"], "output_mode": rec["output_mode"],
            "context": rec["context"], "postprocess": rec["postprocess"], "path": str(path),
            "release": rec["release"], "record": rec}


def check_ensemble(members: list[dict]) -> None:
    """An ensemble's checkpoints must agree on what they read and what they output; they may
    differ in the slicing plane alone (a triplanar ensemble: probabilities averaged in 3D)."""
    first = members[0]
    for m in members[1:]:
        for key in ("preprocess", "output_mode", "release"):
            a, b = m[key], first[key]
            if key == "preprocess":  # the plane may differ: each member's slices are cut as it was trained
                a, b = replace(a, plane="axial"), replace(b, plane="axial")
            if a != b:
                raise PredictError(f"{m['path']} and {first['path']} differ in {key}: they cannot form an ensemble")


@torch.no_grad()
def predict_slices(model, image: np.ndarray, device, batch_size: int = 32, tta: bool = False) -> np.ndarray:
    """(S, M(2k+1), H, W) float16 -> (S, K, H, W) float32 probabilities, K the model's outputs."""
    out = None  # (S, K, H, W), K from the model's first output
    flips = [(), (-1,), (-2,), (-2, -1)] if tta else [()]
    for i in range(0, image.shape[0], batch_size):
        x = torch.from_numpy(image[i: i + batch_size].astype(np.float32)).to(device)
        p = 0
        for f in flips:  # average of the predictions on flipped copies, flipped back
            pf = torch.sigmoid(model(x.flip(f) if f else x)).float()
            p = p + (pf.flip(f) if f else pf)
        if out is None:
            out = np.empty((image.shape[0], p.shape[1]) + image.shape[2:], np.float32)
        out[i: i + batch_size] = (p / len(flips)).cpu().numpy()
    return out if out is not None else np.zeros((0, 3) + image.shape[2:], np.float32)


def check_release(pf: PatientFiles, trained) -> None:
    """The input's release must have the modalities and channels the model was trained on (its
    label values may differ: 2020 and 2023 glioma share channels; labels follow the input)."""
    rel = pf.release
    if trained is not None and (rel.modalities != trained.modalities or rel.subregions != trained.subregions
                                or tuple(rel.regions) != tuple(trained.regions)):
        raise InputError(f"{pf.pid} is {rel.name} ({', '.join(rel.modalities)} -> {', '.join(rel.subregions)}); "
                               f"the checkpoint was trained on {trained.name} ({', '.join(trained.modalities)} -> "
                               f"{', '.join(trained.subregions)})")


def predict_patient(model, pre: PreprocessConfig, output_mode: str, pf: PatientFiles, device, batch_size=32,
                    tta=False, context: int = 0, post: PostprocessConfig | None = None,
                    ensemble: list | None = None, trained=None) -> tuple[np.ndarray, np.ndarray]:
    """(label map, affine) of one patient. `model` may be one model or, with `ensemble`, ignored
    in favour of a list of (model, context) pairs, or (model, context, preprocess) triples of
    members that may differ in plane, whose probabilities are averaged on the source grid."""
    check_release(pf, trained)
    members = [m if len(m) == 3 else (*m, pre) for m in (ensemble or [(model, context)])]
    prob, affine = ensemble_probabilities(pf, members, device, batch_size, tta)
    return label_map(prob, output_mode, pf.release, affine, post), affine


def prepare_patient(pf: PatientFiles, pre: PreprocessConfig):
    """(PatientSlices, source affine) of one patient: read, checked, preprocessed as recorded."""
    slices, affine = prepare_planes(pf, [pre])
    return slices[pre], affine


def prepare_planes(pf: PatientFiles, recipes: list[PreprocessConfig]):
    """({recipe: PatientSlices}, source affine): the patient read and checked once, then
    preprocessed by each recipe (an ensemble's planes)."""
    if pf.problem:
        raise InputError(pf.problem)
    pf = replace(pf, files={k: v for k, v in pf.files.items() if k != SEG})  # never look at a reference
    vols, _ = load_patient(pf)
    validate(pf, vols)
    return {pre: process_volumes(pf, vols, pre) for pre in dict.fromkeys(recipes)}, \
        vols[pf.release.modalities[0]].affine


def ensemble_probabilities(pf: PatientFiles, members: list, device, batch_size: int = 32, tta: bool = False):
    """(probabilities (K, X, Y, Z) on the source grid, affine): the mean over `members`, (model,
    context, preprocess) triples; members of one recipe are averaged on their slices, then each
    recipe (plane) is mapped back to the source grid and weighed by its members."""
    slices, affine = prepare_planes(pf, [pre for _, _, pre in members])
    prob = 0
    for pre, ps in slices.items():
        group = [(m, k) for m, k, p in members if p == pre]
        prob = prob + source_probabilities(ps, group, device, batch_size, tta) * (len(group) / len(members))
    return prob, affine


def source_probabilities(ps, members: list, device, batch_size: int = 32, tta: bool = False) -> np.ndarray:
    """The members' (model, context) mean probabilities of a prepared patient, mapped back onto
    its source grid: (K, X, Y, Z) as the source is stored."""
    prob = sum(predict_slices(m, with_context(ps.image, ps.slice_index, k), device, batch_size, tta)
               for m, k in members) / len(members)
    return ps.geometry.inverse(prob, ps.slice_index)


def label_map(prob: np.ndarray, output_mode: str, release, affine, post: PostprocessConfig | None = None):
    """Source-grid probabilities -> the label map: thresholded, post-processed, labelled in
    `release`'s convention."""
    positive = prob > THRESHOLD
    if post is not None and (post.et_min_mm3 or post.min_component_mm3) and tuple(release.regions) == REGIONS:
        positive = postprocess(to_regions(positive, output_mode), post, float(np.prod(spacing_of(affine))))
        output_mode = "regions"
    return to_labels(positive, output_mode, release)


def segment(ps, members: list, output_mode: str, release, affine, device, batch_size: int = 32, tta: bool = False,
            post: PostprocessConfig | None = None) -> np.ndarray:
    """The label map of a prepared patient on its source grid: the members' (model, context)
    probabilities averaged, mapped back, thresholded, post-processed, labelled in `release`'s convention."""
    return label_map(source_probabilities(ps, members, device, batch_size, tta), output_mode, release, affine, post)


def predict(checkpoint, input_dir: str | Path, output_dir: str | Path, device: str = "auto",
            batch_size: int = 32, tta: bool = False, progress: bool = True, postprocess: bool = True,
            release: str | None = None) -> dict:
    """Write OUTPUT/<pid>.nii.gz for every patient; returns {'written': [...], 'failed': {pid: reason}}.
    `checkpoint`: one path, or a list of paths (an ensemble: probabilities averaged)."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    members = [load_checkpoint(p, dev) for p in paths]
    check_ensemble(members)
    pre, output_mode = members[0]["preprocess"], members[0]["output_mode"]
    post = members[0]["postprocess"] if postprocess else None
    ensemble = [(m["model"], m["context"], m["preprocess"]) for m in members]
    disc = discover(input_dir, need_seg=False, release=release)
    return write_predictions(disc.patients, output_dir, progress, lambda pf: predict_patient(
        None, pre, output_mode, pf, dev, batch_size, tta, post=post, ensemble=ensemble, trained=members[0]["release"]))


def write_predictions(patients, output_dir: str | Path, progress: bool, label_map) -> dict:
    """OUTPUT/<pid>.nii.gz from `label_map(pf) -> (labels, affine)` for every patient; a failing
    patient is named with its reason and the others are still written."""
    from tqdm import tqdm

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, failed = [], {}
    for pf in tqdm(patients, desc="patients", unit="patient", disable=None if progress else True):
        try:
            labels, affine = label_map(pf)
        except Exception as e:  # named and counted; the other patients are still written
            failed[pf.pid] = str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
            continue
        path = out / f"{pf.pid}.nii.gz"
        save_volume(path, labels, affine)
        written.append(str(path))
    return {"written": written, "failed": failed}
