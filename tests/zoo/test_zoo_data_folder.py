"""``image_folder``: any folder of images, for calibrating on one's own photos."""

import numpy as np
import pytest
from PIL import Image

import qpasses_zoo.data
from qpasses_zoo.data import SYMMETRIC, DatasetNotFound, image_folder


def write_images(root):
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 24), dtype=np.uint8)).save(root / "sub" / "b.JPG")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)).save(root / "sub" / "c.png")
    (root / "notes.txt").write_text("not an image")


def test_reads_every_image_recursively_as_normalised_rgb(tmp_path):
    write_images(tmp_path)
    dataset = qpasses_zoo.data.get("image_folder", root=tmp_path, size=12, normalization=SYMMETRIC)
    assert [p.name for p in dataset.paths] == ["a.png", "b.JPG", "c.png"]
    images = [dataset[i][0] for i in range(len(dataset))]
    assert all(image.shape == (3, 12, 12) for image in images)
    assert all(-1.0 <= float(image.min()) and float(image.max()) <= 1.0 for image in images)
    assert float(images[0].std()) > 0.1


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DatasetNotFound, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetNotFound, match="no images"):
        image_folder(tmp_path)
