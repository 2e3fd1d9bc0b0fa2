"""Pre-activation ResNet (He et al., "Identity Mappings in Deep Residual Networks") for CIFAR-100.

Blocks compute BN → ReLU → conv twice and add the untouched input, so the residual path carries no
activation; a final BN → ReLU precedes the pooling. The block structure is fixed at construction, so
the forward has no data-dependent branches and traces with torch.fx.
"""

from __future__ import annotations

import torch
from torch import nn

from qpasses_zoo.models.weights import no_pretrained_weights


class PreActBlock(nn.Module):
    """Two pre-activated 3×3 convolutions; a 1×1 projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        needs_projection = stride != 1 or in_channels != channels
        self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        # The projection sees the activated input (as in the paper); the identity keeps x itself.
        shortcut = self.shortcut(activated) if self.shortcut is not None else x
        out = self.conv1(activated)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for 32×32 inputs: 3×3 stem, four stages of 64-512 channels."""

    def __init__(self, layers: list[int], num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        stages = []
        in_channels = 64
        for index, (channels, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if index == 0 else 2
            stage = [PreActBlock(in_channels, channels, stride)]
            stage += [PreActBlock(channels, channels) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def preact_resnet34(pretrained: bool, num_classes: int) -> nn.Module:
    """Pre-activation ResNet-34 for CIFAR-100, randomly initialised."""
    if pretrained:
        raise no_pretrained_weights("preact_resnet34")
    return PreActResNet([3, 4, 6, 3], num_classes)
