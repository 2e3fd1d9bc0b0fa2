"""The capture ladder: symbolic tracing → torch.export normalised into the canonical form → auto_leaf."""

import operator

import pytest
import torch
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import nn

from qpasses import PassManager, TraceError, trace
from qpasses.analysis.metrics import sqnr
from qpasses.graph import CaptureInfo
from qpasses.graph.export_capture import FUNCTION_OPS, MODULE_OPS, export_graph
from qpasses.passes import PTQ, FuseBN
from qpasses.quant.state import state_of


def batches(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def ptq(model, shape, passes=()):
    data = batches(shape)
    pm = PassManager([*passes, PTQ(data, backend="x86", progress=False)])
    return pm.run(model, data[0]), pm


@torch.fx.wrap
def clip_if_large(x):
    """Data-dependent control flow symbolic tracing keeps as one call (``torch.fx.wrap``); export cannot."""
    return x.clamp(max=1.0) if x.abs().max() > 1 else x


def count(gm, types):
    return sum(isinstance(m, types) for m in gm.modules())


class LayerScale(nn.Module):
    """ConvNeXt's layer scale: a Parameter used directly, through a method call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        # a branch on the input's rank (channels-first or channels-last layer scale): symbolic tracing
        # cannot decide it, export sees the example's shape
        gamma = self.gamma.reshape(1, -1, 1, 1) if x.ndim == 4 else self.gamma
        return x + gamma * self.conv(x)


class ClsToken(nn.Module):
    """A ViT-like class token prepended with a cat; a linear on every token."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        batch, length, _ = x.shape
        if length > 16:  # a check on the input's shape, as torchvision's ViT makes
            raise ValueError("too many tokens")
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
        return self.proj(tokens)[:, 0]


def test_a_layer_scale_gamma_is_captured_as_an_attribute_by_export():
    model = LayerScale().eval()
    x = torch.randn(2, 4, 6, 6)
    gm = trace(model, x)
    info = state_of(gm).capture
    assert isinstance(info, CaptureInfo) and info.method == "export"
    assert info.tried and info.tried[0].startswith("symbolic_trace failed")
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["gamma"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv"]
    assert gm.conv is model.conv and gm.gamma is model.gamma  # shared, not copied
    assert set(gm.state_dict()) == set(model.state_dict())
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    qm, pm = ptq(gm, (2, 4, 6, 6))
    assert count(qm, nnq.Conv2d) == 1
    assert "capture: export (after symbolic_trace failed" in str(pm.report)
    assert sqnr(model(x), qm(x)) > 25


def test_a_cls_token_cat_is_captured_and_its_linear_quantized():
    model = ClsToken().eval()
    x = torch.randn(2, 5, 8)
    gm = trace(model, x)
    assert state_of(gm).capture.method == "export"
    assert torch.cat in {n.target for n in gm.graph.nodes}
    qm, _ = ptq(model, (2, 5, 8))
    assert count(qm, nnq.Linear) == 1
    assert sqnr(model(x), qm(x)) > 25


class Conv3DSimple(nn.Conv3d):
    """torchvision's video ResNet conv: an nn.Conv3d subclass that only changes __init__."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, kernel_size=3, padding=1, bias=False)


class Video(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = Conv3DSimple(3, 4)
        self.bn = nn.BatchNorm3d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3, 4)))


def _randomized(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
def test_a_conv3d_subclass_stays_a_conv_that_fusebn_folds_and_ptq_quantizes(via):
    model = _randomized(Video())
    shape = (1, 3, 4, 6, 6)
    x = torch.randn(*shape)
    gm = trace(model, x) if via == "symbolic_trace" else export_graph(model, (x,)).graph_module
    assert gm.get_submodule("conv") is model.conv  # the user's module, called as a module
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "bn", "head"]
    qm, pm = ptq(gm, shape, passes=[FuseBN()])
    fused = [r for r in pm.report.records if r.name == "FuseBN"][0]
    assert fused.stats["folded"] == 1
    assert count(qm, nn.BatchNorm3d) == 0
    assert count(qm, nnq.Conv3d) == 1 and count(qm, nnq.Linear) == 1
    assert sqnr(model(x), qm(x)) > 25


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def test_a_transformer_encoder_is_captured_by_export_and_all_its_linears_run_int8():
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 6, 32)
    gm = trace(model, x)
    info = state_of(gm).capture
    assert info.method == "export" and "symbolic_trace kept encoder whole" in info.tried[0]
    assert "scaled_dot_product_attention.default" in info.aten_ops  # attention itself stays float
    qm, pm = ptq(gm, (2, 6, 32))  # the captured graph: its capture is what the report shows
    # Per layer: the attention's in-projection (a Linear built on in_proj_weight), out_proj, linear1, linear2;
    # plus the head: 9 linears, every one int8 (symbolic tracing alone quantized the head only).
    assert count(qm, nnq.Linear) == 9
    assert count(qm, nn.Linear) == 0
    assert sqnr(model(x), qm(x)) > 25
    assert "capture: export (after symbolic_trace kept encoder whole)" in str(pm.report)


def test_the_in_projection_linear_shares_the_attention_parameters():
    model = Encoder().eval()
    gm = trace(model, torch.randn(1, 3, 32))
    attention = model.encoder.layers[0].self_attn
    in_proj = gm.get_submodule("encoder.layers.0.self_attn.in_proj")
    assert type(in_proj) is nn.Linear and in_proj.weight is attention.in_proj_weight
    assert gm.get_submodule("encoder.layers.0.self_attn.out_proj") is attention.out_proj


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gamma = nn.Parameter(torch.ones(4))

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: neither symbolic tracing nor export captures it
            return y
        return -y


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.block = DataDependent()

    def forward(self, x):
        return self.block(self.stem(x))


def test_data_dependent_control_flow_falls_back_to_auto_leaf_and_says_why():
    model = Net().eval()
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(TraceError) as info:
        trace(model, x)
    assert "'block'" in str(info.value) and "torch.export failed" in str(info.value)
    with pytest.warns(UserWarning, match="block"):
        gm = trace(model, x, auto_leaf=True)
    capture = state_of(gm).capture
    assert capture.method == "auto_leaf" and capture.opaque_modules == ["block"]
    assert capture.tried[0].startswith("symbolic_trace failed") and capture.tried[1].startswith("torch.export failed")
    assert "left opaque (untraced, float): block" in str(capture)


def test_where_symbolic_tracing_captures_everything_export_is_not_tried():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()).eval()
    gm = trace(model, torch.randn(1, 3, 4, 4))
    assert state_of(gm).capture == CaptureInfo("symbolic_trace")
    pm = PassManager([FuseBN()])
    pm.run(model, torch.randn(1, 3, 4, 4))
    assert pm.report.capture == CaptureInfo("symbolic_trace") and "capture: symbolic_trace" in str(pm.report)


def test_leaf_modules_skip_export():
    model = Encoder().eval()
    gm = trace(model, torch.randn(1, 3, 32), leaf_modules=["encoder"])
    assert state_of(gm).capture.method == "symbolic_trace"
    assert "encoder" in {n.target for n in gm.graph.nodes if n.op == "call_module"}


def test_a_module_with_its_own_forward_is_rebuilt_not_called():
    class PaddedConv(nn.Conv2d):
        """Pads in its forward, as timm's Conv2dSame does; calling it for the conv op would pad twice."""

        def forward(self, x):
            return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)

    model = nn.Sequential(PaddedConv(3, 4, 3)).eval()
    x = torch.randn(1, 3, 5, 5)
    gm = export_graph(model, (x,)).graph_module
    conv = gm.get_submodule("0")
    assert type(conv) is nn.Conv2d and conv.weight is model[0].weight and conv.padding == (0, 0)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_the_translation_table_targets_what_the_op_table_knows():
    from qpasses.quant import ops

    known = {target for op in ops.OPS for target in (*op.functions, *op.methods)}
    arithmetic = {"add", "iadd", "sub", "mul", "imul", "truediv", "cat", "matmul", "bmm", "silu", "gelu"}
    for op, record in FUNCTION_OPS.items():
        name = record.target if isinstance(record.target, str) else record.target.__name__
        assert record.target in known or name in arithmetic, op
    assert torch.ops.aten.conv3d.default in MODULE_OPS and torch.ops.aten.linear.default in MODULE_OPS


def test_a_functional_conv_on_a_parameter_is_captured_by_export_as_a_conv_module():
    class WeightNormed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.weight, padding=1)

    model = WeightNormed().eval()
    gm = trace(model, torch.randn(1, 3, 5, 5))
    assert state_of(gm).capture.method == "export" and "left conv2d functional" in state_of(gm).capture.tried[0]
    (conv,) = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert type(conv) is nn.Conv2d and conv.weight is model.weight and conv.padding == (1, 1)


def test_an_export_capture_takes_other_batch_sizes_even_from_a_batch_of_one():
    model = Encoder().eval()
    gm = trace(model, torch.randn(1, 6, 32))
    assert state_of(gm).capture.method == "export" and not state_of(gm).capture.fixed_shapes
    for batch in (1, 3):
        x = torch.randn(batch, 6, 32)
        torch.testing.assert_close(gm(x), model(x))


def test_a_batch_norm_with_its_own_forward_is_rebuilt_and_folds():
    class BatchNormAct(nn.BatchNorm2d):
        """timm's BatchNormAct2d: BN and activation in one module's forward."""

        def forward(self, x):
            return F.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4)).eval()
    model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 6, 6)
    gm = export_graph(model, (x,)).graph_module
    bn = gm.get_submodule("1")
    assert type(bn) is nn.BatchNorm2d and bn.running_var is model[1].running_var
    assert bn.num_batches_tracked is model[1].num_batches_tracked
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [F.relu]
    qm, pm = ptq(gm, (1, 3, 6, 6), passes=[FuseBN()])
    assert [r for r in pm.report.records if r.name == "FuseBN"][0].stats["folded"] == 1
    assert count(qm, nnq.Conv2d) == 1 and sqnr(model(x), qm(x)) > 25


def test_transposed_convs_and_qat_on_an_export_capture():
    from qpasses import convert
    from qpasses.passes import QAT

    class UpLayerScale(LayerScale):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

        def forward(self, x):
            return self.up(super().forward(x))

    model = UpLayerScale().eval()
    x = torch.randn(2, 4, 4, 4)
    gm = trace(model, x)
    assert state_of(gm).capture.method == "export" and gm.get_submodule("up") is model.up
    qat = PassManager([QAT(backend="x86")]).run(model, x)
    qat.train()
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-3)
    for batch in batches((2, 4, 4, 4)):
        optimizer.zero_grad()
        qat(batch).square().mean().backward()
        optimizer.step()
    lowered = convert(qat.eval())
    assert count(lowered, nnq.Conv2d) == 1 and count(lowered, nnq.ConvTranspose2d) == 1
    assert sqnr(qat(x), lowered(x)) > 25


def test_an_in_place_activation_becomes_out_of_place_and_later_readers_read_its_result():
    class ReadsAfterReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            z = y.relu_()  # y is z now: both read the rectified values
            return y + z

    model = ReadsAfterReLU().eval()
    x = torch.randn(1, 3, 4, 4)
    gm = export_graph(model, (x,)).graph_module
    (relu,) = [n for n in gm.graph.nodes if n.target is F.relu]
    assert relu.kwargs == {"inplace": False}  # the passes assume out-of-place ops
    (add,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    assert list(add.args) == [relu, relu]  # y's later read sees the update through the alias
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_an_in_place_update_of_a_view_is_refused_by_export():
    class HalvesASlice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            head = y[:, :2]
            head *= 0.5  # halves y's first channels too
            return y + 1

    with pytest.raises(TraceError, match="updates a view .* in place"):
        export_graph(HalvesASlice().eval(), (torch.randn(2, 3, 4, 4),))


def test_a_bare_layer_is_captured_and_quantized():
    model = nn.Linear(8, 4).eval()
    gm = trace(model, torch.randn(2, 8))  # symbolic tracing sees F.linear on the root's own weight
    assert state_of(gm).capture.method == "export" and type(gm.get_submodule("linear")) is nn.Linear
    qm, _ = ptq(model, (2, 8))
    assert count(qm, nnq.Linear) == 1


def test_where_export_fails_the_symbolic_graph_is_kept_with_its_opaque_blocks_named():
    class Attends(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(clip_if_large(self.attn(x, x, x, need_weights=False)[0]))

    model = Attends().eval()
    x = torch.randn(2, 3, 8)
    gm = trace(model, x)
    capture = state_of(gm).capture
    assert capture.method == "symbolic_trace" and capture.opaque_modules == ["attn"]
    assert capture.tried[0].startswith("torch.export failed")
    qm, pm = ptq(model, (2, 3, 8))
    assert count(qm, nnq.Linear) == 1  # proj; the attention block stays whole and float
    assert "left opaque (untraced, float): attn" in str(pm.report)


class AddsIntoItsOwnInput(nn.Module):
    """``a += b`` on an aliased value: symbolic_trace records it out of place, so export captures it. Its
    ``block`` container and unfolded BN (after the add) must come out in the model's modes."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3, padding=1), "drop": nn.Dropout(),
                                    "bn": nn.BatchNorm2d(4)})

    def forward(self, x):
        y = self.block["conv"](x)
        y_alias = self.block["drop"](y)  # in eval mode, y itself
        y_alias += y
        return self.block["bn"](y)


def test_an_export_capture_keeps_the_models_modes():
    model = AddsIntoItsOwnInput().eval()
    with torch.no_grad():
        model.block["bn"].running_mean.uniform_(-1, 1)
        model.block["bn"].running_var.uniform_(0.05, 2)
    x = torch.randn(4, 3, 8, 8)
    gm = trace(model, x)
    assert state_of(gm).capture.method == "export"
    assert not [name for name, m in gm.named_modules() if m.training]
    quantized = PassManager([FuseBN(), PTQ([x], backend="x86", progress=False)]).run(model, x)
    # the BN after the add stays float: in training mode it would normalise with batch statistics
    assert not [name for name, m in quantized.named_modules() if isinstance(m, nn.BatchNorm2d) and m.training]
    with torch.no_grad():
        assert sqnr(model(x), quantized(x)) > 25
