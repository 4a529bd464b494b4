"""The per-slice image kernel of the recipe: gather the kept slices inside the crop box, resample
them in-plane (antialiased linear, `resample.resize_image`), normalise ((x - mean*B) / std, B the
resampled brain mask) and cast to float16: the (S, M, size, size) image of a patient's shards.
Also the brain mask with each volume's exact integer sums (`brain_and_sums`).

Two implementations that give identical bytes:
  * "numba": one compiled pass per slice (optional dependency: `pip install brats-shards[fast]`);
  * "numpy": the whole-array numpy steps (`resample.resize_image`), the reference and the fallback.
`BRATS_SHARDS_KERNEL=numba|numpy|auto` picks one (auto, the default: numba when it imports).

Why the compiled kernel gives the numpy path's bytes on any CPU. Every output value is computed
by the same sequence of IEEE-754 binary32 operations as in numpy, each correctly rounded:
  1. the voxel converted to float32 (exact for the integer inputs of BraTS; round-to-nearest-even
     otherwise, as numpy's cast);
  2. along Y (the last axis) then along X, per output pixel: p_t = float32(v_t * w_t) for the taps
     t in `resample.taps`' order (the numpy path's taps, zero-weight ones included: they decide
     signed zeros), acc = p_0, then acc = float32(acc + p_t) -- one accumulator per pixel, never a
     reduction across pixels, so vectorising the pixel loop (any SIMD width) cannot reorder it;
  3. float32(float32(x - float32(mean * B)) / std);
  4. the cast to float16, round-to-nearest-even, done in integer arithmetic on the float32's bits
     (`kernel_numba.half_bits`; numba has no CPU float16): for every finite float32 it gives
     numpy's bits (all 2**32 bit patterns compared once; tests compare a dense sample), so it has
     no CPU dependence at all. NaN and overflow become Inf, which the recipe refuses either way.
The kernel is compiled without fastmath, so LLVM may not reassociate, use reciprocals or contract
a multiply and an add into an FMA (fusion needs the `contract` fast-math flag, which numba only
sets under fastmath; tests/test_kernel.py also checks the machine code holds no FMA instruction).
Even where a numba version would widen a float32 division to float64, the rounding back to float32
gives the same value: float64 carries more than 2*24+2 bits, so double rounding of +, -, *, / is
innocuous. The numpy path's numpy cast to float16 is itself correctly rounded on every CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

from preprocess import resample, steps

ENV = "BRATS_SHARDS_KERNEL"
CHOICES = ("auto", "numba", "numpy")


@functools.cache
def _numba_kernels():
    """The compiled kernels (preprocess/kernel_numba.py: slices, brain-and-sums), or None when
    numba is not installed (compiled on first call; cached on disk next to the module, so each
    worker process loads them instead of compiling)."""
    if importlib.util.find_spec("numba") is None:
        return None
    from preprocess import kernel_numba  # inside: numba is optional (numpy does the same bytes)

    return kernel_numba.slices_kernel, kernel_numba.brain_sums_kernel


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


def _identity_taps(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(size, dtype=np.int64)[:, None], np.ones((size, 1), np.float32)


def _axis_taps(n_in: int, other_in: int, size: int):
    """The taps of one axis (`resample.taps`). `resize_image` skips a plane already size x size:
    a single tap of weight 1 gives the same bytes (x * 1.0 is exact)."""
    if (n_in, other_in) == (size, size):
        return _identity_taps(size)
    return resample.taps(n_in, size)


def _resize_numba(kern, canonical, box, z, size, out32, c, brain=None, mean=None, std=None, out16=None):
    """Run the compiled kernel: resized float32 into out32[:, c], or (with brain, mean, std) the
    normalised float16 bits into out16[:, c]."""
    x0, x1, y0, y1 = box
    bx, by = x1 - x0, y1 - y0
    iy, wy = _axis_taps(by, bx, size)
    ix, wx = _axis_taps(bx, by, size)
    if canonical.dtype == np.bool_:
        canonical = canonical.view(np.uint8)
    if brain is None:
        brain, mean, std = out32[:0], np.zeros(len(z), np.float32), np.ones(len(z), np.float32)
        out16 = np.empty((0,) + out32.shape[1:], np.uint16)
    kern(canonical, x0, y0, bx, by, z, iy, wy, ix, wx, brain, mean, std, out32, out16, c)


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
        return resample.resize_image(stack, size)
    out = np.empty((len(z), 1, size, size), np.float32)
    if len(z):
        _resize_numba(kern, canonical, box, z, size, out, 0)
    return out[:, 0]


def normalised_slices(images: list[np.ndarray], brain: np.ndarray, box, slice_index, size: int,
                      means: list, stds: list) -> np.ndarray:
    """(S, M, size, size) float16: for each canonical image, its slices resized, then
    (x - mean * B) / std with B the resized brain mask, cast to float16 (values beyond its range
    become Inf, which the caller refuses). `means[c]`, `stds[c]`: float32 scalars (volume
    statistics) or (S, 1, 1) float32 arrays (per slice). Resizing before normalising is
    `process_volumes`' choice (a quarter of the pixels); this function does exactly its arithmetic."""
    z = np.asarray(slice_index, np.int64).reshape(-1)
    kern = _numba_kernel() if which() == "numba" else None
    if kern is None:
        b_small = resize_slices(brain.view(np.uint8), box, z, size)
        return normalise([resize_slices(img, box, z, size) for img in images], b_small, means, stds)
    S = len(z)
    b_small = np.empty((S, 1, size, size), np.float32)
    out = np.empty((S, len(images), size, size), np.float16)
    if S:
        _resize_numba(kern, brain, box, z, size, b_small, 0)
        for c, (img, m, s) in enumerate(zip(images, means, stds)):
            _resize_numba(kern, img, box, z, size, b_small, c, b_small, _per_slice(m, S), _per_slice(s, S),
                          out.view(np.uint16))
    return out


def normalise(resized: list[np.ndarray], b_small: np.ndarray, means: list, stds: list) -> np.ndarray:
    """The numpy path's arithmetic on resized slices: per modality (x - mean * B) / std with B the
    resized brain mask, stacked to (S, M, size, size) and cast to float16 (overflow: Inf)."""
    chans = [(x - m * b_small) / s for x, m, s in zip(resized, means, stds)]
    with np.errstate(over="ignore"):
        return np.stack(chans, axis=1).astype(np.float16)


# ---------------------------------------------------------------- brain mask and exact sums

def _flat_layout(vols: list[np.ndarray]) -> str | None:
    """'C' or 'F' when every volume is contiguous that way with the same shape (so their flat
    views line up voxel for voxel), None otherwise."""
    shape = vols[0].shape
    for order, flag in (("F", "F_CONTIGUOUS"), ("C", "C_CONTIGUOUS")):
        if all(v.shape == shape and v.flags[flag] for v in vols):
            return order
    return None


def brain_and_sums(vols: list[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int]] | None]:
    """The brain mask (voxels nonzero in any volume, `steps.brain_mask`) in the volumes' own
    axis order, and per volume its exact (sum, sum of squares) -- one compiled pass per volume
    when numba is in use and the volumes are contiguous integers of at most 16 bits; otherwise
    (None for the sums) the caller computes the statistics itself (`steps.brain_stats`)."""
    kernels = _numba_kernels() if which() == "numba" else None
    order = _flat_layout(vols)
    if kernels is None or order is None or any(v.dtype.kind not in "iu" or v.dtype.itemsize > 2 for v in vols) \
            or vols[0].size >= 2**31:
        return steps.brain_mask(vols), None
    brain = np.zeros(vols[0].shape, np.uint8, order=order)
    flat_brain = brain.ravel(order=order)  # a view
    sums = [tuple(int(x) for x in kernels[1](v.ravel(order=order), flat_brain)) for v in vols]
    return brain.view(np.bool_), sums
