"""Graphs that once quantized silently wrong or crashed with a misleading message (issue 20): each one is
quantized and compared with the float eager model."""

import pytest
import torch
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import nn

import qpasses
from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.passes import PTQ, QAT

BACKENDS = ["x86", "qnnpack"]
SHAPE = (2, 3, 8, 8)


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*SHAPE, generator=g) for _ in range(n)]


def quantize(model, backend, passes=()):
    # quantize_output: these nets end at the op under test (a cat, an add), which is int8 only where the model's
    # output is read as int8 codes
    data = batches()
    return PassManager([*passes, PTQ(data, backend=backend, progress=False, quantize_output=True)]).run(model, data[0])


def quantized_sqnr(model, backend, passes=()):
    """SQNR (dB) of ``model`` quantized by PTQ on ``backend`` against the float eager model, on unseen data."""
    qm = quantize(model, backend, passes)
    x = batches(seed=5)[0]
    with torch.no_grad():
        return sqnr(model(x), qm(x))


class CatOfActivatedConv(nn.Module):
    """``cat([act(conv_a(x)), conv_b(x)])``: the activation's grid cannot be the cat's (which spans negatives)."""

    def __init__(self, act):
        super().__init__()
        self.a, self.b, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), act

    def forward(self, x):
        return torch.cat([self.act(self.a(x)), self.b(x)], 1)


class CatOfReluOfCat(nn.Module):
    def forward(self, x):
        return torch.cat([F.relu(torch.cat([x, x], 1)), x], 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", [CatOfActivatedConv(nn.ReLU()), CatOfActivatedConv(nn.ReLU6()), CatOfReluOfCat()],
                         ids=["relu", "relu6", "relu_of_cat"])
def test_a_folded_activation_under_cat_keeps_its_bounds(backend, model):
    torch.manual_seed(0)
    model.eval()
    assert quantized_sqnr(model, backend) > 25  # was 4.9 dB: the ReLU was dropped on the cat's grid


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_relu6_under_cat_clips_at_its_bounds(backend):
    torch.manual_seed(0)
    qm = quantize(CatOfActivatedConv(nn.ReLU6()).eval(), backend)
    with torch.no_grad():
        clipped = qm(batches(seed=5)[0])[:, :8]
    assert float(clipped.min()) >= 0.0 and float(clipped.max()) <= 6.0 + 1e-4  # was [-22, 22]


class CatOfReluConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)


def test_activations_with_the_same_bounds_still_share_the_cat_observer():
    torch.manual_seed(0)
    data = batches()
    pm = PassManager([PTQ(data, backend="x86", progress=False, quantize_output=True)])
    pm.run(CatOfReluConvs().eval(), data[0])
    observed = next(r for r in pm.report.records if r.name == "InsertObservers")
    assert observed.stats["observers"] == 2  # the input's and the cat's: both ReLU outputs write at the cat's grid


class NestedCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return torch.cat([torch.cat([x, self.conv(x)], 1), x], 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cat_feeding_a_cat_joins_one_sharing_group(backend):
    torch.manual_seed(0)
    assert quantized_sqnr(NestedCat().eval(), backend) > 25  # was "InsertObservers: internal error KeyError"


class ConvThen(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv, self.fn = nn.Conv2d(3, 8, 3, padding=1), fn

    def forward(self, x):
        return self.fn(self.conv(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", [
    lambda x: F.leaky_relu(x, negative_slope=0.2), lambda x: F.leaky_relu(x, 0.3),
    lambda x: F.elu(x, alpha=0.3), lambda x: F.hardswish(x, inplace=False),
], ids=["leaky_relu_kwarg", "leaky_relu_positional", "elu_kwarg", "hardswish"])
def test_lowering_rebuilds_functional_ops_from_args_and_kwargs(backend, fn):
    torch.manual_seed(0)
    assert quantized_sqnr(ConvThen(fn).eval(), backend) > 25  # was 14.7 dB: slope 0.01 instead of 0.2


class ConvCalledTwice(nn.Module):
    """One conv module called in sequence and from a second branch, and one Hardswish module called twice."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 3, 3, padding=1), nn.Hardswish()

    def forward(self, x):
        y = self.act(self.conv(self.conv(x)))
        return y + self.act(self.conv(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_called_twice_gets_an_int8_module_per_call(backend):
    torch.manual_seed(0)
    assert quantized_sqnr(ConvCalledTwice().eval(), backend) > 25  # was "Lower: no int8 kernel for QuantizedConv2d"


def test_a_conv_called_twice_converts_after_qat_with_its_trained_weight_grid():
    torch.manual_seed(0)
    model = ConvCalledTwice()
    qm = PassManager([QAT(backend="qnnpack")]).run(model, batches(1)[0])
    with torch.no_grad():
        for x in batches():  # observe ranges, as training would
            qm(x)
    qm.eval()
    lowered = qpasses.convert(qm)
    x = batches(seed=5)[0]
    with torch.no_grad():
        assert sqnr(qm(x), lowered(x)) > 40  # the int8 model computes what the fake-quant model simulated
    convs = [m for m in lowered.modules() if isinstance(m, nnq.Conv2d)]
    assert len(convs) == 3 and all(torch.equal(c.weight().int_repr(), convs[0].weight().int_repr()) for c in convs)


class Relu6WithAnotherReader(nn.Module):
    """``relu6(conv(x)) + conv2(conv(x))``: the ReLU6 cannot fold (its producer has two readers), so it runs as
    qnnpack's clamp kernel on the conv's channels-last output."""

    def __init__(self, act):
        super().__init__()
        self.conv, self.conv2, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), act

    def forward(self, x):
        y = self.conv(x)
        return self.act(y) + self.conv2(y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", [nn.ReLU6(), nn.Hardtanh(-1.0, 2.0), lambda t: torch.clamp(t, -0.5, 0.5)],
                         ids=["relu6", "hardtanh", "clamp"])
def test_an_unfolded_clamp_is_exact_on_channels_last_codes(backend, act):
    torch.manual_seed(0)
    assert quantized_sqnr(Relu6WithAnotherReader(act).eval(), backend) > 25  # was 1.4 dB on qnnpack


class AddOfDeadRelu(nn.Module):
    """``x + relu(conv(x))`` where the ReLU never fires: its grid is degenerate (scale ~1e-7), and qnnpack's
    add refuses input/output scale ratios outside [2**-14, 2**8)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.bias.fill_(-100.0)

    def forward(self, x):
        return x + F.relu(self.conv(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_add_of_a_dead_branch_widens_the_degenerate_grid(backend):
    torch.manual_seed(0)
    assert quantized_sqnr(AddOfDeadRelu().eval(), backend) > 30  # was "Lower: internal error KeyError: torch.quint8"


class CancellingAddOfKernelGrids(nn.Module):
    """``sigmoid(c) + (−0.998 · sigmoid(c))``: both inputs on grids a kernel decides (sigmoid's fixed 1/256, the
    scalar multiply's derived one), the output a tiny range: an input/output scale ratio of ~500 (fuzz seed 17,
    graph 5218)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        s = torch.sigmoid(self.conv(x))
        return s + s * -0.998


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_add_of_inputs_on_kernel_decided_grids_gets_a_legal_output_grid(backend):
    torch.manual_seed(0)
    # was, on qnnpack: "failed to create QNNPACK Add operator" (ratio 566): the widening saw no input grid
    assert quantized_sqnr(CancellingAddOfKernelGrids().eval(), backend) > 30


def test_the_widened_grid_is_reported():
    data = batches()
    pm = PassManager([PTQ(data, backend="qnnpack", progress=False, quantize_output=True)])
    pm.run(AddOfDeadRelu().eval(), data[0])
    notes = next(r for r in pm.report.records if r.name == "Lower").notes
    assert any("widened the grid of 'relu'" in note for note in notes)
