"""2D U-Net and Attention U-Net from ConvBlock / Down / Up; widths from base_channels and depth.

Two block styles: the seed notebook's (batch norm + ReLU) and nnU-Net's (instance norm with
affine parameters + leaky ReLU, slope 0.01). With `deep_supervision`, the training forward also
returns logits from the decoder's lower levels (1/2, 1/4, ... of the input size; nnU-Net's deep
supervision), the full-size logits first; in eval mode the forward returns the full-size logits
alone, so predict and export see one tensor whatever the recipe.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn
import torch.nn.functional as F

Norm = Literal["batch", "instance"]
Act = Literal["relu", "leaky"]


def _norm(kind: str, ch: int) -> nn.Module:
    return nn.BatchNorm2d(ch) if kind == "batch" else nn.InstanceNorm2d(ch, affine=True)


def _act(kind: str) -> nn.Module:
    return nn.ReLU(inplace=True) if kind == "relu" else nn.LeakyReLU(0.01, inplace=True)


class ConvBlock(nn.Module):
    """(conv 3x3 -> norm -> activation) x 2."""

    def __init__(self, cin: int, cout: int, norm: Norm = "batch", act: Act = "relu"):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(norm, cout), _act(act),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm(norm, cout), _act(act),
        )

    def forward(self, x):
        return self.net(x)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int, norm: Norm, act: Act):
        super().__init__()
        self.block = ConvBlock(cin, cout, norm, act)

    def forward(self, x):
        return self.block(F.max_pool2d(x, 2))


class AttentionGate(nn.Module):
    """Additive attention (Oktay et al. 2018): the decoder's gating signal weights the skip."""

    def __init__(self, skip_ch: int, gate_ch: int, inter_ch: int):
        super().__init__()
        self.wx = nn.Conv2d(skip_ch, inter_ch, 1, bias=False)
        self.wg = nn.Conv2d(gate_ch, inter_ch, 1, bias=True)
        self.psi = nn.Conv2d(inter_ch, 1, 1, bias=True)

    def forward(self, skip, gate):
        a = F.relu(self.wx(skip) + self.wg(gate))  # gate is already at the skip's resolution
        return skip * torch.sigmoid(self.psi(a))  # (B, C, H, W) * (B, 1, H, W)


class Up(nn.Module):
    def __init__(self, cin: int, skip_ch: int, cout: int, attention: bool, norm: Norm, act: Act):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.gate = AttentionGate(skip_ch, cin // 2, max(skip_ch // 2, 1)) if attention else None
        self.block = ConvBlock(cin // 2 + skip_ch, cout, norm, act)

    def forward(self, x, skip):
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:  # odd sizes: pad to the skip's size
            x = F.pad(x, (0, skip.shape[-1] - x.shape[-1], 0, skip.shape[-2] - x.shape[-2]))
        if self.gate is not None:
            skip = self.gate(skip, x)
        return self.block(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """Encoder of `depth` downsamplings, widths base * 2**level; logits for `out_channels` labels."""

    def __init__(self, in_channels: int = 4, out_channels: int = 3, base_channels: int = 32, depth: int = 4,
                 attention: bool = False, norm: Norm = "batch", act: Act = "relu", deep_supervision: bool = False):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = ConvBlock(in_channels, widths[0], norm, act)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], norm, act) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], widths[i], attention, norm, act)
                                 for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        # deep supervision: a 1x1 head on the outputs of the decoder levels above the lowest
        # (1/2 ... 1/2**(depth-1) of the input size); nnU-Net leaves the two lowest unsupervised
        self.aux_heads = nn.ModuleList(nn.Conv2d(widths[i], out_channels, 1) for i in range(1, depth - 1)) \
            if deep_supervision else None

    def forward(self, x):  # (B, C_in, H, W) -> (B, K, H, W) logits [, lower-resolution logits...]
        skips = [self.inc(x)]
        for d in self.downs:
            skips.append(d(skips[-1]))
        x = skips.pop()
        levels = []
        for up in self.ups:
            x = up(x, skips.pop())
            levels.append(x)
        out = self.head(x)
        if self.aux_heads is None or not self.training:
            return out
        # levels: 1/2**(depth-1), ..., 1/2, full; aux head i (level 1/2**(i+1)) reads levels[-2 - i]
        return [out] + [h(levels[-2 - i]) for i, h in enumerate(self.aux_heads)]


def init_he(model: nn.Module, slope: float = 1e-2) -> nn.Module:
    """nnU-Net's initialisation (InitWeights_He): every convolution's weights He-normal for leaky
    ReLU of this slope, biases 0; torch's default is He-uniform with a = sqrt(5)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, a=slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


ModelName = Literal["unet", "attention-unet"]
MODELS = get_args(ModelName)


def build_model(name: ModelName, base_channels: int = 32, depth: int = 4, in_channels: int = 4, out_channels: int = 3,
                norm: Norm = "batch", act: Act = "relu", deep_supervision: bool = False) -> UNet:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return UNet(in_channels, out_channels, base_channels, depth, attention=name == "attention-unet", norm=norm,
                act=act, deep_supervision=deep_supervision)
