"""The realistic generator's fluid spaces: a resection cavity where the tumour core was (post-treatment
glioma, BraTS 2024 GLI, and metastases, MET: label RC) or a cyst at the edge of the core (paediatric
tumours, PED 2024: label CC). See preprocess/synthetic/realistic.py.

A case gets one when its release has the label (`FLUID_OF`): every such case, so a set of any size
holds the label. The fluid takes internal label 4 in the working label map (1 necrosis / non-
enhancing, 2 oedema, 3 enhancing, 4 fluid) and `release_labels` maps that map into the release's.
  * Resection cavity: the inner 35-70 % of the core by distance from its edge, perturbed, so the
    residual tumour is a rim (enhancing or not) around the cavity, and oedema around that.
  * Cyst: the core voxels within a ball centred on the core's edge, 10-35 % of the core.
Appearance (relative to white matter, T1 / T1Gd / T2 / FLAIR, drawn per case): a cavity is CSF-like,
dark on T1 and T1Gd, bright on T2, and on FLAIR anywhere from suppressed to intermediate (blood
products and protein); a cyst's fluid is proteinaceous, brighter than CSF on T1 and FLAIR.
Sources and caveats: label definitions from the releases' descriptions in shards/domain.py; the
appearances are the textbook ones, not fitted to any release. Every draw here comes from its own
generator seeded by (seed, index), so the cases of releases without fluid keep their bytes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from preprocess.synthetic.fields import lowest, noise_field

FLUID = 4  # the working label of the fluid space
FLUID_OF = {"gli-2024": "rc", "met": "rc", "ped-2024": "cc"}  # release -> its fluid space
APPEARANCE = {  # T1, T1Gd, T2, FLAIR relative to white matter
    "rc": (0.35, 0.38, 2.50, 0.45),
    "cc": (0.50, 0.55, 2.40, 0.95),
}
# working label -> the release's sub-region (the first of the names the release has; none: background)
_NAMES = {1: ("NCR/NET", "NETC", "NET", "GTV"), 2: ("ED", "SNFH"), 3: ("ET", "GTV"), FLUID: ("RC", "CC")}


def carve_fluid(draft) -> None:
    """Replace part of the core by the release's fluid space (no-op for releases without one)."""
    kind = FLUID_OF.get(draft.release)
    draft.fluid = None
    if kind is None or not draft.core.any():
        return
    rng = np.random.default_rng([draft.seed, draft.index, 0xF1D])
    core, sp = draft.core, draft.sp
    if kind == "rc":
        depth = ndi.distance_transform_edt(core, sampling=sp)
        depth += 0.25 * depth.max() * noise_field(rng, core.shape, max(1.0, 4.0 / sp))
        n = int(rng.uniform(0.35, 0.7) * core.sum())
        fluid = core & (-depth < lowest(-depth[core], n)) if n else np.zeros_like(core)
    else:
        edge = np.argwhere(core & ~ndi.binary_erosion(core))
        at = edge[rng.integers(len(edge))]
        offsets = (np.indices(core.shape) - at[:, None, None, None]) * sp  # mm from the edge voxel, per axis
        dist = np.sqrt(offsets[0] ** 2 + offsets[1] ** 2 + offsets[2] ** 2)
        n = max(int(rng.uniform(0.10, 0.35) * core.sum()), 1)
        fluid = core & (dist <= lowest(dist[core], n))
    draft.lab[fluid] = FLUID
    for name in ("core", "necrosis", "net"):
        setattr(draft, name, getattr(draft, name) & ~fluid)
    look = np.array(APPEARANCE[kind]) * np.exp(rng.normal(0, 0.1, 4))
    if kind == "rc":
        look[3] *= rng.uniform(0.8, 2.6)  # FLAIR: suppressed fluid to blood products
    draft.contrast["fluid"] = look
    draft.fluid = fluid
    draft.fluid_texture = rng.uniform(0.02, 0.08)


def release_labels(lab: np.ndarray, rel, names_of: dict = None) -> np.ndarray:
    """A working label map (1 NCR/NET, 2 ED, 3 ET, 4 fluid) in `rel`'s labels; a working label with
    no sub-region in the release (MEN-RT's oedema) becomes background. `names_of`: working label ->
    the names it goes by, first match taken (default `_NAMES`; the toy cases pass their own)."""
    out = np.zeros_like(lab)
    for value, names in (names_of or _NAMES).items():
        name = next((n for n in names if n in rel.subregions), None)
        if name is not None:
            out[lab == value] = rel.label_of(name)
    return out
