import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from qpasses import PassManager
from qpasses.passes import ReplaceFunctional
from tests.nets import ACTIVATIONS, RandomNet, randomize_bn


def rewrite(model, *inputs):
    pm = PassManager([ReplaceFunctional()])
    gm = pm.run(model, inputs)
    return gm, pm.report.records[-1]


def ff_methods(gm):
    return sorted(
        n.target for n in gm.graph.nodes
        if n.op == "call_method" and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr"
        and isinstance(gm.get_submodule(n.args[0].target), FloatFunctional)
    )


def test_replace_functional_is_bit_identical_on_every_model(named_model):
    name, model, x = named_model
    gm, record = rewrite(model, x)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x)), name
    assert sum(record.stats.values()) > 0
    leftover = {operator.add, operator.iadd, torch.add, operator.mul, torch.mul, torch.cat}
    assert not [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in leftover]


class Ops(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, y):
        a = x + y
        b = torch.add(a, x)
        c = b.add(y)
        c += x
        d = x * y
        e = torch.mul(d, 2.0)
        f = 1.5 + e
        g = self.relu(f + x)
        h = F.relu(g + y)
        i = torch.relu(x.add(h))
        return torch.cat([a, c, d, f, g, h, i], dim=1) * 0.5


def test_every_op_form_is_rewritten_bit_identically():
    model = Ops()
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    gm, record = rewrite(model, x, y)
    assert torch.equal(gm(x, y), model(x, y))
    assert ff_methods(gm) == sorted(
        ["add", "add", "add", "add", "mul", "mul_scalar", "add_scalar", "add_relu", "add_relu", "add_relu",
         "cat", "mul_scalar"]
    )
    assert record.stats == {"add": 4, "mul": 1, "mul_scalar": 2, "add_scalar": 1, "add_relu": 3, "cat": 1}
    assert not [n for n in gm.graph.nodes if n.op == "call_module"], "the orphaned ReLU module should be gone"
    assert not hasattr(gm, "relu")


def test_in_place_add_read_later_alpha_and_int_arithmetic_are_left_alone():
    class Net(nn.Module):
        def forward(self, x, y):
            z = x.clone()
            z.add_(y)  # mutates z; the next line reads z
            w = torch.add(x, y, alpha=2)
            n = x.shape[-1] + 1  # size arithmetic, not tensors
            return z + w + n

    model = Net()
    x, y = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    gm, record = rewrite(model, x, y)
    assert torch.equal(gm(x, y), model(x, y))
    notes = " ".join(record.notes)
    assert "in-place 'add_'" in notes and "alpha" in notes
    assert record.stats == {"add": 1}  # z + w; adding the traced size n (not a tensor) stays as it was
    assert len([n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]) == 2


def test_floatfunctional_modules_live_in_the_block_that_computed_them():
    import torchvision

    gm, _ = rewrite(torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32))
    names = [name for name, m in gm.named_modules() if isinstance(m, FloatFunctional)]
    assert len(names) == 8 and names[0].startswith("layer1.0.")


def test_eager_mode_quantization_converts_the_rewritten_ops():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return torch.relu(self.conv(x) + x)

    gm, _ = rewrite(Block().eval(), torch.randn(1, 3, 4, 4))
    (name,) = [n for n, m in gm.named_modules() if isinstance(m, FloatFunctional)]
    assert torch.ao.quantization.quantization_mappings.get_default_static_quant_module_mappings()[FloatFunctional] \
        is torch.ao.nn.quantized.QFunctional
    assert hasattr(gm.get_submodule(name), "activation_post_process")


blocks = st.lists(
    st.tuples(
        st.sampled_from(["conv", "residual", "residual_relu", "cat", "gate", "scale"]),
        st.sampled_from(sorted(ACTIVATIONS)),
        st.integers(2, 5),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=blocks, seed=st.integers(0, 1000))
def test_replace_functional_preserves_random_networks_bit_for_bit(blocks, seed):
    torch.manual_seed(seed)
    model = randomize_bn(RandomNet(blocks), seed).eval()
    x = torch.randn(2, 3, 8, 8)
    gm, record = rewrite(model, x)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    expected = sum(kind in ("residual", "residual_relu", "cat", "gate") for kind, _, _ in blocks)
    expected += 2 * sum(kind == "scale" for kind, _, _ in blocks)
    assert sum(record.stats.values()) == expected


@pytest.mark.parametrize("kind", ["residual_relu"])
def test_add_then_relu_becomes_add_relu(kind):
    model = randomize_bn(RandomNet([(kind, "relu", 3)])).eval()
    gm, record = rewrite(model, torch.randn(1, 3, 8, 8))
    assert record.stats == {"add_relu": 1}
