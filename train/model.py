"""2D U-Net and Attention U-Net from ConvBlock / Down / Up; widths from base_channels and depth."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn
import torch.nn.functional as F


class ConvBlock(nn.Module):
    """(conv 3x3 -> BN -> ReLU) x 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.net(x)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = ConvBlock(cin, cout)

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
    def __init__(self, cin: int, skip_ch: int, cout: int, attention: bool):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.gate = AttentionGate(skip_ch, cin // 2, max(skip_ch // 2, 1)) if attention else None
        self.block = ConvBlock(cin // 2 + skip_ch, cout)

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
                 attention: bool = False):
        super().__init__()
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = ConvBlock(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], widths[i], attention) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x):  # (B, 4, H, W) -> (B, 3, H, W) logits
        skips = [self.inc(x)]
        for d in self.downs:
            skips.append(d(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


ModelName = Literal["unet", "attention-unet"]
MODELS = get_args(ModelName)


def build_model(name: ModelName, base_channels: int = 32, depth: int = 4, in_channels: int = 4, out_channels: int = 3) -> UNet:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return UNet(in_channels, out_channels, base_channels, depth, attention=name == "attention-unet")
