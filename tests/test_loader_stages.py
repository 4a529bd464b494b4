"""The loader's stages, each alone: patients' slices -> shuffle buffer -> quota -> batches ->
foreground oversampling (train/data.py); SliceStream composes them."""

import numpy as np

from train.data import batched, shuffled, take, with_foreground


def _groups(sizes):
    """Lists of items (image, mask, key, patient), a patient's slices each; mask marks tumour
    on the patients of odd index."""
    return [[(None, np.array([p % 2]), f"p{p}_{i}", f"p{p}") for i in range(n)] for p, n in enumerate(sizes)]


def test_shuffled_is_a_seeded_permutation_within_its_buffer():
    groups = _groups([5, 7, 3, 9])
    held = []
    a = [it[2] for it in shuffled(iter(groups), 6, np.random.default_rng(1), held.append)]
    b = [it[2] for it in shuffled(iter(groups), 6, np.random.default_rng(1))]
    c = [it[2] for it in shuffled(iter(groups), 6, np.random.default_rng(2))]
    every = [it[2] for g in groups for it in g]
    assert sorted(a) == sorted(every) and a != every  # all of them, once, reordered
    assert a == b and a != c  # the seed decides the order
    assert held == [5, 12, 9, 15]  # after each patient joins: at most buffer + one patient


def test_take_stops_at_the_quota_and_batched_keeps_the_tail_only_when_asked():
    assert list(take(iter(range(10)), 4)) == [0, 1, 2, 3]
    assert list(take(iter(range(3)), 4)) == [0, 1, 2]
    assert list(batched(iter(range(7)), 3, keep_last=False)) == [[0, 1, 2], [3, 4, 5]]
    assert list(batched(iter(range(7)), 3, keep_last=True)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_with_foreground_fills_each_batch_to_its_share_from_tumour_seen_so_far():
    items = [it for g in _groups([4, 4, 4, 4, 4, 4]) for it in g]  # p1, p3, p5 tumour
    out = list(with_foreground(batched(iter(items), 4, keep_last=False), 0.5, np.random.default_rng(0)))
    assert [len(b) for b in out] == [4] * 6  # counts never change
    assert sum(bool(it[1].any()) for it in out[0]) == 0  # no tumour seen yet: nothing to draw
    for b in out[1:]:
        assert sum(bool(it[1].any()) for it in b) >= 2  # at least half of each batch
    seen = {it[2] for it in items}
    assert all(it[2] in seen for b in out for it in b)  # draws are slices of the stream


def test_balanced_oversampling_draws_every_channel_evenly():
    """nnU-Net's sampling (--fg-balance): the drawn share of the batch is spread evenly over the
    mask channels present, so a rare channel (here ET, in 10 % of the reservoir's slices) fills
    half of the draws instead of a tenth; the rest of the batch is untouched."""
    from train.data import oversample, oversample_balanced

    def item(channel, tag):
        mask = np.zeros((3, 4, 4), np.uint8)
        mask[channel, :2, :2] = 1
        return (tag, mask)

    reservoir = [item(1, "ED")] * 90 + [item(2, "ET")] * 10
    rng = np.random.default_rng(0)
    drawn = []
    for _ in range(200):
        batch = [("empty", np.zeros((3, 4, 4), np.uint8))] * 12
        oversample_balanced(batch, reservoir, 1 / 3, rng)
        assert sum(b[0] != "empty" for b in batch) == 4  # ceil(12 / 3) slices drawn
        drawn += [b[0] for b in batch if b[0] != "empty"]
    share_et = drawn.count("ET") / len(drawn)
    assert 0.42 < share_et < 0.58, share_et
    plain = []
    for _ in range(200):
        batch = [("empty", np.zeros((3, 4, 4), np.uint8))] * 12
        oversample(batch, reservoir, 1 / 3, rng)
        plain += [b[0] for b in batch if b[0] != "empty"]
    assert plain.count("ET") / len(plain) < 0.2  # in proportion to the reservoir
    # a batch already full of tumour is still drawn from (nnU-Net forces its share), and an empty
    # reservoir leaves the batch alone
    full = [item(1, "mine")] * 6
    oversample_balanced(full, reservoir, 0.5, rng)
    assert sum(b[0] != "mine" for b in full) == 3
    alone = [item(1, "mine")] * 6
    oversample_balanced(alone, [], 0.5, rng)
    assert all(b[0] == "mine" for b in alone)
