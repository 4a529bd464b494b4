"""What every shard reader checks, whatever the format: the contract's limits on one patient's
arrays, the slice shapes and data types, and the one error a malformed file raises.

Shard sets are shared between colleagues: every byte read is untrusted. Each read is bounded by
what the manifest promises (`n_slices`) and by the contract: image float16 (S, M<=4, H, W), mask
uint8 (S, K<=16, H, W) (M and K the set's, checked against its manifest by
`shards.source.ShardSource.read_patient`), H = W <= 1024. A malformed file is a
`ShardFormatError` (one line, naming the file), never a memory blow-up, an unpickled object or a
decoder's traceback.
"""

from __future__ import annotations

import numpy as np

from shards import layout
from shards.errors import BratsShardsError

MAX_IMAGE_CHANNELS = 4  # the modalities T1, T1Gd, T2, FLAIR, or a subset (MEN-RT: T1Gd alone)
MAX_MASK_CHANNELS = 16
MAX_SIDE = 1024
MAX_META_BYTES = layout.MAX_META_BYTES
MAX_PATIENT_ARRAY_BYTES = 4 << 30  # one decoded array of one patient (BraTS at 240x240: 36 MB)
MAX_NPY_HEADER = 4096  # numpy writes 128-byte headers
ZARR_DTYPES = {"image": "float16", "mask": "uint8"}
NPY_DTYPES = {"image": np.dtype("<f2"), "mask": np.dtype("|u1")}


class ShardFormatError(BratsShardsError, ValueError):
    """Malformed shard content; the message is one line and names the file."""


def short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def slice_shape_problem(name: str, shape) -> str | None:
    """Why `shape` is not the contract's (C, H, W) of one `name` ('image' or 'mask') slice."""
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(type(v) is int for v in shape)):
        return f"shape {short(shape)} is not three integers (channels, H, W)"
    c, h, w = shape
    if name == "image" and not 1 <= c <= MAX_IMAGE_CHANNELS:
        return f"{name} has {c} channels; the contract has 1 to {MAX_IMAGE_CHANNELS}"
    if name == "mask" and not 1 <= c <= MAX_MASK_CHANNELS:
        return f"{name} has {c} channels; the contract has 1 to {MAX_MASK_CHANNELS}"
    if h != w or not 1 <= h <= MAX_SIDE:
        return f"{name} slices are {h}x{w}; the contract has square slices of at most {MAX_SIDE}x{MAX_SIDE}"
    return None
