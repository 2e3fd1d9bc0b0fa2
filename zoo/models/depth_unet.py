"""Monocular depth U-Net: EfficientNet-B0 encoder, FFNet "Up-C"-style decoder, depth at 1/4 resolution.

Encoder: torchvision's ``efficientnet_b0().features[:6]``, the paper's stages 1-6 (stem, then MBConv
stages of 16, 24, 40, 80, 112 channels). The decoder takes the outputs of stages 3-6, at strides
4, 8, 16 and 16 (24, 40, 80, 112 channels). Decoder: each scale is projected to a common width
(1×1 conv-BN-ReLU); from coarse to fine, the coarser map is upsampled (bilinear, where the stride
differs) and added to the finer one, then smoothed (3×3 conv-BN-ReLU); the four merged maps are
upsampled to stride 4 and concatenated, fused by two 3×3 conv-BN-ReLU, and a 1×1 conv + ReLU gives a
non-negative depth map. A 224×224 input gives a (1, 56, 56) depth; H and W must be multiples of 16.
Upsampling factors are fixed at construction, so the forward traces with torch.fx.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from qpasses_zoo.errors import PretrainedUnavailable
from qpasses_zoo.models.weights import read_state_dict

ENCODER_STAGES = 6
# Indices in ``efficientnet_b0().features`` of the stages whose outputs feed the decoder, and their strides.
TAPS = (2, 3, 4, 5)
TAP_STRIDES = (4, 8, 16, 16)
TAP_CHANNELS = (24, 40, 80, 112)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    # ``factor`` is a Python int fixed at construction: the branch is resolved while tracing.
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class UpCDecoder(nn.Module):
    """Top-down add, then upsample-and-concatenate of all scales at the finest stride."""

    def __init__(self, in_channels: tuple[int, ...], strides: tuple[int, ...], width: int):
        super().__init__()
        self.project = nn.ModuleList(conv_bn_relu(c, width, 1) for c in in_channels)
        # coarser_factors[i] brings the merged map of scale i + 1 to scale i.
        self.coarser_factors = tuple(strides[i + 1] // strides[i] for i in range(len(strides) - 1))
        self.smooth = nn.ModuleList(conv_bn_relu(width, width, 3) for _ in range(len(strides) - 1))
        self.finest_factors = tuple(s // strides[0] for s in strides)
        self.fuse = nn.Sequential(conv_bn_relu(width * len(strides), width, 3), conv_bn_relu(width, width, 3))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        merged = [self.project[-1](features[-1])]
        for i in range(len(features) - 2, -1, -1):
            finer = self.project[i](features[i]) + _upsample(merged[0], self.coarser_factors[i])
            merged.insert(0, self.smooth[i](finer))
        upsampled = [_upsample(m, factor) for m, factor in zip(merged, self.finest_factors, strict=True)]
        return self.fuse(torch.cat(upsampled, dim=1))


class DepthUNet(nn.Module):
    """EfficientNet-B0 encoder (first six stages) + Up-C decoder → ``(N, 1, H/4, W/4)`` depth."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.encoder = tvm.efficientnet_b0(weights=None).features[:ENCODER_STAGES]
        self.decoder = UpCDecoder(TAP_CHANNELS, TAP_STRIDES, width)
        self.head = nn.Conv2d(width, 1, kernel_size=1)
        self.head_act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for index, stage in enumerate(self.encoder):
            x = stage(x)
            if index in TAPS:
                features.append(x)
        return self.head_act(self.head(self.decoder(features)))


def load_encoder_weights(model: DepthUNet, path: str | Path) -> None:
    """Initialise the encoder from a torchvision ``efficientnet_b0`` ImageNet state_dict file."""
    state = read_state_dict(path)
    prefix = "features."
    encoder_state = {
        key[len(prefix) :]: value
        for key, value in state.items()
        if key.startswith(prefix) and int(key[len(prefix) :].split(".", 1)[0]) < ENCODER_STAGES
    }
    try:
        model.encoder.load_state_dict(encoder_state)
    except RuntimeError as exc:
        raise RuntimeError(f"{path} is not a torchvision efficientnet_b0 state_dict: {exc}") from exc


def depth_unet(pretrained: bool, width: int = 64, encoder_weights_path: str | Path | None = None) -> nn.Module:
    """The depth U-Net; ``encoder_weights_path``: a local torchvision efficientnet_b0 ImageNet file."""
    if pretrained:
        url = tvm.EfficientNet_B0_Weights.DEFAULT.url
        raise PretrainedUnavailable(
            "no pretrained weights exist for zoo model 'depth_unet' (qpasses never downloads). Train it on\n"
            "  qpasses_zoo.data.synthetic_depth or NYU Depth v2 and load the result with weights_path=..., and/or start\n"
            f"  from an ImageNet encoder: fetch {url} elsewhere and pass encoder_weights_path=<that file>"
        )
    model = DepthUNet(width)
    if encoder_weights_path is not None:
        load_encoder_weights(model, encoder_weights_path)
    return model
