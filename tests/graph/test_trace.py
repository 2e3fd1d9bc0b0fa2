import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qpasses import TraceError, to_networkx, trace
from qpasses.errors import GraphRunError, InputError
from qpasses.graph import find_chains, is_module, propagate_shapes
from qpasses.nn import SamePad2d
from qpasses.quant.state import state_of


def test_every_model_traces_with_shapes_and_same_output(named_model):
    name, model, x = named_model
    gm = trace(model, x)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "call_module", "call_function", "call_method") and not node.name.startswith("size"):
            meta = node.meta.get("tensor_meta")
            assert meta is not None, f"{name}: node {node.name} has no tensor_meta"
    assert isinstance(gm, torch.fx.GraphModule)


def test_lite0_decompositions_keep_state_dict_keys_and_trace_other_sizes():
    import timm

    model = timm.create_model("tf_efficientnet_lite0").eval()
    gm = trace(model, torch.randn(1, 3, 64, 64))
    types = {type(m).__name__ for m in gm.modules()}
    assert "Conv2dSame" not in types and "BatchNormAct2d" not in types
    assert isinstance(gm.conv_stem_pad, SamePad2d) and type(gm.conv_stem) is nn.Conv2d
    # stride-1 'SAME' is symmetric and static: a plain padded conv, no pad module
    depthwise_5x5 = gm.get_submodule("blocks.2.1.conv_dw")
    assert type(depthwise_5x5) is nn.Conv2d and depthwise_5x5.padding == (2, 2)
    assert not hasattr(gm, "blocks_2_1_conv_dw_pad")
    assert type(gm.bn1) is nn.BatchNorm2d and isinstance(gm.bn1_act, nn.ReLU6)
    assert set(gm.state_dict()) == set(model.state_dict())
    # the padding is computed at run time, so other (odd) input sizes still match the original
    for shape in ((2, 3, 71, 57), (1, 3, 64, 65), (1, 3, 33, 32)):
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return -x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(nn.ReLU(), DataDependent())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def test_untraceable_submodule_error_names_module_line_and_fix():
    with pytest.raises(TraceError) as info:
        trace(Outer(), torch.randn(1, 3, 8, 8))
    message = str(info.value)
    assert "'blocks.1'" in message and "DataDependent" in message
    assert "test_trace.py:" in message and "if x.sum() > 0" in message
    assert "leaf_modules=['blocks.1']" in message and "auto_leaf=True" in message
    assert info.value.module == "blocks.1"


def test_untraceable_top_level_forward_says_so():
    class Root(nn.Module):
        def forward(self, x):
            return x if x.mean() > 0 else -x

    with pytest.raises(TraceError, match="top-level forward of Root"):
        trace(Root(), torch.randn(2))


def test_auto_leaf_keeps_failing_submodule_opaque_and_transforms_the_rest():
    model = Outer().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="blocks.1"):
        gm = trace(model, x, auto_leaf=True)
    assert state_of(gm).capture.opaque_modules == ["blocks.1"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["stem", "blocks.0", "blocks.1", "head"]
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("leaf", ["blocks.1", DataDependent])
def test_explicit_leaf_by_name_or_type(leaf):
    gm = trace(Outer(), torch.randn(1, 3, 8, 8), leaf_modules=[leaf])
    assert "blocks.1" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert state_of(gm).capture.opaque_modules == []


def test_unknown_leaf_name_is_an_error():
    with pytest.raises(TraceError, match="blocks.7"):
        trace(Outer(), torch.randn(1, 3, 8, 8), leaf_modules=["blocks.7"])


def test_bad_example_inputs_and_model_types():
    with pytest.raises(TypeError, match="example_inputs"):
        trace(Outer(), "image.png")
    with pytest.raises(TypeError, match="nn.Module"):
        trace(lambda x: x, torch.randn(1))


def test_same_pad_matches_tensorflow_formula():
    pad = SamePad2d(3, 2)
    assert pad(torch.zeros(1, 1, 8, 8)).shape[-2:] == (9, 9)  # even input: (0, 1) on each axis
    assert pad(torch.zeros(1, 1, 7, 7)).shape[-2:] == (9, 9)  # odd input: (1, 1)
    out = pad(torch.ones(1, 1, 8, 8))
    assert out[0, 0, -1].abs().sum() == 0 and out[0, 0, 0].abs().sum() > 0


def test_to_networkx_and_chain_search():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a, self.r = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
            self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.r(self.bn_a(self.a(x)))
            z = self.b(y)
            return self.bn_b(z) + z  # z has two consumers: no conv→bn chain

    gm = trace(Net(), torch.randn(1, 3, 4, 4))
    graph = to_networkx(gm)
    assert graph.number_of_nodes() == len(gm.graph.nodes)
    assert graph.has_edge("a", "bn_a") and graph.nodes["a"]["kind"] == "Conv2d"
    assert graph.nodes["a"]["shape"] == (1, 4, 4, 4)
    chains = find_chains(gm, [is_module(nn.Conv2d), is_module(nn.BatchNorm2d), is_module(nn.ReLU)])
    assert [[n.name for n in c] for c in chains] == [["a", "bn_a", "r"]]
    assert find_chains(gm, [is_module(nn.Conv2d), is_module(nn.BatchNorm2d)], graph)[0][0].name == "a"
    assert len(find_chains(gm, [is_module(nn.Conv2d), is_module(nn.BatchNorm2d)])) == 1


def test_functional_ops_are_traced_not_hidden():
    class Net(nn.Module):
        def forward(self, x):
            return F.relu(x) + torch.cat([x, x], 1).mean(1, keepdim=True)

    gm = trace(Net(), torch.randn(1, 2, 3, 3))
    targets = {n.target for n in gm.graph.nodes}
    assert F.relu in targets and torch.cat in targets


@pytest.mark.parametrize("value", [0.0, 0.3, float("-inf")])
def test_same_pad_on_quantized_input_pads_the_codes_exactly(value):
    x = torch.quantize_per_tensor(torch.rand(1, 4, 8, 7) * 2 - 0.5, 0.01, 60, torch.quint8)
    pad = SamePad2d(3, 2, value=value)
    out = pad(x)
    expected = F.pad(x.dequantize(), [1, 1, 0, 1], value=value)  # width 7: (1, 1); height 8: (0, 1)
    assert out.is_quantized and out.q_scale() == x.q_scale() and out.q_zero_point() == x.q_zero_point()
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out.dequantize()[finite], expected[finite], atol=0.005, rtol=0)
    torch.testing.assert_close(out.dequantize()[~finite], torch.full_like(out.dequantize()[~finite], -0.6))  # lowest code


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [(14, 14), (15, 15), (14, 17)])
def test_shifted_same_pad_and_crop_equal_same_padding_on_int8_codes(kernel, size):
    import torch.ao.nn.quantized as nnq

    from qpasses.nn import CropStart2d, ShiftedSamePad2d

    torch.backends.quantized.engine = "x86"
    weight = torch.quantize_per_channel(torch.randn(6, 1, kernel, kernel), torch.full((6,), 0.02),
                                        torch.zeros(6, dtype=torch.long), 0, torch.qint8)
    bias = torch.randn(6)
    convs = []
    for padding in (0, (kernel - 1) // 2):
        conv = nnq.Conv2d(6, 6, kernel, stride=2, padding=padding, groups=6)
        conv.set_weight_bias(weight, bias)
        conv.scale, conv.zero_point = 0.05, 64
        convs.append(conv)
    x = torch.quantize_per_tensor(torch.rand(1, 6, *size), 0.01, 3, torch.quint8)
    same = convs[0](SamePad2d(kernel, 2)(x))
    shifted = CropStart2d()(convs[1](ShiftedSamePad2d(kernel, 2)(x)))
    assert shifted.shape == same.shape
    assert torch.equal(shifted.int_repr(), same.int_repr())


def test_a_node_that_fails_on_quantized_values_is_named_not_masked():
    """fx's ShapeProp formats the graph's metadata when a node fails, which raised ``KeyError: torch.quint8``
    instead of the kernel's error."""

    class AddsQuantizedTensors(nn.Module):
        def forward(self, x):
            q = torch.quantize_per_tensor(x, 0.1, 0, torch.quint8)
            return q + q  # no int8 kernel for a plain + of quantized tensors

    with pytest.raises(InputError, match=r"cannot run on the example inputs: node 'add' \(add\) fails on .*QuantizedCPU"):
        trace(AddsQuantizedTensors(), torch.randn(1, 3))
    with pytest.raises(GraphRunError, match=r"node 'add' \(add\) fails on .*QuantizedCPU") as info:
        propagate_shapes(fx.symbolic_trace(AddsQuantizedTensors()), (torch.randn(1, 3),))
    assert info.value.node == "add"


class AddsIntoDropoutOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.drop = nn.Conv2d(3, 3, 1), nn.Dropout()

    def forward(self, x):
        a = self.drop(x)  # in eval mode, x itself
        a += self.conv(x)  # eager: x changes too; torch.fx: a = a + conv(x)
        return a + x


class Wraps(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = AddsIntoDropoutOutput()

    def forward(self, x):
        return self.block(x) * 2


def test_an_in_place_add_on_an_aliased_value_is_caught_against_the_eager_model():
    model, x = Wraps().eval(), torch.randn(1, 3, 4, 4)
    gm = trace(model, x)  # export records the in-place add as it runs: the ladder's next rung captures it
    assert state_of(gm).capture.method == "export"
    assert "in-place `a += self.conv(x)`" in state_of(gm).capture.tried[0]
    torch.testing.assert_close(gm(x.clone()), model(x.clone()))
    with pytest.raises(TraceError) as info:  # naming a leaf skips export: the symbolic trace's error
        trace(model, x, leaf_modules=[nn.Dropout])
    message = str(info.value)
    assert "\n" not in message
    assert "differs from the eager model" in message
    assert "in-place `a += self.conv(x)` at" in message and f"{__file__}:" in message and "(node 'add')" in message
    assert "leaf_modules=['block']" in message


def test_an_in_place_update_of_a_slice_is_caught_and_a_harmless_one_is_not():
    class SliceUpdate(nn.Module):
        def forward(self, x):
            head = x[:, :2]
            head *= 0.5  # halves x's first channels in eager mode
            return x + 1

    class FreshUpdate(nn.Module):
        def forward(self, x):
            y = x * 2
            y += 1  # y aliases nothing: recording it out of place changes nothing
            return y

    with pytest.raises(TraceError, match=r"in-place `head \*= 0\.5`.*out-of-place"):
        trace(SliceUpdate(), torch.randn(1, 3, 4), leaf_modules=[nn.Dropout])  # a named leaf: symbolic only
    # export records the update of the view, but the passes assume out-of-place ops: refused on every rung
    with pytest.raises(TraceError, match=r"in-place `head \*= 0\.5`.*torch\.export failed: .*updates a view") as info:
        trace(SliceUpdate(), torch.randn(1, 3, 4))
    assert "\n" not in str(info.value)
    assert state_of(trace(FreshUpdate(), torch.randn(1, 3, 4))).capture.method == "symbolic_trace"
    trace(SliceUpdate(), torch.randn(1, 3, 4), verify=False)  # the check can be turned off


def test_capture_verification_runs_in_eval_mode_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    stats = model[1].running_mean.clone()
    trace(model, torch.randn(2, 3, 6, 6))
    # Dropout samples in training mode; the check compares deterministic eval-mode forwards: no false alarm.
    assert model.training and torch.equal(model[1].running_mean, stats)  # BN statistics untouched


def test_postponed_annotations_leave_no_string_types_and_the_graph_pickles(tmp_path):
    # tests.nets is written with `from __future__ import annotations`: its forward's annotations are strings,
    # which torch < 2.14 cannot pickle as node types.
    from tests.nets import TinyUNet

    gm = trace(TinyUNet().eval(), torch.randn(1, 3, 16, 16))
    assert not [n.name for n in gm.graph.nodes if isinstance(n.type, str)]
    torch.save(gm, tmp_path / "g.pt")
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(torch.load(tmp_path / "g.pt", weights_only=False)(x), gm(x))
