"""ResNets for 32×32 inputs: torchvision's ResNet with a 3×3 stride-1 stem and no max-pool.

On 32×32 images the ImageNet stem (7×7 stride 2, then a stride-2 max-pool) would leave 8×8 maps
before the first stage; this stem keeps 32×32, the usual CIFAR recipe. The state_dict keys stay
torchvision's, only ``conv1.weight`` has another shape.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from qpasses_zoo.models.weights import no_pretrained_weights


class CifarResNet(ResNet):
    """torchvision's ResNet with the CIFAR stem."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 10):
        super().__init__(block, layers, num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        del self.maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar_builder(name: str, block: type[BasicBlock | Bottleneck], layers: list[int]):
    def build(pretrained: bool, num_classes: int) -> nn.Module:
        if pretrained:
            raise no_pretrained_weights(name)
        return CifarResNet(block, layers, num_classes)

    build.__doc__ = f"{name}: ResNet with the 32×32 stem, randomly initialised."
    return build


cifar_resnet18 = _cifar_builder("cifar_resnet18", BasicBlock, [2, 2, 2, 2])
cifar_resnet34 = _cifar_builder("cifar_resnet34", BasicBlock, [3, 4, 6, 3])
cifar_resnet50 = _cifar_builder("cifar_resnet50", Bottleneck, [3, 4, 6, 3])
