"""Calibration and evaluation images for ImageNet models, cut from photos shipped with scikit-image and
scikit-learn, so that every recipe runs on a fresh machine without downloading anything.

Calibration and evaluation never share a source pixel: every photo is cut in two halves across its
longer side, one half feeds the ``"calib"`` split and the other the ``"eval"`` split (which half goes
where alternates from photo to photo), and each split draws its crops from its own random stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from skimage import data as skimage_data
from sklearn.datasets import load_sample_images
from torch.utils.data import TensorDataset

from qpasses_zoo.data.transforms import IMAGENET, Normalization, resize, to_float_image

SPLITS = ("calib", "eval")

# Colour photographs of everyday scenes; the microscopy and synthetic images of skimage.data are left out.
_SKIMAGE_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skimage_data.astronaut,
    "chelsea": skimage_data.chelsea,
    "coffee": skimage_data.coffee,
    "rocket": skimage_data.rocket,
    "motorcycle": lambda: skimage_data.stereo_motorcycle()[0],
    "hubble_deep_field": skimage_data.hubble_deep_field,
}

# Crops cover 25-100 % of the half photo, with aspect ratios from 3/4 to 4/3 (as RandomResizedCrop).
_AREA_RANGE = (0.25, 1.0)
_LOG_ASPECT_RANGE = (math.log(3 / 4), math.log(4 / 3))


@dataclass(frozen=True)
class CropBox:
    """Where one crop comes from: a photo name and a box in its pixel coordinates."""

    photo: str
    top: int
    left: int
    height: int
    width: int


@lru_cache(maxsize=1)
def photos() -> dict[str, torch.Tensor]:
    """The source photos by name, as ``(3, H, W)`` float tensors in [0, 1]."""
    named = {name: to_float_image(load()) for name, load in _SKIMAGE_PHOTOS.items()}
    samples = load_sample_images()
    for filename, image in zip(samples.filenames, samples.images, strict=True):
        stem = filename.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        named[stem] = to_float_image(image)
    return named


def _split_region(index: int, shape: tuple[int, int], split: str) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the half of photo ``index`` that ``split`` may crop from."""
    height, width = shape
    first_half = (SPLITS.index(split) + index) % 2 == 0
    if width >= height:
        half = width // 2
        return (0, 0, height, half) if first_half else (0, half, height, width - half)
    half = height // 2
    return (0, 0, half, width) if first_half else (half, 0, height - half, width)


def photo_crop_boxes(n: int, seed: int = 0, split: str = "calib") -> list[CropBox]:
    """The ``n`` crop boxes behind ``photo_crops(n, seed=seed, split=split)``.

    Photos are visited round-robin in an order shuffled by the seed, so small ``n`` still covers many.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    sources = photos()
    names = list(sources)
    order = rng.permutation(len(names))
    boxes = []
    for i in range(n):
        index = int(order[i % len(names)])
        name = names[index]
        top0, left0, region_h, region_w = _split_region(index, tuple(sources[name].shape[-2:]), split)
        area = region_h * region_w * rng.uniform(*_AREA_RANGE)
        aspect = math.exp(rng.uniform(*_LOG_ASPECT_RANGE))
        crop_h = min(region_h, max(1, round(math.sqrt(area / aspect))))
        crop_w = min(region_w, max(1, round(math.sqrt(area * aspect))))
        top = top0 + int(rng.integers(0, region_h - crop_h + 1))
        left = left0 + int(rng.integers(0, region_w - crop_w + 1))
        boxes.append(CropBox(name, top, left, crop_h, crop_w))
    return boxes


def photo_crops(
    n: int,
    size: int = 224,
    seed: int = 0,
    split: str = "calib",
    normalization: Normalization = IMAGENET,
) -> TensorDataset:
    """``n`` random crops of real photos resized to ``size × size``, normalised: a dataset of ``(image,)``.

    The same ``(n, size, seed, split)`` gives the same images; ``"calib"`` and ``"eval"`` crops come from
    disjoint halves of every photo (see the module docstring).
    """
    sources = photos()
    crops = [
        resize(sources[box.photo][:, box.top : box.top + box.height, box.left : box.left + box.width], (size, size))
        for box in photo_crop_boxes(n, seed, split)
    ]
    images = torch.stack(crops) if crops else torch.empty(0, 3, size, size)
    return TensorDataset(normalization(images))
