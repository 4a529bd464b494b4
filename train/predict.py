"""`predict`: a checkpoint applied to a BraTS-layout folder, written back as NIfTI label maps.

For each patient: exactly the preprocessing recorded in the checkpoint (all brain slices kept),
the model over all slices in batches (optionally averaged over in-plane flips), then the way
back: undo the resize (bilinear on probabilities), the crop (zeros outside the box and on the
slices without brain) and the reorientation, so the output has the input's shape and affine.

Channels -> one label map (documented rule):
  * sub-region channels [NCR/NET, ED, ET]: a voxel takes the label of its most specific
    positive channel, in the order ET > NCR/NET > ED (ET and NCR/NET are the tumour core;
    oedema surrounds it), else 0;
  * region channels [WT, TC, ET] (nested): ET -> enhancing label, else TC -> 1, else WT -> 2.
(`shards.domain.to_labels`.) Labels follow the input release (`shards.domain.RELEASES`):
enhancing tumour 4 for 2020/2021-style, 3 for 2023-style. The way back is `Geometry.inverse`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from preprocess import steps
from preprocess.discover import PatientFiles, discover
from preprocess.nifti import save_volume
from preprocess.pipeline import PreprocessConfig, load_patient, process_volumes, validate
from shards.domain import SEG, to_labels
from train import checkpoint as ckpt
from train.model import build_model

THRESHOLD = 0.5  # a channel is positive where its probability exceeds this


def load_model(path: str | Path, device: torch.device):
    """Model, preprocessing config and mask mode from a checkpoint (weights_only load)."""
    ck = ckpt.load(path)
    cfg = ck["config"]
    model = build_model(cfg["model"], cfg["base_channels"], cfg["depth"])
    model.load_state_dict(ck["model"])
    model.to(device).eval()
    built = ck["preprocess"]
    pre = replace(PreprocessConfig.from_dict(built["preprocess"]), tumour_free_fraction=1.0)
    return model, pre, built["preprocess"]["mask"]


@torch.no_grad()
def predict_slices(model, image: np.ndarray, device, batch_size: int = 32, tta: bool = False) -> np.ndarray:
    """(S, 4, H, W) float16 -> (S, 3, H, W) float32 probabilities."""
    out = np.empty((image.shape[0], 3) + image.shape[2:], np.float32)
    flips = [(), (-1,), (-2,), (-2, -1)] if tta else [()]
    for i in range(0, image.shape[0], batch_size):
        x = torch.from_numpy(image[i: i + batch_size].astype(np.float32)).to(device)
        p = torch.zeros((x.shape[0], 3) + x.shape[2:], device=device)
        for f in flips:  # average of the predictions on flipped copies, flipped back
            pf = torch.sigmoid(model(x.flip(f) if f else x)).float()
            p += pf.flip(f) if f else pf
        out[i: i + batch_size] = (p / len(flips)).cpu().numpy()
    return out


def predict_patient(model, pre: PreprocessConfig, mask_mode: str, pf: PatientFiles, device, batch_size=32,
                    tta=False) -> tuple[np.ndarray, np.ndarray]:
    if pf.problem:
        raise steps.InputError(pf.problem)
    pf = replace(pf, files={k: v for k, v in pf.files.items() if k != SEG})  # never look at a reference
    vols, _ = load_patient(pf)
    validate(pf, vols)
    ps = process_volumes(pf, vols, pre)
    prob = predict_slices(model, ps.image, device, batch_size, tta)
    prob = ps.geometry.inverse(prob, ps.slice_index)  # (3, X, Y, Z) as the source is stored
    labels = to_labels(prob > THRESHOLD, mask_mode, pf.release)
    return labels, vols["t1"].affine


def predict(checkpoint: str | Path, input_dir: str | Path, output_dir: str | Path, device: str = "auto",
            batch_size: int = 32, tta: bool = False, progress: bool = True) -> dict:
    """Write OUTPUT/<pid>.nii.gz for every patient; returns {'written': [...], 'failed': {pid: reason}}."""
    from tqdm import tqdm

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, pre, mask_mode = load_model(checkpoint, dev)
    disc = discover(input_dir, need_seg=False)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, failed = [], {}
    for pf in tqdm(disc.patients, desc="patients", unit="patient", disable=None if progress else True):
        try:
            labels, affine = predict_patient(model, pre, mask_mode, pf, dev, batch_size, tta)
        except Exception as e:  # named and counted; the other patients are still written
            failed[pf.pid] = str(e) if isinstance(e, steps.InputError) else f"{type(e).__name__}: {e}"
            continue
        path = out / f"{pf.pid}.nii.gz"
        save_volume(path, labels, affine)
        written.append(str(path))
    return {"written": written, "failed": failed}
