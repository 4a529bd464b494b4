import json

import pytest
import torch

from train.data import SliceStream, StreamConfig, augment
from shards.source import ShardSetError, ShardSource


def _keys(ds, epoch=0):
    ds.set_epoch(epoch)
    return [k for b in ds for k in b["keys"]]


def _stream(src, **kw):
    rank, world = kw.pop("rank", 0), kw.pop("world", 1)
    return SliceStream(src, StreamConfig(**kw), rank=rank, world=world, num_workers=1)


def test_same_seed_same_order_new_epoch_new_order(shard_set):
    src = ShardSource(shard_set)
    a = _keys(_stream(src, batch_size=4, seed=1, buffer_size=16))
    b = _keys(_stream(src, batch_size=4, seed=1, buffer_size=16))
    c = _keys(_stream(src, batch_size=4, seed=1, buffer_size=16), epoch=1)
    d = _keys(_stream(src, batch_size=4, seed=2, buffer_size=16))
    assert a == b and a != c and a != d
    assert len(set(a)) == len(a)  # no slice twice in an epoch


def test_ranks_and_workers_disjoint_with_equal_batch_counts(shard_set):
    src = ShardSource(shard_set)
    n_train = len(src.patients("train"))
    assert n_train >= 3
    for world, workers in ((2, 1), (3, 1), (n_train + 1, 1)):
        seen, counts = [], []
        for rank in range(world):
            ds = SliceStream(src, StreamConfig(batch_size=4, seed=0), rank=rank, world=world, num_workers=workers)
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
            batches = list(loader)
            counts.append(len(batches))
            assert len(batches) == ds.batches_per_epoch()
            assert all(len(b["keys"]) == 4 for b in batches)
            seen.append({k for b in batches for k in b["keys"]})
        assert len(set(counts)) == 1, counts
        if world > n_train:  # a rank without patients: every rank gets 0 batches (no DDP hang)
            assert counts[0] == 0
            continue
        assert counts[0] > 0
        for i in range(world):
            for j in range(i + 1, world):
                assert not seen[i] & seen[j]
            # a rank's slices come from whole patients that no other rank touches
        pats = [{k.rsplit("_s", 1)[0] for k in s} for s in seen]
        assert all(not pats[i] & pats[j] for i in range(world) for j in range(i + 1, world))


def test_validation_stream_covers_everything_in_order(shard_set):
    src = ShardSource(shard_set)
    ds = _stream(src, split="val", train=False, batch_size=5)
    keys = _keys(ds)
    total = sum(src.n_slices(p) for p in src.patients("val"))
    assert len(keys) == total == len(set(keys)) and keys == _keys(ds)


def test_zarr_and_wds_deliver_the_same_samples(shard_set):
    src = ShardSource(shard_set)
    out = {}
    for fmt in ("zarr", "wds"):
        ds = _stream(src, split="val", train=False, batch_size=7, fmt=fmt)
        out[fmt] = {k: (b["image"][i], b["mask"][i]) for b in ds for i, k in enumerate(b["keys"])}
    assert out["zarr"].keys() == out["wds"].keys()
    for k in out["zarr"]:
        assert torch.equal(out["zarr"][k][0], out["wds"][k][0]) and torch.equal(out["zarr"][k][1], out["wds"][k][1])
    b = next(iter(_stream(src, batch_size=8)))
    assert b["image"].dtype == torch.float32 and b["image"].shape == (8, 4, 32, 32) and b["mask"].shape == (8, 3, 32, 32)


def test_memory_bounded_by_buffer_not_dataset(shard_set):
    """The shuffle buffer never holds more than buffer_size plus one patient's slices."""
    src = ShardSource(shard_set)
    largest = max(src.n_slices(p) for p in src.patients("train"))
    total = sum(src.n_slices(p) for p in src.patients("train"))
    ds = _stream(src, batch_size=2, buffer_size=10)
    keys = _keys(ds)
    assert len(keys) > 10 + largest  # the epoch streams far more than is ever held
    assert 10 < ds.peak_buffered <= 10 + largest < total
    big = _stream(src, batch_size=2, buffer_size=10_000)
    _keys(big)
    assert big.peak_buffered == total  # a buffer larger than the set holds the set: the bound is real


def test_augment_moves_image_and_mask_together():
    img = torch.zeros(4, 4, 32, 32)
    img[:, :, 5:12, 20:28] = 1.0
    mask = (img[:, :3] > 0).float()
    g = torch.Generator().manual_seed(0)
    a, m = augment(img, mask, g)
    assert a.shape == img.shape and m.shape == mask.shape
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    inside = (m[:, 0] > 0)
    assert (a[:, 0][inside] > 0.5).float().mean() > 0.9  # the mask still lies on the bright square
    assert not torch.equal(a, img)
    a2, m2 = augment(img, mask, torch.Generator().manual_seed(0))
    assert torch.equal(a, a2) and torch.equal(m, m2)


def test_unknown_format_version_and_missing_set_refused(shard_set, tmp_path):
    m = json.loads((shard_set / "manifest.json").read_text())
    m["format"]["version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardSetError, match="format version 99"):
        ShardSource(tmp_path)
    with pytest.raises(ShardSetError, match="not found"):
        ShardSource(tmp_path / "nothing")
