"""Reading shard sets over HTTP and S3, both served on loopback by the test itself."""

import csv
import functools
import hashlib
import json
import math
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from shards.source import ShardSetError, ShardSource
from train import checkpoint
from train.data import SliceStream, StreamConfig
from train.loop import TrainConfig, train


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    servers = []

    def serve(directory):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def _all_keys(src, fmt):
    ds = SliceStream(src, StreamConfig(split="val", train=False, batch_size=16, fmt=fmt))
    return {k: b["image"][i].sum().item() for b in ds for i, k in enumerate(b["keys"])}


def test_http_reads_both_formats_like_local(shard_set, http_server, tmp_path):
    url = http_server(shard_set)
    remote = ShardSource(url, cache_dir=tmp_path / "cache")
    local = ShardSource(shard_set)
    assert remote.manifest == local.manifest
    for fmt in ("zarr", "wds"):
        assert _all_keys(remote, fmt) == _all_keys(local, fmt)
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cached  # fetched files were cached
    # a second source reads from the cache: the server may go away
    again = ShardSource(url, cache_dir=tmp_path / "cache")
    assert _all_keys(again, "wds") == _all_keys(local, "wds")


TIMING = ("seconds", "slices_per_s")  # the only figures of a run allowed to differ between two runs


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def assert_same_run(remote: Path, hist_remote: list[dict], local: Path, hist_local: list[dict]) -> None:
    """Training from a remote copy gave what training from the local set gives with the same seed:
    the same history and metrics.csv (timings aside) and bit-identical weights and optimiser state."""
    def plain(hist):  # NaN-safe comparison (a patient Dice of an empty region may be NaN)
        return [json.dumps({k: v for k, v in row.items() if k not in TIMING}, sort_keys=True) for row in hist]

    assert len(hist_local) >= 1 and all(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in hist_local)
    assert plain(hist_remote) == plain(hist_local)
    assert _metrics(remote) == _metrics(local) and len(_metrics(local)) == len(hist_local)
    a, b = checkpoint.load(remote / "checkpoints" / "last.pt"), checkpoint.load(local / "checkpoints" / "last.pt")
    assert a["manifest_sha256"] == b["manifest_sha256"] and a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    # every state tensor, whatever the optimizer (SGD's momentum_buffer by default, Adam's exp_avg, ...)
    assert sa.keys() == sb.keys() and all(sa[i].keys() == sb[i].keys() for i in sa)
    assert all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for i in sa for k in sa[i])


WDS_RUN = TrainConfig(base_channels=4, depth=2, batch_size=8, num_workers=1, epochs=2, fmt="wds")
ZARR_RUN = TrainConfig(base_channels=4, depth=2, batch_size=8, num_workers=0, epochs=1)


def test_train_from_http_equals_training_from_the_local_copy(shard_set, http_server, tmp_path):
    url = http_server(shard_set)
    hist = train(url, tmp_path / "run", WDS_RUN, progress=False, cache_dir=str(tmp_path / "cache"))
    ref = train(str(shard_set), tmp_path / "local", WDS_RUN, progress=False)
    assert len(hist) == 2
    assert_same_run(tmp_path / "run", hist, tmp_path / "local", ref)


def test_corrupted_remote_shard_is_refused(shard_set, http_server, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(shard_set, served)
    src = ShardSource(shard_set)
    victim = src.wds_file(src.patients("val")[0])
    data = bytearray((served / victim).read_bytes())
    data[2000] ^= 0x01  # same size, one bit off
    (served / victim).write_bytes(bytes(data))
    remote = ShardSource(http_server(served), cache_dir=tmp_path / "cache")
    with pytest.raises(ShardSetError, match=f"corrupted shard .*{victim}"):
        _all_keys(remote, "wds")
    bad = hashlib.sha256(bytes(data)).hexdigest()
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert all(p.name == hashlib.sha256(p.read_bytes()).hexdigest() for p in cached)  # content-addressed
    assert bad not in {p.name for p in cached}  # never cached, never used


def test_cache_is_bounded(shard_set, http_server, tmp_path):
    src = ShardSource(shard_set)
    biggest = max(f["bytes"] for f in src.manifest["files"])
    remote = ShardSource(http_server(shard_set), cache_dir=tmp_path / "cache", cache_bytes=2 * biggest)
    for f in src.manifest["files"]:
        assert remote.read(f["path"]) == (shard_set / f["path"]).read_bytes()
        cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
        assert sum(p.stat().st_size for p in cached) <= 2 * biggest
        # content-addressed: cache/sha256/<2 hex>/<sha256>, no manifest path in it
        assert all(p.relative_to(tmp_path / "cache").parts == ("sha256", p.name[:2], p.name) for p in cached)
        assert remote.cache / f["sha256"][:2] / f["sha256"] in cached
    assert sum(f["bytes"] for f in src.manifest["files"]) > 2 * biggest  # eviction really happened


def test_s3_compatible_server(shard_set, tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._server.server_port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="brats")
        for p in shard_set.rglob("*"):
            if p.is_file():
                s3.upload_file(str(p), "brats", f"sets/demo/{p.relative_to(shard_set).as_posix()}")
        remote = ShardSource("s3://brats/sets/demo", cache_dir=tmp_path / "cache",
                             storage_options={"endpoint_url": endpoint})
        local = ShardSource(shard_set)
        assert _all_keys(remote, "zarr") == _all_keys(local, "zarr")
        hist = train("s3://brats/sets/demo", tmp_path / "run", ZARR_RUN, progress=False,
                     cache_dir=str(tmp_path / "cache2"), storage_options={"endpoint_url": endpoint})
        ref = train(str(shard_set), tmp_path / "local", ZARR_RUN, progress=False)
        assert len(hist) == 1
        assert_same_run(tmp_path / "run", hist, tmp_path / "local", ref)
    finally:
        server.stop()
