"""Image conversion, resizing and normalisation shared by the datasets and the model zoo."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` for images with values in [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise ``(3, H, W)`` or ``(N, 3, H, W)`` images."""
        mean = torch.tensor(self.mean, dtype=images.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(3, 1, 1)
        return (images - mean) / std

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] values, e.g. to display a normalised image."""
        mean = torch.tensor(self.mean, dtype=images.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(3, 1, 1)
        return images * std + mean


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# TensorFlow-trained models (EfficientNet-Lite) take (x - 127) / 128, i.e. [-1, 1] inputs.
SYMMETRIC = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CIFAR10 = Normalization(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
CIFAR100 = Normalization(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))

# torchvision's and timm's evaluation recipe: resize the shorter side to size / 0.875, crop the centre.
CENTER_CROP_FRACTION = 0.875


def to_float_image(image: np.ndarray | Image.Image | torch.Tensor) -> torch.Tensor:
    """An RGB ``(3, H, W)`` float tensor in [0, 1] from an HWC/HW uint8 array, a PIL image or a tensor.

    Grey images are repeated to three channels and an alpha channel is dropped, so every photo
    source gives what the RGB models expect. A tensor is taken to be ``(3, H, W)`` in [0, 1] already.
    """
    if isinstance(image, torch.Tensor):
        return image.float()
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    array = array[:, :, :3]
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    return torch.tensor(array, dtype=torch.float32).permute(2, 0, 1) / scale


def resize(images: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize ``(C, H, W)`` or ``(N, C, H, W)`` to ``size``; bilinear uses antialiasing when shrinking."""
    batched = images.dim() == 4
    x = images if batched else images[None]
    if mode == "nearest":
        out = F.interpolate(x, size=size, mode="nearest")
    else:
        out = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    return out if batched else out[0]


def resize_center_crop(image: torch.Tensor, size: int, crop_fraction: float = CENTER_CROP_FRACTION) -> torch.Tensor:
    """Resize the shorter side of ``(3, H, W)`` to ``round(size / crop_fraction)``, crop ``size × size``."""
    height, width = image.shape[-2:]
    short = round(size / crop_fraction)
    scale = short / min(height, width)
    resized = resize(image, (max(size, round(height * scale)), max(size, round(width * scale))))
    top = (resized.shape[-2] - size) // 2
    left = (resized.shape[-1] - size) // 2
    return resized[..., top : top + size, left : left + size]


def preprocess(
    image: np.ndarray | Image.Image | torch.Tensor,
    size: int = 224,
    normalization: Normalization = IMAGENET,
    crop_fraction: float = CENTER_CROP_FRACTION,
) -> torch.Tensor:
    """The ImageNet evaluation transform: ``(3, size, size)`` normalised, from any photo."""
    return normalization(resize_center_crop(to_float_image(image), size, crop_fraction))
