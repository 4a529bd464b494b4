"""The realistic generator's acquisition: per-case tissue contrast, bias fields, Rician noise,
thick-slice protocols and an intensity scale per modality. See preprocess/synthetic/realistic.py."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

# Mean intensity per tissue and modality relative to white matter; drawn anew per case around these.
CONTRAST = {
    #          T1    T1Gd  T2    FLAIR
    "wm":     (1.00, 1.00, 1.00, 1.00),
    "gm":     (0.72, 0.74, 1.35, 1.22),
    "csf":    (0.32, 0.34, 2.80, 0.32),
    "ed":     (0.82, 0.82, 1.80, 1.75),
    "net":    (0.68, 0.70, 1.75, 1.55),  # non-enhancing solid tumour (label 1)
    "ncr":    (0.45, 0.46, 2.30, 1.05),  # necrosis (label 1)
    "et":     (0.80, 1.60, 1.45, 1.40),  # T1Gd value replaced by the case's enhancement
    "vessel": (0.85, 2.00, 0.55, 0.85),
    "plexus": (0.80, 1.70, 1.40, 0.95),
    "wml":    (0.92, 0.92, 1.55, 1.60),  # small white-matter lesion / periventricular cap
}

# how the residual of the template T1 (what GM/WM/CSF do not explain: deep nuclei, myelination)
# shows in each modality
DETAIL = (1.0, 0.9, -0.8, -0.5)


def draw_contrast(rng) -> dict:
    c = {}
    for name, vals in CONTRAST.items():
        sd = 0.0 if name == "wm" else (0.07 if name in ("gm", "csf") else 0.12)
        c[name] = np.array(vals) * np.exp(rng.normal(0, sd, 4))
    c["gm"] = 1 + (c["gm"] - 1) * rng.uniform(0.6, 1.3, 4)  # GM/WM contrast varies per scanner
    c["ed"] = 1 + (c["ed"] - 1) * rng.uniform(0.5, 1.3, 4)  # faint to marked oedema
    enhancement = rng.uniform(0.08, 0.3) if rng.random() < 0.25 else rng.uniform(0.3, 1.1)
    c["et"][1] = c["wm"][1] * (1 + enhancement)
    return c


def thick_slices(img: np.ndarray, axis: int, k: float, phase: float) -> np.ndarray:
    """A 2D acquisition with slices k voxels thick along `axis`, linearly resampled back."""
    n = img.shape[axis]
    prof = ndi.gaussian_filter1d(img, k / 2.355, axis=axis, mode="constant", truncate=2.5)
    pos = np.arange(phase, n - 1 + 1e-6, k)
    if pos.size < 2:
        return prof
    acquired = _lerp_along(prof, pos, axis)
    j = np.clip((np.arange(n) - phase) / k, 0, pos.size - 1)
    return _lerp_along(acquired, j, axis)


def _lerp_along(a: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """`a` linearly sampled at fractional positions `x` along `axis` (clamped at the ends)."""
    n = a.shape[axis]
    i0 = np.clip(np.floor(x).astype(int), 0, n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    sh = [1, 1, 1]
    sh[axis] = -1
    t = (x - i0).astype(np.float32).reshape(sh)
    return np.take(a, i0, axis=axis) * (1 - t) + np.take(a, i1, axis=axis) * t


def bias_terms(rng, shape, n_terms: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A smooth log-bias field as separable products: (XY (X, Y, K), Z (K, Z)), field = XY @ Z."""
    grids = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    parts = [[], [], []]
    for _ in range(n_terms):
        for ax, g in enumerate(grids):
            f = np.zeros_like(g)
            for freq in (0.5, 1.0, 1.5):
                f += rng.normal(0, 1.0 / freq) * np.cos(np.pi * freq * g + rng.uniform(0, 2 * np.pi))
            parts[ax].append(f / (np.abs(f).max() + 1e-6))
    xy = np.stack([a[:, None] * b[None, :] for a, b in zip(parts[0], parts[1])], -1)
    return xy.astype(np.float32), np.stack(parts[2]).astype(np.float32)


def bias_field(terms, weights) -> np.ndarray:
    """exp(sum_k w_k x_k(x) y_k(y) z_k(z)) from one or more `bias_terms`."""
    xy = np.concatenate([t[0] * np.float32(w) for t, w in zip(terms, weights)], -1)
    z = np.concatenate([t[1] for t in terms], 0)
    log = np.einsum("xyk,kz->xyz", xy, z)  # einsum's own loop, not BLAS: same bytes whatever the threads
    return np.exp(log, out=log)


def _draw_thickness(rng, m: int) -> float:
    """Slice thickness (mm) of modality m's acquisition (Menze et al. 2015 protocols)."""
    if m == 1:  # T1Gd: 3D 1 mm for most patients
        return 1.0 if rng.random() < 0.8 else rng.uniform(1.5, 3.0)
    if m == 0:  # T1: 1-6 mm
        return 1.0 if rng.random() < 0.35 else rng.uniform(3.0, 6.0)
    return 1.0 if rng.random() < 0.15 else rng.uniform(3.0, 6.0)  # T2, FLAIR: 2-6 mm


def _draw_axis(rng, m: int) -> int:
    if m == 0:  # sagittal or axial
        return 0 if rng.random() < 0.4 else 2
    if m == 3:  # axial, coronal or sagittal
        return int(rng.choice([2, 1, 0], p=[0.6, 0.25, 0.15]))
    return 2


def acquisition_parameters(draft) -> None:
    """Per-case acquisition parameters: noise, bias strength, the shared bias terms, per-modality generators."""
    brain, crop, index, lo, rng, seed = draft.brain, draft.crop, draft.index, draft.lo, draft.rng, draft.seed
    shape = draft.shape
    noise_sd = rng.uniform(0.01, 0.06)
    bias_strength = rng.uniform(0.05, 0.35)
    shared_bias = bias_terms(rng, crop)
    modal_rng = [np.random.default_rng([seed, index, 0x5EA1, m]) for m in range(4)]
    bidx = np.flatnonzero(brain)  # brain voxels, flat indices into the crop
    zyx = np.unravel_index(bidx, crop)
    full_idx = np.ravel_multi_index(tuple(z + o for z, o in zip(zyx, lo)), shape)  # ... into the grid
    draft.bias_strength, draft.bidx, draft.full_idx, draft.modal_rng = bias_strength, bidx, full_idx, modal_rng
    draft.noise_sd, draft.shared_bias = noise_sd, shared_bias



def modality_image(draft, m: int) -> np.ndarray:
    """One modality's image: tissue, confounders and tumour mixed, then bias, Rician noise, slice thickness and scale."""
    bias_strength, bidx, contrast, crop = draft.bias_strength, draft.bidx, draft.contrast, draft.crop
    csf, detail, full_idx, gm, healthy_frac = draft.csf, draft.detail, draft.full_idx, draft.gm, draft.healthy_frac
    modal_rng, noise_sd, patches, shape = draft.modal_rng, draft.noise_sd, draft.patches, draft.shape
    shared_bias, sp, tsl_crop, weighted, wm = draft.shared_bias, draft.sp, draft.tsl_crop, draft.weighted, draft.wm
    mr = modal_rng[m]
    # everything outside the brain stays 0: all the maps below are masked
    img = gm * np.float32(contrast["gm"][m])
    img += wm * np.float32(contrast["wm"][m])
    img += csf * np.float32(contrast["csf"][m])
    img += detail * np.float32(DETAIL[m])
    for name in ("plexus", "vessel", "wml"):  # confounders, in their patches
        if name not in patches:
            continue
        sl, pm = patches[name]
        if name == "wml":
            img[sl] *= 1 + pm * np.float32(contrast["wml"][m] - 1)
        else:
            img[sl] = img[sl] * (1 - pm) + pm * np.float32(contrast[name][m])
    mix = img[tsl_crop] * healthy_frac  # tumour, in its box
    for n, wgt in weighted.items():
        mix += wgt * np.float32(contrast[n][m])
    img[tsl_crop] = mix
    # acquisition: bias, Rician noise, slice thickness (brain voxels only, where possible)
    w = bias_strength / 3 ** 0.5
    img *= bias_field([shared_bias, bias_terms(mr, crop)], [0.8 * w, 0.6 * w])
    sd = np.float32(noise_sd * mr.uniform(0.7, 1.3))
    v = img.ravel().take(bidx)
    v += mr.standard_normal(v.size, dtype=np.float32) * sd
    v *= v
    n_im = mr.standard_normal(v.size, dtype=np.float32) * sd
    v += n_im * n_im
    np.sqrt(v, out=v)
    thick = _draw_thickness(mr, m)
    if thick / sp >= 1.4:
        axis = _draw_axis(mr, m)
        img = np.zeros(crop, np.float32)
        img.ravel()[bidx] = v
        img = thick_slices(img, axis, thick / sp, mr.uniform(0, thick / sp))
        v = img.ravel().take(bidx)
    v *= np.float32(math.exp(mr.uniform(math.log(250), math.log(2500))))  # scanner scale
    np.rint(v, out=v)
    np.clip(v, 1, 32000, out=v)
    out = np.zeros(shape, np.int16)
    out.ravel()[full_idx] = v.astype(np.int16)
    return out
