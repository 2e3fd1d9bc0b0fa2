"""Any folder of images (searched recursively), for calibrating on one's own photos."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from qpasses_zoo.data.transforms import IMAGENET, Normalization, preprocess
from qpasses_zoo.errors import DatasetNotFound

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageFolder(Dataset):
    """Every image under ``root`` (sorted by path) as ``(image,)``, with the ImageNet evaluation transform."""

    def __init__(self, root: str | Path, size: int = 224, normalization: Normalization = IMAGENET):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetNotFound(f"image folder {str(self.root)!r} does not exist or is not a folder")
        self.paths = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise DatasetNotFound(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {str(self.root)!r}")
        self.size = size
        self.normalization = normalization

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        with Image.open(self.paths[index]) as image:
            return (preprocess(image, self.size, self.normalization),)


def image_folder(root: str | Path, size: int = 224, normalization: Normalization = IMAGENET) -> ImageFolder:
    return ImageFolder(root, size, normalization)
