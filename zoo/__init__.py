"""Models and datasets for qpasses' recipes, tests and benchmarks; nothing here downloads anything.

``zoo.get(name)`` / ``zoo.list_models()`` build models (``qpasses_zoo.models``); ``qpasses_zoo.data`` holds the datasets.
"""

from __future__ import annotations

from torchvision.models import ResNet18_Weights

from qpasses_zoo.errors import DatasetNotFound, PretrainedUnavailable, UnknownName, ZooError
from qpasses_zoo.models import MODELS, ModelSpec, get, list_models, spec


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names by index, from the metadata torchvision ships (offline)."""
    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


__all__ = [
    "MODELS",
    "DatasetNotFound",
    "ModelSpec",
    "PretrainedUnavailable",
    "UnknownName",
    "ZooError",
    "get",
    "imagenet_classes",
    "list_models",
    "spec",
]
