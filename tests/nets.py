"""Small networks shared by the tests: a U-Net with skips, randomly built conv/bn/act/add/cat nets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters, so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act())


class TinyUNet(nn.Module):
    """Two-level U-Net: skip connections joined with torch.cat, upsampling by interpolation."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.enc1 = conv_bn_act(3, width)
        self.enc2 = conv_bn_act(width, 2 * width, stride=2)
        self.mid = conv_bn_act(2 * width, 2 * width)
        self.dec1 = conv_bn_act(3 * width, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        m = self.mid(e2) + e2
        up = F.interpolate(m, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.head(self.dec1(torch.cat([up, e1], dim=1)))


ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "identity": nn.Identity}


class RandomNet(nn.Module):
    """A chain of blocks from a list of (kind, activation, width) specs.

    kinds: ``conv`` (conv → bn → act), ``residual`` (h + conv_bn(h)), ``residual_relu`` (relu(h + conv_bn(h))),
    ``cat`` (cat([h, conv_bn_act(h)])), ``gate`` (h * sigmoid(conv(h))), ``scale`` (h * 0.5 + 1.0),
    ``depthwise`` (grouped conv → bn → act).
    """

    def __init__(self, blocks: list[tuple[str, str, int]], in_channels: int = 3):
        super().__init__()
        self.kinds = [kind for kind, _, _ in blocks]
        self.layers = nn.ModuleList()
        channels = in_channels
        for kind, act_name, width in blocks:
            act = ACTIVATIONS[act_name]
            if kind == "conv":
                self.layers.append(conv_bn_act(channels, width, act=act))
                channels = width
            elif kind == "depthwise":
                self.layers.append(conv_bn_act(channels, channels, groups=channels, act=act))
            elif kind in ("residual", "residual_relu"):
                self.layers.append(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)))
            elif kind == "cat":
                self.layers.append(conv_bn_act(channels, width, act=act))
                channels += width
            elif kind == "gate":
                self.layers.append(nn.Conv2d(channels, channels, 1))
            elif kind == "scale":
                self.layers.append(nn.Identity())
            else:
                raise ValueError(kind)
        self.head = nn.Conv2d(channels, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for kind, layer in zip(self.kinds, self.layers, strict=True):
            if kind in ("conv", "depthwise"):
                h = layer(h)
            elif kind == "residual":
                h = h + layer(h)
            elif kind == "residual_relu":
                h = F.relu(layer(h) + h)
            elif kind == "cat":
                h = torch.cat([h, layer(h)], dim=1)
            elif kind == "gate":
                h = h * torch.sigmoid(layer(h))
            elif kind == "scale":
                h = h * 0.5 + 1.0
        return self.head(h)
