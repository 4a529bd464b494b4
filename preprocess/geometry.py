"""Where a patient's slices came from, as a frozen record, with the way there and the way back.

The way there (what the recipe does to index space), in order:
  1. reorient the storage axes to RAS+ (`to_canonical`), then lay the volume out for the slicing
     `plane` (`to_view`): (A, B, S), S the axis slices are cut along. Axial: (X, Y, Z) as it is;
     coronal: (X, Z, Y); sagittal: (Y, Z, X). A coronal or sagittal plane is zero-padded (evenly,
     the odd voxel after) to a square A x B, so its slices keep the voxels' proportions whether or
     not the recipe crops (the axial plane is never padded: its slices are those of every set)
  2. crop in-plane to `crop_box` (a0, a1, b0, b1) and keep the slices `slice_index`
  3. resize in-plane to size x size (`to_slices`: antialiased linear for images, nearest for labels)
The way back undoes them in reverse (`from_slices`, `from_view`, `from_canonical`; all three:
`inverse`), so a
prediction on the slices lands on the source volume's voxels, zeros outside the box and on the
slices not kept. `to_dict()` is the record stored in the manifest and the Zarr attributes.

What an affine says, for the record and for evaluate and show alike, is here too: the voxel size
(`spacing_of`), whether it can be oriented at all (`affine_problem`), and the orientation
(`canonical_ornt`, applied by `apply_ornt`, undone by `invert_ornt`; `canonical_affine`), in
numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np

from preprocess import kernel, resample  # kernel: numba's or numpy's resize, the same bytes
from shards.domain import RELEASES
from shards.layout import PLANES

# plane -> the canonical (RAS) axes laid out as (A, B, S): in-plane rows, in-plane columns, slices
PLANE_AXES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}

# ---------------------------------------------------------------- voxel size and orientation


def spacing_of(affine) -> tuple[float, float, float]:
    """Voxel size (mm) along each storage axis of a 4x4 affine: the norms of its first three columns."""
    zooms = np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))
    return tuple(float(z) for z in zooms)


def affine_problem(affine: np.ndarray) -> str | None:
    """What makes an affine unusable for reorientation (None: nothing). NaN compares unequal to
    itself and a singular matrix has no orientation, so both are named before anything uses them."""
    if not np.all(np.isfinite(affine)):
        return "has a NaN/Inf value in its affine (qform/sform)"
    zooms = spacing_of(affine)
    # relative test: voxel sizes range from microns to millimetres
    if min(zooms) == 0 or abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * float(np.prod(zooms)):
        return "has a singular affine (a zero voxel size or parallel axes): its orientation is undefined"
    return None


def canonical_ornt(affine) -> np.ndarray:
    """The orientation transform from storage axes to RAS+, in nibabel's `ornt` form: (3, 2) float,
    row k = (the RAS axis storage axis k runs along, flip +-1). Computed as nibabel 5's
    `io_orientation` does (the closest rotation to the affine's directions, by SVD; each storage
    axis, strongest first, takes the RAS axis it runs most along), without nibabel: its rows go
    into every shard set's geometry, so they must not change with a nibabel release."""
    rs = np.asarray(affine, dtype=float)[:3, :3] / np.array([z or 1.0 for z in spacing_of(affine)])
    p, s, qs = np.linalg.svd(rs, full_matrices=False)
    keep = s > s.max() * 3 * np.finfo(s.dtype).eps  # the rank: singular values above round-off
    r = np.dot(p[:, keep], qs[keep])
    ornt = np.full((3, 2), np.nan)
    for k in np.argsort(np.min(-(r**2), axis=0), kind="stable"):
        col = r[:, k]
        if not np.allclose(col, 0):
            axis = int(np.argmax(np.abs(col)))
            ornt[k] = axis, (-1 if col[axis] < 0 else 1)
            r[axis, :] = 0  # taken: the next storage axis picks among the others
    return ornt


def apply_ornt(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Reorder/flip the three spatial axes (the last three) of `arr` as `ornt` says (a view)."""
    lead = arr.ndim - 3
    perm = [int(a) for a in ornt[:, 0]]
    out = arr.transpose(list(range(lead)) + [lead + int(np.argsort(perm)[i]) for i in range(3)])
    # after the transpose, output axis j comes from input axis k = argsort(perm)[j]
    for j in range(3):
        k = int(np.argsort(perm)[j])
        if ornt[k, 1] < 0:
            out = np.flip(out, axis=lead + j)
    return out


def invert_ornt(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Undo `apply_ornt`: canonical (RAS) array back to storage order (a view)."""
    lead = arr.ndim - 3
    perm = [int(a) for a in ornt[:, 0]]
    inv = np.argsort(perm)
    out = arr
    for j in range(3):
        k = int(inv[j])
        if ornt[k, 1] < 0:
            out = np.flip(out, axis=lead + j)
    # output axis k (storage) is canonical axis perm[k]
    return out.transpose(list(range(lead)) + [lead + perm[k] for k in range(3)])


def canonical_affine(affine: np.ndarray, ornt: np.ndarray, shape) -> np.ndarray:
    """The affine of an array of storage `shape` reoriented by `ornt` (RAS+ axis order): `affine`
    after the map from reoriented voxel indices back to storage ones (nibabel's `inv_ornt_aff`)."""
    ornt = np.asarray(ornt)
    undo_reorder = np.eye(4)[[int(a) for a in ornt[:, 0]] + [3], :]
    undo_flip = np.diag(list(ornt[:, 1]) + [1.0])
    centre = -(np.array(shape)[:3] - 1) / 2.0
    undo_flip[:3, 3] = ornt[:, 1] * centre - centre
    return affine @ np.dot(undo_flip, undo_reorder)


# ---------------------------------------------------------------- validators (parse_*: value or ValueError)

def _parse_ints(name: str, value, n: int | None, minimum: int | None = None) -> tuple[int, ...]:
    """A list of `n` integers (n None: one or more), each >= `minimum`."""
    value = value.tolist() if isinstance(value, np.ndarray) else value
    if not (isinstance(value, (list, tuple)) and (len(value) == n if n else len(value) > 0)
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"geometry.{name} must be a list of {n or 'one or more'} integers, not {value!r}")
    if minimum is not None and any(v < minimum for v in value):
        raise ValueError(f"geometry.{name} {list(value)} has a value below {minimum}")
    return tuple(int(v) for v in value)


def _parse_affine(value) -> tuple[tuple[float, ...], ...]:
    rows = value.tolist() if isinstance(value, np.ndarray) else value
    ok = isinstance(rows, (list, tuple)) and len(rows) == 4 and all(
        isinstance(r, (list, tuple)) and len(r) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in r) for r in rows)
    if not ok:
        raise ValueError(f"geometry.affine must be a 4x4 matrix of finite numbers, not {value!r}")
    return tuple(tuple(float(v) for v in r) for r in rows)


def _parse_ornt(value) -> tuple[tuple[int, int], ...]:
    rows = value.tolist() if isinstance(value, np.ndarray) else value
    ok = isinstance(rows, (list, tuple)) and len(rows) == 3 and all(
        isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in r) for r in rows)
    if not ok or sorted(r[0] for r in rows) != [0, 1, 2] or any(r[1] not in (-1, 1) for r in rows):
        raise ValueError(f"geometry.ornt must be 3 rows (axis 0-2, each once; flip +-1), not {value!r}")
    return tuple((int(a), int(f)) for a, f in rows)


def canonical_shape_of(source_shape, ornt) -> tuple[int, int, int]:
    """Shape after `to_canonical`: storage axis k becomes RAS axis ornt[k][0]."""
    out = [0, 0, 0]
    for k, (axis, _) in enumerate(ornt):
        out[int(axis)] = int(source_shape[k])
    return tuple(out)


def _view_shape(canonical_shape, plane: str) -> tuple[int, int, int]:
    """(A, B, S) of a canonical volume laid out for `plane`; a coronal or sagittal plane padded square."""
    a, b, n = (int(canonical_shape[k]) for k in PLANE_AXES.get(plane, (0, 1, 2)))
    return (a, b, n) if plane == "axial" else (max(a, b), max(a, b), n)


# ---------------------------------------------------------------- the record

@dataclass(frozen=True)
class Geometry:
    """Everything it takes to map slices back onto the source volume. Field order is the key order
    of `to_dict()` (and so of the bytes in every shard set's attributes)."""

    affine: tuple  # 4x4 source affine (storage voxel -> mm)
    source_shape: tuple  # (X, Y, Z) as stored
    ornt: tuple  # storage axis k -> (RAS axis, flip), nibabel's `ornt`
    canonical_shape: tuple  # (X, Y, Z) after reorientation to RAS+
    crop_box: tuple  # in-plane (x0, x1, y0, y1) of the canonical volume that was resized
    spacing: tuple = field(init=False)  # voxel size (mm) per storage axis: spacing_of(affine), never given
    labels: tuple  # label values of the release, background first
    convention: str  # the release's name in shards.domain.RELEASES
    affine_known: bool  # False: the input carried no affine and the identity was assumed
    plane: str = "axial"  # the slicing plane (PLANES); stored only when it is not axial

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise once, here, to plain tuples of Python numbers
        set_(self, "affine", _parse_affine(self.affine))
        set_(self, "source_shape", _parse_ints("source_shape", self.source_shape, 3, 1))
        set_(self, "ornt", _parse_ornt(self.ornt))
        set_(self, "canonical_shape", _parse_ints("canonical_shape", self.canonical_shape, 3, 1))
        set_(self, "crop_box", _parse_ints("crop_box", self.crop_box, 4, 0))
        set_(self, "labels", _parse_ints("labels", self.labels, None, 0))
        set_(self, "spacing", spacing_of(self.affine))
        if not (isinstance(self.plane, str) and self.plane in PLANES):
            raise ValueError(f"geometry.plane {str(self.plane)[:40]!r} is not one of {', '.join(PLANES)}")
        if self.canonical_shape != canonical_shape_of(self.source_shape, self.ornt):
            raise ValueError(f"geometry.canonical_shape {list(self.canonical_shape)} is not source_shape "
                             f"{list(self.source_shape)} reoriented by ornt {[list(r) for r in self.ornt]}")
        x0, x1, y0, y1 = self.crop_box
        if not (x0 < x1 <= self.view_shape[0] and y0 < y1 <= self.view_shape[1]):
            raise ValueError(f"geometry.crop_box {list(self.crop_box)} is not a box inside the plane "
                             f"{list(self.view_shape[:2])}")
        if not (isinstance(self.convention, str) and self.convention in RELEASES):
            raise ValueError(f"geometry.convention {self.convention!r} is not a known release ({', '.join(RELEASES)})")
        if not isinstance(self.affine_known, bool):
            raise ValueError(f"geometry.affine_known must be true or false, not {self.affine_known!r}")

    @classmethod
    def of_source(cls, affine: np.ndarray, source_shape, convention: str, affine_known: bool = True,
                  plane: str = "axial") -> "Geometry":
        """The geometry of a source volume before any crop: reorientation from the affine, the box
        the whole (padded) plane, the labels those of the release."""
        ornt = canonical_ornt(affine).astype(int)
        canonical = canonical_shape_of(source_shape, ornt)
        a, b, _ = _view_shape(canonical, plane)
        return cls(affine=affine, source_shape=source_shape, ornt=ornt, canonical_shape=canonical,
                   crop_box=(0, a, 0, b), labels=RELEASES[convention].label_values,
                   convention=convention, affine_known=affine_known, plane=plane)

    def cropped(self, box) -> "Geometry":
        return replace(self, crop_box=box)

    def to_dict(self) -> dict:
        """The stored record: plain JSON types, keys in field order."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.plane == "axial":  # the record of every axial set, as it always was
            del d["plane"]
        return {k: ([list(r) for r in v] if k in ("affine", "ornt") else list(v) if isinstance(v, tuple) else v)
                for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        """A stored record back, validated; a `spacing` that disagrees with the affine is refused."""
        if not isinstance(d, dict):
            raise ValueError(f"geometry must be a mapping, not {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d and n != "plane"]  # no plane: axial
        unknown = sorted(set(d) - set(names))
        if missing or unknown:
            raise ValueError(f"geometry: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}")
        geo = cls(**{k: v for k, v in d.items() if k != "spacing"})
        stored = d["spacing"]
        if not (isinstance(stored, (list, tuple)) and len(stored) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in stored)
                and np.allclose(stored, geo.spacing, rtol=1e-9, atol=0)):
            raise ValueError(f"geometry.spacing {stored!r} disagrees with the affine's {list(geo.spacing)}")
        return geo

    @property
    def affine_array(self) -> np.ndarray:
        return np.array(self.affine)

    @property
    def ornt_array(self) -> np.ndarray:
        return np.array(self.ornt, float)

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the RAS axes X, Y, Z (`spacing` is per storage axis)."""
        out = [0.0, 0.0, 0.0]
        for k, (axis, _) in enumerate(self.ornt):
            out[axis] = self.spacing[k]
        return tuple(out)

    @property
    def view_shape(self) -> tuple[int, int, int]:
        """(A, B, S) of the volume laid out for the plane (`to_view`), padding included."""
        return _view_shape(self.canonical_shape, self.plane)

    @property
    def view_spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the view's axes A, B, S."""
        return tuple(self.canonical_spacing[k] for k in PLANE_AXES[self.plane])

    def _pads(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Zeros before and after along A and B (`to_view`)."""
        return tuple(((n - c) // 2, n - c - (n - c) // 2) for n, c in
                     zip(self.view_shape[:2], (self.canonical_shape[k] for k in PLANE_AXES[self.plane][:2])))

    def slice_spacing(self, size: int) -> tuple[float, float, float]:
        """Pixel size (mm) of the stored `size` x `size` slices along A and B (the crop box
        resized), and the spacing between slices."""
        sx, sy, sz = self.view_spacing
        x0, x1, y0, y1 = self.crop_box
        return sx * (x1 - x0) / size, sy * (y1 - y0) / size, sz

    # ------------------------------------------------------------ the way there

    def to_canonical(self, arr: np.ndarray) -> np.ndarray:
        """Step 1: (..., X, Y, Z) in storage order -> RAS+ order (a view, not a copy)."""
        return apply_ornt(arr, self.ornt_array)

    def to_view(self, canonical: np.ndarray) -> np.ndarray:
        """Step 1's layout: (..., X, Y, Z) in RAS+ order -> (..., A, B, S) for the plane (axial:
        the array itself; otherwise a padded copy)."""
        if self.plane == "axial":
            return canonical
        lead = canonical.ndim - 3
        view = canonical.transpose(tuple(range(lead)) + tuple(lead + k for k in PLANE_AXES[self.plane]))
        return np.pad(view, ((0, 0),) * lead + self._pads() + ((0, 0),))

    def to_slices(self, canonical: np.ndarray, slice_index, size: int, labels: bool = False) -> np.ndarray:
        """Steps 2-3: canonical (X, Y, Z) -> (S, size, size) of the kept slices inside the box:
        float32 by antialiased linear resampling, or (labels=True) the input dtype by nearest."""
        x0, x1, y0, y1 = self.crop_box
        if labels:  # the gather leaves (S, size, size) laid out slice-last: made contiguous once
            # here (2 MB), which spares every later per-channel step a transposing copy
            return np.ascontiguousarray(resample.resize_labels(np.moveaxis(canonical[x0:x1, y0:y1, slice_index], 2, 0),
                                                            size))
        return kernel.resize_slices(canonical, self.crop_box, slice_index, size)

    def forward(self, vol: np.ndarray, slice_index, size: int, labels: bool = False) -> np.ndarray:
        """Steps 1-3: source (X, Y, Z) -> (S, size, size)."""
        return self.to_slices(self.to_view(self.to_canonical(vol)), slice_index, size, labels)

    # ------------------------------------------------------------ the way back

    def from_slices(self, slices: np.ndarray, slice_index) -> np.ndarray:
        """Undo steps 3-2: (S, C, size, size) float -> the view (C, A, B, S) float32, resized back
        to the box (bilinear) and zero outside it and on the slices not kept."""
        x0, x1, y0, y1 = self.crop_box
        view = np.zeros((slices.shape[1],) + self.view_shape, np.float32)
        if len(slice_index):
            t = resample.bilinear(np.asarray(slices, np.float32), x1 - x0, y1 - y0)
            view[:, x0:x1, y0:y1, list(slice_index)] = t.transpose(1, 2, 3, 0)  # (C, bx, by, S)
        return view

    def from_view(self, view: np.ndarray) -> np.ndarray:
        """Undo `to_view`: (..., A, B, S) -> (..., X, Y, Z) in RAS+ order (the padding dropped)."""
        if self.plane == "axial":
            return view
        (a0, a1), (b0, b1) = self._pads()
        lead = view.ndim - 3
        core = view[..., a0: view.shape[-3] - a1, b0: view.shape[-2] - b1, :]
        return core.transpose(tuple(range(lead)) + tuple(lead + k for k in np.argsort(PLANE_AXES[self.plane])))

    def from_canonical(self, arr: np.ndarray) -> np.ndarray:
        """Undo step 1: (..., X, Y, Z) in RAS+ order -> storage order, contiguous."""
        return np.ascontiguousarray(invert_ornt(arr, self.ornt_array))

    def inverse(self, slices: np.ndarray, slice_index) -> np.ndarray:
        """Undo steps 3-1: (S, C, size, size) -> (C, X, Y, Z) on the source volume's voxels."""
        return self.from_canonical(self.from_view(self.from_slices(slices, slice_index)))
