"""Imagenette, the 10-class subset of ImageNet, for users who have it on disk.

Layout (the extracted ``imagenette2``, ``imagenette2-320`` or ``imagenette2-160`` archive):
``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``. Labels are ImageNet class indices by
default, so that ImageNet classifiers are scored without retraining their head.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from torchvision.datasets import ImageFolder

from qpasses_zoo.data.transforms import IMAGENET, Normalization, preprocess
from qpasses_zoo.errors import DatasetNotFound

SPLITS = ("train", "val")

# WordNet id of each Imagenette class → its index among the 1000 ImageNet-1k classes.
IMAGENETTE_TO_IMAGENET = {
    "n01440764": 0,  # tench
    "n02102040": 217,  # English springer
    "n02979186": 482,  # cassette player
    "n03000684": 491,  # chain saw
    "n03028079": 497,  # church
    "n03394916": 566,  # French horn
    "n03417042": 569,  # garbage truck
    "n03425413": 571,  # gas pump
    "n03445777": 574,  # golf ball
    "n03888605": 701,  # parachute
}


def imagenette(
    root: str | Path,
    split: str = "val",
    size: int = 224,
    labels: str = "imagenet",
    normalization: Normalization = IMAGENET,
) -> ImageFolder:
    """Imagenette as ``(image (3, size, size) normalised, label)`` with the ImageNet evaluation transform.

    ``labels="imagenet"``: ImageNet-1k indices (folder names must be Imagenette's wnids);
    ``labels="folder"``: 0..C-1 in sorted folder order, for any ImageFolder tree such as Imagewoof.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if labels not in ("imagenet", "folder"):
        raise ValueError(f"labels must be 'imagenet' or 'folder', got {labels!r}")
    folder = Path(root) / split
    if not folder.is_dir() or not any(child.is_dir() for child in folder.iterdir()):
        raise DatasetNotFound(
            f"Imagenette {split} split not found: {folder} has no class folders.\n"
            f"  expected root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG with root = {root}\n"
            f"  (the extracted imagenette2 archive's top folder; nothing is downloaded by qpasses)"
        )
    dataset = ImageFolder(str(folder), transform=partial(preprocess, size=size, normalization=normalization))
    if labels == "imagenet":
        unknown = sorted(set(dataset.classes) - IMAGENETTE_TO_IMAGENET.keys())
        if unknown:
            raise ValueError(
                f"{folder} has class folders that are not Imagenette wnids: {unknown}; "
                f"pass labels='folder' to number the folders 0..{len(dataset.classes) - 1} instead"
            )
        table = [IMAGENETTE_TO_IMAGENET[wnid] for wnid in dataset.classes]
        # A bound method of a list, not a lambda, so that DataLoader workers can pickle the dataset.
        dataset.target_transform = table.__getitem__
    return dataset
