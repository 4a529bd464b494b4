"""In-plane resampling: the antialiased image resize, the nearest label resize, their taps and the
bilinear way back."""

import numpy as np
import pytest

from preprocess import resample


def test_resize_image_keeps_constants_and_mean():
    const = np.full((3, 240, 240), 2.5, np.float32)
    assert np.allclose(resample.resize_image(const, 128), 2.5, atol=1e-5)
    ramp = np.tile(np.linspace(0, 1, 240, dtype=np.float32), (240, 1))
    out = resample.resize_image(ramp, 128)
    assert out.shape == (128, 128) and abs(out.mean() - ramp.mean()) < 1e-3
    assert np.all(np.diff(out, axis=1) > 0)  # monotone ramp stays monotone


def test_resize_labels_keeps_label_set():
    seg = np.zeros((240, 240), np.uint8)
    seg[100:140, 100:140] = 2
    seg[110:130, 110:130] = 4
    seg[118:122, 118:122] = 1
    out = resample.resize_labels(seg, 128)
    assert out.shape == (128, 128) and set(np.unique(out)) == {0, 1, 2, 4}


@pytest.mark.parametrize("n_in,n_out", [(240, 128), (128, 240), (64, 64), (155, 16), (7, 9)])
def test_taps_carry_weight_and_sum_to_one(n_in, n_out):
    idx, w = resample.taps(n_in, n_out)
    assert idx.shape == w.shape and idx.shape[0] == n_out and w.dtype == np.float32
    assert idx.min() >= 0 and idx.max() < n_in
    assert all(np.any(w[:, t]) for t in range(w.shape[1]))  # no column of zeros
    assert np.allclose(w.sum(axis=1), 1, atol=1e-6)


def test_bilinear_is_torchs_interpolation():
    """The way back (numpy) against torch's bilinear interpolate (align_corners False), which it
    replaces: the same values up to float32 rounding."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for h, w, height, width in [(64, 64, 40, 52), (48, 48, 48, 30), (16, 16, 7, 9), (32, 32, 100, 33)]:
        x = rng.random((2, 3, h, w), dtype=np.float32)
        ours = resample.bilinear(x, height, width)
        theirs = torch.nn.functional.interpolate(torch.from_numpy(x), size=(height, width), mode="bilinear",
                                                 align_corners=False).numpy()
        assert ours.shape == theirs.shape and ours.dtype == np.float32
        assert np.allclose(ours, theirs, rtol=0, atol=1e-5)
    same = rng.random((1, 1, 20, 20), dtype=np.float32)
    assert np.array_equal(resample.bilinear(same, 20, 20), same)  # its own size: the identity
