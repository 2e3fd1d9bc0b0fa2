"""The model zoo: every model the project compiles, built by name, never downloading weights.

``get(name)`` returns the model in eval mode (quantization calibrates and evaluates; call ``.train()``
to fine-tune). ``spec(name)`` tells its native input size, its input normalisation and its number of
classes (``None`` for the depth model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from qpasses_zoo.data.transforms import CIFAR10, CIFAR100, IMAGENET, SYMMETRIC, Normalization
from qpasses_zoo.errors import UnknownName
from qpasses_zoo.models.cifar_resnet import cifar_resnet18, cifar_resnet34, cifar_resnet50
from qpasses_zoo.models.depth_unet import depth_unet
from qpasses_zoo.models.lite0 import efficientnet_lite0, tf_efficientnet_lite0
from qpasses_zoo.models.preact_resnet import preact_resnet34
from qpasses_zoo.models.torchvision_models import mobilenet_v2, resnet18, resnet34, resnet50
from qpasses_zoo.models.weights import load_local_weights


@dataclass(frozen=True)
class ModelSpec:
    """What a zoo model expects: ``input_size × input_size`` RGB normalised by ``normalization``."""

    name: str
    build: Callable[..., nn.Module]
    input_size: int
    normalization: Normalization
    num_classes: int | None


_SPECS = [
    ModelSpec("resnet18", resnet18, 224, IMAGENET, 1000),
    ModelSpec("resnet34", resnet34, 224, IMAGENET, 1000),
    ModelSpec("resnet50", resnet50, 224, IMAGENET, 1000),
    ModelSpec("mobilenet_v2", mobilenet_v2, 224, IMAGENET, 1000),
    ModelSpec("tf_efficientnet_lite0", tf_efficientnet_lite0, 224, SYMMETRIC, 1000),
    ModelSpec("efficientnet_lite0", efficientnet_lite0, 224, SYMMETRIC, 1000),
    ModelSpec("cifar_resnet18", cifar_resnet18, 32, CIFAR10, 10),
    ModelSpec("cifar_resnet34", cifar_resnet34, 32, CIFAR10, 10),
    ModelSpec("cifar_resnet50", cifar_resnet50, 32, CIFAR10, 10),
    ModelSpec("preact_resnet34", preact_resnet34, 32, CIFAR100, 100),
    ModelSpec("depth_unet", depth_unet, 224, IMAGENET, None),
]
MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def list_models() -> list[str]:
    """The names ``get`` accepts."""
    return sorted(MODELS)


def spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of ``name``; raises ``UnknownName`` listing the models."""
    if name not in MODELS:
        raise UnknownName(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return MODELS[name]


def get(
    name: str,
    pretrained: bool = False,
    num_classes: int | None = None,
    weights_path: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build zoo model ``name`` in eval mode.

    ``pretrained=True`` loads weights that ship offline (the EfficientNet-Lite0 models) and otherwise
    raises ``PretrainedUnavailable`` saying where to get a file; ``weights_path`` loads a local
    ``state_dict`` file instead. ``num_classes`` defaults to the model's own (``spec(name).num_classes``).
    ``kwargs`` go to the model's builder (``depth_unet``: ``width``, ``encoder_weights_path``).
    """
    model_spec = spec(name)
    if pretrained and weights_path is not None:
        raise ValueError("pass either pretrained=True or weights_path=..., not both")
    if model_spec.num_classes is None:
        if num_classes is not None:
            raise ValueError(f"zoo model {name!r} is not a classifier and takes no num_classes")
        model = model_spec.build(pretrained=pretrained, **kwargs)
    else:
        model = model_spec.build(pretrained=pretrained, num_classes=num_classes or model_spec.num_classes, **kwargs)
    if weights_path is not None:
        load_local_weights(model, weights_path, name)
    return model.eval()


__all__ = ["MODELS", "ModelSpec", "get", "list_models", "spec"]
