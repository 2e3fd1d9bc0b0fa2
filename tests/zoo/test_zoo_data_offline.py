"""The offline datasets: photo crops, digits, MNIST-5k, rendered depth; the ``get`` dispatch and ``loader``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qpasses_zoo import data
from qpasses_zoo.data.photos import photos
from qpasses_zoo.data.synthetic_depth import render_room


def test_photo_crops_shapes_and_normalisation():
    (images,) = data.photo_crops(6, size=64).tensors
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.float32
    pixels = data.IMAGENET.invert(images)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert data.photo_crops(0, size=64).tensors[0].shape == (0, 3, 64, 64)


def test_photo_crops_are_determined_by_seed_and_split():
    first = data.photo_crops(4, size=32, seed=3).tensors[0]
    assert torch.equal(first, data.photo_crops(4, size=32, seed=3).tensors[0])
    assert not torch.equal(first, data.photo_crops(4, size=32, seed=4).tensors[0])
    assert not torch.equal(first, data.photo_crops(4, size=32, seed=3, split="eval").tensors[0])


def test_photo_crops_use_several_real_photos():
    sources = photos()
    assert {"astronaut", "chelsea", "coffee", "rocket", "china", "flower"} <= set(sources)
    assert len({box.photo for box in data.photo_crop_boxes(len(sources))}) == len(sources)


def _overlap(a, b) -> bool:
    return (
        a.photo == b.photo
        and a.top < b.top + b.height
        and b.top < a.top + a.height
        and a.left < b.left + b.width
        and b.left < a.left + a.width
    )


@pytest.mark.parametrize(("calib_seed", "eval_seed"), [(0, 0), (0, 1), (7, 2)])
def test_calib_and_eval_crops_share_no_source_pixel(calib_seed, eval_seed):
    calib = data.photo_crop_boxes(60, seed=calib_seed, split="calib")
    evaluation = data.photo_crop_boxes(60, seed=eval_seed, split="eval")
    sources = photos()
    for box in calib + evaluation:
        height, width = sources[box.photo].shape[-2:]
        assert 0 <= box.top and box.top + box.height <= height and 0 <= box.left and box.left + box.width <= width
    assert not any(_overlap(a, b) for a in calib for b in evaluation)


def test_photo_crops_reject_an_unknown_split():
    with pytest.raises(ValueError, match="split"):
        data.photo_crops(1, split="train")


def test_digits_split_by_seed_with_labels():
    train, test = data.digits("train"), data.digits("test")
    x, y = train.tensors
    assert x.shape[1:] == (3, 32, 32) and len(train) + len(test) == 1797
    assert set(y.tolist()) == set(range(10)) and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 2])  # grey repeated to three channels
    assert torch.equal(y, data.digits("train").tensors[1])
    assert not torch.equal(y, data.digits("train", seed=1).tensors[1])
    assert data.digits("test", size=16).tensors[0].shape[-2:] == (16, 16)


def test_mnist5k_split_with_balanced_labels():
    train, test = data.mnist5k("train"), data.mnist5k("test")
    assert len(train) == 4000 and len(test) == 1000
    images, labels = test.tensors
    assert images.shape == (1000, 3, 32, 32)
    assert labels.bincount().tolist() == [100] * 10
    assert images.min() >= -1 and images.max() <= 1


def test_synthetic_depth_shapes_and_positive_depth():
    images, depths = data.synthetic_depth(3, size=64).tensors
    assert images.shape == (3, 3, 64, 64) and depths.shape == (3, 1, 16, 16)
    assert torch.isfinite(depths).all() and depths.min() > 0.1 and depths.max() < 15
    full = data.synthetic_depth(1, size=64, target_size=64).tensors[1]
    assert full.shape == (1, 1, 64, 64)


def test_synthetic_depth_is_determined_by_seed_and_scene_index():
    images, depths = data.synthetic_depth(3, size=48, seed=5).tensors
    prefix_images, prefix_depths = data.synthetic_depth(2, size=48, seed=5).tensors
    assert torch.equal(images[:2], prefix_images) and torch.equal(depths[:2], prefix_depths)
    assert not torch.equal(depths, data.synthetic_depth(3, size=48, seed=6).tensors[1])


def test_rendered_room_has_texture_shading_and_depth_discontinuities():
    image, depth = render_room(64, np.random.default_rng(0))
    assert image.shape == (3, 64, 64) and depth.shape == (64, 64)
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.05
    # Boxes in front of walls make depth jump between neighbouring pixels.
    assert depth.diff(dim=1).abs().max() > 0.3


def test_loader_batches_the_first_element_as_model_input():
    batches = list(data.loader(data.digits("test"), batch_size=100, shuffle=True))
    images, labels = batches[0]
    assert images.shape == (100, 3, 32, 32) and labels.shape == (100,)
    again = next(iter(data.loader(data.digits("test"), batch_size=100, shuffle=True)))
    assert torch.equal(labels, again[1])


def test_get_dispatches_by_name():
    assert len(data.get("digits", split="test")) == 450
    assert "photo_crops" in data.list_datasets() and "nyu_mat" in data.list_datasets()
    with pytest.raises(ValueError, match="takes no root"):
        data.get("digits", root="/tmp")
    with pytest.raises(data.DatasetNotFound, match="pass root"):
        data.get("cifar10")
    with pytest.raises(KeyError, match="unknown dataset 'imagenet'.*cifar10"):
        data.get("imagenet")
