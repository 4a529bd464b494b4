"""A remote shard set is untrusted: its manifest, its server and the local cache of it.

Every server here is http.server on 127.0.0.1, serving a copy of a shard set, with per-path
hooks that misbehave (wrong paths in the manifest, oversized or short bodies, HTTP 500, a hang).
"""

import hashlib
import json
import os
import shutil
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest

import shards.source
from train.data import SliceStream, StreamConfig
from shards.source import ShardSetError, ShardSource


def _all_keys(src, fmt="wds"):
    ds = SliceStream(src, StreamConfig(split="val", train=False, batch_size=16, fmt=fmt))
    return {k: b["image"][i].sum().item() for b in ds for i, k in enumerate(b["keys"])}


def _copy(shard_set, tmp_path) -> Path:
    served = tmp_path / "served"
    shutil.copytree(shard_set, served)
    return served


def _val_wds(manifest: dict) -> dict:
    pid = manifest["splits"]["val"][0]
    return next(f for f in manifest["files"] if f["format"] == "wds" and f["patient"] == pid)


# ------------------------------------------------------------------ 1. paths in a remote manifest

@pytest.mark.parametrize("kind", ["absolute", "climbing"])
def test_manifest_path_cannot_write_outside_the_cache(shard_set, serve, tmp_path, kind):
    served = _copy(shard_set, tmp_path)
    cache = tmp_path / "a" / "cache"
    target = tmp_path / "outside" / "owned"
    m = json.loads((served / "manifest.json").read_text())
    entry = _val_wds(m)
    payload = (served / entry["path"]).read_bytes()  # sha256 and bytes still match the listing
    if kind == "absolute":
        evil = str(target)
        (served / evil.lstrip("/")).parent.mkdir(parents=True)
        (served / evil.lstrip("/")).write_bytes(payload)
    else:  # cache/<key>/../../../outside/owned is tmp_path/outside/owned
        evil = "../../../outside/owned"
        (served / "outside").mkdir()
        (served / "outside" / "owned").write_bytes(payload)
    entry["path"] = evil
    (served / "manifest.json").write_text(json.dumps(m))
    url, _ = serve(served)
    try:
        src = ShardSource(url, cache_dir=cache)
        src.read(src.wds_file(entry["patient"]))
        _all_keys(src)
    except ShardSetError as e:
        refused = str(e)
    else:
        refused = None
    assert not target.exists(), "a remote manifest wrote a file outside the cache"
    assert refused is not None and "manifest.json" in refused and "path" in refused


def test_cache_paths_never_come_from_manifest_text(shard_set, serve, tmp_path, monkeypatch):
    """Defence in depth: even with manifest validation bypassed, the cache writes only
    cache/sha256/<2 hex>/<sha256>, and refuses a sha256 that is not 64 hex digits."""
    monkeypatch.setattr(shards.source, "parse_manifest", lambda raw, where: json.loads(raw))
    served = _copy(shard_set, tmp_path)
    cache = tmp_path / "a" / "cache"
    m = json.loads((served / "manifest.json").read_text())
    entry = _val_wds(m)
    (served / "outside").mkdir()
    (served / "outside" / "owned").write_bytes((served / entry["path"]).read_bytes())
    entry["path"] = "../../../outside/owned"
    (served / "manifest.json").write_text(json.dumps(m))
    url, _ = serve(served)
    src = ShardSource(url, cache_dir=cache)
    assert src.read(entry["path"]) == (shard_set / _val_wds(json.loads((shard_set / "manifest.json")
                                                                        .read_text()))["path"]).read_bytes()
    assert not (tmp_path / "outside").exists()
    cached = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(served)]
    assert cached == [cache / "sha256" / entry["sha256"][:2] / entry["sha256"]]
    src.files[entry["path"]] = dict(entry, sha256="../../../outside/x" + "0" * 46)
    with pytest.raises(ShardSetError, match="invalid sha256"):
        src.read(entry["path"])


# ------------------------------------------------------------------ 2. stale or damaged cache

@pytest.fixture(scope="module")
def two_sets(release_2020, tmp_path_factory):
    """Set A and set B: same patients, same file sizes, other bytes (--normalize slice)."""
    from preprocess.config import PreprocessConfig
    from preprocess.build import BuildConfig, build

    root = tmp_path_factory.mktemp("ab")
    for name, norm in (("a", "volume"), ("b", "slice")):
        build(release_2020, root / name, BuildConfig(preprocess=PreprocessConfig(size=32, normalize=norm),
                                                     val_fraction=0.2, formats=("wds",)), workers=0, progress=False)
    return root / "a", root / "b"


def test_rebuilt_set_at_same_url_is_not_read_from_stale_cache(two_sets, serve, tmp_path):
    a, b = two_sets
    fa = {f["path"]: f for f in json.loads((a / "manifest.json").read_text())["files"]}
    fb = {f["path"]: f for f in json.loads((b / "manifest.json").read_text())["files"]}
    assert {p: f["bytes"] for p, f in fa.items()} == {p: f["bytes"] for p, f in fb.items()}
    assert all(fa[p]["sha256"] != fb[p]["sha256"] for p in fa)
    served = tmp_path / "served"
    shutil.copytree(a, served)
    url, _ = serve(served)
    first = ShardSource(url, cache_dir=tmp_path / "cache")
    for p in fa:
        assert first.read(p) == (a / p).read_bytes()
    shutil.rmtree(served)
    shutil.copytree(b, served)  # rebuilt in place: same URL, same sizes, new manifest
    again = ShardSource(url, cache_dir=tmp_path / "cache")
    for p in fb:
        assert again.read(p) == (b / p).read_bytes()
    assert _all_keys(ShardSource(url, cache_dir=tmp_path / "cache")) == _all_keys(ShardSource(b))


def test_damaged_cached_file_is_discarded_and_fetched_again(two_sets, serve, tmp_path):
    a, _ = two_sets
    url, requests = serve(a)
    files = json.loads((a / "manifest.json").read_text())["files"]
    first = ShardSource(url, cache_dir=tmp_path / "cache")
    for f in files:
        first.read(f["path"])
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(cached) == len(files)
    for p in cached:  # same size, one bit off
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    again = ShardSource(url, cache_dir=tmp_path / "cache")
    for f in files:
        assert again.read(f["path"]) == (a / f["path"]).read_bytes()
        assert requests[f"/{f['path']}"] == 2  # fetched again
    for p in cached:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name  # repaired


def test_cached_file_is_hashed_once_per_process(two_sets, serve, tmp_path, monkeypatch):
    a, _ = two_sets
    url, requests = serve(a)
    rel = json.loads((a / "manifest.json").read_text())["files"][0]["path"]
    ShardSource(url, cache_dir=tmp_path / "cache").read(rel)  # now cached
    calls = []

    def counting(data=b""):
        calls.append(len(data))
        return hashlib.sha256(data)

    src = ShardSource(url, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(shards.source, "hashlib", SimpleNamespace(sha256=counting))
    for _ in range(3):
        assert src.read(rel) == (a / rel).read_bytes()
    assert len(calls) == 1 and requests[f"/{rel}"] == 1


# ------------------------------------------------------------------ 3. downloads bounded by the manifest

def test_oversized_body_is_refused_without_buffering_it(shard_set, serve, tmp_path):
    served = _copy(shard_set, tmp_path)
    entry = _val_wds(json.loads((served / "manifest.json").read_text()))
    total, sent, done = 48 * 2**20, [0], threading.Event()

    def endless(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()  # no Content-Length: the body ends when the server closes
        block = b"\0" * 2**16
        try:
            while sent[0] < total:
                h.wfile.write(block)
                sent[0] += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            done.set()
        return True

    url, _ = serve(served, {f"/{entry['path']}": endless})
    src = ShardSource(url, cache_dir=tmp_path / "cache")
    tracemalloc.start()
    try:
        with pytest.raises(ShardSetError) as e:
            src.read(entry["path"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert done.wait(10)
    assert peak < entry["bytes"] + 8 * 2**20, f"peak {peak >> 20} MiB while refusing"
    assert sent[0] < total // 2, f"the server got to send {sent[0] >> 20} MiB"
    assert f"{url}/{entry['path']} sends more than the manifest's {entry['bytes']} bytes" in str(e.value)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_remote_manifest_download_is_bounded(shard_set, serve, tmp_path, monkeypatch):
    monkeypatch.setattr(shards.source, "MAX_MANIFEST_BYTES", 1000)
    assert (shard_set / "manifest.json").stat().st_size > 1000
    url, _ = serve(shard_set)
    with pytest.raises(ShardSetError, match=f"{url}/manifest.json sends more than 1000 bytes"):
        ShardSource(url, cache_dir=tmp_path / "cache")


def test_short_body_is_refused(shard_set, serve, tmp_path):
    served = _copy(shard_set, tmp_path)
    entry = _val_wds(json.loads((served / "manifest.json").read_text()))
    half = (served / entry["path"]).read_bytes()[: entry["bytes"] // 2]

    def short(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(half)))
        h.end_headers()
        h.wfile.write(half)
        return True

    url, _ = serve(served, {f"/{entry['path']}": short})
    src = ShardSource(url, cache_dir=tmp_path / "cache")
    with pytest.raises(ShardSetError, match=f"{entry['path']} ended after {len(half)} bytes"):
        src.read(entry["path"])


# ------------------------------------------------------------------ 4. remote errors: retry, timeout, clean message

def test_transient_500_is_retried(shard_set, serve, tmp_path):
    failed = set()

    def fail_first(h):  # every path, the manifest included, fails once with HTTP 500
        path = h.path.split("?", 1)[0]
        if path in failed:
            return False
        failed.add(path)
        h.send_error(500)
        return True

    url, requests = serve(shard_set, {"*": fail_first})
    remote = ShardSource(url, cache_dir=tmp_path / "cache")  # default backoff: 0.5 s before the 2nd attempt
    assert _all_keys(remote) == _all_keys(ShardSource(shard_set))
    assert requests["/manifest.json"] == 2 and all(n == 2 for n in requests.values())


def test_persistent_500_ends_in_one_clean_error(shard_set, serve, tmp_path):
    entry = _val_wds(json.loads((shard_set / "manifest.json").read_text()))

    def always(h):
        h.send_error(500)
        return True

    url, requests = serve(shard_set, {f"/{entry['path']}": always})
    remote = ShardSource(url, cache_dir=tmp_path / "cache", backoff=0.01)
    with pytest.raises(ShardSetError) as e:
        _all_keys(remote)
    msg = str(e.value)
    assert f"{url}/{entry['path']}" in msg and "HTTP 500" in msg and "4 attempts" in msg and "\n" not in msg
    assert requests[f"/{entry['path']}"] == 4


@pytest.mark.parametrize("status", [403, 404])
def test_client_errors_are_not_retried(shard_set, serve, tmp_path, status):
    entry = _val_wds(json.loads((shard_set / "manifest.json").read_text()))

    def refuse(h):
        h.send_error(status)
        return True

    url, requests = serve(shard_set, {f"/{entry['path']}": refuse})
    remote = ShardSource(url, cache_dir=tmp_path / "cache", backoff=0.01)
    with pytest.raises(ShardSetError, match=f"{url}/{entry['path']}"):
        remote.read(entry["path"])
    assert requests[f"/{entry['path']}"] == 1


def test_hanging_server_times_out_naming_the_url(shard_set, serve, tmp_path):
    entry = _val_wds(json.loads((shard_set / "manifest.json").read_text()))

    def hang(h):
        serve.release.wait(60)
        return True

    url, requests = serve(shard_set, {f"/{entry['path']}": hang})
    remote = ShardSource(url, cache_dir=tmp_path / "cache", timeout=1, retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(ShardSetError) as e:
        remote.read(entry["path"])
    elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert f"{url}/{entry['path']}" in msg and "timeout" in msg and "2 attempts" in msg
    assert elapsed < 8, f"took {elapsed:.1f} s"
    assert requests[f"/{entry['path']}"] == 2


# ------------------------------------------------------------------ local files: cheap checks

def test_local_file_of_wrong_size_is_refused(shard_set, tmp_path):
    local = _copy(shard_set, tmp_path)
    entry = _val_wds(json.loads((local / "manifest.json").read_text()))
    with open(local / entry["path"], "ab") as f:
        f.write(b"\0" * 512)
    src = ShardSource(local)
    for read in (src.read, src.read_buffer):
        with pytest.raises(ShardSetError, match=f"{entry['path']} is {entry['bytes'] + 512} bytes, the manifest says"):
            read(entry["path"])


def test_local_fifo_is_refused_without_blocking(shard_set, tmp_path):
    local = _copy(shard_set, tmp_path)
    entry = _val_wds(json.loads((local / "manifest.json").read_text()))
    (local / entry["path"]).unlink()
    os.mkfifo(local / entry["path"])
    src = ShardSource(local)
    outcome = []

    def go():
        try:
            src.read_buffer(entry["path"])
            outcome.append("read")
        except ShardSetError as e:
            outcome.append(str(e))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # blocked on the FIFO: release it, then fail
        os.close(os.open(local / entry["path"], os.O_WRONLY | os.O_NONBLOCK))
    assert outcome and "not a regular file" in outcome[0] and entry["path"] in outcome[0]
