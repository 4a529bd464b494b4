"""The label algebra, checked by hand on every label of every release."""

import numpy as np
import pytest

from shards.domain import (MASK_CHANNELS, RELEASES, REGIONS, SUBREGIONS, encode_mask, regions_of, release,
                           to_labels, to_regions)


@pytest.mark.parametrize("name", ["2020", "2023"])  # the 3-channel glioma sets; others: test_releases.py
def test_labels_to_channels_to_labels(name):
    rel = RELEASES[name]
    seg = np.array(rel.label_values, np.uint8)  # one voxel of each label: background first
    sub = encode_mask(seg, rel, "subregions")
    assert sub.tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # NCR/NET, ED, ET
    reg = encode_mask(seg, rel, "regions")
    assert reg.tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]  # WT, TC, ET
    assert np.array_equal(to_regions(sub, "subregions"), reg.astype(bool))
    assert np.array_equal(to_regions(reg, "regions"), reg.astype(bool))
    for mode, ch in (("subregions", sub), ("regions", reg)):
        assert np.array_equal(to_labels(ch.astype(bool), mode, rel), seg)  # the round trip is exact


def test_conventions_are_data():
    assert RELEASES["2020"].et_label == 4 and RELEASES["2023"].et_label == 3
    assert RELEASES["2020"].label_values == (0, 1, 2, 4)
    assert RELEASES["2023"].file_suffix("t1gd") == "t1c" and RELEASES["2020"].file_suffix("t1gd") == "t1ce"
    assert MASK_CHANNELS["subregions"] == SUBREGIONS and MASK_CHANNELS["regions"] == REGIONS
    with pytest.raises(ValueError, match="unknown release"):
        release("1999")


def test_overlapping_channels_take_the_most_specific_label():
    rel = RELEASES["2020"]
    pos = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], bool)  # (NCR/NET, ED, ET) x 3 voxels
    assert to_labels(pos, "subregions", rel).tolist() == [4, 1, 2]
    assert regions_of(pos[:, None], axis=0).shape == (3, 1, 3)
