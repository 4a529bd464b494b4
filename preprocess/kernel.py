"""The per-slice image kernel of the recipe: gather the kept slices inside the crop box, resample
them in-plane (antialiased linear, `steps.resize_image`), normalise ((x - mean*B) / std, B the
resampled brain mask) into one float32 (S, M, size, size) buffer.

Two implementations that give identical bytes:
  * "numba": one compiled pass per slice (optional dependency: `pip install brats-shards[fast]`);
  * "numpy": the whole-array numpy steps (`steps.resize_image`), the reference and the fallback.
`BRATS_SHARDS_KERNEL=numba|numpy|auto` picks one (auto, the default: numba when it imports).

Why the compiled kernel gives the numpy path's bytes on any CPU. Every output value is computed
by the same sequence of IEEE-754 binary32 operations as in numpy, each correctly rounded:
  1. the voxel converted to float32 (exact for the integer inputs of BraTS; round-to-nearest-even
     otherwise, as numpy's cast);
  2. along Y (the last axis) then along X, per output pixel: p_t = float32(v_t * w_t) for the taps
     t in `_taps_of`'s order (the numpy path's taps, zero-weight ones included: they decide signed
     zeros), acc = p_0, then acc = float32(acc + p_t) -- one accumulator per pixel, never a
     reduction across pixels, so vectorising the pixel loop (any SIMD width) cannot reorder it;
  3. float32(float32(x - float32(mean * B)) / std).
The kernel is compiled without fastmath, so LLVM may not reassociate, use reciprocals or contract
a multiply and an add into an FMA (fusion needs the `contract` fast-math flag, which numba only
sets under fastmath; tests/test_kernel.py also checks the machine code holds no FMA instruction).
Even where a numba version would widen a float32 division to float64, the rounding back to float32
gives the same value: float64 carries more than 2*24+2 bits, so double rounding of +, -, *, / is
innocuous. The float32 -> float16 cast stays in numpy (round-to-nearest-even on every CPU).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from preprocess import steps

ENV = "BRATS_SHARDS_KERNEL"
CHOICES = ("auto", "numba", "numpy")


@functools.cache
def _numba_kernels():
    """The compiled kernels (slices, brain-and-sums), or None when numba is not installed
    (compiled on first call; cached on disk next to this module, so each worker process loads
    them instead of compiling)."""
    try:
        import numba
    except ImportError:
        return None
    jit = numba.njit(cache=True, nogil=True)
    return jit(_slices_kernel), jit(_brain_sums_kernel)


def _numba_kernel():
    kernels = _numba_kernels()
    return None if kernels is None else kernels[0]


def which() -> str:
    """The implementation in use: 'numba' or 'numpy' (from BRATS_SHARDS_KERNEL, default auto)."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "numpy":
        return "numpy"
    if _numba_kernel() is None:
        if choice == "numba":
            raise RuntimeError(f"{ENV}=numba but numba is not installed (pip install 'brats-shards[fast]')")
        return "numpy"
    return "numba"


def _taps_of(n_in: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The numpy path's taps for one axis, in its order: (size, T) int64 source indices and
    float32 weights. `resize_image` skips a plane already size x size: a single tap of weight 1
    gives the same bytes (x * 1.0 is exact)."""
    idx, w = steps._taps(n_in, size)
    keep = [k for k in range(idx.shape[1]) if np.any(w[:, k])]  # as `steps._resample_last`
    return np.ascontiguousarray(idx[:, keep]), np.ascontiguousarray(w[:, keep])


def _identity_taps(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(size, dtype=np.int64)[:, None], np.ones((size, 1), np.float32)


def _slices_kernel(vol, x0, y0, bx, by, zs, iy, wy, ix, wx, brain, mean, std, normalise, out, c):
    """out[s, c] = resize(vol[x0:x0+bx, y0:y0+by, zs[s]]) (float32), then when `normalise`:
    (out - mean[s] * brain[s, 0]) / std[s]. Loops are ordered so the inner one runs over
    independent pixels (vectorisable) while each pixel's taps are added in the fixed order."""
    W, Ty = iy.shape
    H, Tx = ix.shape
    g = np.empty((by, bx), np.float32)  # the slice, transposed: X contiguous for the Y pass
    ty = np.empty((W, bx), np.float32)  # after the Y pass, transposed
    t = np.empty((bx, W), np.float32)  # after the Y pass
    row = np.empty(W, np.float32)
    for s in range(zs.shape[0]):
        z = zs[s]
        for yy in range(by):
            for xx in range(bx):
                g[yy, xx] = np.float32(vol[x0 + xx, y0 + yy, z])
        for j in range(W):  # along Y
            k = iy[j, 0]
            w = wy[j, 0]
            for xx in range(bx):
                ty[j, xx] = g[k, xx] * w
            for tap in range(1, Ty):
                k = iy[j, tap]
                w = wy[j, tap]
                for xx in range(bx):
                    ty[j, xx] = ty[j, xx] + g[k, xx] * w
        for xx in range(bx):
            for j in range(W):
                t[xx, j] = ty[j, xx]
        m = mean[s]
        sd = std[s]
        for i in range(H):  # along X
            k = ix[i, 0]
            w = wx[i, 0]
            for j in range(W):
                row[j] = t[k, j] * w
            for tap in range(1, Tx):
                k = ix[i, tap]
                w = wx[i, tap]
                for j in range(W):
                    row[j] = row[j] + t[k, j] * w
            if normalise:
                for j in range(W):
                    out[s, c, i, j] = (row[j] - m * brain[s, 0, i, j]) / sd
            else:
                for j in range(W):
                    out[s, c, i, j] = row[j]


def _axis_taps(n_in: int, other_in: int, size: int):
    if (n_in, other_in) == (size, size):
        return _identity_taps(size)
    return _taps_of(n_in, size)


def _resize_numba(kern, canonical, box, z, size, out, c, brain=None, mean=None, std=None):
    x0, x1, y0, y1 = box
    bx, by = x1 - x0, y1 - y0
    iy, wy = _axis_taps(by, bx, size)
    ix, wx = _axis_taps(bx, by, size)
    if canonical.dtype == np.bool_:
        canonical = canonical.view(np.uint8)
    normalise = brain is not None
    if not normalise:
        brain, mean, std = out[:0], np.zeros(len(z), np.float32), np.ones(len(z), np.float32)
    kern(canonical, x0, y0, bx, by, z, iy, wy, ix, wx, brain, mean, std, normalise, out, c)


def _per_slice(v, n: int) -> np.ndarray:
    """A mean or std (a float32 scalar, or per slice (S, 1, 1)) as a float32 (S,) array."""
    return np.ascontiguousarray(np.broadcast_to(np.asarray(v, np.float32).reshape(-1), (n,)))


def resize_slices(canonical: np.ndarray, box, slice_index, size: int) -> np.ndarray:
    """Canonical (X, Y, Z) -> (S, size, size) float32: the slices `slice_index` inside the in-plane
    `box` (x0, x1, y0, y1), resampled (`Geometry.to_slices` for images)."""
    x0, x1, y0, y1 = box
    z = np.asarray(slice_index, np.int64).reshape(-1)
    kern = _numba_kernel() if which() == "numba" else None
    if kern is None:
        stack = np.empty((len(z), x1 - x0, y1 - y0), np.float32)
        for i, zi in enumerate(z):  # gather the kept slices and cast in one pass
            stack[i] = canonical[x0:x1, y0:y1, zi]
        return steps.resize_image(stack, size)
    out = np.empty((len(z), 1, size, size), np.float32)
    if len(z):
        _resize_numba(kern, canonical, box, z, size, out, 0)
    return out[:, 0]


def normalised_slices(images: list[np.ndarray], brain: np.ndarray, box, slice_index, size: int,
                      means: list, stds: list) -> np.ndarray:
    """(S, M, size, size) float32: for each canonical image, its slices resized, then
    (x - mean * B) / std with B the resized brain mask. `means[c]`, `stds[c]`: float32 scalars
    (volume statistics) or (S, 1, 1) float32 arrays (per slice). Resizing before normalising is
    `process_volumes`' choice (a quarter of the pixels); this function does exactly its arithmetic."""
    z = np.asarray(slice_index, np.int64).reshape(-1)
    kern = _numba_kernel() if which() == "numba" else None
    if kern is None:
        b_small = resize_slices(brain.view(np.uint8), box, z, size)
        chans = [(resize_slices(img, box, z, size) - m * b_small) / s for img, m, s in zip(images, means, stds)]
        return np.stack(chans, axis=1)
    S = len(z)
    b_small = np.empty((S, 1, size, size), np.float32)
    out = np.empty((S, len(images), size, size), np.float32)
    if S:
        _resize_numba(kern, brain, box, z, size, b_small, 0)
        for c, (img, m, s) in enumerate(zip(images, means, stds)):
            _resize_numba(kern, img, box, z, size, out, c, b_small, _per_slice(m, S), _per_slice(s, S))
    return out


# ---------------------------------------------------------------- brain mask and exact sums

def _brain_sums_kernel(flat, brain):
    """brain |= flat != 0; returns the exact int64 (sum, sum of squares) of `flat` (integers of at
    most 16 bits: |v|**2 < 2**32, so up to 2**31 values cannot overflow; integer adds are exact,
    so any order, vectorised or not, gives the same sums)."""
    s = 0
    s2 = 0
    for i in range(flat.shape[0]):
        v = np.int64(flat[i])
        s += v
        s2 += v * v
        brain[i] |= v != 0
    return s, s2


def _flat_layout(vols: list[np.ndarray]) -> str | None:
    """'C' or 'F' when every volume is contiguous that way with the same shape (so their flat
    views line up voxel for voxel), None otherwise."""
    shape = vols[0].shape
    for order, flag in (("F", "F_CONTIGUOUS"), ("C", "C_CONTIGUOUS")):
        if all(v.shape == shape and v.flags[flag] for v in vols):
            return order
    return None


def brain_and_sums(vols: list[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
    """The brain mask (voxels nonzero in any volume, `pipeline.brain_mask`) in the volumes' own
    axis order, and per volume its exact (sum, sum of squares) -- one compiled pass per volume
    when numba is in use and the volumes are contiguous integers of at most 16 bits; otherwise
    (None for the sums) the caller computes the statistics itself (`steps.brain_stats`)."""
    from preprocess.pipeline import brain_mask

    kernels = _numba_kernels() if which() == "numba" else None
    order = _flat_layout(vols)
    if kernels is None or order is None or any(v.dtype.kind not in "iu" or v.dtype.itemsize > 2 for v in vols) \
            or vols[0].size >= 2**31:
        return brain_mask(vols), None
    brain = np.zeros(vols[0].shape, np.uint8, order=order)
    flat_brain = brain.ravel(order=order)  # a view
    sums = [tuple(int(x) for x in kernels[1](v.ravel(order=order), flat_brain)) for v in vols]
    return brain.view(np.bool_), sums
