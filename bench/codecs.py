"""Choose the Zarr compressor by measurement: bytes on disk, write and whole-patient read speed.

    python bench/codecs.py [--data DIR] [--patients 2]

Uses synthetic full-size patients preprocessed at 128x128. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import zarr

from preprocess.discover import discover
from preprocess.config import PreprocessConfig
from preprocess.pipeline import process_patient
from preprocess.synthetic.toy import make_demo_data
from shards import zarr_io

CANDIDATES = ["none", "blosc-lz4:5", "blosc-zstd:1", "blosc-zstd:3", "blosc-zstd:5", "zstd:1", "zstd:3"]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "brats-shards-bench-data")
    ap.add_argument("--patients", type=int, default=2)
    args = ap.parse_args()
    if len(list(args.data.glob("BraTS20_Training_*"))) < args.patients:
        make_demo_data(args.data, args.patients, progress=True)
    pats = [process_patient(pf, PreprocessConfig()) for pf in discover(args.data).patients[: args.patients]]
    raw = sum(p.image.nbytes + p.mask.nbytes for p in pats)
    slices = sum(p.image.shape[0] for p in pats)
    rows = []
    for codec in CANDIDATES:
        tmp = Path(tempfile.mkdtemp())
        try:
            t0 = time.perf_counter()
            files = []
            for p in pats:
                files += zarr_io.write_patient(tmp / p.pid, p.image, p.mask, {}, codec)
            w = time.perf_counter() - t0
            nbytes = sum(f.stat().st_size for f in files)
            best = 1e9
            for _ in range(3):
                t0 = time.perf_counter()
                for p in pats:
                    g = zarr.open_group(str(tmp / p.pid), mode="r")  # zarr's own read: the peer
                    g["image"][:], g["mask"][:]
                best = min(best, time.perf_counter() - t0)
            direct = 1e9
            for _ in range(3):
                t0 = time.perf_counter()
                for p in pats:
                    zarr_io.read_zarr_patient(lambda rel: (tmp / rel).read_bytes() if (tmp / rel).exists() else None,
                                              p.pid, per_slice=True)
                direct = min(direct, time.perf_counter() - t0)
            rows.append({"codec": codec, "ratio": round(raw / nbytes, 2), "bytes_per_slice": nbytes // slices,
                         "write_MBps": round(raw / w / 1e6), "read_slices_per_s": round(slices / best),
                         "direct_decode_slices_per_s": round(slices / direct)})
        finally:
            shutil.rmtree(tmp)
        r = rows[-1]
        print(f"{codec:14s} ratio {r['ratio']:5.2f}  {r['bytes_per_slice']:7d} B/slice  write {r['write_MBps']:5d} MB/s"
              f"  read {r['read_slices_per_s']:6d} slices/s (zarr, whole patients)"
              f"  {r['direct_decode_slices_per_s']:6d} slices/s (direct decode)", flush=True)
    print(json.dumps({"raw_bytes_per_slice": raw // slices, "codecs": rows}))


if __name__ == "__main__":
    main()
