import pytest
import torch

from tests.nets import TinyUNet, randomize_bn

MODEL_NAMES = [
    "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "tf_efficientnet_lite0", "tiny_unet",
]


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "tf_efficientnet_lite0":
        import timm

        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    elif name == "tiny_unet":
        model = TinyUNet()
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
    return randomize_bn(model).eval()


_CACHE: dict[str, torch.nn.Module] = {}


@pytest.fixture(params=MODEL_NAMES)
def named_model(request):
    """(name, eval-mode model with randomized BN, 64×64 example input); models are built once per session."""
    name = request.param
    if name not in _CACHE:
        _CACHE[name] = build_model(name)
    return name, _CACHE[name], torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
