"""A factory for ``module:factory`` model arguments: the same weights on every call."""

import torch

from tests.nets import TinyUNet, randomize_bn


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyUNet()).eval()


def half_unet() -> torch.nn.Module:
    """A float16 model: refused with what to do (model.float())."""
    return tiny_unet().half()


def linear() -> torch.nn.Module:
    """Takes 10 features, not images."""
    return torch.nn.Linear(10, 2)


def tiny_classifier() -> torch.nn.Module:
    """Conv → pool → linear logits."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()
