"""The on-disk loaders, on tiny fake datasets written in the real layouts, and their missing-file errors."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from qpasses_zoo import data
from qpasses_zoo.data.transforms import Normalization

IDENTITY = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _write_pickle(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_images(count: int, offset: int) -> np.ndarray:
    # Rows of 3072 bytes: the red plane, then green, then blue, each 32×32 row-major, as in the archives.
    return ((np.arange(count * 3072).reshape(count, 3072) + offset) % 256).astype(np.uint8)


@pytest.fixture
def cifar10_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _write_pickle(folder / f"data_batch_{i}", {"data": _cifar_images(2, i), "labels": [i, 9 - i]})
    _write_pickle(folder / "test_batch", {"data": _cifar_images(3, 0), "labels": [0, 1, 2]})
    _write_pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return tmp_path


def test_cifar10_reads_the_pickle_batches(cifar10_root):
    train = data.cifar10(cifar10_root, "train", normalization=IDENTITY)
    assert len(train) == 10 and train.classes[3] == "class3"
    image, label = train[2]
    assert image.shape == (3, 32, 32) and label == 2
    expected = torch.from_numpy(_cifar_images(2, 2)[0].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(image, expected)
    test = data.cifar10(cifar10_root / "cifar-10-batches-py", "test")
    assert [test[i][1] for i in range(3)] == [0, 1, 2]
    assert len(data.get("cifar10", root=cifar10_root, split="test")) == 3


def test_cifar100_fine_and_coarse_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split in ("train", "test"):
        _write_pickle(folder / split, {"data": _cifar_images(2, 0), "fine_labels": [42, 99], "coarse_labels": [3, 19]})
    _write_pickle(folder / "meta", {"fine_label_names": ["f"] * 100, "coarse_label_names": ["c"] * 20})
    assert [label for _, label in data.cifar100(tmp_path, "test")] == [42, 99]
    coarse = data.cifar100(tmp_path, "train", labels="coarse")
    assert [label for _, label in coarse] == [3, 19] and len(coarse.classes) == 20


def test_cifar_missing_files_name_the_layout(cifar10_root, tmp_path):
    (cifar10_root / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(data.DatasetNotFound, match="data_batch_4") as info:
        data.cifar10(cifar10_root, "train")
    assert isinstance(info.value, FileNotFoundError)
    assert "cifar-10-batches-py" in str(info.value) and "nothing is downloaded" in str(info.value)
    data.cifar10(cifar10_root, "test")  # the test split is complete
    with pytest.raises(data.DatasetNotFound, match="cifar-100-python"):
        data.cifar100(tmp_path / "empty")


def _write_photo(path, size=(50, 40), colour=(200, 30, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagenette_labels_are_imagenet_indices(tmp_path):
    _write_photo(tmp_path / "val" / "n01440764" / "ILSVRC2012_val_1.JPEG")
    _write_photo(tmp_path / "val" / "n03888605" / "ILSVRC2012_val_2.JPEG")
    dataset = data.imagenette(tmp_path, "val", size=32, normalization=IDENTITY)
    (image, tench), (_, parachute) = dataset[0], dataset[1]
    assert image.shape == (3, 32, 32) and (tench, parachute) == (0, 701)
    torch.testing.assert_close(image[:, 16, 16], torch.tensor([200, 30, 10]) / 255, atol=0.01, rtol=0)
    assert [label for _, label in data.imagenette(tmp_path, "val", size=32, labels="folder")] == [0, 1]


def test_imagenette_rejects_foreign_folders_and_missing_splits(tmp_path):
    _write_photo(tmp_path / "val" / "dogs" / "a.jpg")
    with pytest.raises(ValueError, match=r"not Imagenette wnids: \['dogs'\]"):
        data.imagenette(tmp_path, "val")
    with pytest.raises(data.DatasetNotFound, match=r"root/train/<wnid>/\*\.JPEG"):
        data.imagenette(tmp_path, "train")


def _write_nyu_csv_set(root, rows: int) -> list[str]:
    lines = []
    for i in range(rows):
        rgb = f"data/nyu2_train/room_{i}_out/{i}.jpg"
        depth = f"data/nyu2_train/room_{i}_out/{i}.png"
        _write_photo(root / rgb, size=(64, 48))
        Image.fromarray(np.full((48, 64), 51 * (i + 1), dtype=np.uint8), mode="L").save(root / depth)
        lines.append(f"{rgb},{depth}")
    (root / "data" / "nyu2_train.csv").write_text("\n".join(lines) + "\n")
    return lines


def test_nyu_csv_pairs_in_metres(tmp_path):
    _write_nyu_csv_set(tmp_path, rows=2)
    dataset = data.nyu_csv(tmp_path, "train", size=32)
    image, depth = dataset[1]
    assert len(dataset) == 2 and image.shape == (3, 32, 32) and depth.shape == (1, 8, 8)
    torch.testing.assert_close(depth, torch.full((1, 8, 8), 102 / 255 * 10))  # 8-bit PNG: 0-255 is 0-10 m
    Image.new("RGB", (64, 48), (102, 102, 102)).save(tmp_path / dataset.pairs[1][1])  # grey stored as RGB
    torch.testing.assert_close(dataset[1][1], depth)


def test_nyu_csv_16bit_depth_is_millimetres(tmp_path):
    rgb, depth = tmp_path / "data/nyu2_test/0_colors.png", tmp_path / "data/nyu2_test/0_depth.png"
    _write_photo(rgb, size=(64, 48))
    Image.fromarray(np.full((48, 64), 1500, dtype=np.uint16)).save(depth)
    (tmp_path / "data/nyu2_test.csv").write_text("data/nyu2_test/0_colors.png,data/nyu2_test/0_depth.png\n")
    _, metres = data.nyu_csv(tmp_path, "test", size=32, target_size=32)[0]
    torch.testing.assert_close(metres, torch.full((1, 32, 32), 1.5))


def test_nyu_csv_missing_list_or_files(tmp_path):
    with pytest.raises(data.DatasetNotFound, match="nyu2_train.csv") as info:
        data.nyu_csv(tmp_path)
    assert "rgb_path,depth_path" in str(info.value)
    lines = _write_nyu_csv_set(tmp_path, rows=2)
    (tmp_path / lines[1].split(",")[1]).unlink()
    with pytest.raises(data.DatasetNotFound, match=r"1 file\(s\) listed .* missing .*room_1_out/1.png"):
        data.nyu_csv(tmp_path)


def _write_nyu_mat(path, frames: int, width: int = 64, height: int = 48) -> None:
    # As MATLAB v7.3 stores it: column-major, so (N, 3, W, H) images and (N, W, H) depths.
    w = np.arange(width)[:, None]
    h = np.arange(height)[None, :]
    images = np.broadcast_to((w + 0 * h).astype(np.uint8), (frames, 3, width, height))
    depths = np.broadcast_to((h + 0.0 * w).astype(np.float32), (frames, width, height)) + 1.0
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["depths"] = depths


def test_nyu_mat_transposes_matlab_layout(tmp_path):
    _write_nyu_mat(tmp_path / "nyu_depth_v2_labeled.mat", frames=3)
    dataset = data.nyu_mat(tmp_path, indices=[2, 0], size=48, target_size=48, normalization=IDENTITY)
    image, depth = dataset[0]
    assert len(dataset) == 2 and image.shape == (3, 48, 48) and depth.shape == (1, 48, 48)
    # Depth grows with the row; red grows with the column (the centre crop starts at column 8).
    torch.testing.assert_close(depth[0, :, 5], torch.arange(48.0) + 1)
    torch.testing.assert_close(image[0, 5, :], (torch.arange(48.0) + 8) / 255)
    pickle.loads(pickle.dumps(dataset))  # DataLoader workers get a copy without the open HDF5 handle
    assert data.nyu_mat(tmp_path / "nyu_depth_v2_labeled.mat", size=32)[2][1].shape == (1, 8, 8)


def test_nyu_mat_missing_or_wrong_file(tmp_path):
    with pytest.raises(data.DatasetNotFound, match="nyu_depth_v2_labeled.mat"):
        data.nyu_mat(tmp_path)
    with h5py.File(tmp_path / "other.mat", "w") as f:
        f["labels"] = np.zeros((2, 4, 4))
    with pytest.raises(data.DatasetNotFound, match="'images' and 'depths'"):
        data.nyu_mat(tmp_path / "other.mat")
    (tmp_path / "text.mat").write_text("MATLAB 5.0 MAT-file")
    with pytest.raises(data.DatasetNotFound, match="not an HDF5"):
        data.nyu_mat(tmp_path / "text.mat")
    _write_nyu_mat(tmp_path / "small.mat", frames=2)
    with pytest.raises(IndexError, match="holds 2 frames"):
        data.nyu_mat(tmp_path / "small.mat", indices=[2])
