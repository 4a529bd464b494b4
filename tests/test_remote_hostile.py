"""Remote shard sets whose servers stall, trickle or talk too much (issue 18, cases 3 and 23).

A download has a deadline: after its first `timeout` seconds it must average `min_rate` bytes per
second, so a server that sends a byte now and then is given up on. Every remote failure is one
capped line naming the URL and saying truthfully whether it was retried, also when it happened in
a DataLoader worker process.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.errors import BratsShardsError, one_line
from shards.source import ShardSetError, ShardSource

ROOT = Path(__file__).resolve().parents[1]


def _trickle(stop, body: bytes, every=0.05):
    """A hook that announces the whole body and then sends it one byte at a time."""
    def hook(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            for b in body:
                if stop.wait(every):
                    break
                h.wfile.write(bytes([b]))
                h.wfile.flush()
        except OSError:  # the client gave up: what this test wants
            pass
        return True
    return hook


def _wds_entry(shard_set: Path) -> dict:
    m = json.loads((shard_set / "manifest.json").read_text())
    return next(f for f in m["files"] if f["format"] == "wds")


def _refusal(shard_set: Path, serve, tmp_path, hook, **opts) -> tuple[str, str]:
    """(url of the shard, the one line) when reading the set's first tar through `hook` fails."""
    entry = _wds_entry(shard_set)
    url, _ = serve(shard_set, {f"/{entry['path']}": hook})
    src = ShardSource(url, cache_dir=tmp_path / "cache", backoff=0.01, **opts)
    with pytest.raises(ShardSetError) as e:
        src.read(entry["path"])
    return f"{url}/{entry['path']}", str(e.value)


def test_trickling_shard_is_given_up_on(shard_set, serve, tmp_path):
    body = (shard_set / _wds_entry(shard_set)["path"]).read_bytes()
    t0 = time.monotonic()
    where, msg = _refusal(shard_set, serve, tmp_path, _trickle(serve.release, body), timeout=0.5, retries=1)
    elapsed = time.monotonic() - t0
    assert elapsed < 8, f"took {elapsed:.1f} s"  # 2 attempts of ~0.5 s + a read in flight each
    assert where in msg and "too slow" in msg and "gave up after 2 attempts" in msg, msg


def test_trickling_manifest_is_given_up_on(shard_set, serve, tmp_path):
    body = (shard_set / "manifest.json").read_bytes()
    url, _ = serve(shard_set, {"/manifest.json": _trickle(serve.release, body)})
    t0 = time.monotonic()
    with pytest.raises(ShardSetError, match=r"manifest\.json: too slow.*gave up after 1 attempt|manifest\.json: too slow"):
        ShardSource(url, cache_dir=tmp_path / "cache", timeout=0.5, retries=0)
    assert time.monotonic() - t0 < 5


def test_fast_server_is_not_too_slow(shard_set, serve, tmp_path):
    """The deadline grows with the size: a server that keeps up is never refused."""
    url, _ = serve(shard_set)
    src = ShardSource(url, cache_dir=tmp_path / "cache", timeout=0.5, retries=0, min_rate=1024)
    entry = _wds_entry(shard_set)
    assert src.read(entry["path"]) == (shard_set / entry["path"]).read_bytes()


def test_a_long_reason_phrase_is_capped(shard_set, serve, tmp_path):

    def chatty(h):
        h.send_response(503, "overloaded " + "x" * 6000)
        h.send_header("Content-Length", "0")
        h.end_headers()
        return True

    where, msg = _refusal(shard_set, serve, tmp_path, chatty, timeout=2, retries=1)
    assert where in msg and len(msg) < 600 and "\n" not in msg, msg[:300]
    assert "gave up after 2 attempts" in msg, msg


def test_a_permanent_error_says_it_was_not_retried(shard_set, serve, tmp_path):
    seen = []

    def first_500_then_403(h):
        seen.append(1)
        h.send_error(500 if len(seen) == 1 else 403)
        return True

    _, msg = _refusal(shard_set, serve, tmp_path, first_500_then_403, timeout=2, retries=3)
    assert "HTTP 403" in msg and "not retried, a permanent error (after 1 failed attempt retried)" in msg, msg
    assert "attempt 2 of 4" not in msg and len(seen) == 2


def test_refused_s3_connection_is_retried_and_says_so(tmp_path):
    """A connection refused is transient: retried, and the line says how often."""
    pytest.importorskip("s3fs")
    opts = {"anon": True, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
            "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(ShardSetError) as e:
        ShardSource("s3://bucket/set", cache_dir=tmp_path / "cache", storage_options=opts, timeout=1,
                    retries=1, backoff=0.01)
    msg = str(e.value)
    assert "s3://bucket/set/manifest.json" in msg and "gave up after 2 attempts" in msg, msg
    assert "not retried" not in msg


def test_a_worker_traceback_becomes_its_message():
    """torch re-raises a DataLoader worker's error as the same class built from its traceback."""
    wrapped = ("Caught ShardSetError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 3, in f\n    raise ShardSetError(m)\n'
               "shards.source.ShardSetError: cannot read http://h/a.tar: not found\n")
    assert str(ShardSetError(wrapped)) == "cannot read http://h/a.tar: not found"
    assert one_line(wrapped) == "cannot read http://h/a.tar: not found"
    long = BratsShardsError("y" * 50_000)
    assert len(str(long)) <= 1000 and "characters cut" in str(long)


@pytest.mark.slow
def test_train_over_a_404_in_a_worker_is_one_line(shard_set, serve, tmp_path):
    """The whole path: `train URL --num-workers 1`, a shard the server no longer has."""
    served = tmp_path / "served"
    shutil.copytree(shard_set, served)
    m = json.loads((served / "manifest.json").read_text())
    for f in m["files"]:  # every shard, whichever layout train reads
        (served / f["path"]).unlink()
    url, _ = serve(served)
    env = {**os.environ, "BRATS_SHARDS_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", url, "--out", str(tmp_path / "run"),
                        "--epochs", "1", "--base-channels", "4", "--depth", "2", "--batch-size", "4",
                        "--max-batches", "2", "--num-workers", "1", "--device", "cpu", "--quiet",
                        "--remote-timeout", "2"], capture_output=True, text=True, timeout=240, env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and url in lines[0], r.stderr[-2000:]
    assert "Traceback" not in lines[0] and "Caught" not in lines[0] and "not found" in lines[0]
