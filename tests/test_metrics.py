import numpy as np
import pytest
import torch

from shards.domain import to_regions
from train.metrics import confusion, dice, make_loss, scores, soft_dice_loss


def test_scores_by_hand():
    # pred 1 1 0 0 ; truth 1 0 1 0 -> TP 1, FP 1, FN 1
    s = scores(1, 1, 1)
    assert s == {"dice": pytest.approx(0.5), "precision": 0.5, "recall": 0.5}
    assert scores(3, 1, 0) == {"dice": pytest.approx(6 / 7), "precision": 0.75, "recall": 1.0}


def test_empty_conventions():
    assert scores(0, 0, 0) == {"dice": 1.0, "precision": 1.0, "recall": 1.0}  # both empty: perfect
    assert scores(0, 5, 0)["dice"] == 0.0 and scores(0, 5, 0)["precision"] == 0.0  # false alarm
    assert scores(0, 0, 5)["dice"] == 0.0 and scores(0, 0, 5)["recall"] == 0.0  # missed lesion
    assert scores(0, 5, 0)["recall"] == 0.0 and scores(0, 0, 5)["precision"] == 0.0


def test_confusion_counts_per_channel():
    pred = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    truth = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    pred[0, 0, 0, :] = True  # 2 predicted
    truth[0, 0, :, 0] = True  # 2 true, 1 overlap
    truth[0, 2, 1, 1] = True
    c = confusion(pred, truth)
    assert c.tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 1]]


def test_dice_numpy_and_regions():
    ref = np.zeros((4, 4), bool)
    ref[:2, :2] = True
    pred = np.zeros((4, 4), bool)
    pred[:2, :1] = True
    assert dice(pred, ref) == pytest.approx(2 * 2 / (2 + 4))
    sub = np.zeros((3, 1, 4), np.uint8)
    sub[0, 0, 0] = 1  # NCR
    sub[1, 0, 1] = 1  # ED
    sub[2, 0, 2] = 1  # ET
    wt, tc, et = to_regions(sub, "subregions")
    assert wt[0].tolist() == [True, True, True, False]
    assert tc[0].tolist() == [True, False, True, False]
    assert et[0].tolist() == [False, False, True, False]
    assert np.array_equal(to_regions(sub, "regions"), sub.astype(bool))


def test_losses():
    y = torch.zeros(2, 3, 8, 8)
    y[:, :, 2:5, 2:5] = 1
    perfect = (y * 2 - 1) * 20  # confident logits
    assert soft_dice_loss(perfect, y).item() < 1e-3
    assert soft_dice_loss(-perfect, y).item() > 0.9
    both = make_loss("dice-bce")
    assert both(perfect, y).item() < 1e-3 and both(-perfect, y).item() > 5
    with pytest.raises(ValueError):
        make_loss("focal")
