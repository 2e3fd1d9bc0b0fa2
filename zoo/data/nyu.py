"""NYU Depth v2 for users who have it on disk, in its two common distributions.

``nyu_csv``: the DenseDepth ``nyu_data`` archive, a CSV of ``rgb_path,depth_path`` rows relative to the
archive's top folder (``data/nyu2_train.csv``, ``data/nyu2_test.csv``) next to the JPEG/PNG pairs.
``nyu_mat``: the official labelled set ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5), read with
h5py; MATLAB stores column-major, so ``images`` is ``(N, 3, W, H)`` and ``depths`` ``(N, W, H)`` there.

Both give ``(image (3, size, size) normalised, depth (1, t, t) in metres)``: the centre square of the
frame, the image resized to ``size`` and the depth to ``t = target_size`` (default ``size // 4``, the
output of ``depth_unet``) by nearest neighbour, so that holes (depth 0) are not smeared into neighbours.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from qpasses_zoo.data.transforms import IMAGENET, Normalization, resize, to_float_image
from qpasses_zoo.errors import DatasetNotFound

SPLITS = ("train", "test")
DEFAULT_CSV = {"train": "data/nyu2_train.csv", "test": "data/nyu2_test.csv"}

# DenseDepth's training depths are 8-bit PNGs spanning 0-10 m; its test depths are 16-bit millimetres.
_METRES_PER_UNIT = {8: 10.0 / 255.0, 16: 1e-3}


def depth_pair(
    image: torch.Tensor,
    depth: torch.Tensor,
    size: int,
    target_size: int | None,
    normalization: Normalization,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-square crop of ``image (3, H, W)`` in [0, 1] and ``depth (H, W)``, resized for the model."""
    height, width = depth.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[:, top : top + side, left : left + side]
    depth = depth[None, top : top + side, left : left + side]
    target = target_size or size // 4
    return normalization(resize(image, (size, size))), resize(depth, (target, target), mode="nearest")


def _read_depth_png(path: Path, metres_per_unit: float | None) -> torch.Tensor:
    with Image.open(path) as png:
        # 16-bit PNGs open as mode "I;16" (or "I"); 8-bit ones as "L", or "RGB" with equal channels.
        bits = 16 if png.mode.startswith("I") else 8
        values = np.asarray(png, dtype=np.float32)
    if values.ndim == 3:
        values = values[:, :, 0]
    return torch.from_numpy(values * (metres_per_unit or _METRES_PER_UNIT[bits]))


class NYUDepthCSV(Dataset):
    """Image/depth pairs listed in a DenseDepth-style CSV; see ``nyu_csv``."""

    def __init__(
        self,
        root: Path,
        pairs: list[tuple[str, str]],
        size: int,
        target_size: int | None,
        normalization: Normalization,
        metres_per_unit: float | None,
    ):
        self.root = root
        self.pairs = pairs
        self.size = size
        self.target_size = target_size
        self.normalization = normalization
        self.metres_per_unit = metres_per_unit

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb_path, depth_path = self.pairs[index]
        with Image.open(self.root / rgb_path) as rgb:
            image = to_float_image(rgb)
        depth = _read_depth_png(self.root / depth_path, self.metres_per_unit)
        return depth_pair(image, depth, self.size, self.target_size, self.normalization)


def nyu_csv(
    root: str | Path,
    split: str = "train",
    csv_path: str | None = None,
    size: int = 224,
    target_size: int | None = None,
    normalization: Normalization = IMAGENET,
    metres_per_unit: float | None = None,
) -> NYUDepthCSV:
    """NYU Depth v2 pairs from ``root/data/nyu2_{split}.csv`` (or ``root/csv_path``).

    Each CSV row is ``rgb_path,depth_path`` relative to ``root``. Depth PNG values are converted to
    metres with ``metres_per_unit``, by default DenseDepth's convention: 8-bit PNGs span 0-10 m,
    16-bit PNGs are millimetres.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    listing = root / (csv_path or DEFAULT_CSV[split])
    layout = (
        f"  expected {listing} with rows 'rgb_path,depth_path' relative to {root}, e.g.\n"
        f"  data/nyu2_train/living_room_0038_out/37.jpg,data/nyu2_train/living_room_0038_out/37.png\n"
        f"  (the DenseDepth nyu_data.zip extracted into root; nothing is downloaded by qpasses)"
    )
    if not listing.is_file():
        raise DatasetNotFound(f"NYU Depth v2 {split} list not found: {listing}\n{layout}")
    with open(listing, newline="") as f:
        pairs = [(row[0].strip(), row[1].strip()) for row in csv.reader(f) if len(row) >= 2]
    if not pairs:
        raise DatasetNotFound(f"NYU Depth v2 list {listing} has no 'rgb_path,depth_path' rows\n{layout}")
    missing = [path for pair in pairs for path in pair if not (root / path).is_file()]
    if missing:
        raise DatasetNotFound(
            f"NYU Depth v2: {len(missing)} file(s) listed in {listing} are missing under {root}, "
            f"e.g. {missing[:3]}\n{layout}"
        )
    return NYUDepthCSV(root, pairs, size, target_size, normalization, metres_per_unit)


class NYUDepthMat(Dataset):
    """Image/depth pairs of the labelled ``.mat`` file, read lazily; see ``nyu_mat``."""

    def __init__(
        self,
        path: Path,
        indices: list[int],
        size: int,
        target_size: int | None,
        normalization: Normalization,
    ):
        self.path = path
        self.indices = indices
        self.size = size
        self.target_size = target_size
        self.normalization = normalization
        self._file = None

    def __getstate__(self) -> dict:
        # An open HDF5 handle cannot be pickled into DataLoader workers; each process opens its own.
        return {**self.__dict__, "_file": None}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        i = self.indices[index]
        image = torch.from_numpy(self._file["images"][i].transpose(0, 2, 1).copy()).float() / 255.0
        depth = torch.from_numpy(self._file["depths"][i].T.astype(np.float32))
        return depth_pair(image, depth, self.size, self.target_size, self.normalization)


def nyu_mat(
    path: str | Path,
    indices: Sequence[int] | None = None,
    size: int = 224,
    target_size: int | None = None,
    normalization: Normalization = IMAGENET,
) -> NYUDepthMat:
    """NYU Depth v2's labelled set from ``nyu_depth_v2_labeled.mat`` (1,449 frames, depth in metres).

    ``path`` is the file, or a folder holding it. ``indices`` selects frames (all by default), e.g. the
    official 795/654 train/test split, which ships separately in ``splits.mat``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "nyu_depth_v2_labeled.mat"
    layout = (
        "  expected the labelled NYU Depth v2 file nyu_depth_v2_labeled.mat (MATLAB v7.3 / HDF5) holding\n"
        "  'images' (N, 3, 640, 480) uint8 and 'depths' (N, 640, 480) float metres; nothing is downloaded by qpasses"
    )
    if not path.is_file():
        raise DatasetNotFound(f"NYU Depth v2 labelled file not found: {path}\n{layout}")
    try:
        with h5py.File(path, "r") as f:
            found = {key: f[key].shape for key in ("images", "depths") if key in f}
    except OSError as exc:
        raise DatasetNotFound(f"{path} is not an HDF5 (MATLAB v7.3) file: {exc}\n{layout}") from exc
    if len(found) != 2 or found["images"][0] != found["depths"][0]:
        raise DatasetNotFound(f"{path} does not hold matching 'images' and 'depths' arrays (found {found})\n{layout}")
    count = found["images"][0]
    chosen = list(range(count)) if indices is None else [int(i) for i in indices]
    out_of_range = [i for i in chosen if not 0 <= i < count]
    if out_of_range:
        raise IndexError(f"{path} holds {count} frames; indices out of range: {out_of_range[:5]}")
    return NYUDepthMat(path, chosen, size, target_size, normalization)
