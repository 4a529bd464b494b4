"""Random fields, rotations and quantile cuts shared by the realistic generator's models."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi


def rotation(angles_deg) -> np.ndarray:
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_rotation(rng) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def noise_field(rng, shape, corr: float) -> np.ndarray:
    """Smooth zero-mean, unit-sd random field with a correlation length of about `corr` voxels."""
    shape = tuple(int(n) for n in shape)
    if corr <= 2.0:
        f = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), max(corr, 0.5), truncate=3.0)
    else:
        step = corr / 1.5
        small = tuple(max(2, int(math.ceil(n / step)) + 1) for n in shape)
        f = ndi.gaussian_filter(rng.standard_normal(small, dtype=np.float32), 1.0, mode="wrap")
        f = ndi.zoom(f, [n / m for n, m in zip(shape, small)], order=1, grid_mode=True, mode="nearest")
        f = f[tuple(slice(0, n) for n in shape)]
    sd = float(f.std())
    return f / sd if sd > 0 else f


def lowest(values: np.ndarray, n: int) -> float:
    """Threshold t such that about n of `values` are < t (inf when n >= len)."""
    if n <= 0 or values.size == 0:
        return -np.inf
    if n >= values.size:
        return np.inf
    return float(np.partition(values, n)[n])


def block_reduce(a: np.ndarray, k: int, fn) -> np.ndarray:
    if k == 1:
        return a
    pad = [(0, (-n) % k) for n in a.shape]
    a = np.pad(a, pad, mode="edge")
    s = a.shape
    return fn(a.reshape(s[0] // k, k, s[1] // k, k, s[2] // k, k), axis=(1, 3, 5))


def box(centre, half, lo, hi):
    a = np.maximum(np.floor(centre - half).astype(int), lo)
    b = np.minimum(np.ceil(centre + half).astype(int) + 1, hi)
    return a, b
