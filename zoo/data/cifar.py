"""CIFAR-10 and CIFAR-100 from the python-pickle batches, for users who have them on disk.

The layout is the one of the official archives (and of torchvision's ``CIFAR10(root)``):
``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``root/cifar-100-python/{train, test, meta}``. The batches are parsed here rather than with torchvision,
which insists on the official MD5 sums and so could not read a subset or a rebuilt copy.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from qpasses_zoo.data.transforms import CIFAR10, CIFAR100, Normalization
from qpasses_zoo.errors import DatasetNotFound

SPLITS = ("train", "test")


@dataclass(frozen=True)
class _Layout:
    name: str
    folder: str
    files: dict[str, tuple[str, ...]]
    meta: str
    label_key: str
    names_key: str


_CIFAR10 = _Layout(
    name="CIFAR-10",
    folder="cifar-10-batches-py",
    files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    meta="batches.meta",
    label_key="labels",
    names_key="label_names",
)


def _cifar100_layout(labels: str) -> _Layout:
    return _Layout(
        name="CIFAR-100",
        folder="cifar-100-python",
        files={"train": ("train",), "test": ("test",)},
        meta="meta",
        label_key=f"{labels}_labels",
        names_key=f"{labels}_label_names",
    )


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        # The batches were pickled by Python 2; latin1 turns their byte-string keys into str.
        return pickle.load(f, encoding="latin1")


class CIFARDataset(Dataset):
    """CIFAR images as ``(image (3, 32, 32) normalised, label)``; ``classes`` holds the label names."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], normalization: Normalization):
        self.images = images
        self.labels = labels
        self.classes = classes
        self.normalization = normalization

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.images[index]).float() / 255.0
        return self.normalization(image), int(self.labels[index])


def _load(root: str | Path, split: str, layout: _Layout, normalization: Normalization) -> CIFARDataset:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    folder = root if root.name == layout.folder else root / layout.folder
    needed = [folder / name for name in (*layout.files[split], layout.meta)]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise DatasetNotFound(
            f"{layout.name} {split} split not found: missing {missing}.\n"
            f"  expected the python version of the official archive extracted under root, i.e.\n"
            f"  {root / layout.folder}/{{{', '.join((*layout.files['train'], *layout.files['test'], layout.meta))}}}\n"
            f"  (nothing is downloaded by qpasses)"
        )
    batches = [_unpickle(folder / name) for name in layout.files[split]]
    images = np.concatenate([np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
    labels = np.concatenate([np.asarray(b[layout.label_key], dtype=np.int64) for b in batches])
    classes = list(_unpickle(folder / layout.meta)[layout.names_key])
    return CIFARDataset(images, labels, classes, normalization)


def cifar10(root: str | Path, split: str = "train", normalization: Normalization = CIFAR10) -> CIFARDataset:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (``root`` may also be that folder itself)."""
    return _load(root, split, _CIFAR10, normalization)


def cifar100(
    root: str | Path,
    split: str = "train",
    labels: str = "fine",
    normalization: Normalization = CIFAR100,
) -> CIFARDataset:
    """CIFAR-100 from ``root/cifar-100-python``; ``labels="fine"`` (100 classes) or ``"coarse"`` (20)."""
    if labels not in ("fine", "coarse"):
        raise ValueError(f"labels must be 'fine' or 'coarse', got {labels!r}")
    return _load(root, split, _cifar100_layout(labels), normalization)
