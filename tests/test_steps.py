import numpy as np
import pytest

from preprocess import steps
from preprocess.errors import InputError


def test_exact_statistics_of_integers():
    v = np.array([1, 2, 3, 4], np.int16)
    assert steps._exact_mean_std(v) == (2.5, pytest.approx(np.sqrt(1.25)))


def test_brain_stats_exact_for_integers_and_floats():
    rng = np.random.default_rng(1)
    vol = rng.integers(-50, 3000, (30, 30, 8)).astype(np.int16)
    brain = vol > 100
    vol = np.where(brain, vol, 0).astype(np.int16)
    ref = vol[brain].astype(np.float64)
    for v in (vol, vol.astype(np.float32), vol.astype(np.int32)):
        m, s = steps.brain_stats(v, brain)
        assert m == pytest.approx(ref.mean(), rel=1e-12) and s == pytest.approx(ref.std(), rel=1e-9)
    f = np.where(brain, rng.normal(5, 2, vol.shape), 0)
    assert steps.brain_stats(f, brain)[0] == pytest.approx(f[brain].mean())


def test_nonfinite_rule():
    v = np.ones((4, 4, 4), np.float32)
    v[0, 0, 0], v[1, 1, 1] = np.nan, np.inf
    out, n = steps.nonfinite_to_zero(v)
    assert n == 2 and np.isfinite(out).all() and out[0, 0, 0] == 0 and np.isnan(v[0, 0, 0])


def test_label_counts_and_offenders():
    assert steps.label_counts(np.array([0, 0, 1, 4, 4, 4]), (0, 1, 2, 4)) == {"0": 2, "1": 1, "4": 3}
    with pytest.raises(InputError, match=r"seg.nii labels \[3\] outside .*\[0, 1, 2, 4\]"):
        steps.label_counts(np.array([0, 1, 3]), (0, 1, 2, 4), "seg.nii")


def test_square_box_is_square_and_contains_mask():
    m = np.zeros((240, 240), bool)
    m[50:200, 80:150] = True
    x0, x1, y0, y1 = steps.square_box(m)
    assert x1 - x0 == y1 - y0 and x0 <= 50 and x1 >= 200 and y0 <= 80 and y1 >= 150
