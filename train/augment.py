"""Batch augmentation on the training device, after nnU-Net's default 2D pipeline.

`augment_batch(image (B, C, H, W), mask (B, K, H, W), gen, cfg, groups)` applies, in this order,
each step decided per sample with its own probability (defaults = nnU-Net's):

  rotation    p 0.2   in-plane angle U(-180, 180) deg       } composed into one affine; image and
  scaling     p 0.2   factor U(0.7, 1.4), > 1 zooms in      } mask warped by one grid_sample call
  elastic     p 0     smooth field: RMS alpha px, sigma px  } (added to the same grid)
  mirroring   p 0.5   per in-plane axis (exact flips)
  noise       p 0.1   Gaussian, std U(0, 0.1)
  blur        p 0.2   Gaussian, sigma U(0.5, 1.0) px
  brightness  p 0.15  x * U(0.75, 1.25)
  contrast    p 0.15  (x - mean) * U(0.75, 1.25) + mean, clipped to the old range
  low-res     p 0.25  area-downsample by U(0.5, 1), bilinear upsample back
  gamma, inv. p 0.1   gamma U(0.7, 1.5) on the negated image (then negated back)
  gamma       p 0.3   gamma U(0.7, 1.5): range -> [0, 1], ** gamma, back; mean and std kept

Mask: warped bilinearly with the image's grid, then thresholded (>= 0.5 is in), so it stays {0, 1}
and nested regions (WT > TC > ET) stay nested, bilinear interpolation being monotone. Padding: 0.

Background: the images are z-scored and skull-stripped, background exactly 0. The foreground
(image != 0 per sample-channel) is fixed after the spatial step, and every intensity step changes
foreground pixels only; statistics (mean, std, range) are the foreground's. Blur and low-res are
normalised ((f * x) / (f * fg)), so the zeros around the brain do not darken its edge.

`groups` (C,) gives each channel's modality (the trainer may stack neighbouring slices of the same
modalities as channels): intensity values are drawn per (sample, group) and shared by the group's
channels; the noise field itself is independent per channel, only its std is shared.

Randomness: every draw - the small parameter tensors, and the noise and elastic fields of the
selected samples only - comes from `gen`, a CPU generator, and is then moved to image.device. So
a seed gives the same augmentation on CPU and GPU (to float rounding), whatever the device's own
RNG, and the number of draws depends only on the batch shape and the coins, never on the data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from shards.config import from_known_fields

_RANGES = ("scale", "noise_std", "blur_sigma", "brightness", "contrast", "lowres_zoom", "gamma")


@dataclass(frozen=True)
class AugmentConfig:
    # spatial
    p_rotate: float = 0.2
    max_rotate_deg: float = 180.0  # in-plane rotation, nnU-Net 2D style
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    p_mirror: float = 0.5  # per in-plane axis
    p_elastic: float = 0.0  # off, as in nnU-Net
    elastic_alpha: float = 4.0  # RMS displacement per axis, pixels
    elastic_sigma: float = 10.0  # smoothness of the field (Gaussian sigma), pixels
    # intensity (per sample; values per modality group)
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)  # images have unit variance
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_gamma_invert: float = 0.1  # a separate gamma step on the inverted image, before p_gamma's

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("p_") and not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise ValueError(f"augment {f.name} must be a probability in [0, 1], not {v!r}")
        for name in _RANGES:  # lists (from JSON) become tuples, so the config stays hashable
            v = getattr(self, name)
            if not (isinstance(v, (tuple, list)) and len(v) == 2 and v[0] <= v[1]):
                raise ValueError(f"augment {name} must be a (lo, hi) pair with lo <= hi, not {v!r}")
            object.__setattr__(self, name, (float(v[0]), float(v[1])))
        rules = [("scale", self.scale[0] > 0, "> 0"), ("gamma", self.gamma[0] > 0, "> 0"),
                 ("noise_std", self.noise_std[0] >= 0, ">= 0"), ("blur_sigma", self.blur_sigma[0] >= 0, ">= 0"),
                 ("lowres_zoom", 0 < self.lowres_zoom[0] and self.lowres_zoom[1] <= 1, "in (0, 1]"),
                 ("max_rotate_deg", self.max_rotate_deg >= 0, ">= 0"),
                 ("elastic_alpha", self.elastic_alpha >= 0, ">= 0"), ("elastic_sigma", self.elastic_sigma > 0, "> 0")]
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"augment {name} must be {rule}, not {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        return from_known_fields(cls, d)


def _coin(gen, shape, p) -> torch.Tensor:  # bool, CPU
    return torch.rand(shape, generator=gen) < p


def _uniform(gen, shape, lo_hi) -> torch.Tensor:  # float, CPU
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def _gauss_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W), sigma (N, C) in pixels on the CPU -> x blurred per channel, zero padding."""
    N, C, H, W = x.shape
    r = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma.reshape(-1, 1).double().clamp_min(1e-3)) ** 2)  # (N*C, 2r+1)
    k = (k / k.sum(1, keepdim=True)).to(x)
    y = F.conv2d(x.reshape(1, N * C, H, W), k[:, None, None, :], padding=(0, r), groups=N * C)
    y = F.conv2d(y, k[:, None, :, None], padding=(r, 0), groups=N * C)
    return y.reshape(N, C, H, W)


def _elastic(gen, n: int, H: int, W: int, cfg: AugmentConfig, like: torch.Tensor) -> torch.Tensor:
    """(n, H, W, 2) smooth displacement in grid_sample's normalised units (x, y)."""
    field = (torch.rand((n, 2, H, W), generator=gen) * 2 - 1).to(like)
    field = _gauss_blur(field, torch.full((n, 2), cfg.elastic_sigma))
    field = field / field.std(dim=(2, 3), keepdim=True).clamp_min(1e-12) * cfg.elastic_alpha  # pixels
    scale = torch.tensor([2.0 / W, 2.0 / H]).to(like)
    return field.permute(0, 2, 3, 1) * scale


def _spatial(image, mask, gen, cfg: AugmentConfig):
    """Rotation + scaling (+ elastic) of the selected samples, one grid_sample for image and mask."""
    B, C, H, W = image.shape
    rot, scl, ela = _coin(gen, (3, B), torch.tensor([cfg.p_rotate, cfg.p_scale, cfg.p_elastic])[:, None])
    angle = _uniform(gen, B, (-cfg.max_rotate_deg, cfg.max_rotate_deg)).double() * math.pi / 180
    s = _uniform(gen, B, cfg.scale).double()
    idx = torch.nonzero(rot | scl | ela).flatten()
    if len(idx) == 0:
        return image, mask
    a = torch.where(rot, angle, 0.0)[idx]
    s = torch.where(scl, s, 1.0)[idx]
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    # output -> input map R/s in pixel units, expressed in normalised units (x / (W/2), y / (H/2))
    theta = torch.zeros((len(idx), 2, 3), dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * H / W
    theta[:, 1, 0], theta[:, 1, 1] = sin * W / H, cos
    both = torch.cat([image[idx], mask[idx].to(image.dtype)], 1)  # (n, C + K, H, W)
    grid = F.affine_grid(theta.to(image), list(both.shape), align_corners=False)  # (n, H, W, 2)
    e = ela[idx]
    if e.any():
        grid = grid.index_add(0, torch.nonzero(e).flatten().to(image.device),
                              _elastic(gen, int(e.sum()), H, W, cfg, grid))
    warped = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    idx = idx.to(image.device)
    image = image.index_copy(0, idx, warped[:, :C])
    mask = mask.index_copy(0, idx, (warped[:, C:] >= 0.5).to(mask.dtype))
    return image, mask


def _mirror(image, mask, gen, p: float):
    for dim, flip in zip((-1, -2), _coin(gen, (2, image.shape[0]), p)):  # (B,) per axis
        if flip.any():
            f = flip.to(image.device)[:, None, None, None]
            image, mask = torch.where(f, image.flip(dim), image), torch.where(f, mask.flip(dim), mask)
    return image, mask


def _fg_stats(x, fg):
    """Foreground mean, std, min, max of each sample-channel, each (B, C, 1, 1); 0 where empty."""
    n = fg.sum((-2, -1), keepdim=True)
    mean = torch.where(fg, x, 0).sum((-2, -1), keepdim=True) / n.clamp_min(1)
    std = (torch.where(fg, x - mean, 0) ** 2).sum((-2, -1), keepdim=True).div(n.clamp_min(1)).sqrt()
    lo = torch.where(fg, x, math.inf).amin((-2, -1), keepdim=True)
    hi = torch.where(fg, x, -math.inf).amax((-2, -1), keepdim=True)
    return mean, std, torch.where(n > 0, lo, 0), torch.where(n > 0, hi, 0)


def _gamma(x, fg, g, invert: bool):
    """nnU-Net gamma inside the foreground: range -> [0, 1], ** g, back, then mean/std restored."""
    x = -x if invert else x
    mean, std, lo, hi = _fg_stats(x, fg)
    span = (hi - lo).clamp_min(1e-7)
    y = ((x - lo) / span).clamp_min(0) ** g * span + lo
    m2, s2, _, _ = _fg_stats(y, fg)
    y = (y - m2) / s2.clamp_min(1e-7) * std + mean
    return -y if invert else y


def _normalised(op, x, fg):  # op applied to foreground values only: op(x) / op(fg)
    return op(x) / op(fg.to(x.dtype)).clamp_min(1e-6)


def _lowres(x, fg, sel, zoom, gidx):
    """x, fg (B, C, H, W); sel (B,), zoom (B, C) on the CPU; one pair of resizes per selected (sample, group)."""
    H, W = x.shape[-2:]
    out = x.clone()
    for b in torch.nonzero(sel).flatten().tolist():
        for g in torch.unique(gidx).tolist():
            ch = torch.nonzero(gidx == g).flatten()
            z = float(zoom[b, ch[0]])
            size = (max(1, round(H * z)), max(1, round(W * z)))

            def resize(t):
                t = F.interpolate(t, size=size, mode="area")
                return F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False)
            ch = ch.to(x.device)
            out[b, ch] = _normalised(resize, x[b, ch][None], fg[b, ch][None])[0]
    return out


def _intensity(x, gen, cfg: AugmentConfig, gidx: torch.Tensor, G: int):
    """Noise, blur, brightness, contrast, low-res, gamma (inverted), gamma; background kept at 0."""
    B, C, H, W = x.shape
    fg = x != 0  # (B, C, H, W), fixed for every step below

    def draw(p, lo_hi):  # (B,) coins and (B, C) values shared within a group
        sel = _coin(gen, B, p)
        return sel, _uniform(gen, (B, G), lo_hi)[:, gidx]

    def dev(v):  # (B, C) CPU -> (B, C, 1, 1) on x's device
        return v.to(x)[..., None, None]

    def apply(sel, y):  # y where selected and foreground, else x
        return torch.where(fg & sel.to(x.device)[:, None, None, None], y, x)

    sel, std = draw(cfg.p_noise, cfg.noise_std)
    if sel.any():
        noise = torch.zeros_like(x).index_copy(0, torch.nonzero(sel).flatten().to(x.device),
                                               torch.randn((int(sel.sum()), C, H, W), generator=gen).to(x))
        x = apply(sel, x + dev(std) * noise)
    sel, sigma = draw(cfg.p_blur, cfg.blur_sigma)
    if sel.any():
        x = apply(sel, _normalised(lambda t: _gauss_blur(t, sigma), x, fg))
    sel, f = draw(cfg.p_brightness, cfg.brightness)
    if sel.any():
        x = apply(sel, x * dev(f))
    sel, f = draw(cfg.p_contrast, cfg.contrast)
    if sel.any():
        mean, _, lo, hi = _fg_stats(x, fg)
        x = apply(sel, torch.minimum(torch.maximum((x - mean) * dev(f) + mean, lo), hi))
    sel, zoom = draw(cfg.p_lowres, cfg.lowres_zoom)
    if sel.any():
        x = apply(sel, _lowres(x, fg, sel, zoom, gidx))
    for p, invert in ((cfg.p_gamma_invert, True), (cfg.p_gamma, False)):
        sel, g = draw(p, cfg.gamma)
        if sel.any():
            x = apply(sel, _gamma(x, fg, dev(g), invert))
    return x


def augment_batch(image: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig(),
                  groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """image (B, C, H, W) float on any device; mask (B, K, H, W) float 0/1 on the same device.
    Returns new tensors (never modifies inputs) on the same device; all draws from the CPU `gen`."""
    B, C, H, W = image.shape
    if mask.dim() != 4 or mask.shape[0] != B or mask.shape[-2:] != image.shape[-2:] or mask.device != image.device:
        raise ValueError(f"mask {tuple(mask.shape)} on {mask.device} does not fit "
                         f"image {tuple(image.shape)} on {image.device}")
    groups = torch.arange(C) if groups is None else torch.as_tensor(groups).cpu().long().flatten()
    if groups.numel() != C:
        raise ValueError(f"groups has {groups.numel()} entries for {C} image channels")
    uniq, gidx = torch.unique(groups, return_inverse=True)  # group ids -> 0 .. G-1
    out, out_mask = _spatial(image, mask, gen, cfg)
    out, out_mask = _mirror(out, out_mask, gen, cfg.p_mirror)
    out = _intensity(out, gen, cfg, gidx, len(uniq))
    return (out.clone() if out is image else out), (out_mask.clone() if out_mask is mask else out_mask)
