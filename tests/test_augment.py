import dataclasses

import pytest
import torch

from train.augment import AugmentConfig, augment_batch

OFF = AugmentConfig(p_rotate=0, p_scale=0, p_mirror=0, p_elastic=0, p_noise=0, p_blur=0, p_brightness=0,
                    p_contrast=0, p_lowres=0, p_gamma=0, p_gamma_invert=0)
INTENSITY = ("p_noise", "p_blur", "p_brightness", "p_contrast", "p_lowres", "p_gamma", "p_gamma_invert")
ALL_ON = dataclasses.replace(OFF, **{f.name: 1.0 for f in dataclasses.fields(OFF) if f.name.startswith("p_")})


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _brain(B=4, C=4, H=32, W=40, seed=0):
    """(B, C, H, W) z-scored-like image, exactly 0 outside an off-centre ellipse; (B, 3, H, W) mask."""
    g = _gen(seed)
    y, x = torch.meshgrid(torch.arange(H) - H * 0.45, torch.arange(W) - W * 0.55, indexing="ij")
    inside = (y / (0.4 * H)) ** 2 + (x / (0.4 * W)) ** 2 < 1
    image = torch.randn((B, C, H, W), generator=g) * inside
    blob = ((y + 3) / (0.2 * H)) ** 2 + ((x - 4) / (0.15 * W)) ** 2 < 1
    mask = torch.stack([blob, blob & (x > 4), blob & (x > 4) & (y > -3)]).float().expand(B, 3, H, W).clone()
    return image, mask


def test_same_seed_same_output_other_seed_other_output():
    image, mask = _brain()
    cfg = dataclasses.replace(AugmentConfig(), p_rotate=1, p_elastic=0.5, p_noise=0.5)
    a = augment_batch(image, mask, _gen(1), cfg)
    b = augment_batch(image, mask, _gen(1), cfg)
    c = augment_batch(image, mask, _gen(2), cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_inputs_not_modified_outputs_are_new():
    image, mask = _brain()
    image0, mask0 = image.clone(), mask.clone()
    out, out_mask = augment_batch(image, mask, _gen(), ALL_ON)
    assert torch.equal(image, image0) and torch.equal(mask, mask0)
    assert not torch.equal(out, image0)
    out, out_mask = augment_batch(image, mask, _gen(), OFF)
    out += 1
    out_mask += 1
    assert torch.equal(image, image0) and torch.equal(mask, mask0)


def test_all_probabilities_zero_is_identity():
    image, mask = _brain()
    out, out_mask = augment_batch(image, mask, _gen(), OFF)
    assert torch.equal(out, image) and torch.equal(out_mask, mask)


def test_mirror_only_flips_both_axes():
    image, mask = _brain()
    out, out_mask = augment_batch(image, mask, _gen(), dataclasses.replace(OFF, p_mirror=1.0))
    assert torch.equal(out, image.flip(-1).flip(-2))
    assert torch.equal(out_mask, mask.flip(-1).flip(-2))


def test_spatial_keeps_image_and_mask_aligned():
    image, mask = _brain(B=6)
    image[:, 0] = mask[:, 0]
    cfg = dataclasses.replace(OFF, p_rotate=1.0, p_scale=1.0)
    out, out_mask = augment_batch(image, mask, _gen(3), cfg)
    for b in range(6):  # every sample really moved, so the agreement below is not trivial
        assert (out_mask[b, 0] != mask[b, 0]).float().mean() > 0.01
    agree = ((out[:, 0] >= 0.5).float() == out_mask[:, 0]).float().mean()
    assert agree >= 0.97


def test_rotation_and_scale_respect_aspect_ratio_on_non_square_images():
    H, W = 40, 64
    y, x = torch.meshgrid(torch.arange(H) - (H - 1) / 2, torch.arange(W) - (W - 1) / 2, indexing="ij")
    disk = (y ** 2 + x ** 2 < 12 ** 2).float().expand(4, 1, H, W).clone()
    _, rotated = augment_batch(disk, disk, _gen(10), dataclasses.replace(OFF, p_rotate=1.0))
    assert (rotated != disk).float().mean() < 0.01  # a disk stays a disk, not an ellipse
    _, zoomed = augment_batch(disk, disk, _gen(10), dataclasses.replace(OFF, p_scale=1.0, scale=(1.4, 1.4)))
    assert 1.8 < zoomed.sum() / disk.sum() < 2.1  # scale 1.4 zooms in: area x 1.96


def test_mask_stays_binary_and_nested():
    image, mask = _brain(B=8)
    _, out_mask = augment_batch(image, mask, _gen(4), dataclasses.replace(ALL_ON, scale=(1.2, 1.4)))
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0} and out_mask.sum() > 0
    assert (out_mask[:, 1] <= out_mask[:, 0]).all() and (out_mask[:, 2] <= out_mask[:, 1]).all()


@pytest.mark.parametrize("name", INTENSITY)
def test_intensity_keeps_background_zero(name):
    image, mask = _brain()
    out, _ = augment_batch(image, mask, _gen(5), dataclasses.replace(OFF, **{name: 1.0}))
    bg = image == 0
    assert (out[bg] == 0).all()
    assert not torch.allclose(out[~bg], image[~bg], atol=1e-4)
    assert torch.isfinite(out).all()


def test_all_intensity_steps_together_keep_background_zero():
    image, mask = _brain()
    out, _ = augment_batch(image, mask, _gen(6), dataclasses.replace(OFF, **{n: 1.0 for n in INTENSITY}))
    assert (out[image == 0] == 0).all() and torch.isfinite(out).all()


def test_probability_is_per_sample():
    image, mask = _brain(B=16)
    out, _ = augment_batch(image, mask, _gen(7), dataclasses.replace(OFF, p_brightness=0.5))
    same = [torch.equal(out[b], image[b]) for b in range(16)]
    assert any(same) and not all(same)


def test_contrast_stays_in_foreground_range():
    image, mask = _brain()
    out, _ = augment_batch(image, mask, _gen(8), dataclasses.replace(OFF, p_contrast=1.0, contrast=(1.25, 1.25)))
    fg = image != 0
    for b in range(image.shape[0]):
        for c in range(image.shape[1]):
            v, w = image[b, c][fg[b, c]], out[b, c][fg[b, c]]
            assert w.min() >= v.min() and w.max() <= v.max() and w.std() > v.std()


def test_groups_share_intensity_values():
    image, mask = _brain(C=1)
    image = image.expand(-1, 2, -1, -1).clone()  # two identical channels
    cfg = dataclasses.replace(OFF, p_brightness=1.0)
    same, _ = augment_batch(image, mask, _gen(9), cfg, groups=torch.tensor([0, 0]))
    other, _ = augment_batch(image, mask, _gen(9), cfg, groups=torch.tensor([0, 1]))
    assert torch.equal(same[:, 0], same[:, 1]) and not torch.equal(same, image)
    assert not torch.allclose(other[:, 0], other[:, 1])
    with pytest.raises(ValueError, match="groups"):
        augment_batch(image, mask, _gen(), cfg, groups=torch.tensor([0, 1, 2]))


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="p_noise"):
        AugmentConfig(p_noise=1.5)
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=(1.4, 0.7))
    with pytest.raises(ValueError, match="lowres_zoom"):
        AugmentConfig(lowres_zoom=(0.5, 2.0))
    cfg = AugmentConfig(p_elastic=0.3, gamma=(0.8, 1.2))
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}  # as JSON gives it back
    assert AugmentConfig.from_dict({**d, "unknown": 1}) == cfg
