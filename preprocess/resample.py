"""In-plane resampling, both ways, with the taps each way uses.

The way there (`Geometry.to_slices`): images by antialiased linear (triangle) resampling
(`taps`, `resize_image`; `preprocess.kernel` runs the same taps compiled), labels by nearest
neighbour at pixel centres (`resize_labels`). The way back (`Geometry.from_slices`, predict):
probabilities by plain bilinear interpolation (`linear_taps`, `bilinear`), as torch's
`interpolate(mode="bilinear", align_corners=False)` computes it, in numpy.

Every output value is a fixed-order sum of elementwise float32 products (no BLAS, no SIMD
reductions), so the bytes do not depend on the CPU.
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------- the way there


def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Antialiased linear (triangle) resampling from n_in to n_out samples: (n_out, T) int64
    source indices and float32 weights, T the taps that carry weight for some output (a tap
    column of zeros everywhere is left out; zero weights of a kept column stay, in order: they
    decide signed zeros). The order of the columns is the order of the sum."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # widen the triangle when shrinking: antialiasing
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    k = int(np.ceil(support)) * 2 + 1
    first = np.floor(centres - support).astype(np.int64) + 1
    idx = first[:, None] + np.arange(k)[None, :]
    w = np.maximum(0.0, 1.0 - np.abs(idx - centres[:, None]) / support)
    w /= w.sum(axis=1, keepdims=True)
    w = w.astype(np.float32)
    used = [j for j in range(k) if np.any(w[:, j])]
    return np.ascontiguousarray(np.clip(idx, 0, n_in - 1)[:, used]), np.ascontiguousarray(w[:, used])


def _resample_last(arr: np.ndarray, n_out: int) -> np.ndarray:
    """Resample the last axis of a float32 array: out = sum_t w_t * arr[..., idx_t], t in `taps`'
    order (elementwise multiply and add only: identical bytes on any CPU)."""
    idx, w = taps(arr.shape[-1], n_out)
    out = np.empty(arr.shape[:-1] + (n_out,), np.float32)
    tmp = np.empty_like(out)
    for t in range(idx.shape[1]):
        dst = out if t == 0 else tmp
        np.take(arr, idx[:, t], axis=-1, out=dst, mode="clip")  # "clip": unbuffered (indices are in range)
        np.multiply(dst, w[:, t], out=dst)
        if t:
            np.add(out, tmp, out=out)
    return out


def resize_image(arr: np.ndarray, size: int) -> np.ndarray:
    """Smooth (antialiased linear) in-plane resize of (..., X, Y) to (..., size, size), float32."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.shape[-2:] == (size, size):
        return arr
    out = _resample_last(arr, size)  # along Y
    out = _resample_last(np.ascontiguousarray(np.swapaxes(out, -1, -2)), size)  # along X
    return np.ascontiguousarray(np.swapaxes(out, -1, -2))


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resize_labels(arr: np.ndarray, size: int) -> np.ndarray:
    """Label-preserving in-plane resize (nearest neighbour at pixel centres) of (..., X, Y)."""
    ix, iy = nearest_index(arr.shape[-2], size), nearest_index(arr.shape[-1], size)
    return arr[..., ix[:, None], iy[None, :]]


# ---------------------------------------------------------------- the way back

def linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from n_in to n_out samples with half-pixel centres (align_corners
    False): per output index the two source indices and their float32 weights, computed in float32
    as torch's `interpolate(mode="bilinear")` computes them."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                     np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, np.float32(1) - w1, w1


def bilinear(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., H, W) float32 -> (..., height, width): each output pixel the weighted sum of its two
    rows of its two columns' weighted sums, in that order (as torch sums them)."""
    r0, r1, a0, a1 = linear_taps(arr.shape[-2], height)
    c0, c1, b0, b1 = linear_taps(arr.shape[-1], width)
    rows = arr[..., c0] * b0 + arr[..., c1] * b1  # (..., H, width)
    return rows[..., r0, :] * a0[:, None] + rows[..., r1, :] * a1[:, None]
