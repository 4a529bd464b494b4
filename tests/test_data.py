import json

import pytest
import torch

from train.data import SliceStream, StreamConfig, augment, deal
from shards.source import ShardSetError, ShardSource
from shards.wds_io import sample_key


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


@pytest.mark.parametrize("world", [1, 2])
def test_two_workers_per_rank_keep_equal_quotas(shard_set_dotted, world):
    """Real DataLoader workers (2 per rank): worker w of every rank yields the same number of
    full batches (its quota) although the slices dealt to it differ; no slice comes twice across
    ranks and workers; every rank yields the same number of batches; a patient id with a dot
    travels with its slices."""
    src = ShardSource(shard_set_dotted)
    workers, bs, epoch = 2, 2, 1
    per_slot, held, keys, patients, per_rank = {}, {}, [], set(), []
    for rank in range(world):
        ds = SliceStream(src, StreamConfig(batch_size=bs, seed=0, buffer_size=8), rank, world, workers)
        ds.set_epoch(epoch)
        owner = {p: w for w in range(workers) for p in deal(ds.order(epoch), rank, world, w, workers)}
        for w in range(workers):
            held[rank, w] = sum(src.n_slices(p) for p, o in owner.items() if o == w)
        batches = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
        per_rank.append(len(batches))
        assert len(batches) == ds.batches_per_epoch()
        for b in batches:
            assert len(b["keys"]) == bs
            (w,) = {owner[p] for p in b["patients"]}  # a batch holds one worker's patients only
            per_slot[rank, w] = per_slot.get((rank, w), 0) + 1
            assert all(k.startswith(sample_key(p, 0)[:-3]) for k, p in zip(b["keys"], b["patients"]))
            keys += b["keys"]
            patients |= set(b["patients"])
    quotas = [min(held[r, w] for r in range(world)) // bs for w in range(workers)]
    assert quotas == [ds.quota(epoch, w) // bs for w in range(workers)] and min(quotas) > 0
    assert all(per_slot.get((r, w), 0) == quotas[w] for r in range(world) for w in range(workers)), per_slot
    if world > 1:  # the quota, not the data, evens the ranks out
        assert any(held[0, w] // bs != held[1, w] // bs for w in range(workers)), held
    assert len(set(per_rank)) == 1
    assert len(keys) == len(set(keys))  # no slice twice
    assert "BraTS20_Training.005" in patients and "BraTS20_Training_005" not in patients


def test_validation_stream_covers_everything_in_order(shard_set):
    src = ShardSource(shard_set)
    ds = _stream(src, split="val", train=False, batch_size=5)
    keys = _keys(ds)
    total = sum(src.n_slices(p) for p in src.patients("val"))
    assert len(keys) == total == len(set(keys)) and keys == _keys(ds)


def test_zarr_and_wds_deliver_the_same_samples(shard_set_dotted):
    src = ShardSource(shard_set_dotted)
    out, pids = {}, {}
    for fmt in ("zarr", "wds"):
        ds = _stream(src, split="val", train=False, batch_size=7, fmt=fmt)
        out[fmt] = {k: (b["image"][i], b["mask"][i]) for b in ds for i, k in enumerate(b["keys"])}
        pids[fmt] = {k: p for b in ds for k, p in zip(b["keys"], b["patients"])}
    assert out["zarr"].keys() == out["wds"].keys()
    assert pids["zarr"] == pids["wds"] and set(pids["wds"].values()) == set(src.patients("val"))
    assert "BraTS20_Training.004" in pids["wds"].values()  # the id, not the key's '_' spelling
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


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return 2 * (a & b).sum().item() / max(a.sum().item() + b.sum().item(), 1)


def _shapes(batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Off-centre, asymmetric shapes, one per channel (so a flip or a swapped channel shows), and
    a mask that is the thresholded image: (B, 4, 32, 32), (B, 3, 32, 32)."""
    img = torch.zeros(batch, 4, 32, 32)
    img[:, 0, 4:12, 18:28] = 1.0  # a bar, top right
    img[:, 1, 18:28, 4:8] = 1.0  # an L, bottom left
    img[:, 1, 24:28, 4:14] = 1.0
    img[:, 2, 20:26, 20:24] = 1.0  # a small block, bottom right
    img[:, 3] = img[:, :3].amax(1)  # "FLAIR": all of it
    return img, (img[:, :3] > 0.5).float()


def test_augment_moves_image_and_mask_together():
    """One geometric transform per sample for every image and mask channel: the augmented mask
    still equals the thresholded augmented image, while the shapes themselves have moved."""
    img, mask = _shapes()
    a, m = augment(img, mask, torch.Generator().manual_seed(0))
    assert a.shape == img.shape and m.shape == mask.shape
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    for b in range(len(img)):
        for c in range(3):
            assert _dice(a[b, c] > 0.5, m[b, c]) > 0.85, (b, c)  # edges: bilinear image, nearest mask
        assert _dice(a[b, 3] > 0.5, m[b].amax(0)) > 0.85, b
    moved = [_dice(m[b, 0], mask[b, 0]) < 0.5 for b in range(len(img))]
    assert any(moved) and not all(moved)  # flips happen to some samples, not to all
    mismatched = torch.cat([m[1:], m[:1]])  # another sample's transform does not fit
    assert min(_dice(a[b, :3] > 0.5, mismatched[b]) for b in range(len(img))) < 0.5


def test_augment_is_a_function_of_the_generator_seed():
    img, mask = _shapes()
    a, m = augment(img, mask, torch.Generator().manual_seed(0))
    a2, m2 = augment(img.clone(), mask.clone(), torch.Generator().manual_seed(0))
    assert torch.equal(a, a2) and torch.equal(m, m2)
    a3, m3 = augment(img, mask, torch.Generator().manual_seed(1))
    assert not torch.equal(a, a3) and not torch.equal(m, m3)
    assert torch.equal(img, _shapes()[0]) and torch.equal(mask, _shapes()[1])  # inputs left as they were


def test_augment_changes_intensity_on_brain_pixels_only():
    """A centred disc of brain is the same shape after any flip or rotation about the centre:
    inside it each (sample, channel) is scaled and shifted by one amount, outside it stays 0."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    r = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2).sqrt()
    img = (r < 10).float().expand(16, 4, 32, 32).contiguous()
    mask = torch.zeros(16, 3, 32, 32)
    a, _ = augment(img, mask, torch.Generator().manual_seed(0))
    assert torch.equal(a[..., r > 11], torch.zeros_like(a[..., r > 11]))  # background untouched
    inside = a[..., r < 8]  # (B, C, pixels): one value per sample and channel
    per = inside[..., :1]
    assert torch.allclose(inside, per.expand_as(inside), atol=1e-6)
    assert ((per - 1).abs() <= 0.2 + 1e-6).all() and (per - 1).abs().max() > 0.01
    assert len(torch.unique(per)) > 16  # channels of one sample get their own scale and shift


def test_unknown_format_version_and_missing_set_refused(shard_set, tmp_path):
    m = json.loads((shard_set / "manifest.json").read_text())
    m["format"]["version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardSetError, match="format version 99"):
        ShardSource(tmp_path)
    with pytest.raises(ShardSetError, match="not found"):
        ShardSource(tmp_path / "nothing")
