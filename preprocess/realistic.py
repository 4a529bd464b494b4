"""A realistic synthetic BraTS generator: template anatomy, glioma-like tumours, real-scan nuisances.

`preprocess.synthetic` draws an ellipsoid brain with a concentric tumour: every recipe scores ~0.94
Dice on it, so it cannot rank training recipes. This module makes cases that are hard in the ways
real BraTS cases are hard, in the same `Case` format (images int16 in RAS voxel order, seg uint8 in
the release's labels), so `write_case` writes them in the BraTS layout.

Anatomy
    The MNI152 2009a symmetric template shipped inside the nilearn wheel (T1, GM and WM
    probability maps; CSF = brain - GM - WM, ventricles included), loaded once per process with
    no network. Each case places it in the BraTS 240x240x155 1 mm grid with a random rotation
    (sd 3 degrees per axis) and scaling (+-8 %, a little anisotropic) by trilinear resampling
    (scipy.ndimage.affine_transform, order 1); a smaller `shape` keeps the BraTS field of view
    at a coarser isotropic spacing max(240/X, 240/Y, 155/Z) mm (the template is smoothed first so
    it does not alias). Skull-stripped: zero background outside the brain mask in every modality.

Tumour (volumes in cm^3 at any grid; voxel counts scale with the voxel volume of `shape`)
    whole tumour WT ~ log-normal, median 95, clipped to [12, 280]; tumour core TC = 15-65 % of WT;
    enhancing tumour ET = 25-85 % of TC, solid (no necrosis) in 20 % of cases, absent (a
    non-enhancing, low-grade-like core) in 10 %; enhancing rims incomplete in half of the cases
    (5-35 % of the rim is non-enhancing tumour, label 1); oedema ED = WT - TC.
    Sources and caveats: label definitions and the 1 mm / 240x240x155 / skull-stripped conventions
    follow Baid et al. 2021 (arXiv:2107.02314) and Bakas et al. 2018 (arXiv:1811.02629). The
    volume figures could NOT be checked against published tables from this machine (no network;
    the search index returned only the opening pages of those papers): they approximate what is
    commonly reported for BraTS training cases (whole tumours from about 10 to 300 cm^3 with a
    median near 100 cm^3; a tumour core of a third to a half of the whole tumour; enhancing tumour
    in nearly all high-grade cases, absent in many low-grade ones). Check `VOLUME_RANGES_CM3`
    against a real release before trusting volume-dependent conclusions.
    Shapes: the core is a union of 1-4 randomly oriented, noise-perturbed ellipsoids (a second
    focus in 15 % of cases), cut at the quantile that gives the sampled volume; the necrotic centre
    is a differently perturbed inner level set, so it can touch the rim. Oedema grows from the core
    by a geodesic distance whose speed is high in white matter, low in grey matter and near zero in
    CSF (finger-like spread along white-matter tracts, stopped by ventricles), with an intensity
    that fades towards its edge. Every region has its own multiplicative texture.

Confounders (label 0)
    choroid plexus in the lateral ventricles and cortical vessels, bright on T1Gd (and dark on T2
    for vessels); periventricular caps and small white-matter lesions, bright on FLAIR and T2.

Nuisances
    per-case tissue contrast (every tissue mean drawn per case, GM/WM contrast scaled 0.6-1.3x, not
    only a global scale); enhancement from faint (+8 %) to strong (+110 %); thick-slice
    acquisitions, following the protocols in Menze et al. 2015 (IEEE TMI 34(10), 1993-2024: T1
    1-6 mm sagittal/axial, T2 2-6 mm axial, FLAIR 2-6 mm axial/coronal/sagittal, T1Gd 3D 1 mm for
    most patients): T1 in 65 %, T2 and FLAIR in 85 % of cases at 3-6 mm, T1Gd in 20 % at
    1.5-3 mm, as a slice-profile blur, sampling and linear re-interpolation along one axis;
    Rician noise 1-6 % of white matter; smooth bias fields of case-varying strength; an intensity
    scale per modality. The segmentation is what a rater would draw: the true regions with a rater-specific bias (generous or tight whole tumour, up
    to ~1.5 mm) and a smooth random displacement of ~1 mm, so no model can reach Dice 1.0.

Seeded and deterministic: case i of seed s is always the same bytes (for given numpy/scipy builds;
no BLAS or threads involved). About 1.4 s for a 240x240x155 case and 0.15 s for 96x96x64 on one
core, plus ~2 s once per process to import nilearn and load the template.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtr

from preprocess.synthetic import Case, case_id, write_release
from shards.domain import release as release_named

BRATS_SHAPE = (240, 240, 155)
_FOV_MM = np.array([240.0, 240.0, 155.0])
_BASE_SCALE = 0.93  # the MNI152 brain (1.9 l mask) is larger than an average patient's

# Volumes of the true sub-regions (cm^3), as sampled; see the module docstring for the sources.
VOLUME_RANGES_CM3 = {
    "WT": (12.0, 280.0),  # NCR + ED + ET
    "TC": (1.8, 182.0),  # NCR + ET
    "ET": (0.0, 182.0),  # 0 in non-enhancing cases; = TC when solid
    "ED": (4.2, 238.0),
}

# Mean intensity per tissue and modality relative to white matter; drawn anew per case around these.
_CONTRAST = {
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
_DETAIL = (1.0, 0.9, -0.8, -0.5)


# ----------------------------------------------------------------------------------------------
# template


@dataclass(frozen=True)
class _Template:
    t1: np.ndarray  # float32 (X, Y, Z), 1 mm, RAS, cropped to the brain, 0 outside
    gm: np.ndarray
    wm: np.ndarray
    centre: np.ndarray  # brain bounding-box centre, template voxels
    corners: np.ndarray  # (8, 3) brain bounding-box corners
    tissue_t1: np.ndarray  # template T1 mean of (gm, wm, csf): for the detail residual
    seeds: np.ndarray  # (N, 3) voxels where a glioma may be centred (supratentorial WM)
    plexus: np.ndarray  # (N, 3) voxels in the posterior lateral ventricles
    ventricle_box: tuple  # (lo, hi) voxel box around the ventricles
    periventricular: np.ndarray  # float32 map inside ventricle_box: 1 at the ventricle wall, fading


def _load_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t1, gm, wm, affine) of nilearn's packaged MNI152 2009a template, 1 mm, scaled to [0, 1].

    nilearn is imported here only: it is slow to import. Its loaders read files inside its own
    wheel (nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz): no network.
    """
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    imgs = [f(resolution=1) for f in (load_mni152_template, load_mni152_gm_template, load_mni152_wm_template)]
    arrays = [np.asarray(im.get_fdata(dtype=np.float32)) for im in imgs]
    return (*arrays, np.asarray(imgs[0].affine))


@functools.lru_cache(maxsize=1)
def _template_1mm() -> _Template:
    t1, gm, wm, affine = _load_mni152()
    diag = np.diag(affine)[:3]
    if not np.allclose(affine[:3, :3], np.diag(diag)) or np.any(diag <= 0):
        raise RuntimeError("the MNI152 template is expected with a diagonal RAS affine")
    brain = t1 > 0
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0) + 1
    lo = np.maximum(lo - 2, 0)
    hi = np.minimum(hi + 2, brain.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    t1 = np.ascontiguousarray(t1[sl]) * brain[sl]
    gm = np.ascontiguousarray(gm[sl]) * brain[sl]
    wm = np.ascontiguousarray(wm[sl]) * brain[sl]
    brain = brain[sl]
    csf = np.clip(1.0 - gm - wm, 0, 1) * brain
    # template T1 explained by the tissue maps (least squares), for the residual "detail" term
    sel = brain
    A = np.stack([gm[sel], wm[sel], csf[sel]], 1).astype(np.float64)
    tissue_t1 = np.linalg.lstsq(A, t1[sel].astype(np.float64), rcond=None)[0].astype(np.float32)

    # MNI coordinates (mm) of the cropped voxels: world = affine @ (voxel + lo)
    x, y, z = ((np.arange(n) + lo[i]) * affine[i, i] + affine[i, 3] for i, n in enumerate(t1.shape))
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
    supratentorial = (Z > -5) | ((Z > -35) & (np.abs(X) > 28) & (Y > -45))
    seeds = np.argwhere((wm > 0.7) & supratentorial)[::7].astype(np.int32)

    # ventricles: CSF far from the brain surface (computed at 2 mm, enough for a mask)
    depth = ndi.distance_transform_edt(brain[::2, ::2, ::2]) * 2.0
    depth = ndi.zoom(depth, 2, order=0)[tuple(slice(0, n) for n in brain.shape)]
    ventricle = (csf > 0.7) & (depth > 18) & (np.abs(X) < 35)
    ventricle = ndi.binary_opening(ventricle)
    vidx = np.argwhere(ventricle)
    posterior = vidx[:, 1] < np.median(vidx[:, 1])
    plexus = vidx[posterior][::3].astype(np.int32)
    vlo = np.maximum(vidx.min(0) - 12, 0)
    vhi = np.minimum(vidx.max(0) + 13, brain.shape)
    vsl = tuple(slice(a, b) for a, b in zip(vlo, vhi))
    dist = ndi.distance_transform_edt(~ventricle[vsl])
    periventricular = (np.exp(-dist / 3.0) * (dist > 0) * np.clip(wm[vsl] * 1.4, 0, 1)).astype(np.float32)

    corners = np.array([[a, b, c] for a in (0, t1.shape[0] - 1) for b in (0, t1.shape[1] - 1)
                        for c in (0, t1.shape[2] - 1)], float)
    return _Template(t1=t1.astype(np.float32), gm=gm.astype(np.float32), wm=wm.astype(np.float32),
                     centre=(np.array(t1.shape) - 1) / 2.0, corners=corners, tissue_t1=tissue_t1,
                     seeds=seeds, plexus=plexus, ventricle_box=(vlo, vhi), periventricular=periventricular)


@functools.lru_cache(maxsize=4)
def _template_maps(spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t1, gm, wm) low-passed for sampling at `spacing` mm (no aliasing on coarse grids)."""
    t = _template_1mm()
    if spacing <= 1.25:
        return t.t1, t.gm, t.wm
    sigma = 0.42 * spacing  # FWHM ~ one output voxel
    return tuple(ndi.gaussian_filter(a, sigma, truncate=3.0) for a in (t.t1, t.gm, t.wm))


# ----------------------------------------------------------------------------------------------
# small helpers


def spacing_mm(shape) -> float:
    """Isotropic voxel size (mm) at which `shape` holds the BraTS 240x240x155 mm field of view."""
    return float(max(_FOV_MM / np.asarray(shape, float)))


def voxel_volume_mm3(shape) -> float:
    return spacing_mm(shape) ** 3


def volume_ranges_voxels(shape) -> dict[str, tuple[float, float]]:
    """`VOLUME_RANGES_CM3` in voxels of a grid of `shape` (the ranges scale with the grid)."""
    v = voxel_volume_mm3(shape) / 1000.0
    return {k: (lo / v, hi / v) for k, (lo, hi) in VOLUME_RANGES_CM3.items()}


def _rotation(angles_deg) -> np.ndarray:
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _noise(rng, shape, corr: float) -> np.ndarray:
    """Smooth zero-mean, unit-sd random field with a correlation length of about `corr` voxels."""
    shape = tuple(int(n) for n in shape)
    if corr <= 2.0:
        f = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), max(corr, 0.5), truncate=3.0)
    else:
        step = corr / 1.5
        small = tuple(max(2, int(math.ceil(n / step)) + 1) for n in shape)
        f = ndi.gaussian_filter(rng.standard_normal(small, dtype=np.float32), 1.0, mode="wrap")
        f = ndi.zoom(f, [n / m for n, m in zip(shape, small)], order=1, grid_mode=True, mode="nearest")
        f = f[tuple(slice(0, n) for n in shape)]
    sd = float(f.std())
    return f / sd if sd > 0 else f


def _lowest(values: np.ndarray, n: int) -> float:
    """Threshold t such that about n of `values` are < t (inf when n >= len)."""
    if n <= 0 or values.size == 0:
        return -np.inf
    if n >= values.size:
        return np.inf
    return float(np.partition(values, n)[n])


def _block_reduce(a: np.ndarray, k: int, fn) -> np.ndarray:
    if k == 1:
        return a
    pad = [(0, (-n) % k) for n in a.shape]
    a = np.pad(a, pad, mode="edge")
    s = a.shape
    return fn(a.reshape(s[0] // k, k, s[1] // k, k, s[2] // k, k), axis=(1, 3, 5))


_BIG = np.float32(1e9)


def _geodesic(seed: np.ndarray, cost: np.ndarray, max_iter: int) -> np.ndarray:
    """Geodesic distance from `seed` through voxels whose entry cost is `cost` (26-neighbours)."""
    T = np.where(seed, 0, _BIG).astype(np.float32)
    n0, n1, n2 = T.shape
    groups = {1.0: [], math.sqrt(2): [], math.sqrt(3): []}
    for dx in (0, 1, 2):
        for dy in (0, 1, 2):
            for dz in (0, 1, 2):
                o = abs(dx - 1) + abs(dy - 1) + abs(dz - 1)
                if o:
                    groups[[1.0, math.sqrt(2), math.sqrt(3)][o - 1]].append((dx, dy, dz))
    for _ in range(max_iter):
        P = np.pad(T, 1, constant_values=_BIG)
        new = T.copy()
        for w, offs in groups.items():
            m = np.full_like(T, _BIG)
            for dx, dy, dz in offs:
                np.minimum(m, P[dx:dx + n0, dy:dy + n1, dz:dz + n2], out=m)
            np.minimum(new, m + np.float32(w) * cost, out=new)
        if np.array_equal(new, T):
            break
        T = new
    return T


def _thick_slices(img: np.ndarray, axis: int, k: float, phase: float) -> np.ndarray:
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


def _bias_terms(rng, shape, n_terms: int = 3) -> tuple[np.ndarray, np.ndarray]:
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


def _bias_field(terms, weights) -> np.ndarray:
    """exp(sum_k w_k x_k(x) y_k(y) z_k(z)) from one or more `_bias_terms`."""
    xy = np.concatenate([t[0] * np.float32(w) for t, w in zip(terms, weights)], -1)
    z = np.concatenate([t[1] for t in terms], 0)
    log = np.einsum("xyk,kz->xyz", xy, z)  # einsum's own loop, not BLAS: same bytes whatever the threads
    return np.exp(log, out=log)


# ----------------------------------------------------------------------------------------------
# the generator


@dataclass
class _Truth:
    """What a test needs to see behind a case (full-grid arrays)."""

    labels: np.ndarray  # uint8, the true regions in the release's labels
    brain: np.ndarray  # bool
    wm: np.ndarray  # float32 WM probability
    gm: np.ndarray
    confounders: dict  # name -> bool mask (label 0 structures)
    contrast: dict  # tissue -> 4 means (relative units) used for this case
    spacing: float
    enhancing: bool


def _box(centre, half, lo, hi):
    a = np.maximum(np.floor(centre - half).astype(int), lo)
    b = np.minimum(np.ceil(centre + half).astype(int) + 1, hi)
    return a, b


def _ellipsoid_field(X, Y, Z, c, radii, R):
    u = [R[i, 0] * (X - c[0]) + R[i, 1] * (Y - c[1]) + R[i, 2] * (Z - c[2]) for i in range(3)]
    return np.sqrt((u[0] / radii[0]) ** 2 + (u[1] / radii[1]) ** 2 + (u[2] / radii[2]) ** 2)


def _draw_contrast(rng) -> dict:
    c = {}
    for name, vals in _CONTRAST.items():
        sd = 0.0 if name == "wm" else (0.07 if name in ("gm", "csf") else 0.12)
        c[name] = np.array(vals) * np.exp(rng.normal(0, sd, 4))
    c["gm"] = 1 + (c["gm"] - 1) * rng.uniform(0.6, 1.3, 4)  # GM/WM contrast varies per scanner
    c["ed"] = 1 + (c["ed"] - 1) * rng.uniform(0.5, 1.3, 4)  # faint to marked oedema
    enhancement = rng.uniform(0.08, 0.3) if rng.random() < 0.25 else rng.uniform(0.3, 1.1)
    c["et"][1] = c["wm"][1] * (1 + enhancement)
    return c


def _generate(index: int, shape=BRATS_SHAPE, release: str = "2020", seed: int = 0,
              want_truth: bool = False):
    rel = release_named(release)  # ValueError naming the known releases
    shape = tuple(int(n) for n in shape)
    rng = np.random.default_rng([seed, index, 0x5EA1])
    sp = spacing_mm(shape)
    tmpl = _template_1mm()
    t1_map, gm_map, wm_map = _template_maps(round(sp, 3))
    et_label = rel.et_label

    # -- anatomy: template -> case grid -------------------------------------------------------
    angles = np.clip(rng.normal(0, 3.0, 3), -7, 7)
    scale = _BASE_SCALE * rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)
    A = _rotation(angles) @ np.diag(scale)  # template mm -> case mm
    c_out = (np.array(shape) - 1) / 2.0 + rng.normal(0, 2.0, 3) / sp
    M = np.linalg.inv(A) * sp  # case voxel -> template voxel (template is 1 mm)

    def to_case(q):  # template voxel(s) -> case voxel(s)
        return c_out + (np.asarray(q, float) - tmpl.centre) @ A.T / sp

    corners = to_case(tmpl.corners)
    lo = np.maximum(np.floor(corners.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(corners.max(0)).astype(int) + 2, shape)
    crop = tuple(int(b - a) for a, b in zip(lo, hi))
    offset = tmpl.centre - M @ c_out + M @ lo
    res = [ndi.affine_transform(a, M, offset=offset, output_shape=crop, order=1, mode="constant",
                                cval=0.0, prefilter=False) for a in (t1_map, gm_map, wm_map)]
    t1r, gm, wm = res
    brain = t1r > 0.12
    gm *= brain
    wm *= brain
    s = gm + wm
    over = s > 1
    if over.any():
        gm[over] /= s[over]
        wm[over] /= s[over]
    csf = np.clip(1.0 - gm - wm, 0, 1) * brain
    detail = (t1r - (gm * tmpl.tissue_t1[0] + wm * tmpl.tissue_t1[1] + csf * tmpl.tissue_t1[2])) * brain
    detail /= max(float(tmpl.tissue_t1[1]), 1e-3)

    contrast = _draw_contrast(rng)

    # -- tumour: volumes -------------------------------------------------------------------------
    vox_cm3 = sp ** 3 / 1000.0
    wt_cm3 = float(np.clip(rng.lognormal(math.log(95.0), 0.55), *VOLUME_RANGES_CM3["WT"]))
    tc_cm3 = wt_cm3 * rng.uniform(0.15, 0.65)
    enhancing = rng.random() >= 0.10
    r = rng.random()
    et_frac = 0.0 if not enhancing else (1.0 if r < 0.2 else rng.uniform(0.25, 0.85))
    gap = rng.uniform(0.05, 0.35) if (enhancing and rng.random() < 0.5) else 0.0
    n_tc = max(int(round(tc_cm3 / vox_cm3)), 1)
    n_ncr = int(round(n_tc * (1 - et_frac))) if enhancing else 0
    n_ed = max(int(round((wt_cm3 - tc_cm3) / vox_cm3)), 0)

    # -- tumour: where, and the working box -------------------------------------------------------
    seed_vox = tmpl.seeds[rng.integers(len(tmpl.seeds))]
    centre = to_case(seed_vox + rng.uniform(-0.5, 0.5, 3)) - lo  # in crop coordinates
    r_tc = (3 * tc_cm3 * 1000 / (4 * math.pi)) ** (1 / 3)  # mm
    r_wt = (3 * wt_cm3 * 1000 / (4 * math.pi)) ** (1 / 3)
    blo, bhi = _box(centre, (1.5 * r_wt + 10) / sp, 0, crop)
    bsl = tuple(slice(a, b) for a, b in zip(blo, bhi))
    bshape = tuple(int(b - a) for a, b in zip(blo, bhi))
    b_brain, b_wm, b_gm, b_csf = brain[bsl], wm[bsl], gm[bsl], csf[bsl]
    axes = ([-1, 1, 1], [1, -1, 1], [1, 1, -1])
    X, Y, Z = (((np.arange(n, dtype=np.float32) + a - c) * sp).reshape(ax)  # mm from the centre
               for ax, n, a, c in zip(axes, bshape, blo, centre))

    # core: union of perturbed ellipsoids (sometimes a second focus), cut at the volume quantile
    f = np.full(bshape, np.inf, np.float32)
    n_lobes = int(rng.integers(1, 5))
    for k in range(n_lobes):
        if k == 0:
            c, rad = np.zeros(3), r_tc * rng.uniform(0.75, 1.0) * rng.uniform(0.7, 1.3, 3)
        else:
            d = rng.normal(size=3)
            c = d / np.linalg.norm(d) * r_tc * rng.uniform(0.4, 0.9)
            rad = r_tc * rng.uniform(0.35, 0.7) * rng.uniform(0.7, 1.3, 3)
        np.minimum(f, _ellipsoid_field(X, Y, Z, c, rad, _random_rotation(rng)), out=f)
    if rng.random() < 0.15:  # a second focus
        d = rng.normal(size=3)
        c = d / np.linalg.norm(d) * r_tc * rng.uniform(1.8, 2.8)
        rad = r_tc * rng.uniform(0.3, 0.5) * rng.uniform(0.8, 1.2, 3)
        np.minimum(f, _ellipsoid_field(X, Y, Z, c, rad / 0.45, _random_rotation(rng)), out=f)
    corr = max(1.0, 6.0 / sp)
    n1, n2, n3 = (_noise(rng, bshape, corr) for _ in range(3))
    f += rng.uniform(0.12, 0.3) * n1 + 0.6 * b_csf  # lobulated; tumour displaces rather than fills CSF
    allowed = b_brain & (b_csf < 0.6)
    t_c = _lowest(f[allowed], n_tc)
    core = allowed & (f < t_c)
    if not core.any():  # degenerate tiny grid: at least the centre voxel
        ci = tuple(np.clip(np.round(centre - blo).astype(int), 0, np.array(bshape) - 1))
        core[ci] = True
    fn = f + 0.15 * n2
    necrosis = np.zeros_like(core)
    if n_ncr:
        necrosis = core & (fn < _lowest(fn[core], n_ncr))
    lab = np.zeros(bshape, np.uint8)
    lab[core] = et_label if enhancing else 1
    lab[necrosis] = 1
    net = np.zeros_like(core)  # non-enhancing solid tumour (also label 1)
    if not enhancing:
        net = core & ~necrosis
    elif gap > 0:
        rim = core & ~necrosis
        if rim.any():
            net = rim & (n3 < _lowest(n3[rim], int(gap * rim.sum())))
            lab[net] = 1

    # oedema: geodesic spread from the core, fast in WM, slow in GM, nearly stopped by CSF
    k = max(1, int(round(3.0 / sp)))
    speed = (0.12 + 1.0 * b_wm + 0.22 * b_gm + 0.02 * b_csf) * b_brain
    speed_c = _block_reduce(speed.astype(np.float32), k, np.mean)
    speed_c *= np.exp(0.45 * _noise(rng, speed_c.shape, max(1.0, 2.0 / k)))
    h = k * sp
    cost = np.where(speed_c > 0.02, h / np.maximum(speed_c, 1e-3), _BIG).astype(np.float32)
    seed_c = _block_reduce(core, k, np.max)
    T = _geodesic(seed_c, cost, max_iter=int(3.0 * r_wt / h) + 12)
    T = np.minimum(T, np.float32(1e6))
    if k > 1:
        T = ndi.zoom(T, k, order=1, grid_mode=True, mode="nearest")[tuple(slice(0, n) for n in bshape)]
    T = T + 1.5 * sp * _noise(rng, bshape, max(1.0, 2.0 / sp))
    ed_ok = b_brain & ~core & (b_csf < 0.5)
    t_e = _lowest(T[ed_ok], n_ed)
    edema = ed_ok & (T < t_e)
    lab[edema] = 2
    ed_weight = np.zeros(bshape, np.float32)
    if edema.any():
        fall = rng.uniform(0.35, 0.7)
        ed_weight[edema] = 1 - fall * np.clip(T[edema] / max(t_e, 1e-3), 0, 1) ** 1.5

    # -- confounders (label 0) --------------------------------------------------------------------
    conf = {name: np.zeros(crop, np.float32) for name in ("vessel", "plexus", "wml")}

    def blob(arr, ctr, radius_mm):
        rv = radius_mm / sp
        a, b = _box(ctr, rv + 2, 0, crop)
        if np.any(b <= a):
            return
        g = [(np.arange(x0, x1, dtype=np.float32) - c0).reshape([-1 if i == j else 1 for j in range(3)])
             for i, (x0, x1, c0) in enumerate(zip(a, b, ctr))]
        d = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2) / max(rv, 0.5)
        sl = tuple(slice(x0, x1) for x0, x1 in zip(a, b))
        np.maximum(arr[sl], np.clip(1.5 - d, 0, 1), out=arr[sl])

    if rng.random() < 0.7:  # choroid plexus, one glomus per side
        left = tmpl.plexus[:, 0] < tmpl.centre[0]
        for side in (left, ~left):
            cands = tmpl.plexus[side]
            if len(cands):
                blob(conf["plexus"], to_case(cands[rng.integers(len(cands))]) - lo, rng.uniform(2.0, 4.5))
    if rng.random() < 0.6:  # cortical / sulcal vessels
        surf = np.flatnonzero((csf > 0.25) & (gm > 0.25))
        for _ in range(int(rng.integers(2, 7))):
            if not surf.size:
                break
            p = np.array(np.unravel_index(surf[rng.integers(surf.size)], crop), float)
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            radius = rng.uniform(0.7, 1.6)
            step = 0.5
            for _ in range(int(rng.uniform(20, 70) / (step * sp))):
                blob(conf["vessel"], p, radius)
                d = d + rng.normal(0, 0.12, 3)
                d /= np.linalg.norm(d)
                p = p + d * step
                if np.any(p < 0) or np.any(p >= np.array(crop) - 1):
                    break
    pv_strength = rng.uniform(0.2, 0.8) if rng.random() < 0.5 else 0.0
    if pv_strength > 0:  # periventricular caps/rims, resampled from the template map
        vlo, vhi = tmpl.ventricle_box
        vc = to_case(np.array([[a, b, c] for a in (vlo[0], vhi[0]) for b in (vlo[1], vhi[1])
                               for c in (vlo[2], vhi[2])], float)) - lo
        a = np.maximum(np.floor(vc.min(0)).astype(int), 0)
        b = np.minimum(np.ceil(vc.max(0)).astype(int) + 1, crop)
        if np.all(b > a):
            pv_map = tmpl.periventricular
            if sp > 1.25:
                pv_map = ndi.gaussian_filter(pv_map, 0.42 * sp, truncate=3.0)
            off = tmpl.centre - M @ c_out + M @ (lo + a) - vlo
            pv = ndi.affine_transform(pv_map, M, offset=off, output_shape=tuple(b - a), order=1,
                                      mode="constant", cval=0.0, prefilter=False)
            sl = tuple(slice(x0, x1) for x0, x1 in zip(a, b))
            np.maximum(conf["wml"][sl], np.clip(pv * pv_strength * 1.6, 0, 1), out=conf["wml"][sl])
    if rng.random() < 0.5:  # small deep white-matter lesions
        deep = np.flatnonzero(wm > 0.85)
        for _ in range(int(rng.integers(1, 11))):
            if deep.size:
                p = np.array(np.unravel_index(deep[rng.integers(deep.size)], crop), float)
                blob(conf["wml"], p, rng.uniform(1.5, 4.0))
    patches = {}  # name -> (slices, soft mask) around the structures, to touch only those voxels
    for name in conf:
        conf[name] *= brain
        nz = np.nonzero(conf[name].any(axis=(1, 2)))[0], np.nonzero(conf[name].any(axis=(0, 2)))[0], \
            np.nonzero(conf[name].any(axis=(0, 1)))[0]
        if all(len(v) for v in nz):
            sl = tuple(slice(int(v[0]), int(v[-1]) + 1) for v in nz)
            patches[name] = (sl, conf[name][sl])

    # -- images ------------------------------------------------------------------------------------
    soft_sigma = max(0.45, 0.8 / sp)
    # the tumour's own box: its labels plus a margin for the soft edges
    tidx = np.argwhere(lab > 0)
    margin = int(math.ceil(2.5 * soft_sigma)) + 1
    ta = np.maximum(tidx.min(0) - margin, 0)
    tb = np.minimum(tidx.max(0) + margin + 1, bshape)
    tsl = tuple(slice(x0, x1) for x0, x1 in zip(ta, tb))
    tshape = tuple(int(x1 - x0) for x0, x1 in zip(ta, tb))
    t_brain = b_brain[tsl]
    tex_fine = _noise(rng, tshape, max(0.7, 1.2 / sp))
    # soft fractions of each tumour class, for partial-volume boundaries
    classes = {
        "ncr": (necrosis & core)[tsl],
        "net": (net & ~necrosis)[tsl],
        "et": (core & ~necrosis & ~net)[tsl] if enhancing else np.zeros(tshape, bool),
        "ed": edema[tsl],
    }
    frac = {n: ndi.gaussian_filter(c.astype(np.float32), soft_sigma, truncate=2.5) * t_brain
            for n, c in classes.items()}
    t_edw = ed_weight[tsl]
    frac["ed"] *= np.where(classes["ed"], t_edw, ndi.gaussian_filter(t_edw, soft_sigma, truncate=2.5))
    healthy_frac = 1 - np.minimum(sum(frac.values()), 1.0)
    texture_amp = {"ncr": rng.uniform(0.08, 0.2), "net": rng.uniform(0.05, 0.14),
                   "et": rng.uniform(0.08, 0.22), "ed": rng.uniform(0.03, 0.08)}
    t_n1 = n1[tsl]
    weighted = {n: frac[n] * np.exp(texture_amp[n] * (0.6 * t_n1 * (1 if i % 2 else -1) + 0.8 * tex_fine))
                for i, n in enumerate(texture_amp)}
    tsl_crop = tuple(slice(x0 + o, x1 + o) for x0, x1, o in zip(ta, tb, blo))  # tumour box in crop

    noise_sd = rng.uniform(0.01, 0.06)
    bias_strength = rng.uniform(0.05, 0.35)
    shared_bias = _bias_terms(rng, crop)
    modal_rng = [np.random.default_rng([seed, index, 0x5EA1, m]) for m in range(4)]
    bidx = np.flatnonzero(brain)  # brain voxels, flat indices into the crop
    zyx = np.unravel_index(bidx, crop)
    full_idx = np.ravel_multi_index(tuple(z + o for z, o in zip(zyx, lo)), shape)  # ... into the grid
    images = []
    for m in range(4):
        mr = modal_rng[m]
        # everything outside the brain stays 0: all the maps below are masked
        img = gm * np.float32(contrast["gm"][m])
        img += wm * np.float32(contrast["wm"][m])
        img += csf * np.float32(contrast["csf"][m])
        img += detail * np.float32(_DETAIL[m])
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
        img *= _bias_field([shared_bias, _bias_terms(mr, crop)], [0.8 * w, 0.6 * w])
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
            img = _thick_slices(img, axis, thick / sp, mr.uniform(0, thick / sp))
            v = img.ravel().take(bidx)
        v *= np.float32(math.exp(mr.uniform(math.log(250), math.log(2500))))  # scanner scale
        np.rint(v, out=v)
        np.clip(v, 1, 32000, out=v)
        out = np.zeros(shape, np.int16)
        out.ravel()[full_idx] = v.astype(np.int16)
        images.append(out)

    # -- the rater's segmentation ------------------------------------------------------------------
    ann = _annotate(rng, lab, b_brain, sp, et_label)
    seg = np.zeros(shape, np.uint8)
    full = tuple(slice(a, b) for a, b in zip(lo, hi))
    seg_crop = np.zeros(crop, np.uint8)
    seg_crop[bsl] = ann
    seg_crop[~brain] = 0
    seg[full] = seg_crop
    case = Case(pid=case_id(release, index), images=tuple(images), seg=seg)
    if not want_truth:
        return case, None

    def full_grid(a, dtype):
        o = np.zeros(shape, dtype)
        o[full] = a
        return o

    lab_crop = np.zeros(crop, np.uint8)
    lab_crop[bsl] = lab
    truth = _Truth(labels=full_grid(lab_crop, np.uint8), brain=full_grid(brain, bool),
                   wm=full_grid(wm, np.float32), gm=full_grid(gm, np.float32),
                   confounders={n: full_grid(c > 0.5, bool) for n, c in conf.items()},
                   contrast=contrast, spacing=sp, enhancing=enhancing)
    return case, truth


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


def _annotate(rng, lab: np.ndarray, brain: np.ndarray, sp: float, et_label: int) -> np.ndarray:
    """A rater's drawing of `lab`: a biased whole-tumour outline and a smooth ~1 mm displacement."""
    if not lab.any():
        return lab.copy()
    idx = np.argwhere(lab > 0)
    pad = int(math.ceil(6.0 / sp)) + 2
    a = np.maximum(idx.min(0) - pad, 0)
    b = np.minimum(idx.max(0) + pad + 1, lab.shape)
    sl = tuple(slice(x0, x1) for x0, x1 in zip(a, b))
    sub = lab[sl]
    shp = sub.shape
    # 1. whole-tumour outline: generous or tight rater, plus local wobble (mm)
    sigma_mm = max(1.5, 0.9 * sp)
    bias = rng.uniform(-1.3, 1.3)
    d = bias + 0.7 * _noise(rng, shp, max(1.0, 8.0 / sp))
    tau = ndtr(-d / sigma_mm).astype(np.float32)
    wt_blur = ndi.gaussian_filter((sub > 0).astype(np.float32), sigma_mm / sp, truncate=3.0)
    wt = (wt_blur > tau) & brain[sl]
    # 2. smooth displacement of the inner boundaries (nearest-neighbour warp), ~1 mm
    amp = rng.uniform(0.6, 1.3) / sp
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shp], indexing="ij")
    coords = [g + amp * _noise(rng, shp, max(1.0, 8.0 / sp)) for g in grids]
    warped = ndi.map_coordinates(sub, coords, order=0, mode="nearest")
    inner = np.where(warped == 2, 0, warped)
    out = np.where(wt, 2, 0).astype(np.uint8)
    core = (inner > 0) & wt
    out[core] = inner[core]
    res = lab.copy()
    res[sl] = out
    return res


# ----------------------------------------------------------------------------------------------
# public API


def make_realistic_case(index: int, shape=BRATS_SHAPE, release: str = "2020", seed: int = 0) -> Case:
    """Generate one realistic case (images int16 in RAS voxel order, seg in the release's labels)."""
    return _generate(index, shape, release, seed)[0]


def _realistic_case_with_truth(index: int, shape=BRATS_SHAPE, release: str = "2020", seed: int = 0):
    """(Case, _Truth): the case and the true regions / tissue maps / confounders behind it (tests)."""
    return _generate(index, shape, release, seed, want_truth=True)


def make_realistic_data(out: Path, patients: int, shape=BRATS_SHAPE, release: str = "2020",
                        seed: int = 0, orientation: str = "lps", start: int = 1,
                        progress: bool = False) -> list[str]:
    """Write `patients` realistic cases plus a name-mapping table, like `make_demo_data`;
    grade LGG when a case has no enhancing tumour."""
    def make(i):
        case, _ = _generate(i, shape=shape, release=release, seed=seed)
        return case, ("HGG" if (case.seg == release_named(release).et_label).any() else "LGG")

    return write_release(out, make, patients, release, orientation, start, progress, "realistic cases")
