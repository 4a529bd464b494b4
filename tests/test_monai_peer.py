"""bench/monai_peer.py: MONAI's DynUNet recipe trained on a shard set, predicted through our own predict.

MONAI is in the `bench` extra only: skipped where it is not installed (the test extra), run where it is.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from bench.monai_peer import (augmentation, batch_of, kernels_strides, load_peer, network_kwargs,  # noqa: E402
                              peer_loss, predict_peer, train_peer)
from preprocess.discover import discover  # noqa: E402
from preprocess.nifti import load_volume  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny 32x32 networks gain nothing from threads, and on a busy 2-core machine OpenMP threads
    competing with other processes made this file 10x slower (measured: 110 s against 10 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cropped_set(release_2020, tmp_path_factory):
    """release_2020 built at 32x32 with the brain crop, sub-region masks (the peer trains on regions)."""
    from preprocess.build import BuildConfig, build
    from preprocess.config import PreprocessConfig

    out = tmp_path_factory.mktemp("peer") / "set"
    build(release_2020, out, BuildConfig(preprocess=PreprocessConfig(size=32, crop=True), val_fraction=0.2),
          workers=0, progress=False)
    return out


def test_network_follows_the_slice_size():
    kernels, strides = kernels_strides(96)  # 96 -> 48 -> 24 -> 12 -> 6, as get_kernels_strides gives
    assert strides == [[1, 1]] + [[2, 2]] * 4 and kernels == [[3, 3]] * 5
    assert network_kwargs(96)["deep_supr_num"] == 3 and network_kwargs(32)["deep_supr_num"] == 2
    with pytest.raises(ValueError, match="slice size 8"):
        kernels_strides(8)


def test_loss_pushes_false_positives_down():
    """Multi-label targets: on a tumour-free slice, calling every pixel positive must cost more than
    calling none (MONAI's DiceCELoss fails this: its CE is a softmax over the channels)."""
    loss, y = peer_loss(), torch.zeros(2, 3, 16, 16)
    assert loss(torch.full_like(y, 5.0), y) > loss(torch.full_like(y, -5.0), y) + 0.5


def test_augmentation_moves_image_and_label_together():
    rng = np.random.default_rng(0)
    label = np.zeros((64, 3, 32, 32), np.uint8)
    for i, (r, c) in enumerate(rng.integers(2, 20, (64, 2))):
        label[i, :, r: r + 9, c: c + 5] = 1  # a box off-centre: flips and zooms move it
    image = np.repeat(label[:, :1], 4, axis=1).astype(np.float16)
    x, y = batch_of(augmentation(1), image, label, np.arange(64))
    assert x.shape == (64, 4, 32, 32) and y.shape == (64, 3, 32, 32) and x.dtype == y.dtype == torch.float32
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
    moved = (y[:, 0] != torch.from_numpy(label[:, 0]).float()).flatten(1).any(1)
    assert moved.sum() > 16  # most samples were flipped on some axis
    agree = ((x[:, 0] > 0.5) == (y[:, 0] > 0.5)).float().mean()
    assert agree > 0.99  # only the edges of a zoomed box (bilinear vs nearest) may differ


def test_train_reload_and_predict(cropped_set, release_2020, tmp_path):
    r = train_peer(str(cropped_set), tmp_path / "run", slices=320, seed=0, batch_size=16)
    assert r["output_mode"] == "regions" and r["slices"] == 320 and len(r["losses"]) == 20
    assert r["slices_per_s"] > 0 and r["seconds"] > 0 and r["preprocess"]["size"] == 32
    assert np.mean(r["losses"][-5:]) < np.mean(r["losses"][:5]), r["losses"]

    model = r["model"]
    assert not model.training
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 32, 32)  # eval mode: the main head only

    again, pre = load_peer(tmp_path / "run" / "peer.pt")  # weights_only load
    assert pre == r["preprocess"]
    with torch.no_grad():
        assert torch.equal(again(x), y)

    res = predict_peer(model, r["preprocess"], release_2020, tmp_path / "pred")
    patients = discover(release_2020).patients
    assert res["failed"] == {} and len(res["written"]) == len(patients)
    for pf in patients:
        pred = load_volume(tmp_path / "pred" / f"{pf.pid}.nii.gz")
        src = load_volume(pf.files["t1"])
        assert pred.data.shape == src.data.shape and np.allclose(pred.affine, src.affine)
        assert set(np.unique(pred.data)) <= {0, 1, 2, 4}


def test_same_seed_same_run(cropped_set, tmp_path):
    a = train_peer(str(cropped_set), tmp_path / "a", slices=48, seed=3, batch_size=16)
    b = train_peer(str(cropped_set), tmp_path / "b", slices=48, seed=3, batch_size=16)
    assert a["losses"] == b["losses"]
