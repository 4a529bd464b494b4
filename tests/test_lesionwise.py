"""Lesion-wise Dice/HD95 on hand-made volumes whose answers follow from the rules by hand."""

import dataclasses
import math

import numpy as np
import pytest

from train.lesionwise import nsd, surface_distances, BRATS_2023, BRATS_EVALUATION, LesionParams, hd95, lesion_metrics

SHAPE = (40, 12, 12)
ONE_MM = (1.0, 1.0, 1.0)


def cube(x0: int, side: int = 4, shape=SHAPE) -> np.ndarray:
    """A side**3 cube at x0 along x (64 voxels for side 4: above the 50 mm^3 minimum at 1 mm)."""
    m = np.zeros(shape, bool)
    m[x0:x0 + side, 4:4 + side, 4:4 + side] = True
    return m


def test_perfect_lesion():
    for params in (BRATS_2023, BRATS_EVALUATION):
        assert lesion_metrics(cube(2), cube(2), ONE_MM, params) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0, "tp": 1, "fp": 0, "fn": 0}


def test_missed_lesion_is_penalised():
    """Two lesions, one found perfectly, one missed: (1 + 0) / 2 and (0 + 374) / 2."""
    ref = cube(2) | cube(30)
    m = lesion_metrics(cube(2), ref, ONE_MM, BRATS_2023)
    assert m == {"dice": 0.5, "hd95": 187.0, "nsd": 0.5, "tp": 1, "fp": 0, "fn": 1}
    # brats-evaluation counts the miss but averages over the matched lesion only
    assert lesion_metrics(cube(2), ref, ONE_MM, BRATS_EVALUATION) == {
        "dice": 1.0, "hd95": 0.0, "nsd": 1.0, "tp": 1, "fp": 0, "fn": 1}
    assert lesion_metrics(np.zeros(SHAPE, bool), ref, ONE_MM, BRATS_2023)["hd95"] == 374.0


def test_false_positive_component_is_penalised():
    """A blob far from every dilated lesion (however small) is one more lesion scoring 0 / 374."""
    pred = cube(2).copy()
    pred[32, 6, 6] = True
    m = lesion_metrics(pred, cube(2), ONE_MM, BRATS_2023)
    assert m == {"dice": 0.5, "hd95": 187.0, "nsd": 0.5, "tp": 1, "fp": 1, "fn": 0}
    assert lesion_metrics(pred, cube(2), ONE_MM, BRATS_EVALUATION)["dice"] == 1.0
    # reference empty: only false positives -> Dice 0, HD95 374 (2023), 0 / inf (brats-evaluation)
    assert lesion_metrics(pred, np.zeros(SHAPE, bool), ONE_MM, BRATS_2023) == {
        "dice": 0.0, "hd95": 374.0, "nsd": 0.0, "tp": 0, "fp": 2, "fn": 0}
    none = lesion_metrics(pred, np.zeros(SHAPE, bool), ONE_MM, BRATS_EVALUATION)
    assert none["dice"] == 0.0 and none["hd95"] == math.inf and none["nsd"] == 0.0


def test_component_near_a_lesion_belongs_to_it():
    """A blob 3 voxels from the lesion is inside its 3-voxel dilation: part of the lesion's
    prediction (lowering its Dice), not a false positive; at 4 voxels it is a false positive."""
    near = cube(2).copy()
    near[8, 6, 6] = True  # cube ends at x = 5; x = 8 is 3 voxels away
    m = lesion_metrics(near, cube(2), ONE_MM, BRATS_2023)
    assert m["fp"] == 0 and m["tp"] == 1 and m["dice"] == pytest.approx(2 * 64 / (64 + 65))
    far = cube(2).copy()
    far[9, 6, 6] = True
    assert lesion_metrics(far, cube(2), ONE_MM, BRATS_2023)["fp"] == 1


def test_two_lesions_one_merged_prediction():
    """Reference lesions 7 voxels apart (their 3-voxel dilations do not touch): two lesions.
    One predicted component spans both (4 x 4 x 15 = 240 voxels).
    BraTS 2023: each lesion owns every component touching it, so both are found (TP 2, FN 0),
    each scoring Dice 2 * 64 / (64 + 240) against the whole component.
    brats-evaluation: one-to-one, so the component goes to one lesion (same Dice), the other is
    missed (FN 1), and the mean is over the matched one."""
    ref = cube(2) | cube(13)
    pred = np.zeros(SHAPE, bool)
    pred[2:17, 4:8, 4:8] = True
    m = lesion_metrics(pred, ref, ONE_MM, BRATS_2023)
    each = 2 * 64 / (64 + 240)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    assert m["dice"] == pytest.approx(each)
    assert m["hd95"] == pytest.approx(np.mean([hd95(pred, cube(2), ONE_MM), hd95(pred, cube(13), ONE_MM)]))
    e = lesion_metrics(pred, ref, ONE_MM, BRATS_EVALUATION)
    assert (e["tp"], e["fp"], e["fn"]) == (1, 0, 1) and e["dice"] == pytest.approx(each)


def test_close_reference_lesions_are_one_lesion():
    """6 voxels apart the 3-voxel dilations touch: one lesion of 128 voxels, found by the
    component covering the first cube only: Dice 2 * 64 / (128 + 64), no miss."""
    ref = cube(2) | cube(12)
    m = lesion_metrics(cube(2), ref, ONE_MM, BRATS_2023)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 0) and m["dice"] == pytest.approx(2 / 3)
    assert lesion_metrics(cube(2), ref, ONE_MM, dataclasses.replace(BRATS_2023, dilation=0))["fn"] == 1


def test_both_empty():
    empty = np.zeros(SHAPE, bool)
    assert lesion_metrics(empty, empty, ONE_MM, BRATS_2023) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0, "tp": 0, "fp": 0, "fn": 0}
    e = lesion_metrics(empty, empty, ONE_MM, BRATS_EVALUATION)
    assert math.isnan(e["dice"]) and math.isnan(e["hd95"]) and math.isnan(e["nsd"])


def test_lesions_up_to_the_minimum_volume_are_not_scored():
    """A 27-voxel lesion (at most 50 mm^3 at 1 mm) is neither a miss nor, when predicted, a TP;
    the component on it is no false positive. With 2 mm along x the same lesion is 54 mm^3."""
    small = cube(30, side=3)
    ref = cube(2) | small
    assert lesion_metrics(cube(2), ref, ONE_MM, BRATS_2023) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0, "tp": 1, "fp": 0, "fn": 0}
    assert lesion_metrics(ref, ref, ONE_MM, BRATS_2023) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0, "tp": 1, "fp": 0, "fn": 0}
    assert lesion_metrics(small, small, ONE_MM, BRATS_2023) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0, "tp": 0, "fp": 0, "fn": 0}
    m = lesion_metrics(cube(2), ref, (2.0, 1.0, 1.0), BRATS_2023)
    assert m["fn"] == 1 and m["dice"] == 0.5
    # a lesion of exactly the minimum is still left out (the rule keeps volumes above it)
    at_minimum = dataclasses.replace(BRATS_2023, min_volume=54.0)
    assert lesion_metrics(cube(2), ref, (2.0, 1.0, 1.0), at_minimum)["fn"] == 0


def test_spacing_used_in_hd95():
    """Two 10 x 10 planes 2 voxels apart along z: every surface distance is 2 voxels, so HD95
    is 2 mm at 1 mm and 4 mm with 2 mm slices; no overlap, Dice 0, yet found (within 3 voxels)."""
    ref = np.zeros((12, 12, 12), bool)
    pred = np.zeros_like(ref)
    ref[1:11, 1:11, 4] = True
    pred[1:11, 1:11, 6] = True
    assert lesion_metrics(pred, ref, ONE_MM, BRATS_2023) == {"dice": 0.0, "hd95": 2.0, "nsd": 0.0, "tp": 1, "fp": 0, "fn": 0}
    assert lesion_metrics(pred, ref, (1.0, 1.0, 2.0), BRATS_2023)["hd95"] == pytest.approx(4.0)
    assert lesion_metrics(pred, ref, (1.0, 1.0, 2.0), BRATS_EVALUATION)["fn"] == 1  # no overlap: no match


def test_lesions_are_26_connected():
    """Two cubes meeting at one corner are one lesion; with 6-connectivity they would be two."""
    ref = cube(2) | np.roll(cube(2), (4, 4, 4), axis=(0, 1, 2))
    m = lesion_metrics(cube(2), ref, ONE_MM, BRATS_EVALUATION)
    assert (m["tp"], m["fn"]) == (1, 0) and m["dice"] == pytest.approx(2 * 64 / (128 + 64))
    six = lesion_metrics(cube(2), ref, ONE_MM, dataclasses.replace(BRATS_EVALUATION, connectivity=6))
    assert (six["tp"], six["fn"], six["dice"]) == (1, 1, 1.0)


def test_one_to_one_maximises_summed_dice():
    """Lesions L1 (x 2-9, 128 voxels) and L2 (x 20-23, 64); components A (x 2, 16 voxels, on L1)
    and B (x 4-23, 320, over most of L1 and all of L2). Dice B-L1 0.43 is the best single pair,
    but A-L1 0.22 + B-L2 0.33 is the larger sum: both lesions matched, none missed."""
    ref, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    ref[2:10, 4:8, 4:8] = ref[20:24, 4:8, 4:8] = True
    pred[2:3, 4:8, 4:8] = pred[4:24, 4:8, 4:8] = True
    m = lesion_metrics(pred, ref, ONE_MM, BRATS_EVALUATION)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    assert m["dice"] == pytest.approx(np.mean([2 * 16 / (128 + 16), 2 * 64 / (64 + 320)]))


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="connectivity"):
        LesionParams("x", connectivity=8)
    with pytest.raises(ValueError, match="matching"):
        LesionParams("x", matching="greedy")
    with pytest.raises(ValueError, match="shape"):
        lesion_metrics(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool), ONE_MM)


def test_nsd_counts_surface_voxels_within_the_tolerance():
    """A 10-voxel cube (z 5-14) against the same cube shifted to z 7-16, at 1 mm. Of the reference's
    488 surface voxels (two 10 x 10 faces, eight 36-voxel side rings), within 1 mm of the
    prediction's surface: the side rings at z 7-13 (on its side faces, 252), the ring at z 6 (1 mm
    below its bottom face, 36) and the 64 voxels of the z 14 face that are on or next to its side
    faces (the inner 6 x 6 are 2 mm from everything); the z 5 face is 2 mm away. 352 / 488 each
    way, so NSD = 352 / 488. The tolerance is the smallest spacing unless named."""
    ref = np.zeros((20, 20, 20), bool)
    ref[5:15, 5:15, 5:15] = True
    pred = np.roll(ref, 2, axis=2)
    d_pred, d_ref = surface_distances(pred, ref, ONE_MM)
    assert d_pred.size == d_ref.size == 488
    assert np.sum(d_ref <= 1.0) == np.sum(d_pred <= 1.0) == 352
    assert nsd(pred, ref, ONE_MM) == pytest.approx(352 / 488, abs=1e-12)
    # every surface voxel is within 2 mm of the other surface: a 2 mm tolerance gives 1
    assert nsd(pred, ref, ONE_MM, tolerance=2.0) == pytest.approx(1.0)
    # with 2 mm slices the same shift is 4 mm: fewer voxels within the (still 1 mm) tolerance
    assert nsd(pred, ref, (1.0, 1.0, 2.0)) < nsd(pred, ref, ONE_MM)
    # symmetric, and the edge cases: both empty 1, one empty 0, no voxel in common 0
    assert nsd(ref, pred, ONE_MM) == pytest.approx(nsd(pred, ref, ONE_MM))
    empty = np.zeros_like(ref)
    assert nsd(empty, empty, ONE_MM) == 1.0 and nsd(ref, empty, ONE_MM) == 0.0 and nsd(empty, ref, ONE_MM) == 0.0
    apart = np.roll(ref, 10, axis=0)  # touching faces, no common voxel
    assert nsd(apart, ref, ONE_MM) == 0.0
