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
