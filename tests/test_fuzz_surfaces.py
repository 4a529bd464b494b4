"""Fuzzing the input surfaces besides the shard readers (those are tests/test_fuzz.py): every command
is run, as a user would run it, on seeded random hostile or careless variants of

  - release folders and `--release` (stray folders, colliding MSD ids, contradicting releases,
    deep trees, symlink loops, overflowing scl_slope, gzip bombs) -> `build-shards`;
  - a finished build whose inputs changed (bytes, size, mtime, patients) -> `build-shards` again;
  - checkpoint fields (config, tensors, post-processing, channels, loader position, history, RNG)
    and whole checkpoint files -> `predict`, `export`, `train --resume`;
  - prediction label values (another release's labels, floats, out-of-set values, NaN) and flat
    reference folders of another release -> `evaluate`;
  - HTTP servers that stall, trickle, lie about lengths, fail or answer with big error bodies,
    reached through a URL that carries a password -> `train URL`.

Each case runs in a worker process under an address-space limit and a time limit, through the CLI
(typer's runner, in process). It must end with exit 0, 1 (patients named) or 2 (one `error:` line),
never an exception, a traceback, a hang or a write outside the folders the command was given; a
URL's password never appears in what is printed or stored. Where the right answer is known, it is
checked too (a contradicting `--release` refused, a changed source rebuilt, an out-of-set label not
scored, an impossible checkpoint refused, a tampered loader position refused).

Reproduce one case: `python tests/test_fuzz_surfaces.py --worker BASE SCRATCH SEED SURFACE:CASE`.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("FUZZ_SEED", 20261203))
AS_LIMIT = 4 << 30
CASE_SECONDS = 60
# cases per surface: kept small, each runs a whole command
CASES = {"build": 14, "rebuild": 8, "checkpoint": 14, "evaluate": 16, "remote": 7}
PASSWORD = "pw-s3cr3t-9731"
ODD = ["x", "", [], {}, None, True, -1, 0, 1.5, 2**63, 10**30, 1e308, float("inf"), float("nan"), -3,
       "../../esc", [1, 2], {"a": 1}]
RELEASES = ["2020", "2023", "gli-2024", "men", "met", "ssa", "ped-2023", "ped-2024", "men-rt", "msd"]
# --release values a folder of each release may be read as (same names and labels, or a superset)
COMPATIBLE = {"2020": {"2020"}, "2023": {"2023", "gli-2024"}, "msd": {"msd"}, "ped-2024": {"ped-2024", "ped-2023"},
              "men": {"men"}}


# -- helpers run inside the worker ----------------------------------------------------------------------

def _snapshot(top: Path) -> dict:
    """path -> (size, mtime_ns) of every file and symlink below `top` (links not followed; an
    explicit stack, not os.walk, which recurses on Python 3.11 and the trees here can be deep)."""
    out, stack = {}, [str(top)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            else:
                st = e.stat(follow_symlinks=False)
                out[e.path] = (st.st_size, st.st_mtime_ns)
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _nib():
    import nibabel as nib

    return nib


def _invoke(argv: list[str]) -> dict:
    """Run the CLI in process: exit code, stdout, stderr, an exception other than exit, seconds."""
    from typer.testing import CliRunner

    from cli import app

    t0 = time.perf_counter()
    r = CliRunner().invoke(app, [str(a) for a in argv])
    exc = None
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        exc = "".join(traceback.format_exception(r.exception))[-1500:]
    return {"code": r.exit_code, "out": r.stdout[-3000:], "err": r.stderr[-3000:], "exc": exc,
            "seconds": round(time.perf_counter() - t0, 2)}


# -- surface: release folders -> build-shards -----------------------------------------------------------

def _rewrite(path: Path, fn) -> None:
    """Load a NIfTI, let fn change (data, header) and save it back under the same name."""
    nib = _nib()
    img = nib.load(str(path))
    data, hdr = fn(np_asarray(img), img.header.copy())
    nib.save(nib.Nifti1Image(data, img.affine, hdr), str(path))


def _patch_slope(path: Path, slope: float) -> None:
    """Write scl_slope into the header bytes (offset 112): nibabel recomputes it when it saves."""
    import struct

    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    raw = raw[:112] + struct.pack("<ff", slope, 0.0) + raw[120:]
    path.write_bytes(gzip.compress(raw, 1) if path.name.endswith(".gz") else raw)


def np_asarray(img):
    import numpy as np

    return np.asarray(img.dataobj)


def _gzip_bomb(path: Path) -> None:
    """A float64 volume whose header promises 1024x1024x512 voxels (4 GiB, past the worker's
    address-space limit) of zeros: concatenated gzip members of one compressed block, ~4 MB on disk."""
    import numpy as np

    nib = _nib()
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1024, 1024, 512))
    hdr.set_data_dtype(np.float64)
    hdr.set_qform(np.eye(4), 1)
    hdr.set_sform(np.eye(4), 1)
    block = gzip.compress(b"\0" * (1 << 24), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(hdr.binaryblock + b"\0" * 4))
        for _ in range(256):
            f.write(block)


def _patients(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def build_case(base: Path, work: Path, rng: random.Random) -> dict:
    rel = rng.choice(["2020", "2023", "msd", "ped-2024", "men"])
    inp = work / "input"
    shutil.copytree(base / f"rel-{rel}", inp, symlinks=True)
    files = sorted(p for p in inp.rglob("*.nii*") if p.is_file())
    what = rng.choice(["plain", "stray-seg", "atlas", "deep", "loop", "slope", "bomb", "msd-dup", "msd-ts",
                       "out-symlink", "release"])
    given = None
    if what == "stray-seg":  # a folder holding only a segmentation
        seg = next(p for p in files if "seg" in p.name or "label" in str(p))
        (inp / "stray").mkdir()
        shutil.copy(seg, inp / "stray" / seg.name)
    elif what == "atlas":
        (inp / "atlas").mkdir()
        shutil.copy(files[0], inp / "atlas" / "mni152.nii.gz")
    elif what == "deep":
        d = inp
        for _ in range(rng.choice([60, 1100])):  # 1,100: past Python's recursion limit (os.makedirs too)
            d = d / "d"
            d.mkdir()
        src = _patients(inp)[0] if rel != "msd" else None
        if src is not None:
            shutil.copytree(src, d / src.name.replace("1", "9", 1))
    elif what == "loop":
        os.symlink("..", inp / "loop")
    elif what == "slope":  # one modality overflows to Inf after scaling
        img = next(p for p in files if not any(k in p.name for k in ("seg", "label")) and "labelsTr" not in str(p))

        def ints(data, hdr):
            hdr.set_data_dtype("int16")
            return (data.astype("float32") % 1000 + 1000).astype("int16"), hdr
        _rewrite(img, ints)
        _patch_slope(img, 1e38)
    elif what == "bomb":
        img = next(p for p in files if not any(k in p.name for k in ("seg", "label")) and "labelsTr" not in str(p))
        _gzip_bomb(img)
    elif what == "msd-dup" and rel == "msd":
        img = sorted((inp / "imagesTr").glob("*.nii.gz"))[0]
        shutil.copy(sorted((inp / "imagesTr").glob("*.nii.gz"))[1], img.with_name(img.name[:-3]))
    elif what == "msd-ts" and rel == "msd":
        (inp / "imagesTs").mkdir(exist_ok=True)
        img = sorted((inp / "imagesTr").glob("*.nii.gz"))[0]
        shutil.copy(img, inp / "imagesTs" / img.name)
    if what in ("msd-dup", "msd-ts") and rel != "msd":
        what = "plain"
    if what == "release" or rng.random() < 0.35:
        given = rng.choice(RELEASES + ["2024", "GLI", "../x"])
    elif rel == "ped-2024":  # PED folders need it: 2023 and 2024 share names, not labels
        given = "ped-2024"
    out = work / "out"
    if what == "out-symlink":  # OUTPUT/wds points elsewhere: a build must never write or delete there
        outside = work / "outside"
        outside.mkdir()
        (outside / "keep.tar").write_bytes(b"precious")
        out.mkdir()
        os.symlink(outside, out / "wds")
    argv = ["build-shards", inp, out, "--size", "16", "--workers", "0", "--quiet"]
    if given:
        argv += ["--release", given]
    return {"argv": argv, "rel": rel, "what": what, "given": given, "allowed": [str(out)], "top": str(work)}


def build_check(case: dict, res: dict) -> list[str]:
    bad = []
    given, rel = case["given"], case["rel"]
    if res["code"] == 0 and given and given not in COMPATIBLE.get(rel, {rel}):
        bad.append(f"--release {given} accepted for a {rel} folder")
    manifest = Path(case["allowed"][0]) / "manifest.json"
    if res["code"] == 2 and given and given not in COMPATIBLE.get(rel, {rel}) and manifest.exists():
        bad.append("refused release, but a manifest was written")
    if res["code"] in (0, 1) and manifest.exists():
        m = json.loads(manifest.read_text())
        if given is None and m["config"]["convention"] not in COMPATIBLE.get(rel, {rel}):
            bad.append(f"{rel} folder built as {m['config']['convention']}")
        if case["what"] in ("slope", "bomb") and not m["failed"]:
            bad.append(f"{case['what']}: no patient failed")
        if case["what"] == "slope" and "NaN or Inf" not in json.dumps(m["failed"]):
            bad.append(f"an overflowing scl_slope failed for another reason: {json.dumps(m['failed'])[:200]}")
        if case["what"] in ("msd-dup",) and not m["failed"]:
            bad.append("colliding MSD ids: no patient failed")
    if case["what"] == "out-symlink" and res["code"] == 0:
        bad.append("built through a symlinked OUTPUT/wds")
    return bad


# -- surface: a finished build whose inputs change -> build-shards again ---------------------------------

def rebuild_case(base: Path, work: Path, rng: random.Random) -> dict:
    inp, out = work / "input", work / "out"
    shutil.copytree(base / "rel-2020", inp)
    shutil.copytree(base / "built-2020", out)
    # the copies' mtimes differ from the build's records: put them back as the build saw them
    for p in inp.rglob("*"):
        src = base / "rel-2020" / p.relative_to(inp)
        os.utime(p, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))
    pats = _patients(inp)
    victim = rng.choice(pats)
    mod = rng.choice(sorted(victim.glob("*.nii.gz")))
    what = rng.choice(["bytes", "bytes-same-size", "touch", "remove", "add", "none"])
    if what in ("bytes", "bytes-same-size"):
        st = mod.stat()

        def bump(data, hdr):
            data = data.copy()
            data[data.shape[0] // 2] = data[data.shape[0] // 2] + 7
            return data, hdr
        _rewrite(mod, bump)
        if what == "bytes-same-size":  # same size and mtime as before: only a hash can tell
            with open(mod, "r+b") as f:
                f.truncate(st.st_size)
            os.utime(mod, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif what == "touch":
        os.utime(mod, (time.time() + 100, time.time() + 100))
    elif what == "remove":
        shutil.rmtree(victim)
    elif what == "add":
        shutil.copytree(victim, inp / "BraTS20_Training_099")
        for p in (inp / "BraTS20_Training_099").iterdir():
            p.rename(p.with_name(p.name.replace(victim.name, "BraTS20_Training_099")))
    return {"argv": ["build-shards", inp, out, "--size", "32", "--workers", "0", "--quiet"], "what": what,
            "inp": str(inp), "allowed": [str(out)], "top": str(work), "victim": victim.name, "file": mod.name}


def rebuild_check(case: dict, res: dict) -> list[str]:
    if case["what"] == "bytes-same-size":  # not told by size or mtime: no oracle on the build itself
        return []
    if case["what"] == "bytes" and "seg" in case["file"]:  # label + 7: out of the release's set, so it fails
        return [] if res["code"] == 1 and case["victim"] in res["out"] else \
            [f"a segmentation changed to labels out of the set: exit {res['code']}, {case['victim']} not named"]
    if res["code"] != 0:
        return [f"exit {res['code']} after the input changed ({case['what']})"]
    m = json.loads((Path(case["allowed"][0]) / "manifest.json").read_text())
    stale = [f["path"] for p in m["patients"].values() for f in p["sources"].values()
             if _sha(Path(case["inp"]) / f["path"]) != f["sha256"]]
    return [f"manifest keeps stale source hashes: {stale}"] if stale else []


# -- surface: checkpoints -> predict, export, train --resume ---------------------------------------------

CK_TARGETS = ["config", "postprocess", "channels", "output_mode", "preprocess", "position", "history", "epoch",
              "best_dice", "rng", "tensor", "drop-key", "file"]
ARCH = {"base_channels", "depth", "model", "context", "deep_supervision", "norm", "targets"}


def _mutate_checkpoint(ck: dict, rng: random.Random) -> tuple[dict | bytes, str, bool]:
    """(new checkpoint or raw bytes, what was done, must every command refuse it)."""
    import torch

    target = rng.choice(CK_TARGETS)
    ck = copy.deepcopy(ck)
    if target == "config":
        key = rng.choice(sorted(ck["config"]))
        val = rng.choice(ODD + [4000, 64, 9, 0, 3])
        must = key in ARCH and val != ck["config"][key]
        ck["config"][key] = val
        return ck, f"config.{key}={val!r}", must and key != "deep_supervision" and key != "norm"
    if target == "postprocess":
        val = rng.choice([float("inf"), 1e308, -5.0, float("nan"), "x", None, 10.0, 0.0])
        key = rng.choice(sorted(ck["postprocess"]) or ["et_min_mm3"])
        ck["postprocess"][key] = val
        bad = not isinstance(val, (int, float)) or val != val or val < 0 or val > 1e12
        return ck, f"postprocess.{key}={val!r}", bad
    if target == "channels":
        val = rng.choice([ck["channels"][:-1], ck["channels"] + ["XX"], ["A", "B", "C"], "WT", None, []])
        ck["channels"] = val
        return ck, f"channels={val!r}", True
    if target == "output_mode":
        ck["output_mode"] = rng.choice(["nonsense", None, 3])
        return ck, f"output_mode={ck['output_mode']!r}", True
    if target == "preprocess":
        key = rng.choice(["size", "modalities", "mask_channels", "convention", "crop"])
        pre = ck["preprocess"].get("preprocess", ck["preprocess"])
        pre[key] = rng.choice(ODD + [100000])
        return ck, f"preprocess.{key}={pre[key]!r}", False
    if target == "position":
        pos = {"epoch": ck["epoch"] + 1, "batch": 1, "loss_sum": 0.5, "n_seen": 4, "keys": [],
               "rng": torch.get_rng_state()}
        key = rng.choice(["epoch", "batch", "loss_sum", "n_seen", "keys", "rng", "whole"])
        val = rng.choice([10**12, -1, float("nan"), "x", None, -50, [1, 2]])
        if key == "whole":
            pos = val
        else:
            pos[key] = val
        ck["position"] = pos
        return ck, f"position.{key}={val!r}", "resume" if pos is not None else False
    if target == "history":
        ck["history"] = rng.choice([None, "x", [1, 2], [{"epoch": float("nan")}], {"a": 1}])
        return ck, f"history={ck['history']!r}", "resume"
    if target == "epoch":
        ck["epoch"] = rng.choice([-50, 10**12, "x", None, 1.5])
        return ck, f"epoch={ck['epoch']!r}", "resume"
    if target == "best_dice":
        ck["best_dice"] = rng.choice([float("nan"), "x", None, 1e308])
        return ck, f"best_dice={ck['best_dice']!r}", False
    if target == "rng":
        ck["rng"] = rng.choice([torch.zeros(3, dtype=torch.uint8), torch.zeros(10), "x", None])
        return ck, "rng damaged", "resume"
    if target == "tensor":
        key = rng.choice(sorted(ck["model"]))
        t = ck["model"][key]
        ck["model"][key] = rng.choice([torch.zeros(t.numel() + 1), torch.zeros(0), torch.zeros(t.shape, dtype=torch.int64)])
        return ck, f"model.{key} reshaped", True
    if target == "drop-key":
        key = rng.choice(sorted(ck))
        del ck[key]
        # channels, output_mode, postprocess: absent from older checkpoints, derived from the config
        return ck, f"no {key}", key in ("model", "config", "preprocess")
    kind = rng.choice(["text", "truncated", "zeros", "pickle", "list"])
    if kind == "text":
        return b"this is not a checkpoint\n", "text file", True
    if kind == "zeros":
        return b"\0" * 4096, "zeros", True
    if kind == "list":
        return [1, 2, 3], "a list", True
    if kind == "pickle":
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, ("touch PWNED",))
        return pickle.dumps({"model": Evil()}), "a pickle that runs code", True
    return b"truncated", "truncated", True


def checkpoint_case(base: Path, work: Path, rng: random.Random) -> dict:
    import torch

    run = work / "run"
    shutil.copytree(base / "run", run)
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    new, what, must = _mutate_checkpoint(ck, rng)
    path = run / "checkpoints" / "last.pt"
    if isinstance(new, bytes):
        if what == "truncated":
            new = path.read_bytes()[: len(path.read_bytes()) // 2]
        path.write_bytes(new)
    else:
        torch.save(new, path)
    command = rng.choice(["predict", "export", "resume", "ensemble"])
    pred = work / "pred"
    if command == "predict":
        argv = ["predict", path, base / "rel-2020", pred, "--quiet", "--device", "cpu"]
        allowed = [str(pred)]
    elif command == "ensemble":
        argv = ["predict", base / "run" / "checkpoints" / "last.pt", base / "rel-2020", pred, "--ensemble", path,
                "--quiet", "--device", "cpu"]
        allowed = [str(pred)]
    elif command == "export":
        argv = ["export", path, work / "model.pt", "--format", "torchscript"]
        allowed = [str(work / "model.pt"), str(work / "model.pt.json")]
    else:
        argv = ["train", base / "set", "--out", run, "--resume", "--epochs", "2", *TRAIN_ARGS]
        allowed = [str(run)]
    return {"argv": argv, "what": what, "must": must, "command": command, "allowed": allowed, "top": str(work)}


def checkpoint_check(case: dict, res: dict) -> list[str]:
    must = case["must"]
    if must is True or (must == "resume" and case["command"] == "resume"):
        if res["code"] == 0:
            return [f"{case['command']} accepted a checkpoint with {case['what']}"]
    if Path(case["top"], "PWNED").exists() or Path("PWNED").exists():
        return ["a checkpoint ran code"]
    return []


# -- surface: prediction labels and reference folders -> evaluate ----------------------------------------

def evaluate_case(base: Path, work: Path, rng: random.Random) -> dict:
    import numpy as np

    nib = _nib()
    rel = rng.choice(["2020", "2020", "ped-2024"])
    ref = base / f"rel-{rel}"
    pred = work / "pred"
    pred.mkdir()
    layout = "folder"
    if rel == "ped-2024" or rng.random() < 0.3:  # a flat reference folder: <patient>.nii.gz
        layout = "flat"
        flat = work / "ref"
        flat.mkdir()
        for seg in sorted(ref.rglob("*seg.nii.gz")):
            shutil.copy(seg, flat / f"{seg.parent.name}.nii.gz")
        ref = flat
    what = rng.choice(["same", "float-same", "int16-same", "0.999", "label-7", "label-neg", "nan", "random-float"]
                      + (["2023-labels"] if rel == "2020" else []))
    victim = None
    for seg in sorted((base / f"rel-{rel}").rglob("*seg.nii.gz")):
        pid = seg.parent.name
        img = nib.load(str(seg))
        data = np.asarray(img.dataobj).astype(np.int16)
        dtype = np.uint8
        if victim is None:
            victim = pid
            if what == "float-same":
                dtype = np.float32
            elif what == "int16-same":
                dtype = np.int16
            elif what == "2023-labels":
                data = np.where(data == 4, 3, data)
            elif what == "0.999":
                data, dtype = data * 0.999, np.float32
            elif what == "label-7":
                data = data.copy()
                data[data.shape[0] // 2, data.shape[1] // 2, data.shape[2] // 2] = 7
            elif what == "label-neg":
                data, dtype = data.copy(), np.int16
                data[0, 0, 0] = -3
            elif what == "nan":
                data, dtype = data.astype(np.float32), np.float32
                data[1, 1, 1] = np.nan
            elif what == "random-float":
                data, dtype = np.random.default_rng(rng.randrange(2**32)).random(data.shape) * 4, np.float32
        out = nib.Nifti1Image(np.asarray(data).astype(dtype), img.affine)
        out.header.set_data_dtype(dtype)
        nib.save(out, str(pred / f"{pid}.nii.gz"))
    argv = ["evaluate", pred, ref, "--csv", work / "metrics.csv", "--quiet"]
    if rel == "ped-2024":
        argv += ["--release", "ped-2024"]
    invalid = what in ("0.999", "label-7", "label-neg", "nan", "random-float") or (what == "2023-labels" and rel == "2020")
    return {"argv": argv, "what": what, "rel": rel, "layout": layout, "victim": victim, "invalid": invalid,
            "allowed": [str(work / "metrics.csv"), str(pred / "metrics.csv")], "top": str(work)}


def evaluate_check(case: dict, res: dict) -> list[str]:
    if case["invalid"]:
        if res["code"] == 0:
            return [f"{case['what']} predictions scored with exit 0"]
        if res["code"] == 1 and case["victim"] not in res["out"] + res["err"]:
            return [f"{case['victim']} not named"]
        return []
    if res["code"] != 0:
        return [f"valid predictions ({case['what']}) refused: {res['err'][-300:]}"]
    import csv

    rows = list(csv.DictReader(open(Path(case["top"]) / "metrics.csv")))
    cols = [c for c in rows[0] if c.startswith("dice_") and rows[0][c] not in ("", "nan")]
    low = [(r["patient"], c, r[c]) for r in rows for c in cols if float(r[c]) < 0.999]
    if case["rel"] == "ped-2024" and "dice_CC" not in rows[0] and "dice_ED" not in rows[0]:
        return ["ped-2024 references scored without the PED columns"]
    return [f"identical predictions scored below 1: {low[:3]}"] if low else []


# -- surface: remote servers -> train URL ----------------------------------------------------------------

def _server(directory: Path, behaviour: str):
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    state = {"n": 0}

    class H(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            state["n"] += 1
            if path.endswith("manifest.json") and behaviour != "manifest-trickle":
                return super().do_GET()
            if behaviour == "stall":
                time.sleep(30)
                return
            if behaviour in ("trickle", "manifest-trickle"):
                body = (directory / path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.25)
                except OSError:
                    return
                return
            if behaviour == "short":
                body = (directory / path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                return
            if behaviour == "big-404":
                self.send_response(404)
                blob = (b"<html>" + b"not found " * 1200 + b"</html>")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)
                return
            if behaviour == "500-once" and state["n"] < 4:
                self.send_error(500)
                return
            if behaviour == "500":
                self.send_error(500)
                return
            if behaviour == "wrong-bytes":
                body = bytearray((directory / path.lstrip("/")).read_bytes())
                body[len(body) // 2] ^= 0xFF
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(bytes(body))
                return
            return super().do_GET()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(H, directory=str(directory)))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def remote_case(base: Path, work: Path, rng: random.Random) -> dict:
    behaviour = rng.choice(["stall", "trickle", "manifest-trickle", "short", "big-404", "500-once", "500",
                            "wrong-bytes", "ok"])
    srv = _server(base / "set", behaviour)
    port = srv.server_address[1]
    url = f"http://user:{PASSWORD}@127.0.0.1:{port}"
    run = work / "run"
    argv = ["train", url, "--out", run, "--remote-timeout", "1", "--cache-dir", work / "cache", "--format", "wds",
            "--epochs", "1", *TRAIN_ARGS]
    if rng.random() < 0.5:
        argv += ["--log", "tensorboard"]
    return {"argv": argv, "what": behaviour, "allowed": [str(run), str(work / "cache")], "top": str(work),
            "server": srv}


def remote_check(case: dict, res: dict) -> list[str]:
    bad = []
    if res["seconds"] > 45:
        bad.append(f"{case['what']}: took {res['seconds']} s")
    if case["what"] in ("ok", "500-once") and res["code"] != 0:
        bad.append(f"{case['what']}: exit {res['code']}: {res['err'][-300:]}")
    if case["what"] not in ("ok", "500-once") and res["code"] == 0:
        bad.append(f"{case['what']}: exit 0")
    if res["code"] == 2 and "127.0.0.1" not in res["err"]:
        bad.append("the error does not name the URL")
    if len(res["err"]) > 1000:
        bad.append(f"error of {len(res['err'])} characters")
    if PASSWORD in res["out"] + res["err"]:
        bad.append("the password was printed")
    leaks = [str(p) for p in Path(case["top"]).rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    if leaks:
        bad.append(f"the password is stored in {leaks}")
    return bad


# -- the worker -----------------------------------------------------------------------------------------

TRAIN_ARGS = ["--base-channels", "4", "--depth", "2", "--batch-size", "4", "--max-batches", "2", "--num-workers", "0",
              "--device", "cpu", "--quiet", "--checkpoint-every", "1"]
SURFACES = {"build": (build_case, build_check), "rebuild": (rebuild_case, rebuild_check),
            "checkpoint": (checkpoint_case, checkpoint_check), "evaluate": (evaluate_case, evaluate_check),
            "remote": (remote_case, remote_check)}


def general_check(case: dict, res: dict, before: dict, after: dict) -> list[str]:
    bad = []
    if res["exc"]:
        bad.append(f"crash: {res['exc'][-600:]}")
    if res["code"] not in (0, 1, 2):
        bad.append(f"exit {res['code']}")
    text = res["out"] + res["err"]
    if "Traceback" in text:
        bad.append("a traceback was printed")
    if res["code"] == 2:
        lines = [ln for ln in res["err"].splitlines() if ln.strip()]
        if len(lines) != 1 or not lines[0].startswith("error: "):
            bad.append(f"not one error line: {res['err'][-400:]!r}")
        elif len(lines[0]) > 1000:
            bad.append(f"error line of {len(lines[0])} characters")
    if res["code"] == 1 and "FAILED" not in res["out"]:
        bad.append("exit 1 without a named failure")
    allowed = [Path(a) for a in case["allowed"]]
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not any(Path(k) == a or a in Path(k).parents for a in allowed))
    if changed:
        bad.append(f"wrote outside its folders: {changed[:5]}")
    return bad


class CaseTimeout(BaseException):
    pass


def run_case(base: Path, scratch: Path, seed: int, surface: str, index: int) -> dict:
    rng = random.Random(f"{seed}:{surface}:{index}")
    work = scratch / f"{surface}-{index}"
    work.mkdir(parents=True)
    make, check = SURFACES[surface]
    case = make(base, work, rng)
    server = case.pop("server", None)
    before = _snapshot(scratch)
    os.chdir(work)

    def alarm(*_):  # not an Exception: no retry loop or handler of the project may swallow it
        raise CaseTimeout(f"case ran over {CASE_SECONDS} s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_SECONDS)
    try:
        res = _invoke(case["argv"])
    except CaseTimeout as e:
        res = {"code": None, "out": "", "err": "", "exc": f"hang: {e}", "seconds": CASE_SECONDS}
    finally:
        signal.alarm(0)
        os.chdir(scratch)
    if server is not None:
        server.shutdown()
        server.server_close()
    after = _snapshot(scratch)
    problems = general_check(case, res, before, after) + check(case, res)
    rec = {"surface": surface, "case": index, "what": case.get("what"), "given": case.get("given"),
           "command": case.get("command", case["argv"][0]), "code": res["code"], "seconds": res["seconds"],
           "out": res["out"][-300:], "err": res["err"][-300:], "problems": problems}
    subprocess.run(["rm", "-rf", str(work)])  # shutil.rmtree recurses: the deep trees would stop it
    return rec


def worker(base: str, scratch: str, seed: int, cases: list[str]) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    scratch = Path(scratch)
    for item in cases:
        surface, index = item.split(":")
        print(json.dumps(run_case(Path(base), scratch, seed, surface, int(index))), flush=True)


# -- the test -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory, release_2020) -> Path:
    """What the cases start from: one small folder per release, a build of the 2020 one, a short run."""
    from preprocess.synthetic.toy import make_demo_data
    from preprocess.synthetic.releases import write_release

    root = tmp_path_factory.mktemp("fuzz-base")
    shutil.copytree(release_2020, root / "rel-2020")
    make_demo_data(root / "rel-2023", 2, shape=(24, 24, 12), release="2023", seed=3)
    for rel in ("msd", "ped-2024", "men"):
        write_release(root / f"rel-{rel}", rel, 2, shape=(24, 28, 16), seed=3, defaced=rel == "ped-2024")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = [sys.executable, str(REPO / "cli.py")]
    subprocess.run(cli + ["build-shards", root / "rel-2020", root / "built-2020", "--size", "32", "--workers", "0",
                          "--quiet"], check=True, env=env, cwd=root, capture_output=True)
    shutil.copytree(root / "built-2020", root / "set")
    subprocess.run(cli + ["train", root / "set", "--out", root / "run", "--epochs", "1", *TRAIN_ARGS], check=True,
                   env=env, cwd=root, capture_output=True)
    return root


def test_every_input_surface_ends_in_a_refusal_or_the_right_result(base, tmp_path):
    items = [f"{s}:{i}" for s, n in CASES.items() for i in range(n)]
    random.Random(SEED).shuffle(items)
    procs, records, errors = [], [], []
    for w in range(2):
        scratch = tmp_path / f"w{w}" / "scratch"
        scratch.mkdir(parents=True)
        env = dict(os.environ, HOME=str(scratch.parent), BRATS_SHARDS_CACHE=str(scratch.parent / "cache"),
                   TMPDIR=str(scratch.parent), MLFLOW_TRACKING_URI="")
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(base),
                                       str(scratch), str(SEED), ",".join(items[w::2])],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
    for w, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=1200)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            errors.append(f"worker {w} timed out")
        if p.returncode != 0:
            errors.append(f"worker {w} exited {p.returncode}: {err[-2000:]}")
        records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert not errors, errors
    assert len(records) == len(items)
    failures = [r for r in records if r["problems"]]
    summary = {s: sorted({(r["what"], r["code"]) for r in records if r["surface"] == s}) for s in CASES}
    print(f"\nsurface fuzz: {len(records)} cases; slowest {max(r['seconds'] for r in records)} s; {summary}")
    assert not failures, "\n".join(f"{r['surface']}:{r['case']} ({r['what']}, {r['command']}): {r['problems']}"
                                   for r in failures[:20])
    # the cases reach past the first check: some of every surface end in exit 0 and some are refused
    for s in CASES:
        codes = {r["code"] for r in records if r["surface"] == s}
        assert codes & {0} and codes & {1, 2}, (s, codes)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.path.insert(0, str(REPO))
    _, _, base_dir, scratch_dir, seed, items = sys.argv
    worker(base_dir, scratch_dir, int(seed), items.split(","))
