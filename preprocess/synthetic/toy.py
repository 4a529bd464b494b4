"""The toy generator: an ellipsoid brain (white matter, grey matter, ventricles, an outer CSF rim)
with one concentric glioma: necrotic core (label 1), enhancing rim (label 4, or 3 in 2023-style
releases) and surrounding oedema (label 2), of random size, position and irregular shape. Some
cases have no necrosis, some no enhancement. Modality contrast follows MRI physics coarsely
(enhancing tumour bright on T1Gd, oedema and CSF bright on T2, CSF dark on FLAIR), with a smooth
multiplicative bias field, Rician-like noise and a per-case scanner scale. Fast, for tiny test
shapes; every recipe scores ~0.94 Dice on it (the realistic generator ranks recipes).
Seeded and deterministic: case i of seed s is always the same volume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess.synthetic.cases import Case, case_id, write_cases
from shards.domain import release as release_named

# tissue -> mean intensity per modality (T1, T1Gd, T2, FLAIR), relative units
CONTRAST = {
    "wm": (0.80, 0.75, 0.35, 0.45),
    "gm": (0.60, 0.55, 0.55, 0.60),
    "csf": (0.20, 0.20, 1.00, 0.15),
    "edema": (0.50, 0.48, 0.85, 0.95),
    "ncr": (0.30, 0.32, 0.90, 0.50),
    "et": (0.62, 1.25, 0.60, 0.72),
}


def _smooth_field(rng, grids, n_waves: int, scale: float) -> np.ndarray:
    """Sum of a few low-frequency sinusoids: a cheap smooth random field."""
    field = np.zeros(np.broadcast_shapes(*(g.shape for g in grids)), np.float32)
    for _ in range(n_waves):
        w = rng.normal(0, 2.5, 3)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.sin(w[0] * grids[0] + w[1] * grids[1] + w[2] * grids[2] + phase, dtype=np.float32)
    return field * (scale / np.sqrt(n_waves))


def make_case(index: int, shape=(240, 240, 155), release: str = "2020", seed: int = 0) -> Case:
    """Generate one case in RAS voxel order."""
    et_label = release_named(release).et_label  # 2018/2019/2021 -> 2020; ValueError naming the known ones
    rng = np.random.default_rng([seed, index])
    X, Y, Z = shape
    # normalised coordinates in [-1, 1], broadcastable (X,1,1), (1,Y,1), (1,1,Z)
    gx = np.linspace(-1, 1, X, dtype=np.float32)[:, None, None]
    gy = np.linspace(-1, 1, Y, dtype=np.float32)[None, :, None]
    gz = np.linspace(-1, 1, Z, dtype=np.float32)[None, None, :]
    grids = (gx, gy, gz)
    brain, tissue = _brain(rng, grids, shape)
    seg = _tumour(rng, grids, shape, et_label, brain)
    images = _images(rng, grids, shape, tissue, seg, brain, et_label)
    return Case(pid=case_id(release, index), images=images, seg=seg)


def _brain(rng, grids, shape) -> tuple[np.ndarray, np.ndarray]:
    """(brain mask, tissue labels 0 bg / 1 wm / 2 gm / 3 csf): a deformed ellipsoid, r < 1 inside."""
    gx, gy, gz = grids
    radii = np.array([0.68, 0.82, 0.78]) * rng.uniform(0.92, 1.05, 3)
    r_brain = np.sqrt((gx / radii[0]) ** 2 + (gy / radii[1]) ** 2 + ((gz + 0.05) / radii[2]) ** 2)
    r_brain = r_brain + _smooth_field(rng, grids, 4, 0.04)
    brain = r_brain < 1.0
    tissue = np.full(shape, 1, np.uint8)  # 0 bg, 1 wm, 2 gm, 3 csf
    tissue[r_brain > 0.80] = 2
    tissue[r_brain > 0.95] = 3
    # two lateral ventricles
    for side in (-1, 1):
        rv = np.sqrt(((gx - side * 0.12) / 0.08) ** 2 + ((gy + 0.05) / 0.30) ** 2 + ((gz - 0.1) / 0.18) ** 2)
        tissue[rv < 1.0] = 3
    tissue[~brain] = 0
    return brain, tissue


def _tumour(rng, grids, shape, et_label: int, brain: np.ndarray) -> np.ndarray:
    """The label map: centre inside the brain, irregular boundary from a smooth field."""
    gx, gy, gz = grids
    centre = np.array([rng.choice([-1, 1]) * rng.uniform(0.1, 0.4), rng.uniform(-0.4, 0.4),
                       rng.uniform(-0.3, 0.4)], np.float32)
    t_radii = rng.uniform(0.07, 0.20) * rng.uniform(0.75, 1.25, 3)
    d = np.sqrt(((gx - centre[0]) / t_radii[0]) ** 2 + ((gy - centre[1]) / t_radii[1]) ** 2
                + ((gz - centre[2]) / t_radii[2]) ** 2)
    d = d + _smooth_field(rng, grids, 6, 0.30)  # irregular, lobulated boundary
    edema_extent = rng.uniform(1.4, 2.1)
    has_ncr = rng.random() < 0.8
    has_et = rng.random() < 0.85
    seg = np.zeros(shape, np.uint8)
    seg[d < edema_extent] = 2
    core = d < 1.0
    if has_et:
        seg[core] = et_label
        if has_ncr:
            seg[d < rng.uniform(0.55, 0.85)] = 1
    else:
        seg[core] = 1  # non-enhancing core only
    seg[~brain] = 0
    return seg


def _images(rng, grids, shape, tissue, seg, brain, et_label: int) -> tuple[np.ndarray, ...]:
    """The four modalities (int16): tissue and tumour contrast, texture, bias, noise, scanner scale."""
    labels = {0: None, 1: "ncr", 2: "edema", et_label: "et"}
    tissue_names = {1: "wm", 2: "gm", 3: "csf"}
    images = []
    texture = _smooth_field(rng, grids, 6, 0.05)
    for m in range(4):
        img = np.zeros(shape, np.float32)
        for t, name in tissue_names.items():
            img[tissue == t] = CONTRAST[name][m]
        for lab, name in labels.items():
            if name is not None:
                img[seg == lab] = CONTRAST[name][m]
        bias = np.exp(_smooth_field(rng, grids, 3, 0.15))
        noise = rng.normal(0, 0.035, shape).astype(np.float32)
        img = (img * (1 + texture) + noise) * bias
        scale = rng.uniform(300, 3000)  # scanner / protocol intensity scale
        out = np.clip(np.rint(img * scale), 1, 32000).astype(np.int16)
        out[~brain] = 0
        images.append(out)
    return tuple(images)


def make_demo_data(out: Path, patients: int, shape=(240, 240, 155), release: str = "2020",
                   seed: int = 0, orientation: str = "lps", start: int = 1, progress: bool = False) -> list[str]:
    """Write `patients` toy cases plus a name-mapping table in the root."""
    return write_cases(out, lambda i: (make_case(i, shape=shape, release=release, seed=seed), "HGG"),
                      patients, release, orientation, start, progress, "demo cases")
