"""The compiled side of preprocess/kernel.py (imported only when numba is installed; that module
explains why these loops give the numpy path's bytes on any CPU).

Compiled with numba's defaults plus `cache=True` (on disk, so worker processes load rather than
compile) and `nogil=True`; never `fastmath`, `error_model` or `parallel`: fastmath would let LLVM
reassociate the tap sums and contract multiply-adds into FMAs, and `parallel` would split work
in an order that depends on the machine.
"""

from __future__ import annotations

import numba
import numpy as np



def _jit(f):
    try:
        return numba.njit(cache=True, nogil=True)(f)
    except RuntimeError:  # numba finds no writable cache folder: compile in each process instead
        return numba.njit(nogil=True)(f)


@_jit
def half_bits(bits):
    """float32 bits (as an integer) -> IEEE binary16 bits, rounded to nearest, ties to even: the
    conversion numpy's `astype(np.float16)` does, in integer arithmetic only (numba has no float16
    on the CPU). Finite inputs give numpy's bits exactly (checked over all of them, tests); NaN and
    values rounding beyond 65504 become Inf (the recipe refuses a patient with either)."""
    a = np.int64(bits) & 0x7FFFFFFF
    sign = (np.int64(bits) >> 16) & 0x8000
    m = a - 0x38000000  # rebias the exponent from 127 to 15 (normal halves: a >= 2**-14)
    normal = (m + 0xFFF + ((m >> 13) & 1)) >> 13  # round the 13 dropped bits, ties to even
    shift = min(126 - (a >> 23), 31)  # subnormal halves (units of 2**-24): mantissa >> shift
    mant = (a & 0x7FFFFF) | 0x800000
    q = mant >> shift
    rem = mant & ((np.int64(1) << shift) - 1)
    halfway = np.int64(1) << (shift - 1)
    q += (rem > halfway) | ((rem == halfway) & (q & 1))
    out = q if a < 0x38800000 else normal
    if a >= 0x47800000:  # 2**16 and beyond (and Inf, NaN): Inf; 65520..65535 carry into Inf above
        out = 0x7C00
    return np.uint16(out | sign)


@_jit
def half_bits_array(x, out):
    """out[i] = half_bits of float32 x[i] (1-d, x's bits as uint32): what the tests compare with numpy."""
    bits = x.view(np.uint32)
    for i in range(bits.shape[0]):
        out[i] = half_bits(bits[i])


@_jit
def slices_kernel(vol, x0, y0, bx, by, zs, iy, wy, ix, wx, brain, mean, std, out32, out16, c):
    """Resize the slices zs of vol[x0:x0+bx, y0:y0+by] to (H, W) = (len(ix), len(iy)): along Y
    with taps (iy, wy), then along X with (ix, wx). With an empty `out16`: out32[s, c] = the
    resized slice (float32). Otherwise out16[s, c] = the float16 bits of
    (resized - mean[s] * brain[s, 0]) / std[s]. Loops are ordered so the inner one runs over
    independent pixels (vectorisable) while each pixel's taps are added in the fixed order."""
    W, Ty = iy.shape
    H, Tx = ix.shape
    normalise = out16.shape[0] > 0
    g = np.empty((by, bx), np.float32)  # the slice, transposed: X contiguous for the Y pass
    ty = np.empty((W, bx), np.float32)  # after the Y pass, transposed
    t = np.empty((bx, W), np.float32)  # after the Y pass
    row = np.empty(W, np.float32)
    rowbits = row.view(np.uint32)
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
                    row[j] = (row[j] - m * brain[s, 0, i, j]) / sd
                for j in range(W):
                    out16[s, c, i, j] = half_bits(rowbits[j])
            else:
                for j in range(W):
                    out32[s, c, i, j] = row[j]


@_jit
def brain_sums_kernel(flat, brain):
    """brain |= flat != 0; returns the exact int64 (sum, sum of squares) of `flat` (integers of at
    most 16 bits: |v|**2 <= 2**32, so fewer than 2**31 values cannot overflow; integer adds are
    exact, so any order, vectorised or not, gives the same sums)."""
    s = 0
    s2 = 0
    for i in range(flat.shape[0]):
        v = np.int64(flat[i])
        s += v
        s2 += v * v
        brain[i] |= v != 0
    return s, s2
