"""ImageNet classifiers from torchvision, built without weights."""

from __future__ import annotations

from collections.abc import Callable

import torchvision.models as tvm
from torch import nn

from qpasses_zoo.models.weights import torchvision_weights_unavailable


def _torchvision_builder(name: str, constructor: Callable[..., nn.Module], weights_enum: type):
    def build(pretrained: bool, num_classes: int) -> nn.Module:
        if pretrained:
            raise torchvision_weights_unavailable(name, weights_enum)
        return constructor(weights=None, num_classes=num_classes)

    build.__doc__ = f"torchvision's {name}, randomly initialised."
    return build


resnet18 = _torchvision_builder("resnet18", tvm.resnet18, tvm.ResNet18_Weights)
resnet34 = _torchvision_builder("resnet34", tvm.resnet34, tvm.ResNet34_Weights)
resnet50 = _torchvision_builder("resnet50", tvm.resnet50, tvm.ResNet50_Weights)
mobilenet_v2 = _torchvision_builder("mobilenet_v2", tvm.mobilenet_v2, tvm.MobileNet_V2_Weights)
