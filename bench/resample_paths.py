"""Candidate in-plane resampling paths for one full-size patient, timed side by side in one run
(issue "Build at the speed of decoding").

    python bench/resample_paths.py [--data DIR] [--repeats 7] [--size 128] [--crop]

The work is the build's: the first patient of DIR (default: /tmp/k_bench64 or bench/build.py's
folder if present, else one synthetic 240x240x155 patient in a temporary folder), reoriented,
its kept slices (and crop box with --crop) chosen by `preprocess.pipeline`, each of its
modalities resized in-plane to size x size (antialiased linear). Paths:
  numpy        the reference: `preprocess.kernel.resize_slices` with BRATS_SHARDS_KERNEL=numpy
  numba        the compiled kernel, resize only (same call, BRATS_SHARDS_KERNEL=numba)
  pillow       Pillow's C resampler per slice, float32 'F' images, BILINEAR (antialiased triangle)
  fixed-point  the reference's taps quantised to integers (2**14), exact int32/int64 sums, one
               float conversion at the end (numba: a vectorised numpy version, tried, was ~3x
               slower than the numpy reference)
Each path: median ms per patient, time ratios, max |diff| from the reference float32, and the
float16 values that differ after the project's normalisation + cast ((x - mean*B) / std, B the
reference's resized brain mask). Peer: the decode floor, `preprocess.nifti.decode_only` of the
patient's modality files. Last line: a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
from PIL import Image

from preprocess import kernel
from preprocess.discover import discover
from preprocess.nifti import decode_only
from preprocess.config import PreprocessConfig
from preprocess.pipeline import load_patient, prepare_volumes, validate
from preprocess.synthetic.toy import make_demo_data

DEFAULT_DATA = (Path("/tmp/k_bench64"), Path(tempfile.gettempdir()) / "brats-shards-bench-data")
FIXED_BITS = 14  # weight scale: each axis's weights sum to exactly 2**14


@contextlib.contextmanager
def kernel_choice(name: str):
    old = os.environ.get(kernel.ENV)
    os.environ[kernel.ENV] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ[kernel.ENV]
        else:
            os.environ[kernel.ENV] = old


def prepare(pf, root: Path, cfg: PreprocessConfig):
    """The build's own inputs to the image kernel (`pipeline.prepare_volumes`)."""
    vols, _ = load_patient(pf, root)
    validate(pf, vols)
    k = prepare_volumes(pf, vols, cfg)
    return k.images, k.brain, k.slice_index, k.geometry.crop_box, k.means, k.stds


# ---------------------------------------------------------------- the candidate paths

def resize_kernel(images, box, z, size, which: str) -> np.ndarray:
    with kernel_choice(which):
        return np.stack([kernel.resize_slices(img, box, z, size) for img in images], axis=1)


def resize_pillow(images, box, z, size) -> np.ndarray:
    x0, x1, y0, y1 = box
    out = np.empty((len(z), len(images), size, size), np.float32)
    for c, img in enumerate(images):
        for s, zi in enumerate(z):  # rows = X, columns = Y, as the reference's (X, Y) planes
            plane = Image.fromarray(img[x0:x1, y0:y1, zi].astype(np.float32))  # mode 'F'
            out[s, c] = np.asarray(plane.resize((size, size), Image.Resampling.BILINEAR))
    return out


def quantised_taps(n_in: int, other_in: int, size: int):
    """The reference's taps for one axis with integer weights summing to exactly 2**FIXED_BITS
    per output pixel (rounded; the largest tap absorbs the remainder)."""
    idx, w = kernel._axis_taps(n_in, other_in, size)
    wq = np.rint(w.astype(np.float64) * 2**FIXED_BITS).astype(np.int64)
    wq[np.arange(len(wq)), wq.argmax(axis=1)] += 2**FIXED_BITS - wq.sum(axis=1)
    return idx, wq.astype(np.int32)


@numba.njit(cache=False, nogil=True)
def _fixed_kernel(vol, x0, y0, bx, by, zs, iy, wy, ix, wx, inv_scale, out, c):
    """out[s, c] = resized slice zs[s] of vol[x0:x0+bx, y0:y0+by]: along Y in int32 (|v| * 2**14
    <= 2**29), along X in int64, then one float conversion. Integer sums are exact: the result
    does not depend on the order of the taps or the vector width."""
    W, Ty = iy.shape
    H, Tx = ix.shape
    g = np.empty((by, bx), np.int32)
    ty = np.zeros((W, bx), np.int32)
    t = np.empty((bx, W), np.int64)
    row = np.empty(W, np.int64)
    for s in range(zs.shape[0]):
        for yy in range(by):
            for xx in range(bx):
                g[yy, xx] = vol[x0 + xx, y0 + yy, zs[s]]
        ty[:] = 0
        for j in range(W):  # along Y
            for tap in range(Ty):
                k = iy[j, tap]
                w = wy[j, tap]
                for xx in range(bx):
                    ty[j, xx] += g[k, xx] * w
        for xx in range(bx):
            for j in range(W):
                t[xx, j] = ty[j, xx]
        for i in range(H):  # along X
            row[:] = 0
            for tap in range(Tx):
                k = ix[i, tap]
                w = np.int64(wx[i, tap])
                for j in range(W):
                    row[j] += t[k, j] * w
            for j in range(W):
                out[s, c, i, j] = np.float32(row[j] * inv_scale)  # int64 -> float64 exact, one rounding


def resize_fixed(images, box, z, size) -> np.ndarray:
    x0, x1, y0, y1 = box
    bx, by = x1 - x0, y1 - y0
    iy, wy = quantised_taps(by, bx, size)
    ix, wx = quantised_taps(bx, by, size)
    out = np.empty((len(z), len(images), size, size), np.float32)
    zs = np.asarray(z, np.int64)
    for c, img in enumerate(images):
        if img.dtype.kind not in "iu" or img.dtype.itemsize > 2:
            raise SystemExit(f"fixed-point path needs integer volumes of at most 16 bits, not {img.dtype}")
        _fixed_kernel(img, x0, y0, bx, by, zs, iy, wy, ix, wx, 2.0 ** (-2 * FIXED_BITS), out, c)
    return out


# ---------------------------------------------------------------- measuring

def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def as_float16(res32, b_small, means, stds) -> np.ndarray:
    """`kernel.normalise` (the numpy path's arithmetic) on already resized (S, M, H, W) float32."""
    return kernel.normalise([res32[:, c] for c in range(res32.shape[1])], b_small, means, stds)


def find_data(arg: Path | None, tmp: Path) -> Path:
    if arg is not None:
        return arg
    for d in DEFAULT_DATA:
        if d.is_dir() and discover(d).patients:
            return d
    print(f"generating one synthetic 240x240x155 patient in {tmp} ...", flush=True)
    make_demo_data(tmp, 1, shape=(240, 240, 155))
    return tmp


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="BraTS-layout folder (its first patient is used)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--crop", action="store_true", help="crop to the brain's square box first")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-resample-"))
    try:
        data = find_data(args.data, tmp)
        pf = discover(data).patients[0]
        cfg = PreprocessConfig(size=args.size, crop=args.crop)
        images, brain, z, box, means, stds = prepare(pf, data, cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = cfg.size
    paths = {
        "numpy": lambda: resize_kernel(images, box, z, size, "numpy"),
        "numba": lambda: resize_kernel(images, box, z, size, "numba"),
        "pillow": lambda: resize_pillow(images, box, z, size),
        "fixed-point": lambda: resize_fixed(images, box, z, size),
    }
    outputs = {name: fn() for name, fn in paths.items()}  # warm-up (compiles numba) and results
    ref32 = outputs["numpy"]
    with kernel_choice("numpy"):
        b_small = kernel.resize_slices(brain.view(np.uint8), box, z, size)
        ref16 = kernel.normalised_slices(images, brain, box, z, size, means, stds)
    assert np.array_equal(as_float16(ref32, b_small, means, stds).view(np.uint16), ref16.view(np.uint16))

    ms = {name: median_ms(fn, args.repeats) for name, fn in paths.items()}
    files = [str(pf.files[m]) for m in pf.release.modalities]
    decode_ms = median_ms(lambda: sum(decode_only(f) for f in files), args.repeats)

    rows = {}
    for name, out in outputs.items():
        diff16 = int(np.count_nonzero(as_float16(out, b_small, means, stds).view(np.uint16) != ref16.view(np.uint16)))
        rows[name] = {"ms": round(ms[name], 2), "ratio_to_numpy": round(ms[name] / ms["numpy"], 3),
                      "ratio_to_numba": round(ms[name] / ms["numba"], 3),
                      "max_abs_diff": float(np.max(np.abs(out - ref32))),
                      "f16_differing": diff16, "f16_total": int(ref16.size), "f16_identical": diff16 == 0}
    rows["decode floor"] = {"ms": round(decode_ms, 2), "ratio_to_numpy": round(decode_ms / ms["numpy"], 3),
                            "ratio_to_numba": round(decode_ms / ms["numba"], 3)}

    print(f"patient {pf.pid} from {data}: {len(images)} modalities, {len(z)} kept slices, box {tuple(box)} "
          f"-> {size}x{size}, median of {args.repeats}; ratios are time / time of the path named")
    print(f"{'path':<13} {'ms/patient':>10} {'/numpy':>7} {'/numba':>7} {'max|diff|':>10} {'f16 differing':>20}")
    for name, r in rows.items():
        tail = (f" {r['max_abs_diff']:>10.3g} {r['f16_differing']:>9,d} / {r['f16_total']:,d}"
                if "max_abs_diff" in r else f" {'(inflate ' + str(len(files)) + ' .nii.gz)':>31}")
        print(f"{name:<13} {r['ms']:>10.1f} {r['ratio_to_numpy']:>7.2f} {r['ratio_to_numba']:>7.2f}{tail}")
    print(json.dumps({"patient": pf.pid, "data": str(data), "modalities": len(images), "slices": int(len(z)),
                      "box": [int(v) for v in box], "size": size, "repeats": args.repeats, "paths": rows,
                      "numba_mode": "resize only (float32), no normalise/cast",
                      "pillow_filter": "Image.Resampling.BILINEAR on mode 'F', no reducing_gap",
                      "fixed_point": {"impl": "numba", "weight_bits": FIXED_BITS, "accumulate": "int32 (Y), int64 (X)"},
                      "decode_floor_files": len(files), "cpu_count": os.cpu_count(), "numpy": np.__version__,
                      "numba": numba.__version__, "pillow": Image.__version__}))


if __name__ == "__main__":
    main()
