"""Fuzzing the readers with hostile shard sets: a few hundred random mutations (fixed seed) of a
tiny built set's manifest, tar headers, npy headers, zarr.json metadata and (a few) zarr shard
bytes, each read the way the project does:

  - `load_manifest` + `verify`, and `summary` + `format_summary` (the `info` command);
  - `ShardSource` + `SliceStream` over the validation split, in each layout the set has.

Every case runs in a worker process under an address-space limit (RLIMIT_AS 3 GiB) and a time
limit, and must end in a clean refusal (a BratsShardsError) or a correct result: the loader
delivers exactly the original slices of the patients the (mutated) manifest lists, unless the
case changed shard bytes without the manifest knowing (then `verify` must name the file by its
sha256 or size). Never another exception, a hang, a MemoryError or a write anywhere. Also
cross-checked: what the loader refuses, `verify` reports; what `verify` passes, the loader reads.

Reproduce one case: `python tests/test_fuzz.py --worker SET SCRATCH SEED CASE` prints its record.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("FUZZ_SEED", 20240611))
N_CASES = 500
WORKERS = 2
AS_LIMIT = 3 << 30
CASE_SECONDS = 20

# -- mutations ------------------------------------------------------------------------------------------

ODD_VALUES = ["x", "", [], {}, None, True, False, 0, -1, 1.5, [1, 2], {"a": 1}, "../../esc", "/etc/passwd",
              "\x1b[2J", 2**63, -(2**63), 10**30, 1e308, -1e308, 2**64 + 1, 10**4000, "0" * 10000]


def _nodes(obj, path=()):
    """(container, key, value) of every node below `obj`."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield obj, k, v
        yield from _nodes(v, path + (k,))


def _number(rng, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        v = 17
    return rng.choice([0, -1, 1, int(v) + 1, int(v) - 1, int(v) * 2, 2**31, 2**32 + int(v), 2**53 + 1, 2**63,
                       2**64 + 1, 10**18, 10**400, 1e308, float("inf"), -0.0, 0.5, int(v) + 0.5, 100_000, 100_001])


def mutate_json(raw: bytes, rng: random.Random, must_change: bool = True) -> tuple[bytes, str]:
    obj = json.loads(raw)
    nodes = list(_nodes(obj))
    op = rng.choice(["number", "number", "type", "huge", "delete", "duplicate", "bigtext"])
    if op == "bigtext":  # a number literal no parser should try hard on
        spans = [m.span() for m in re.finditer(rb"-?\d+(\.\d+)?", raw)]
        a, b = rng.choice(spans)
        big = b"9" * rng.choice([20, 400, 5000, 100_000])
        return raw[:a] + big + raw[b:], f"bigtext {len(big)} digits at {a}"
    if op in ("number", "huge"):
        nums = [n for n in nodes if isinstance(n[2], (int, float)) and not isinstance(n[2], bool)]
        c, k, v = rng.choice(nums or nodes)
        new = _number(rng, v) if op == "number" else rng.choice([10**rng.randint(10, 4200), 2**rng.randint(63, 70),
                                                                   float("1e400"), -(10**25)])
        c[k] = new
        what = f"{op} {k!r}: {str(v)[:30]} -> {str(new)[:30]}"
    elif op == "type":
        c, k, v = rng.choice(nodes)
        new = rng.choice([x for x in ODD_VALUES if type(x) is not type(v)])
        c[k] = new
        what = f"type {k!r}: {type(v).__name__} -> {str(new)[:30]}"
    elif op == "delete":
        c, k, v = rng.choice(nodes)
        del c[k]
        what = f"delete {k!r}"
    else:  # a list element or dict entry repeated (a patient listed twice, a file twice, ...)
        lists = [n for n in nodes if isinstance(n[2], list) and n[2]]
        c, k, v = rng.choice(lists) if lists else rng.choice(nodes)
        if isinstance(v, list) and v:
            v.append(json.loads(json.dumps(rng.choice(v))))
        what = f"duplicate in {k!r}"
    text = json.dumps(obj, allow_nan=True) if rng.random() < 0.5 else json.dumps(obj, indent=1, allow_nan=True)
    return text.encode(), what


def mutate_bytes(data: bytes, lo: int, hi: int, rng: random.Random) -> tuple[bytes, str]:
    hi = max(hi, lo + 1)
    op = rng.choice(["flip", "flip", "truncate", "insert"])
    b = bytearray(data)
    if op == "flip":
        k = rng.choice([1, 1, 2, 4, 8])
        for _ in range(k):
            i = rng.randrange(lo, min(hi, len(b)))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"flip {k} bit(s) in [{lo}, {hi})"
    if op == "truncate":
        i = rng.randrange(lo, min(hi, len(b)))
        return bytes(b[:i]), f"truncate at {i}"
    i = rng.randrange(lo, min(hi, len(b)) + 1)
    ins = bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 16, 512])))
    return bytes(b[:i] + ins + b[i:]), f"insert {len(ins)} bytes at {i}"


def _tar_layout(data: bytes):
    """(header offset, data offset, size, name) of each member."""
    import io

    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return [(m.offset, m.offset_data, m.size, m.name) for m in t.getmembers()]


def mutate_tar_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    off, _, size, name = rng.choice(_tar_layout(data))
    b = bytearray(data)
    op = rng.choice(["bytes", "size", "size", "type", "name", "checksum"])
    if op == "bytes":
        out, what = mutate_bytes(data, off, off + 512, rng)
        return out, f"tar header of {name}: {what}"
    if op == "size":
        new = rng.choice([0, size - 1, size + 1, size * 2, size + 512, 2**33 - 1, 8**11 - 1, len(data)])
        field = rng.choice([f"{new:011o}\0", f"{new:o}", "0o777", "-1", " 1_0", "\x80" + "\0" * 10 + "\x01",
                            f"{new:012o}"]).encode("latin1")[:12].ljust(12, b"\0")
        b[off + 124: off + 136] = field
        what = f"size {field!r}"
    elif op == "type":
        t = rng.choice(b"12345676xgLKSV")
        b[off + 156] = t
        what = f"type {chr(t)!r}"
    elif op == "name":
        i = rng.randrange(0, len(name))
        b[off + i] = rng.choice(b"./_-xA\0\xff")
        what = f"name char {i}"
    else:
        b[off + 148: off + 156] = b"0000000\0"
        what = "checksum"
    if rng.random() < 0.7 and op != "checksum":  # mostly a well-formed header with a changed field
        b[off + 148: off + 156] = b" " * 8
        b[off + 148: off + 156] = f"{sum(b[off: off + 512]):06o}\0 ".encode()
    return bytes(b), f"tar header of {name}: {what}"


def mutate_npy_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    members = [m for m in _tar_layout(data) if m[3].endswith(".npy")]
    _, start, size, name = rng.choice(members)
    hlen = int.from_bytes(data[start + 8: start + 10], "little")
    end = start + 10 + hlen
    op = rng.choice(["bytes", "shape", "shape", "descr", "fortran", "hlen", "version"])
    if op == "bytes":
        out, what = mutate_bytes(data, start, end, rng)
        return out, f"npy header of {name}: {what}"
    header = data[start + 10: end].decode("latin1")
    if op == "shape":
        dims = [rng.choice([0, 1, 3, 4, 16, 17, 31, 32, 33, 64, 1024, 1025, 2**31, 2**40, 10**12])
                for _ in range(rng.choice([0, 1, 2, 3, 3, 3, 4]))]
        new = re.sub(r"'shape': \([^)]*\)", f"'shape': ({', '.join(map(str, dims))}{',' if len(dims) == 1 else ''})",
                     header)
    elif op == "descr":
        d = rng.choice(["<f4", "<f8", ">f2", "|u1", "<f2", "|O", "<U8", "|b1", "<i2", "|V2", "[('a', '<f2')]"])
        literal = d if d.startswith("[") else repr(d)
        new = re.sub(r"'descr': '[^']*'", lambda _: f"'descr': {literal}", header)
    elif op == "fortran":
        new = header.replace("False", "True")
    else:
        b = bytearray(data)
        if op == "hlen":
            b[start + 8: start + 10] = rng.choice([0, 1, hlen - 16, hlen + 16, 4095, 65535]).to_bytes(2, "little")
        else:
            b[start + 6] = rng.choice([0, 2, 3, 4, 255])
        return bytes(b), f"npy header of {name}: {op}"
    new = new.rstrip(" \n")
    if len(new) + 1 <= hlen:
        new = new + " " * (hlen - len(new) - 1) + "\n"
        return data[: start + 10] + new.encode("latin1") + data[end:], f"npy header of {name}: {op}"
    # longer header: the npy payload and its tar member grow (tar rebuilt, member size updated)
    return _replace_member(data, name, data[start: start + 10] + new.encode("latin1") + b"\n" + data[end: start + size]), \
        f"npy header of {name}: {op} (longer)"


def _replace_member(data: bytes, name: str, payload: bytes) -> bytes:
    import io

    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w",
                                                                     format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            body = payload if m.name == name else src.extractfile(m).read()
            m.size = len(body)
            dst.addfile(m, io.BytesIO(body))
    return out.getvalue()


def mutate_case(root: Path, rng: random.Random, manifest: dict) -> tuple[dict, list]:
    """Mutate one file of the set at `root`; returns (description, [(path, original bytes)])."""
    val = sorted(manifest["splits"]["val"])
    pid = rng.choice(val) if rng.random() < 0.85 else rng.choice(sorted(manifest["patients"]))
    split = manifest["patients"][pid]["split"]
    target = rng.choices(["manifest", "zarr.json", "tar header", "npy header", "zarr shard"],
                         weights=[30, 25, 20, 20, 5])[0]
    consistent = False
    if target == "manifest":
        rel = "manifest.json"
    elif target == "zarr.json":
        rel = f"zarr/{split}/{pid}/" + rng.choice(["image/zarr.json", "image/zarr.json", "mask/zarr.json",
                                                   "mask/zarr.json", "zarr.json"])
    elif target == "zarr shard":
        rel = f"zarr/{split}/{pid}/{rng.choice(['image', 'mask'])}/c/0/0/0/0"
    else:
        rel = next(f["path"] for f in manifest["files"] if f["format"] == "wds" and f["patient"] == pid)
    p = root / rel
    data = p.read_bytes()
    restore = [(p, data)]
    if target in ("manifest", "zarr.json"):
        new, what = mutate_json(data, rng) if rng.random() < 0.6 else mutate_bytes(data, 0, len(data), rng)
    elif target == "tar header":
        new, what = mutate_tar_header(data, rng)
    elif target == "npy header":
        new, what = mutate_npy_header(data, rng)
    else:  # shard bytes: the index (and its crc) or a chunk's blosc header
        n = manifest["patients"][pid]["n_slices"]
        if rng.random() < 0.5:
            new, what = mutate_bytes(data, len(data) - 16 * n - 4, len(data), rng)
        else:
            new, what = mutate_bytes(data, 0, 16, rng)
    p.write_bytes(new)
    if target != "manifest" and rng.random() < 0.5:  # a hostile but consistent set: the manifest agrees
        consistent = True
        mp = root / "manifest.json"
        restore.append((mp, mp.read_bytes()))
        m = json.loads(mp.read_bytes())
        for f in m["files"]:
            if f["path"] == rel:
                f["bytes"], f["sha256"] = len(new), hashlib.sha256(new).hexdigest()
        mp.write_text(json.dumps(m, indent=1, sort_keys=True))
    return {"target": target, "file": rel, "what": what, "consistent": consistent, "changed": new != data}, restore


# -- the worker: runs cases, one JSON record per case -----------------------------------------------------

class CaseTimeout(BaseException):
    pass


def _digest_stream(root, fmt):
    from train.data import SliceStream, StreamConfig
    from shards.source import ShardSource

    src = ShardSource(root)
    if fmt not in src.layouts():
        return None
    ds = SliceStream(src, StreamConfig(split="val", fmt=fmt, train=False, batch_size=8))
    out = []
    for b in ds:
        for i, k in enumerate(b["keys"]):
            h = hashlib.sha1(b["image"][i].numpy().tobytes() + b"|" + b["mask"][i].numpy().tobytes()).hexdigest()
            out.append([k, h[:16]])
    return out


def _original_per_patient(root: Path, manifest: dict) -> dict:
    """pid -> [[key, digest], ...] of the pristine set, every patient (both splits)."""
    import numpy as np

    import zarr

    from shards.wds_io import sample_key

    out = {}
    for pid, p in manifest["patients"].items():  # the pristine set, read by zarr itself
        g = zarr.open_group(str(root / "zarr" / p["split"] / pid), mode="r")
        image, mask = g["image"][:], g["mask"][:]
        out[pid] = [[sample_key(pid, i), hashlib.sha1(im.astype(np.float32).tobytes() + b"|"
                                                      + mk.astype(np.float32).tobytes()).hexdigest()[:16]]
                    for i, (im, mk) in enumerate(zip(image, mask))]
    return out


def _snapshot(top: Path) -> dict:
    snap = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            snap[p] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return snap


def run_case(root: Path, scratch: Path, seed: int, case: int, manifest: dict, original: dict) -> dict:
    from shards.errors import BratsShardsError
    from shards.manifest import format_summary, load_manifest, summary
    from shards.verify import verify

    rng = random.Random(seed * 1_000_003 + case)
    before = _snapshot(scratch)
    desc, restore = mutate_case(root, rng, manifest)
    mutated = {str(p) for p, _ in restore}
    before = {k: v for k, v in before.items() if k not in mutated}
    rec = {"case": case, **desc}

    def outcome(fn):
        import signal
        import traceback

        def alarm(*_):
            raise CaseTimeout()
        signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        try:
            return ["ok", fn()]
        except BratsShardsError as e:
            return ["refused", type(e).__name__, str(e)[:300]]
        except CaseTimeout:
            return ["hang"]
        except BaseException as e:  # noqa: BLE001 - exactly what the fuzz test looks for
            return ["crash", type(e).__name__, str(e)[:300], traceback.format_exc()[-1500:]]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    t0 = time.perf_counter()
    rec["manifest"] = outcome(lambda: (load_manifest(root), None)[1])
    rec["verify"] = outcome(lambda: verify(root))
    if rec["manifest"][0] == "ok":
        rec["summary"] = outcome(lambda: (format_summary(summary(load_manifest(root))), None)[1])
        m = load_manifest(root)
        try:
            rec["expected"] = [s for pid in sorted(m["splits"].get("val", [])) for s in original[pid]]
        except KeyError:
            rec["expected"] = None
    for fmt in ("zarr", "wds"):
        rec[fmt] = outcome(lambda: _digest_stream(root, fmt))
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    after = {k: v for k, v in _snapshot(scratch).items() if k not in mutated}
    rec["writes"] = sorted(set(after) ^ set(before) | {k for k in after if k in before and after[k] != before[k]})[:10]
    for p, data in restore:
        p.write_bytes(data)
    return rec


def worker(set_dir: str, scratch: str, seed: int, cases: list[int]) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    scratch = Path(scratch)
    root = scratch / "set"
    shutil.copytree(set_dir, root)
    os.chdir(scratch / "cwd")
    from shards.manifest import load_manifest
    from shards.verify import verify

    manifest = load_manifest(root)
    assert verify(root) == []
    original = _original_per_patient(root, manifest)
    for case in cases:
        print(json.dumps(run_case(root, scratch, seed, case, manifest, original)), flush=True)


# -- the test ---------------------------------------------------------------------------------------------

def check(rec: dict) -> list[str]:
    """What is wrong with one case's outcome (nothing: a clean refusal or a correct result)."""
    bad = []
    ops = [k for k in ("manifest", "verify", "summary", "zarr", "wds") if k in rec]
    for k in ops:
        if rec[k][0] in ("crash", "hang"):
            bad.append(f"{k}: {rec[k][0]} {' '.join(map(str, rec[k][1:3]))}")
        if rec[k][0] == "refused" and "\n" in rec[k][2]:
            bad.append(f"{k}: message not one line")
    if rec["writes"]:
        bad.append(f"wrote {rec['writes']}")
    if bad:
        return bad
    if rec["manifest"][0] == "refused" and rec["verify"][0] != "refused":
        bad.append("verify accepted a manifest load_manifest refuses")
    problems = rec["verify"][1] if rec["verify"][0] == "ok" else None
    # verify is not fooled: sha256/size problems whenever bytes changed behind the manifest's back
    tampered = rec["changed"] and not rec["consistent"] and rec["target"] != "manifest"
    if problems is not None and tampered and not any(rec["file"] in p for p in problems):
        bad.append(f"verify did not name the tampered {rec['file']}: {problems}")
    for fmt in ("zarr", "wds"):
        out = rec[fmt]
        if out[0] == "ok" and out[1] is not None and out[1] != rec.get("expected"):
            # Other slice values are a correct result only where the case changed what is read:
            # chunk bytes themselves (the local loader does not hash them; verify does), or a
            # manifest no longer listing a shard (zarr reads an absent shard as its fill value, as
            # the writer leaves out an all-empty one; verify names the unlisted file). Never for
            # metadata, and never other samples.
            keys = [k for k, _ in out[1]] == [k for k, _ in rec.get("expected") or []]
            unlisted = problems is not None and any("not listed in the manifest" in p for p in problems)
            if not keys or not (rec["target"] == "zarr shard" or (rec["target"] == "manifest" and unlisted)):
                bad.append(f"{fmt}: read data differs from the original")
        if out[0] == "refused" and problems == []:
            bad.append(f"{fmt} refused ({out[2][:120]}) but verify reports nothing")
    if problems == [] and not all(rec[f][0] == "ok" for f in ("zarr", "wds")):
        bad.append("verify passed, the loader did not read")
    return bad


def run_fuzz(shard_set: Path, tmp: Path, seed: int = SEED, n_cases: int = N_CASES, workers: int = WORKERS):
    procs = []
    for w in range(workers):
        scratch = tmp / f"w{w}"
        (scratch / "cwd").mkdir(parents=True)
        (scratch / "home").mkdir()
        env = dict(os.environ, HOME=str(scratch / "home"), BRATS_SHARDS_CACHE=str(scratch / "home" / "cache"),
                   TMPDIR=str(scratch / "home"))
        cases = list(range(w, n_cases, workers))
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(shard_set),
                                       str(scratch), str(seed), ",".join(map(str, cases))],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
    records, errors = [], []
    for w, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=max(120, 4 * n_cases))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            errors.append(f"worker {w} timed out")
        if p.returncode != 0:
            errors.append(f"worker {w} exited {p.returncode}: {err[-2000:]}")
        records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return records, errors


def test_fuzzed_shard_sets_end_in_a_refusal_or_the_right_data(shard_set, tmp_path):  # ~10 s on 2 cores
    t0 = time.perf_counter()
    records, errors = run_fuzz(shard_set, tmp_path)
    elapsed = time.perf_counter() - t0
    assert not errors, errors
    assert sorted(r["case"] for r in records) == list(range(N_CASES))
    failures = {r["case"]: (r["target"], r["file"], r["what"], check(r)) for r in records if check(r)}
    by_target = Counter(r["target"] for r in records)
    outcomes = Counter((r["zarr"][0], r["wds"][0]) for r in records)
    print(f"\nfuzz: {len(records)} cases in {elapsed:.1f} s; targets {dict(by_target)}; "
          f"loader outcomes (zarr, wds) {dict(outcomes)}; "
          f"manifest refused {sum(r['manifest'][0] == 'refused' for r in records)}; "
          f"slowest case {max(r['seconds'] for r in records)} s")
    assert not failures, "\n".join(f"case {c} (seed {SEED}): {v}" for c, v in sorted(failures.items())[:20])
    # the fuzzer reaches the readers: most cases get past the manifest and many are refused by them
    assert sum(r["manifest"][0] == "ok" for r in records) > N_CASES // 2
    assert sum("ShardFormatError" in (r["zarr"][1:2] + r["wds"][1:2]) for r in records) > N_CASES // 10


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.path.insert(0, str(REPO))  # this checkout's project, as pytest's `pythonpath = ["."]` has it
    _, _, set_dir, scratch, seed, cases = sys.argv
    worker(set_dir, scratch, int(seed), [int(c) for c in cases.split(",")])
