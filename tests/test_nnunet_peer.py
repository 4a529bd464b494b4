"""The nnU-Net peer's label mapping (bench/nnunet_peer.py), checked without nnunetv2: the labels
it trains on mean the BraTS regions its dataset.json declares, and the nested labels nnU-Net
writes (regions_class_order 1, 2, 3) read back as those regions."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from nnunet_peer import NNUNET_LABEL, REGIONS, REGIONS_CLASS_ORDER, nnunet_labels, regions_of_nested  # noqa: E402

from shards.domain import RELEASES, regions_of  # noqa: E402



def test_training_labels_are_the_declared_regions():
    rng = np.random.default_rng(0)
    sub = rng.integers(0, 4, size=(5, 8, 8))  # 0 background, 1 NCR/NET, 2 ED, 3 ET (disjoint)
    mask = np.stack([sub == 1, sub == 2, sub == 3], axis=1).astype(np.uint8)  # (S, 3, H, W) sub-regions
    labels = nnunet_labels(mask, ["NCR/NET", "ED", "ET"])
    ours = regions_of(mask.astype(bool), 1, RELEASES["2020"])  # (S, 3, H, W) WT, TC, ET
    for k, values in enumerate(REGIONS.values()):
        assert np.array_equal(np.isin(labels, values), ours[:, k]), k
    assert NNUNET_LABEL == {"ED": 1, "NCR/NET": 2, "ET": 3}


def test_nested_output_reads_back_as_regions():
    """nnU-Net paints region k with regions_class_order[k] in order, so later regions win; the peer
    reads WT as any label, TC as 2 or 3, ET as 3."""
    rng = np.random.default_rng(1)
    wt = rng.random((4, 8, 8)) > 0.4
    tc = wt & (rng.random((4, 8, 8)) > 0.4)
    et = tc & (rng.random((4, 8, 8)) > 0.4)
    seg = np.zeros((4, 8, 8), np.uint8)
    for region, label in zip((wt, tc, et), REGIONS_CLASS_ORDER):
        seg[region] = label
    back = regions_of_nested(seg)
    for k, want in enumerate((wt, tc, et)):
        assert np.array_equal(back[:, k], want), k
    assert list(REGIONS) == ["whole tumor", "tumor core", "enhancing tumor"]  # region k is WT, TC, ET
