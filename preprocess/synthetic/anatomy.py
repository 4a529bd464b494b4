"""The realistic generator's anatomy: the MNI152 template placed in the case grid, and the normal
structures that look like tumour (label 0 confounders: choroid plexus, cortical vessels,
periventricular caps, small white-matter lesions). See preprocess/synthetic/realistic.py."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from preprocess.synthetic.fields import box, rotation

BRATS_SHAPE = (240, 240, 155)


_FOV_MM = np.array([240.0, 240.0, 155.0])


BASE_SCALE = 0.93  # the MNI152 brain (1.9 l mask) is larger than an average patient's


@dataclass(frozen=True)
class Template:
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
def template_1mm() -> Template:
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
    return Template(t1=t1.astype(np.float32), gm=gm.astype(np.float32), wm=wm.astype(np.float32),
                     centre=(np.array(t1.shape) - 1) / 2.0, corners=corners, tissue_t1=tissue_t1,
                     seeds=seeds, plexus=plexus, ventricle_box=(vlo, vhi), periventricular=periventricular)


@functools.lru_cache(maxsize=4)
def template_maps(spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t1, gm, wm) low-passed for sampling at `spacing` mm (no aliasing on coarse grids)."""
    t = template_1mm()
    if spacing <= 1.25:
        return t.t1, t.gm, t.wm
    sigma = 0.42 * spacing  # FWHM ~ one output voxel
    return tuple(ndi.gaussian_filter(a, sigma, truncate=3.0) for a in (t.t1, t.gm, t.wm))


def spacing_mm(shape) -> float:
    """Isotropic voxel size (mm) at which `shape` holds the BraTS 240x240x155 mm field of view."""
    return float(max(_FOV_MM / np.asarray(shape, float)))


def voxel_volume_mm3(shape) -> float:
    return spacing_mm(shape) ** 3


def place_anatomy(draft) -> None:
    """The MNI152 template placed in the case grid (rotation, scaling, shift): tissue maps and the T1 detail residual."""
    gm_map, rng, shape, sp, t1_map, tmpl = draft.gm_map, draft.rng, draft.shape, draft.sp, draft.t1_map, draft.tmpl
    wm_map = draft.wm_map
    angles = np.clip(rng.normal(0, 3.0, 3), -7, 7)
    scale = BASE_SCALE * rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)
    A = rotation(angles) @ np.diag(scale)  # template mm -> case mm
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
    draft.M, draft.brain, draft.c_out, draft.crop, draft.csf, draft.detail = M, brain, c_out, crop, csf, detail
    draft.gm, draft.hi, draft.lo, draft.to_case, draft.wm = gm, hi, lo, to_case, wm



def _blob(arr, ctr, radius_mm, sp: float, crop) -> None:
    """Raise `arr` to a soft ball of `radius_mm` at voxel `ctr` (a confounder's building block)."""
    rv = radius_mm / sp
    a, b = box(ctr, rv + 2, 0, crop)
    if np.any(b <= a):
        return
    g = [(np.arange(x0, x1, dtype=np.float32) - c0).reshape([-1 if i == j else 1 for j in range(3)])
         for i, (x0, x1, c0) in enumerate(zip(a, b, ctr))]
    d = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2) / max(rv, 0.5)
    sl = tuple(slice(x0, x1) for x0, x1 in zip(a, b))
    np.maximum(arr[sl], np.clip(1.5 - d, 0, 1), out=arr[sl])


def plexus_and_vessels(draft) -> None:
    """Choroid plexus and cortical vessels (label 0 confounders)."""
    crop, csf, gm, lo, rng, sp, tmpl = draft.crop, draft.csf, draft.gm, draft.lo, draft.rng, draft.sp, draft.tmpl
    to_case = draft.to_case
    conf = {name: np.zeros(crop, np.float32) for name in ("vessel", "plexus", "wml")}

    if rng.random() < 0.7:  # choroid plexus, one glomus per side
        left = tmpl.plexus[:, 0] < tmpl.centre[0]
        for side in (left, ~left):
            cands = tmpl.plexus[side]
            if len(cands):
                _blob(conf["plexus"], to_case(cands[rng.integers(len(cands))]) - lo, rng.uniform(2.0, 4.5), sp, crop)
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
                _blob(conf["vessel"], p, radius, sp, crop)
                d = d + rng.normal(0, 0.12, 3)
                d /= np.linalg.norm(d)
                p = p + d * step
                if np.any(p < 0) or np.any(p >= np.array(crop) - 1):
                    break
    draft.conf = conf



def white_matter_lesions(draft) -> None:
    """Periventricular caps and deep white-matter lesions (label 0), and the patches all confounders touch."""
    M, brain, c_out, conf, crop, lo = draft.M, draft.brain, draft.c_out, draft.conf, draft.crop, draft.lo
    rng, sp, tmpl, to_case, wm = draft.rng, draft.sp, draft.tmpl, draft.to_case, draft.wm
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
                _blob(conf["wml"], p, rng.uniform(1.5, 4.0), sp, crop)
    patches = {}  # name -> (slices, soft mask) around the structures, to touch only those voxels
    for name in conf:
        conf[name] *= brain
        nz = np.nonzero(conf[name].any(axis=(1, 2)))[0], np.nonzero(conf[name].any(axis=(0, 2)))[0], \
            np.nonzero(conf[name].any(axis=(0, 1)))[0]
        if all(len(v) for v in nz):
            sl = tuple(slice(int(v[0]), int(v[-1]) + 1) for v in nz)
            patches[name] = (sl, conf[name][sl])
    draft.patches = patches
