"""One patient's recipe: volumes on disk -> normalised, resized 2D slices of one plane (axial,
or coronal or sagittal: `Geometry.to_view` lays the volume out so slices are cut along its last axis).

Steps, in order (each a pure function from `preprocess.steps`; the index-space ones, 2, 6 and 7,
through `preprocess.geometry.Geometry`, which holds their inverse beside them):
  1. load the release's modalities (four, or MEN-RT's one; MSD's 4D volume split in its order)
     and the segmentation (reads bounded: see `preprocess.nifti`);
     validate (present, 3D, a finite non-singular affine, same shape and affine, labels within
     the release's set); NaN/Inf image voxels become 0 (counted), but a modality NaN/Inf on more
     than half of the brain (step 3's mask), or with no brain left, fails the patient, named
  2. reorient everything to RAS+ so every patient's slices look the same whatever the affine, and
     lay it out for the plane (coronal and sagittal need square pixels: refused otherwise)
  3. brain mask = voxels nonzero in any modality (BraTS volumes are skull-stripped). Rule for
     defaced, not skull-stripped data (PED, MEN-RT): the same, so the "brain" is the head (every
     nonzero voxel), as nnU-Net's nonzero mask is; slices with head are kept and z-score
     statistics come from the head. Zero air stays background
  4. keep the plane's slices that contain brain; optionally keep only a fraction of tumour-free ones
  5. normalise each modality (z-score over the whole volume's brain voxels, background 0;
     or per slice) -- statistics always come from the full volume or slice, not a crop
  6. optionally crop in-plane to the brain's square bounding box (recorded for the way back)
  7. resize in-plane to size x size (antialiased linear for images, nearest for labels)
  8. encode the mask as the release's sub-regions (glioma: [NCR/NET, ED, ET]) or regions ([WT, TC, ET])
No NaN/Inf is ever written: a normalised image with values beyond float16 fails the patient.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from preprocess import kernel, steps
from preprocess.config import PreprocessConfig
from preprocess.discover import IMAGE4D, PatientFiles
from preprocess.errors import InputError
from preprocess.geometry import Geometry, affine_problem
from preprocess.h5slices import load_volumes
from preprocess.nifti import RawVolume, load_volume
from shards.domain import MSD_ORDER, SEG, encode_mask


@dataclass(frozen=True)
class PatientSlices:
    pid: str
    image: np.ndarray  # (S, M, H, W) float16, M the release's modalities
    mask: np.ndarray  # (S, K, H, W) uint8, K its channels in the mask mode
    slice_index: list[int]  # source axial index (canonical RAS z) of each slice
    geometry: Geometry  # what it takes to map slices back onto the source volume (stored: .to_dict())
    label_voxels: dict  # source label -> voxel count (whole volume)
    sources: dict  # modality -> {path, sha256, bytes}
    nonfinite_voxels: int


def load_patient(pf: PatientFiles, root: Path | None = None):
    """Read the patient's files; returns (volumes by modality and "seg", sources dict)."""
    if pf.slices:
        try:
            return load_volumes(list(pf.slices), root)
        except InputError:  # already names the file
            raise
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{type(e).__name__}: {e}") from e
    vols, sources = {}, {}
    for name in [IMAGE4D] + list(pf.release.modalities) + [SEG]:
        path = pf.files.get(name)
        if path is None:
            continue
        try:
            vols[name] = load_volume(path)
        except InputError:  # already names the file and what is wrong
            raise
        except Exception as e:  # nibabel raises many types for truncated / non-NIfTI files
            raise InputError(f"cannot read {Path(path).name}: {type(e).__name__}: {e}") from e
        rel = str(Path(path).relative_to(root)) if root else str(path)
        sources[name] = {"path": rel, "sha256": vols[name].sha256, "bytes": vols[name].nbytes}
    if IMAGE4D in vols:
        vols.update(split_4d(vols.pop(IMAGE4D), Path(pf.files[IMAGE4D]).name))
    return vols, sources


def split_4d(vol: RawVolume, name: str) -> dict:
    """An MSD 4D image (X, Y, Z, 4) -> one volume per modality, in the task's order (MSD_ORDER)."""
    if vol.data.ndim != 4 or vol.data.shape[3] != len(MSD_ORDER):
        raise InputError(f"{name} has shape {vol.data.shape}; an MSD image is 4D with "
                               f"{len(MSD_ORDER)} volumes ({', '.join(MSD_ORDER)})")
    return {m: RawVolume(np.ascontiguousarray(vol.data[..., i]), vol.affine, vol.sha256, vol.nbytes)
            for i, m in enumerate(MSD_ORDER)}


def _name(pf: PatientFiles, modality: str) -> str:
    return Path(pf.files[modality]).name if modality in pf.files else f"{pf.pid} {modality}"


def validate(pf: PatientFiles, vols: dict) -> dict[str, int] | None:
    """Refuse inconsistent volumes, naming the file; returns the segmentation's voxels per label
    (None without one), counted once here and reused by `process_volumes`."""
    ref_name = pf.release.modalities[0]
    ref = vols[ref_name]
    for name, v in vols.items():
        fname = _name(pf, name)
        if why := affine_problem(v.affine):
            raise InputError(f"{fname} {why}")
        if v.data.ndim != 3:
            raise InputError(f"{fname} is {v.data.ndim}D with shape {v.data.shape}; expected 3D")
        if v.data.shape != ref.data.shape:
            raise InputError(f"{fname} has shape {v.data.shape}, {_name(pf, ref_name)} has {ref.data.shape}")
        if not np.allclose(v.affine, ref.affine, atol=1e-3):
            raise InputError(f"{fname} has a different affine from {_name(pf, ref_name)}")
    if SEG in vols:
        seg = vols[SEG].data
        if seg.dtype.kind == "f" and not np.all(np.isfinite(seg)):
            raise InputError(f"{_name(pf, 'seg')} holds NaN/Inf values")
        return steps.label_counts(seg, pf.labels, _name(pf, SEG))
    return None


def _keep_tumour_free(pid: str, seed: int, n: int, fraction: float) -> np.ndarray:
    """Deterministic choice of round(fraction * n) tumour-free slices for this patient."""
    if fraction >= 1.0:
        return np.ones(n, bool)
    digest = hashlib.sha256(f"{seed}:{pid}:tumour-free".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    keep = np.zeros(n, bool)
    keep[rng.permutation(n)[: int(round(fraction * n))]] = True
    return keep


def select_slices(pid: str, brain: np.ndarray, seg: np.ndarray | None, cfg: PreprocessConfig) -> np.ndarray:
    """Axial slices with brain; of those without tumour, a fixed fraction when asked."""
    z_all = np.nonzero(brain.any(axis=(0, 1)))[0]
    if z_all.size == 0:
        raise InputError("no brain voxels: every modality is zero everywhere")
    if seg is None or cfg.tumour_free_fraction >= 1.0:
        return z_all
    tumour = (seg[:, :, z_all] > 0).any(axis=(0, 1))
    return z_all[tumour | _keep_tumour_free(pid, cfg.seed, len(z_all), cfg.tumour_free_fraction)]


def _check_finite(pf: PatientFiles, image: np.ndarray) -> None:
    """No NaN/Inf is ever written to a shard: z-scores beyond float16's range (65504) become Inf."""
    bad = [m for c, m in enumerate(pf.release.modalities) if not np.isfinite(image[:, c]).all()]
    if bad:
        raise InputError(f"{pf.pid}: normalised {', '.join(_name(pf, m) for m in bad)} has values beyond "
                               f"the float16 range (+-65504) of the shards: refused")


def _check_nonfinite(pf: PatientFiles, bad: dict, brain: np.ndarray) -> None:
    """A modality NaN/Inf on most of the brain fails the patient, named (`steps.mostly_nonfinite`)."""
    for m, where in bad.items():
        if hit := steps.mostly_nonfinite(where, brain):
            raise InputError(f"{_name(pf, m)}: NaN or Inf on {hit[0]} of the {hit[1]} brain voxels (more than "
                                   f"half, or no brain left: an overflowing scl_slope in its header?); fix or "
                                   f"replace the file")


@dataclass(frozen=True)
class KernelInputs:
    """What the image kernel takes for one patient (`prepare_volumes`)."""
    geometry: Geometry  # cropped when the recipe crops
    images: list  # canonical (X, Y, Z) volumes, one per modality
    brain: np.ndarray  # canonical brain mask
    seg: np.ndarray | None  # canonical uint8 labels
    slice_index: np.ndarray  # kept axial slices
    means: list  # per modality: float32 scalar (volume) or (S, 1, 1) float32 (slice)
    stds: list
    nonfinite_voxels: int


def prepare_volumes(pf: PatientFiles, vols: dict, cfg: PreprocessConfig) -> KernelInputs:
    """Steps 2-5 on loaded, validated volumes: reorient, brain mask, kept slices, crop box and the
    normalisation statistics, up to the image kernel."""
    rel = pf.release
    ref = vols[rel.modalities[0]]
    geo = Geometry.of_source(ref.affine, ref.data.shape, pf.convention, affine_known=not pf.slices,
                             plane=cfg.plane)
    _check_square_pixels(pf, geo)
    stored, bad, nonfinite = _finite_volumes(vols, rel.modalities)
    images = [geo.to_view(geo.to_canonical(v)) for v in stored]  # (A, B, S): RAS order laid out for the plane
    seg = geo.to_view(geo.to_canonical(np.asarray(vols[SEG].data).astype(np.uint8))) if SEG in vols else None

    # the brain mask, and (compiled kernel, integer volumes) each volume's exact sums in one pass
    brain, sums = kernel.brain_and_sums(stored)
    _check_nonfinite(pf, bad, brain)
    brain = geo.to_view(geo.to_canonical(brain))
    z_keep = select_slices(pf.pid, brain, seg, cfg)
    if cfg.crop:
        geo = geo.cropped(steps.square_box(brain.any(axis=2)))
    means, stds = _statistics(images, brain, sums, z_keep, cfg.normalize)
    return KernelInputs(geo, images, brain, seg, z_keep, means, stds, nonfinite)


def _check_square_pixels(pf: PatientFiles, geo: Geometry) -> None:
    """Coronal and sagittal slices are cut from the volume as it is: they need the same voxel size
    along both of their in-plane axes (BraTS volumes are 1 mm isotropic), or they would be stretched."""
    a, b, _ = geo.view_spacing
    if geo.plane != "axial" and not np.isclose(a, b, rtol=1e-3):
        raise InputError(f"{_name(pf, pf.release.modalities[0])} has {a:g} x {b:g} mm voxels in the {geo.plane} "
                         f"plane; {geo.plane} slices need square pixels: resample it to isotropic voxels, or use "
                         f"axial slices only")


def _finite_volumes(vols: dict, modalities) -> tuple[list, dict, int]:
    """(each modality with NaN/Inf set to 0, where each had some, how many voxels in all)."""
    stored, bad, nonfinite = [], {}, 0
    for m in modalities:
        v, n = steps.nonfinite_to_zero(vols[m].data)
        if n:  # where, to weigh against the brain below (rare: recomputed rather than always kept)
            bad[m] = ~np.isfinite(vols[m].data)
        nonfinite += n
        stored.append(v)
    return stored, bad, nonfinite


def _statistics(images: list, brain: np.ndarray, sums, z_keep, normalize: str) -> tuple[list, list]:
    """Per modality the z-score's (mean, std): over the brain of the whole volume, or per kept slice.

    Resize first, normalise after: z = (x - mean*B) / std is linear in (x, B) with B the brain
    mask, so resizing x and B and then combining equals normalising then resizing (up to float
    rounding), at a quarter of the pixels. Statistics come from full volumes."""
    n_brain = int(np.count_nonzero(brain))  # shared by the modalities' statistics
    means, stds = [], []
    for c, img in enumerate(images):
        if normalize == "volume":
            if sums is not None:  # images are 0 outside the brain: whole-volume sums are the brain's
                mean, std = steps.mean_std_of_sums(*sums[c], n_brain) if n_brain else (0.0, 1.0)
            else:
                mean, std = steps.brain_stats(img, brain, n_brain)
            mean, std = np.float32(mean), np.float32(std if std > 1e-8 else 1.0)
        else:
            stats = [steps.brain_stats(img[:, :, z], brain[:, :, z]) for z in z_keep]
            mean = np.array([m for m, _ in stats], np.float32)[:, None, None]
            std = np.array([sd if sd > 1e-8 else 1.0 for _, sd in stats], np.float32)[:, None, None]
        means.append(mean)
        stds.append(std)
    return means, stds


def process_volumes(pf: PatientFiles, vols: dict, cfg: PreprocessConfig, sources: dict | None = None,
                    label_voxels: dict[str, int] | None = None) -> PatientSlices:
    """Steps 2-8 on loaded, validated volumes (`label_voxels`: `validate`'s counts, when at hand)."""
    k = prepare_volumes(pf, vols, cfg)
    # gather, resize, normalise and cast in one kernel (compiled when numba is installed; same
    # bytes); overflow to Inf is caught, named, right below
    image = kernel.normalised_slices(k.images, k.brain, k.geometry.crop_box, k.slice_index, cfg.size, k.means,
                                     k.stds)  # (S, M, H, W) float16
    _check_finite(pf, image)
    mask = _mask(pf, k, cfg)
    if label_voxels is None:
        label_voxels = steps.label_counts(vols[SEG].data, pf.labels) if SEG in vols else {}
    return PatientSlices(pid=pf.pid, image=np.ascontiguousarray(image), mask=np.ascontiguousarray(mask),
                         slice_index=[int(z) for z in k.slice_index], geometry=k.geometry,
                         label_voxels=label_voxels, sources=sources or {}, nonfinite_voxels=k.nonfinite_voxels)


def _mask(pf: PatientFiles, k: KernelInputs, cfg: PreprocessConfig) -> np.ndarray:
    """Steps 7-8 for the labels: (S, K, H, W) uint8, the release's channels in the mask mode (all
    zero without a segmentation)."""
    rel = pf.release
    if k.seg is None:
        return np.zeros((len(k.slice_index), len(rel.channels(cfg.mask)), cfg.size, cfg.size), np.uint8)
    seg_s = k.geometry.to_slices(k.seg, k.slice_index, cfg.size, labels=True)  # (S, H, W)
    return np.moveaxis(encode_mask(seg_s, rel, cfg.mask), 0, 1)


def process_patient(pf: PatientFiles, cfg: PreprocessConfig, root: Path | None = None) -> PatientSlices:
    """The whole recipe for one patient, in `cfg.plane`; raises InputError naming the file on bad input."""
    return process_planes(pf, cfg, (cfg.plane,), root)[cfg.plane]


def process_planes(pf: PatientFiles, cfg: PreprocessConfig, planes: tuple[str, ...],
                   root: Path | None = None) -> dict[str, PatientSlices]:
    """The recipe once per slicing plane, from one reading of the patient's files: plane -> its slices."""
    if pf.problem:
        raise InputError(pf.problem)
    vols, sources = load_patient(pf, root)
    counts = validate(pf, vols)
    return {p: process_volumes(pf, vols, replace(cfg, plane=p), sources, label_voxels=counts) for p in planes}
