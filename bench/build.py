"""Build throughput against the decode floor, measured side by side in one run.

    python bench/build.py --patients 32 --workers 2 [--data DIR] [--scaling]

The decode floor is the time to only read and inflate the same `.nii.gz` inputs with the same
number of worker processes. Last line: a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

from preprocess.discover import discover
from preprocess.nifti import decode_only
from preprocess.config import PreprocessConfig
from preprocess.synthetic.toy import make_demo_data
from preprocess.build import BuildConfig, build


def _decode_patient(paths, stdlib=False):
    return sum(decode_only(p, stdlib) for p in paths)


def _decode_patient_stdlib(paths):
    return _decode_patient(paths, True)


def decode_floor(patients, workers: int, stdlib: bool = False) -> float:
    jobs = [[str(p) for p in pf.files.values()] for pf in patients]
    fn = _decode_patient_stdlib if stdlib else _decode_patient
    t0 = time.perf_counter()
    if workers <= 1:
        for j in jobs:
            fn(j)
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(fn, jobs, chunksize=1)
    return time.perf_counter() - t0


def time_build(data: Path, n: int, workers: int, cfg: BuildConfig) -> dict:
    subset = Path(tempfile.mkdtemp(prefix="bench-in-"))
    out = Path(tempfile.mkdtemp(prefix="bench-out-")) / "shards"
    try:
        for pf in discover(data).patients[:n]:
            os.symlink(pf.files["t1"].parent, subset / pf.pid)
        patients = discover(subset).patients
        floor = decode_floor(patients, workers)
        floor_zlib = decode_floor(patients, workers, stdlib=True)
        t0 = time.perf_counter()
        r = build(subset, out, cfg, workers=workers, progress=False)
        wall = time.perf_counter() - t0
        m = r.manifest
        return {"patients": n, "workers": workers, "build_s": round(wall, 3), "decode_floor_s": round(floor, 3),
                "ratio": round(wall / floor, 2), "s_per_patient": round(wall / n, 3),
                "decode_floor_stdlib_zlib_s": round(floor_zlib, 3), "ratio_vs_stdlib_zlib_floor": round(wall / floor_zlib, 2),
                "task_s_mean": round(sum(r.task_seconds) / n, 3),
                "peak_rss_mb_per_worker": round(max(r.peak_rss_mb), 1),
                "bytes_out": sum(f["bytes"] for f in m["files"]), "failed": len(m["failed"])}
    finally:
        shutil.rmtree(subset, ignore_errors=True)
        shutil.rmtree(out.parent, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "brats-shards-bench-data",
                    help="synthetic full-size release (generated on first use, then reused)")
    ap.add_argument("--shape", default="240,240,155")
    ap.add_argument("--scaling", action="store_true", help="also 8/16/32 patients x 1/2 workers")
    ap.add_argument("--format", default="both", choices=["zarr", "wds", "both"])
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    have = len(list(args.data.glob("BraTS20_Training_*"))) if args.data.exists() else 0
    if have < args.patients:
        print(f"generating {args.patients} synthetic patients of shape {shape} in {args.data} ...", flush=True)
        make_demo_data(args.data, args.patients, shape=shape, progress=True)
    formats = ("zarr", "wds") if args.format == "both" else (args.format,)
    cfg = BuildConfig(preprocess=PreprocessConfig(), formats=formats)
    runs = []
    grid = [(n, w) for n in (8, 16, 32) for w in (1, 2)] if args.scaling else [(args.patients, args.workers)]
    for n, w in grid:
        r = time_build(args.data, n, w, cfg)
        runs.append(r)
        print(f"patients={r['patients']:3d} workers={r['workers']} build={r['build_s']:7.2f}s "
              f"decode floor={r['decode_floor_s']:6.2f}s (stdlib zlib {r['decode_floor_stdlib_zlib_s']:.2f}s) ratio={r['ratio']:5.2f} "
              f"s/patient={r['s_per_patient']:.3f} task mean={r['task_s_mean']:.3f}s "
              f"peak RSS/worker={r['peak_rss_mb_per_worker']:.0f} MB", flush=True)
    main_run = next((r for r in runs if r["patients"] == args.patients and r["workers"] == args.workers), runs[-1])
    from preprocess.kernel import which

    result = dict(main_run, machine=f"{os.cpu_count()} cores", kernel=which(), runs=runs)
    if args.scaling:
        per = {w: [r for r in runs if r["workers"] == w] for w in (1, 2)}
        sp = {w: (per[w][-1]["build_s"] - per[w][0]["build_s"]) / (per[w][-1]["patients"] - per[w][0]["patients"])
              for w in per}
        result["marginal_s_per_patient"] = {str(w): round(v, 3) for w, v in sp.items()}
        result["extrapolated_min"] = {f"brats2020_369_w{w}": round(369 * v / 60, 1) for w, v in sp.items()}
        result["extrapolated_min"].update({f"brats2021_1251_w{w}": round(1251 * v / 60, 1) for w, v in sp.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
