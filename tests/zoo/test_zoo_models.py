"""The model zoo: every model builds, traces exactly, loads local weights; Lite0's packaged weights work."""

from __future__ import annotations

import pytest
import torch
import torchvision
from skimage import data as skimage_data

import qpasses_zoo as zoo
from qpasses.graph import trace
from qpasses_zoo.models.depth_unet import ENCODER_STAGES
from qpasses_zoo.models.lite0 import map_by_position, preprocess


def _small_input(name: str) -> torch.Tensor:
    # CIFAR nets at their native 32×32; ImageNet-sized models at 64×64 to keep the suite fast.
    size = 32 if zoo.spec(name).input_size == 32 else 64
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", zoo.list_models())
def test_every_model_traces_and_the_graph_computes_the_same(name):
    model = zoo.get(name)
    x = _small_input(name)
    gm = trace(model, x)
    with torch.no_grad():
        expected, actual = model(x), gm(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    num_classes = zoo.spec(name).num_classes
    if num_classes is None:
        assert expected.shape == (2, 1, x.shape[-2] // 4, x.shape[-1] // 4)
    else:
        assert expected.shape == (2, num_classes)
    assert not model.training


def test_depth_unet_maps_224_to_56_and_is_non_negative():
    model = zoo.get("depth_unet")
    with torch.no_grad():
        depth = model(torch.randn(1, 3, 224, 224))
    assert depth.shape == (1, 1, 56, 56)
    assert depth.min() >= 0


def test_cifar_resnets_keep_32x32_in_the_first_stage():
    model = zoo.get("cifar_resnet18")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not hasattr(model, "maxpool")
    features = model.layer1(model.relu(model.bn1(model.conv1(torch.randn(1, 3, 32, 32)))))
    assert features.shape[-2:] == (32, 32)


def test_default_and_overridden_num_classes():
    assert zoo.get("preact_resnet34").fc.out_features == 100
    assert zoo.get("cifar_resnet50").fc.out_features == 10
    assert zoo.get("cifar_resnet18", num_classes=7).fc.out_features == 7
    with pytest.raises(ValueError, match="not a classifier"):
        zoo.get("depth_unet", num_classes=3)


def test_unknown_model_name_lists_the_models():
    with pytest.raises(KeyError) as info:
        zoo.get("resnet19")
    assert isinstance(info.value, zoo.UnknownName)
    assert "resnet19" in str(info.value) and "resnet18" in str(info.value) and "depth_unet" in str(info.value)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_pretrained_says_how_to_load_a_local_file(name):
    with pytest.raises(zoo.PretrainedUnavailable, match="weights_path") as info:
        zoo.get(name, pretrained=True)
    assert "https://download.pytorch.org/models/" in str(info.value)


@pytest.mark.parametrize("name", ["cifar_resnet18", "preact_resnet34", "depth_unet"])
def test_models_without_published_weights_refuse_pretrained(name):
    with pytest.raises(zoo.PretrainedUnavailable, match="weights_path"):
        zoo.get(name, pretrained=True)


def test_weights_path_loads_a_local_state_dict(tmp_path):
    trained = zoo.get("cifar_resnet18")
    path = tmp_path / "cifar_resnet18.pt"
    torch.save(trained.state_dict(), path)
    loaded = zoo.get("cifar_resnet18", weights_path=path)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "checkpoint.pt")
    zoo.get("cifar_resnet18", weights_path=tmp_path / "checkpoint.pt")


def test_weights_path_of_another_model_names_both(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(zoo.get("cifar_resnet18", num_classes=3).state_dict(), path)
    with pytest.raises(RuntimeError, match="do not fit zoo model 'cifar_resnet18'"):
        zoo.get("cifar_resnet18", weights_path=path)
    with pytest.raises(FileNotFoundError):
        zoo.get("cifar_resnet18", weights_path=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not both"):
        zoo.get("tf_efficientnet_lite0", pretrained=True, weights_path=path)


def test_depth_unet_encoder_from_a_torchvision_efficientnet_b0_file(tmp_path):
    reference = torchvision.models.efficientnet_b0(weights=None)
    path = tmp_path / "efficientnet_b0.pth"
    torch.save(reference.state_dict(), path)
    model = zoo.get("depth_unet", encoder_weights_path=path)
    for index in range(ENCODER_STAGES):
        for key, value in reference.features[index].state_dict().items():
            assert torch.equal(model.encoder[index].state_dict()[key], value), (index, key)


def test_map_by_position_checks_every_shape():
    source = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    assert list(map_by_position(source, {"x": torch.ones(3), "y": torch.ones(2, 2)})) == ["x", "y"]
    with pytest.raises(ValueError, match=r"'b' \(2, 2\) does not fit target 'y' \(4,\)"):
        map_by_position(source, {"x": torch.ones(3), "y": torch.ones(4)})
    with pytest.raises(ValueError, match="2 source tensors, 1 target"):
        map_by_position(source, {"x": torch.ones(3)})


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "efficientnet_lite0"])
def test_lite0_packaged_weights_recognise_real_photos(name):
    model = zoo.get(name, pretrained=True)
    photos = torch.stack([preprocess(skimage_data.chelsea()), preprocess(skimage_data.coffee())])
    with torch.no_grad():
        probabilities = model(photos).softmax(dim=1)
        traced_logits = trace(model, photos)(photos)
    cat, espresso = probabilities.argmax(dim=1).tolist()
    assert 281 <= cat <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert probabilities[0, 281:286].sum() > 0.8
    assert espresso == 967 and probabilities[1, 967] > 0.8
    assert traced_logits.argmax(dim=1).tolist() == [cat, espresso]


def test_imagenet_classes_are_offline_and_indexed():
    classes = zoo.imagenet_classes()
    assert len(classes) == 1000
    assert classes[967] == "espresso" and classes[281] == "tabby"
