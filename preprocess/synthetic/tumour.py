"""The realistic generator's tumour: sub-region volumes, where it sits, its core (perturbed
ellipsoids), necrosis and non-enhancing parts, oedema spreading along white matter, and its
soft boundaries and textures. See preprocess/synthetic/realistic.py."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from preprocess.synthetic.anatomy import voxel_volume_mm3
from preprocess.synthetic.fields import block_reduce, box, lowest, noise_field, random_rotation

# Volumes of the true sub-regions (cm^3), as sampled; see the module docstring for the sources.
VOLUME_RANGES_CM3 = {
    "WT": (12.0, 280.0),  # NCR + ED + ET
    "TC": (1.8, 182.0),  # NCR + ET
    "ET": (0.0, 182.0),  # 0 in non-enhancing cases; = TC when solid
    "ED": (4.2, 238.0),
}


def volume_ranges_voxels(shape) -> dict[str, tuple[float, float]]:
    """`VOLUME_RANGES_CM3` in voxels of a grid of `shape` (the ranges scale with the grid)."""
    v = voxel_volume_mm3(shape) / 1000.0
    return {k: (lo / v, hi / v) for k, (lo, hi) in VOLUME_RANGES_CM3.items()}


_BIG = np.float32(1e9)


def geodesic(seed: np.ndarray, cost: np.ndarray, max_iter: int) -> np.ndarray:
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


def ellipsoid_field(X, Y, Z, c, radii, R):
    u = [R[i, 0] * (X - c[0]) + R[i, 1] * (Y - c[1]) + R[i, 2] * (Z - c[2]) for i in range(3)]
    return np.sqrt((u[0] / radii[0]) ** 2 + (u[1] / radii[1]) ** 2 + (u[2] / radii[2]) ** 2)


def tumour_volumes(draft) -> None:
    """The tumour's sub-region volumes (cm^3, voxel counts) and whether it enhances."""
    rng, sp = draft.rng, draft.sp
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
    draft.enhancing, draft.gap, draft.n_ed, draft.n_ncr, draft.n_tc = enhancing, gap, n_ed, n_ncr, n_tc
    draft.tc_cm3, draft.wt_cm3 = tc_cm3, wt_cm3



def place_tumour(draft) -> None:
    """Where the tumour sits, the working box around it and the box's tissue maps and mm grids."""
    brain, crop, csf, gm, lo, rng, sp = draft.brain, draft.crop, draft.csf, draft.gm, draft.lo, draft.rng, draft.sp
    tc_cm3, tmpl, to_case, wm, wt_cm3 = draft.tc_cm3, draft.tmpl, draft.to_case, draft.wm, draft.wt_cm3
    seed_vox = tmpl.seeds[rng.integers(len(tmpl.seeds))]
    centre = to_case(seed_vox + rng.uniform(-0.5, 0.5, 3)) - lo  # in crop coordinates
    r_tc = (3 * tc_cm3 * 1000 / (4 * math.pi)) ** (1 / 3)  # mm
    r_wt = (3 * wt_cm3 * 1000 / (4 * math.pi)) ** (1 / 3)
    blo, bhi = box(centre, (1.5 * r_wt + 10) / sp, 0, crop)
    bsl = tuple(slice(a, b) for a, b in zip(blo, bhi))
    bshape = tuple(int(b - a) for a, b in zip(blo, bhi))
    b_brain, b_wm, b_gm, b_csf = brain[bsl], wm[bsl], gm[bsl], csf[bsl]
    axes = ([-1, 1, 1], [1, -1, 1], [1, 1, -1])
    X, Y, Z = (((np.arange(n, dtype=np.float32) + a - c) * sp).reshape(ax)  # mm from the centre
               for ax, n, a, c in zip(axes, bshape, blo, centre))
    draft.X, draft.Y, draft.Z, draft.b_brain, draft.b_csf, draft.b_gm = X, Y, Z, b_brain, b_csf, b_gm
    draft.b_wm, draft.blo, draft.bshape, draft.bsl, draft.centre, draft.r_tc = b_wm, blo, bshape, bsl, centre, r_tc
    draft.r_wt = r_wt



def grow_core(draft) -> None:
    """The tumour core (perturbed ellipsoids cut at the sampled volume), necrosis and non-enhancing tumour."""
    X, Y, Z, b_brain, b_csf, blo = draft.X, draft.Y, draft.Z, draft.b_brain, draft.b_csf, draft.blo
    bshape, centre, enhancing, et_label = draft.bshape, draft.centre, draft.enhancing, draft.et_label
    gap, n_ncr, n_tc, r_tc, rng, sp = draft.gap, draft.n_ncr, draft.n_tc, draft.r_tc, draft.rng, draft.sp
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
        np.minimum(f, ellipsoid_field(X, Y, Z, c, rad, random_rotation(rng)), out=f)
    if rng.random() < 0.15:  # a second focus
        d = rng.normal(size=3)
        c = d / np.linalg.norm(d) * r_tc * rng.uniform(1.8, 2.8)
        rad = r_tc * rng.uniform(0.3, 0.5) * rng.uniform(0.8, 1.2, 3)
        np.minimum(f, ellipsoid_field(X, Y, Z, c, rad / 0.45, random_rotation(rng)), out=f)
    corr = max(1.0, 6.0 / sp)
    n1, n2, n3 = (noise_field(rng, bshape, corr) for _ in range(3))
    f += rng.uniform(0.12, 0.3) * n1 + 0.6 * b_csf  # lobulated; tumour displaces rather than fills CSF
    allowed = b_brain & (b_csf < 0.6)
    t_c = lowest(f[allowed], n_tc)
    core = allowed & (f < t_c)
    if not core.any():  # degenerate tiny grid: at least the centre voxel
        ci = tuple(np.clip(np.round(centre - blo).astype(int), 0, np.array(bshape) - 1))
        core[ci] = True
    fn = f + 0.15 * n2
    necrosis = np.zeros_like(core)
    if n_ncr:
        necrosis = core & (fn < lowest(fn[core], n_ncr))
    lab = np.zeros(bshape, np.uint8)
    lab[core] = et_label if enhancing else 1
    lab[necrosis] = 1
    net = np.zeros_like(core)  # non-enhancing solid tumour (also label 1)
    if not enhancing:
        net = core & ~necrosis
    elif gap > 0:
        rim = core & ~necrosis
        if rim.any():
            net = rim & (n3 < lowest(n3[rim], int(gap * rim.sum())))
            lab[net] = 1
    draft.core, draft.lab, draft.n1, draft.necrosis, draft.net = core, lab, n1, necrosis, net



def grow_oedema(draft) -> None:
    """Oedema: geodesic spread from the core, fast in WM, slow in GM, nearly stopped by CSF."""
    b_brain, b_csf, b_gm, b_wm, bshape = draft.b_brain, draft.b_csf, draft.b_gm, draft.b_wm, draft.bshape
    core, lab, n_ed, r_wt, rng, sp = draft.core, draft.lab, draft.n_ed, draft.r_wt, draft.rng, draft.sp
    # oedema: geodesic spread from the core, fast in WM, slow in GM, nearly stopped by CSF
    k = max(1, int(round(3.0 / sp)))
    speed = (0.12 + 1.0 * b_wm + 0.22 * b_gm + 0.02 * b_csf) * b_brain
    speed_c = block_reduce(speed.astype(np.float32), k, np.mean)
    speed_c *= np.exp(0.45 * noise_field(rng, speed_c.shape, max(1.0, 2.0 / k)))
    h = k * sp
    cost = np.where(speed_c > 0.02, h / np.maximum(speed_c, 1e-3), _BIG).astype(np.float32)
    seed_c = block_reduce(core, k, np.max)
    T = geodesic(seed_c, cost, max_iter=int(3.0 * r_wt / h) + 12)
    T = np.minimum(T, np.float32(1e6))
    if k > 1:
        T = ndi.zoom(T, k, order=1, grid_mode=True, mode="nearest")[tuple(slice(0, n) for n in bshape)]
    T = T + 1.5 * sp * noise_field(rng, bshape, max(1.0, 2.0 / sp))
    ed_ok = b_brain & ~core & (b_csf < 0.5)
    t_e = lowest(T[ed_ok], n_ed)
    edema = ed_ok & (T < t_e)
    lab[edema] = 2
    ed_weight = np.zeros(bshape, np.float32)
    if edema.any():
        fall = rng.uniform(0.35, 0.7)
        ed_weight[edema] = 1 - fall * np.clip(T[edema] / max(t_e, 1e-3), 0, 1) ** 1.5
    draft.ed_weight, draft.edema = ed_weight, edema



def tumour_appearance(draft) -> None:
    """The tumour's soft class fractions (partial volume) and textures, in its own box."""
    b_brain, blo, bshape, core, ed_weight = draft.b_brain, draft.blo, draft.bshape, draft.core, draft.ed_weight
    edema, enhancing, lab, n1, necrosis = draft.edema, draft.enhancing, draft.lab, draft.n1, draft.necrosis
    net, rng, sp = draft.net, draft.rng, draft.sp
    soft_sigma = max(0.45, 0.8 / sp)
    # the tumour's own box: its labels plus a margin for the soft edges
    tidx = np.argwhere(lab > 0)
    margin = int(math.ceil(2.5 * soft_sigma)) + 1
    ta = np.maximum(tidx.min(0) - margin, 0)
    tb = np.minimum(tidx.max(0) + margin + 1, bshape)
    tsl = tuple(slice(x0, x1) for x0, x1 in zip(ta, tb))
    tshape = tuple(int(x1 - x0) for x0, x1 in zip(ta, tb))
    t_brain = b_brain[tsl]
    tex_fine = noise_field(rng, tshape, max(0.7, 1.2 / sp))
    # soft fractions of each tumour class, for partial-volume boundaries
    classes = {
        "ncr": (necrosis & core)[tsl],
        "net": (net & ~necrosis)[tsl],
        "et": (core & ~necrosis & ~net)[tsl] if enhancing else np.zeros(tshape, bool),
        "ed": edema[tsl],
    }
    frac = {n: ndi.gaussian_filter(c.astype(np.float32), soft_sigma, truncate=2.5) * t_brain
            for n, c in classes.items()}
    fluid = getattr(draft, "fluid", None)  # a cavity or cyst (preprocess/synthetic/fluid.py), or None
    if fluid is not None:
        frac["fluid"] = ndi.gaussian_filter(fluid[tsl].astype(np.float32), soft_sigma, truncate=2.5) * t_brain
    t_edw = ed_weight[tsl]
    frac["ed"] *= np.where(classes["ed"], t_edw, ndi.gaussian_filter(t_edw, soft_sigma, truncate=2.5))
    healthy_frac = 1 - np.minimum(sum(frac.values()), 1.0)
    texture_amp = {"ncr": rng.uniform(0.08, 0.2), "net": rng.uniform(0.05, 0.14),
                   "et": rng.uniform(0.08, 0.22), "ed": rng.uniform(0.03, 0.08)}
    t_n1 = n1[tsl]
    weighted = {n: frac[n] * np.exp(texture_amp[n] * (0.6 * t_n1 * (1 if i % 2 else -1) + 0.8 * tex_fine))
                for i, n in enumerate(texture_amp)}
    if fluid is not None:  # fluid is nearly uniform: a faint texture of its own
        weighted["fluid"] = frac["fluid"] * np.exp(np.float32(draft.fluid_texture) * tex_fine)
    tsl_crop = tuple(slice(x0 + o, x1 + o) for x0, x1, o in zip(ta, tb, blo))  # tumour box in crop
    draft.healthy_frac, draft.tsl_crop, draft.weighted = healthy_frac, tsl_crop, weighted
