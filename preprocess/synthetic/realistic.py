"""A realistic synthetic BraTS generator: template anatomy, glioma-like tumours, real-scan nuisances.

`preprocess.synthetic.toy` draws an ellipsoid brain with a concentric tumour: every recipe scores ~0.94
Dice on it, so it cannot rank training recipes. This module makes cases that are hard in the ways
real BraTS cases are hard, in the same `Case` format (images int16 in RAS voxel order, seg uint8 in
the release's labels), so `cases.write_case` writes them in the BraTS layout.

The models live beside this module, one per file: anatomy.py (template, confounders), tumour.py,
fluid.py (resection cavities, cysts), acquisition.py, rater.py; `_generate` calls their stages in
order on one draft of the case, so every random draw happens in the order it always did (same
seed, same bytes).

Releases
    2020 and 2023 cases are drawn in their own labels. Every other release of the table is drawn
    in working labels (the 2023 ones plus 4 for a fluid space) and mapped into its own
    (`fluid.release_labels`), with its modalities only: post-treatment GLI 2024 and MET cases have
    a resection cavity (RC) inside the residual tumour, PED 2024 cases a cyst (CC) at the core's
    edge with the PED labels (1 ET, 2 NETC, 3 CC, 4 ED), MEN-RT cases are T1Gd alone with the
    tumour core as the GTV (no oedema label), MSD cases are written as 4-D files in its layout.
    MEN, SSA and PED 2023 take the glioma-like tumour in their labels. Not modelled: the
    extra-axial, dural-based shape of meningiomas, multiple metastases, the skull and face that
    MEN-RT and PED scans keep (the template is skull-stripped).

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

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from preprocess.synthetic.acquisition import acquisition_parameters, draw_contrast, modality_image
from preprocess.synthetic.anatomy import (BRATS_SHAPE, place_anatomy, plexus_and_vessels, spacing_mm,
                                          template_1mm, template_maps, white_matter_lesions)
from preprocess.synthetic.cases import Case, write_cases
from preprocess.synthetic.fluid import carve_fluid, release_labels
from preprocess.synthetic.rater import rate
from preprocess.synthetic.tumour import grow_core, grow_oedema, place_tumour, tumour_appearance, tumour_volumes
from shards.domain import MODALITIES, release as release_named

GLIOMA = ("2020", "2023")  # generated in their own labels; other releases in working labels, then mapped


@dataclass
class Truth:
    """What a test needs to see behind a case (full-grid arrays)."""

    labels: np.ndarray  # uint8, the true regions in the release's labels
    brain: np.ndarray  # bool
    wm: np.ndarray  # float32 WM probability
    gm: np.ndarray
    confounders: dict  # name -> bool mask (label 0 structures)
    contrast: dict  # tissue -> 4 means (relative units) used for this case
    spacing: float
    enhancing: bool


def _generate(index: int, shape=BRATS_SHAPE, release: str = "2020", seed: int = 0,
              want_truth: bool = False):
    """(Case, Truth or None) of case `index`: the models' stages in order on one draft."""
    rel = release_named(release)  # ValueError naming the known releases
    release = rel.name  # 2018/2019/2021 -> 2020
    shape = tuple(int(n) for n in shape)
    rng = np.random.default_rng([seed, index, 0x5EA1])
    sp = spacing_mm(shape)
    t1_map, gm_map, wm_map = template_maps(round(sp, 3))
    draft = SimpleNamespace(index=index, shape=shape, release=release, seed=seed, rng=rng, sp=sp,
                            tmpl=template_1mm(), t1_map=t1_map, gm_map=gm_map, wm_map=wm_map,
                            et_label=rel.et_label if release in GLIOMA else 3)  # else working labels
    place_anatomy(draft)
    draft.contrast = draw_contrast(rng)
    tumour_volumes(draft)
    place_tumour(draft)
    grow_core(draft)
    grow_oedema(draft)
    carve_fluid(draft)
    plexus_and_vessels(draft)
    white_matter_lesions(draft)
    tumour_appearance(draft)
    acquisition_parameters(draft)
    draft.images = [modality_image(draft, m) for m in range(4)]
    rate(draft)
    case = draft.case
    if release not in GLIOMA:  # working labels -> the release's; its modalities only
        images = tuple(img for m, img in zip(MODALITIES, case.images) if m in rel.modalities)
        case = Case(pid=case.pid, images=images, seg=release_labels(case.seg, rel))
    return case, (truth_of(draft, rel) if want_truth else None)


def truth_of(draft, rel) -> Truth:
    """The true regions, tissue maps and confounders behind the case (for tests)."""
    brain, bsl, conf, contrast = draft.brain, draft.bsl, draft.conf, draft.contrast
    crop, enhancing, full, gm, lab = draft.crop, draft.enhancing, draft.full, draft.gm, draft.lab
    shape, sp, wm = draft.shape, draft.sp, draft.wm

    def full_grid(a, dtype):
        o = np.zeros(shape, dtype)
        o[full] = a
        return o

    lab_crop = np.zeros(crop, np.uint8)
    lab_crop[bsl] = lab
    labels = full_grid(lab_crop, np.uint8)
    return Truth(labels=labels if rel.name in GLIOMA else release_labels(labels, rel), brain=full_grid(brain, bool),
                 wm=full_grid(wm, np.float32), gm=full_grid(gm, np.float32),
                 confounders={n: full_grid(c > 0.5, bool) for n, c in conf.items()},
                 contrast=contrast, spacing=sp, enhancing=enhancing)


# ----------------------------------------------------------------------------------------------
# public API


def make_realistic_case(index: int, shape=BRATS_SHAPE, release: str = "2020", seed: int = 0) -> Case:
    """Generate one realistic case (images int16 in RAS voxel order, seg in the release's labels)."""
    return _generate(index, shape, release, seed)[0]


def _realistic_case_with_truth(index: int, shape=BRATS_SHAPE, release: str = "2020", seed: int = 0):
    """(Case, Truth): the case and the true regions / tissue maps / confounders behind it (tests)."""
    return _generate(index, shape, release, seed, want_truth=True)


def make_realistic_data(out: Path, patients: int, shape=BRATS_SHAPE, release: str = "2020",
                        seed: int = 0, orientation: str = "lps", start: int = 1,
                        progress: bool = False) -> list[str]:
    """Write `patients` realistic cases plus a name-mapping table, like `make_demo_data`;
    grade LGG when a case has no enhancing tumour (releases without an ET label: no grade)."""
    rel = release_named(release)

    def make(i):
        case, _ = _generate(i, shape=shape, release=release, seed=seed)
        if "ET" not in rel.subregions:
            return case, ""
        return case, ("HGG" if (case.seg == rel.et_label).any() else "LGG")

    return write_cases(out, make, patients, release, orientation, start, progress, "realistic cases")
