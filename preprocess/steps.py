"""Pure array steps of the per-patient recipe on canonical volumes: brain mask, NaN/Inf rule,
z-score statistics, crop box, label counts. No file I/O; inputs are never mutated. (Orientation
and the index-space steps: `preprocess.geometry`; resampling: `preprocess.resample`.)

Byte-for-byte determinism across machines is a contract of the shard set, so the statistics
avoid results that depend on the CPU's vector width: those of integer volumes are summed
exactly (in int64, or in 16-bit limbs where squares would overflow int64).
"""

from __future__ import annotations

import numpy as np

from preprocess.errors import InputError


# ---------------------------------------------------------------- brain

def brain_mask(images: list[np.ndarray]) -> np.ndarray:
    """Voxels nonzero in any modality (BraTS volumes are skull-stripped: background is 0)."""
    brain = images[0] != 0
    tmp = np.empty_like(brain)
    for img in images[1:]:
        np.logical_or(brain, np.not_equal(img, 0, out=tmp), out=brain)
    return brain


# ---------------------------------------------------------------- normalisation

def nonfinite_to_zero(vol: np.ndarray) -> tuple[np.ndarray, int]:
    """Documented rule: NaN/Inf voxels of an image become background (0); returns the count."""
    if vol.dtype.kind != "f":
        return vol, 0
    bad = ~np.isfinite(vol)
    n = int(bad.sum())
    return (np.where(bad, 0, vol).astype(vol.dtype) if n else vol), n


MAX_NONFINITE_BRAIN = 0.5  # a modality NaN/Inf on more than this fraction of the brain is unusable


def mostly_nonfinite(bad: np.ndarray, brain: np.ndarray) -> tuple[int, int] | None:
    """Documented rule: a modality is unusable when its NaN/Inf voxels (`bad`) cover more than half
    of the brain (`brain`: nonzero in any modality once NaN/Inf are 0), or the brain is empty.
    Returns (NaN/Inf voxels in the brain, brain voxels) then, else None. A handful of bad voxels,
    or NaN written as background outside the brain, become background and are counted; a scan
    that overflowed as a whole (an scl_slope of 1e38 scales every voxel to Inf) would become all
    background, a wrong image with only a count to say so."""
    n_brain = int(np.count_nonzero(brain))
    n_bad = int(np.count_nonzero(bad & brain))
    return (n_bad, n_brain) if n_brain == 0 or n_bad > MAX_NONFINITE_BRAIN * n_brain else None


def _exact_mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and std; exact integer sums when the values are integers (the usual BraTS case)."""
    n = values.size
    if n == 0:
        return 0.0, 1.0
    if values.dtype.kind not in "iu" and _int64_exact(values):
        values = values.astype(np.int64)
    if values.dtype.kind in "iu":
        return _integer_mean_std(values, n)
    v = values.astype(np.float64)
    mean = float(np.sort(v).sum() / n)  # sorted: independent of the CPU's SIMD width
    var = float(np.sort((v - mean) ** 2).sum() / n)
    return mean, float(np.sqrt(var))


def _int64_exact(values: np.ndarray) -> bool:
    """Float values that are all integers within int64 (so the integer path is exact)."""
    if values.size == 0 or not np.array_equal(values, np.rint(values)):
        return False
    return bool(np.isfinite(values).all()) and max(-float(values.min()), float(values.max())) < 2.0**63


def _integer_mean_std(values: np.ndarray, n: int) -> tuple[float, float]:
    """Exact integer sums (no rounding anywhere, so any summation order gives the same bits)."""
    if values.dtype.itemsize > 2 and values.size and _squares_overflow(values):
        return _wide_mean_std(values, n)
    sq_dtype = np.int32 if values.dtype.itemsize == 1 or values.dtype == np.int16 else np.int64
    s = int(values.sum(dtype=np.int64))
    s2 = int(np.square(values, dtype=sq_dtype).sum(dtype=np.int64))
    return mean_std_of_sums(s, s2, n)


def mean_std_of_sums(s: int, s2: int, n: int) -> tuple[float, float]:
    """Mean and std from the exact sum and sum of squares of `n` integer values (the sums may
    come from anywhere, e.g. preprocess/kernel.py: exact integers give the same floats)."""
    mean = s / n
    var = max((s2 - s * s / n) / n, 0.0)
    return mean, float(np.sqrt(var))


def _squares_overflow(values: np.ndarray) -> bool:
    """Could the int64 sum of squares overflow? (8- and 16-bit values never do, below 2**31 values.)"""
    m = max(-int(values.min()), int(values.max()))
    return values.size * m * m >= 2**63


_LIMB = 16  # bits per limb: a product of two limbs is < 2**32, so a sum of < 2**31 of them fits int64
_CHUNK = 2**22  # values per partial sum: bounds the limb arrays' memory (4 x 32 MiB)


def _wide_mean_std(values: np.ndarray, n: int) -> tuple[float, float]:
    """The exact sums for values whose squares overflow int64 (e.g. int32 or float intensities
    near 3.4e7): |v| is cut into 16-bit limbs d_i, v**2 = sum_ij d_i d_j 2**(16(i+j)), and each
    limb-product sum is exact in int64; Python ints combine them. The variance is then one
    correctly rounded division of exact integers."""
    s = s2 = 0
    flat = values.ravel()
    for start in range(0, flat.size, _CHUNK):
        v = flat[start:start + _CHUNK]
        s += _sum_exact(v)
        s2 += _sum_squares_exact(v)
    mean = s / n
    var = max((n * s2 - s * s) / (n * n), 0.0)
    return mean, float(np.sqrt(var))


def _sum_exact(v: np.ndarray) -> int:
    """Exact sum of up to 2**30 int values: high and low 32-bit halves summed separately."""
    if v.dtype == np.uint64:  # beyond int64: the same split, unsigned
        hi, lo = v >> np.uint64(32), v & np.uint64(2**32 - 1)
        return int(hi.sum(dtype=np.uint64)) * 2**32 + int(lo.sum(dtype=np.uint64))
    v = v.astype(np.int64, copy=False)
    return int((v >> 32).sum(dtype=np.int64)) * 2**32 + int((v & (2**32 - 1)).sum(dtype=np.int64))


def _sum_squares_exact(v: np.ndarray) -> int:
    """Exact sum of squares of up to 2**30 int values, via 16-bit limbs of |v|."""
    mag = v if v.dtype == np.uint64 else np.abs(v.astype(np.int64, copy=False)).view(np.uint64)  # |INT64_MIN| = 2**63
    top = int(mag.max()).bit_length()
    limbs = [((mag >> np.uint64(_LIMB * i)) & np.uint64(2**_LIMB - 1)).astype(np.int64)
             for i in range(-(-top // _LIMB))]
    total = 0
    for i, a in enumerate(limbs):
        for j in range(i, len(limbs)):
            cross = int(np.multiply(a, limbs[j]).sum(dtype=np.int64))
            total += (cross if i == j else 2 * cross) << (_LIMB * (i + j))  # d_i d_j appears twice if i != j
    return total


def brain_stats(vol: np.ndarray, brain: np.ndarray, n: int | None = None) -> tuple[float, float]:
    """Mean/std of `vol` over `brain` (`n`: its voxel count, if already known). Images are zero
    outside the brain, so integer sums over the whole volume equal sums over the brain: no
    masked copy is needed."""
    if vol.dtype.kind in "iu":
        n = int(np.count_nonzero(brain)) if n is None else n
        return _integer_mean_std(vol, n) if n else (0.0, 1.0)
    return _exact_mean_std(vol[brain])


# ---------------------------------------------------------------- crop

def square_box(mask2d: np.ndarray, margin: int = 2) -> tuple[int, int, int, int]:
    """In-plane bounding box (x0, x1, y0, y1) of `mask2d`, grown to a square inside the plane."""
    X, Y = mask2d.shape
    xs, ys = np.nonzero(mask2d)
    if xs.size == 0:
        return 0, X, 0, Y
    x0, x1 = max(int(xs.min()) - margin, 0), min(int(xs.max()) + 1 + margin, X)
    y0, y1 = max(int(ys.min()) - margin, 0), min(int(ys.max()) + 1 + margin, Y)
    side = min(max(x1 - x0, y1 - y0), X, Y)

    def grow(a0, a1, n):
        extra = side - (a1 - a0)
        a0 = a0 - extra // 2
        a0 = min(max(a0, 0), n - side)
        return a0, a0 + side

    (x0, x1), (y0, y1) = grow(x0, x1, X), grow(y0, y1, Y)
    return x0, x1, y0, y1


# ---------------------------------------------------------------- labels

def label_counts(seg: np.ndarray, allowed: tuple[int, ...], name: str = "segmentation") -> dict[str, int]:
    """Voxels per label; raises InputError naming values outside the release's label set."""
    counts = {str(v): int(np.count_nonzero(seg == v)) for v in allowed}
    if sum(counts.values()) != seg.size:
        found = np.unique(seg)
        bad = [int(v) if float(v).is_integer() else float(v) for v in found if v not in allowed]
        raise InputError(f"{name} labels {bad} outside this release's set {list(allowed)}")
    return {k: c for k, c in counts.items() if c}
