"""The xnnpack target: an ExecuTorch .pte whose quantized ops run in XNNPACK's int8 kernels.

Reference graphs come from qpasses' PTQ with the xnnpack preset (``lower=False``) and, for interop, from
ExecuTorch's own flow (XNNPACKQuantizer → prepare_pt2e → convert_pt2e), which writes the same dialect.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from qpasses import PassManager
from qpasses.errors import ExportError
from qpasses.lower import TARGETS, deploy
from qpasses.passes import PTQ, Calibrate, FuseBN, InsertObservers
from qpasses.quant.backends import get_backend
from tests.lower.conftest import SamePadded

pytest.importorskip("executorch.runtime", reason="ExecuTorch is not installed: pip install 'qpasses[executorch]'")


class SmallNet(nn.Module):
    """conv → relu, a residual add, cat, max and average pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.c4, self.fc = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c1(x))
        h = torch.cat([self.c2(a) + a, self.c4(a)], 1)
        h = F.max_pool2d(F.relu(self.c3(h)), 2)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def lite0_stem() -> nn.Module:
    """Pretrained Lite0's stem (SAME-padded stride-2 conv, BN, ReLU6) and its first depthwise conv (BN, ReLU6):
    pre-activations span about ±200 there, ReLU6 keeps [0, 6].

    Not the first block's 1×1 projection after it: there, measured, only 98.2% of the outputs are within one
    step of the reference graph (tail up to 9 steps): XNNPACK's int32 arithmetic and the reference's float one
    round about 0.2% of the depthwise conv's outputs one step apart, and the projection multiplies such a step
    by its weights (ExecuTorch's XNNPACKQuantizer quantizes the stem before ReLU6, on a 0.8 step)."""
    import qpasses_zoo as zoo

    model = zoo.get("tf_efficientnet_lite0", pretrained=True)
    return nn.Sequential(model.conv_stem, model.bn1, model.blocks[0][0].conv_dw, model.blocks[0][0].bn1).eval()


NETS = {"small": (SmallNet, (1, 3, 16, 16)), "lite0_stem": (lite0_stem, (1, 3, 32, 32))}


def executorch_reference(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> fx.GraphModule:
    """ExecuTorch's documented flow up to the reference graph: XNNPACKQuantizer (symmetric per-channel
    weights), prepare_pt2e, calibration, convert_pt2e."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    g = torch.Generator().manual_seed(seed)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model, (torch.randn(shape, generator=g),)).module(), quantizer)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(shape, generator=g))
    return convert_pt2e(prepared)


def output_step(reference: fx.GraphModule) -> float:
    """The scale of the reference graph's output grid (its output is a dequantize)."""
    out = next(n for n in reference.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, tuple | list) else out  # convert_pt2e returns a tuple, qpasses the value
    assert "dequantize_per_tensor" in str(out.target)
    return float(out.args[1])


def qpasses_reference(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> fx.GraphModule:
    """qpasses' reference graph for the xnnpack preset: FuseBN, PTQ(backend='xnnpack', lower=False)."""
    g = torch.Generator().manual_seed(seed)
    data = [torch.randn(4, *shape[1:], generator=g) for _ in range(2)]
    ptq = PTQ(data, backend="xnnpack", lower=False, progress=False, recipe=False)
    return PassManager([FuseBN(), ptq]).run(model, data[0][:1])


REFERENCES = {"qpasses": qpasses_reference, "convert_pt2e": executorch_reference}


@pytest.fixture(scope="module", params=[("qpasses", "small"), ("qpasses", "lite0_stem"), ("convert_pt2e", "small")],
                ids="-".join)
def deployed(request, tmp_path_factory):
    flow, net = request.param
    build, shape = NETS[net]
    torch.manual_seed(0)
    reference = REFERENCES[flow](build().eval(), shape)
    out = tmp_path_factory.mktemp(net) / "model.pte"
    return net, reference, shape, deploy(reference, "xnnpack", torch.randn(shape), out)


def test_target_is_registered():
    assert TARGETS["xnnpack"].backend == "xnnpack" and TARGETS["xnnpack"].extra == "executorch"


def test_outputs_equal_the_reference_within_one_output_step(deployed):
    _, reference, shape, model = deployed
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(shape, generator=g) * 1.5 for _ in range(8)]
    with torch.no_grad():
        expected = torch.cat([reference(x) for x in inputs])
    got = torch.cat([model(x) for x in inputs])
    steps = (got - expected).abs() / output_step(reference)
    assert (steps <= 1.0 + 1e-3).float().mean().item() >= 0.99
    assert expected.unique().numel() >= 5  # a signal, not a constant


def test_partitions_run_the_int8_ops(deployed):
    name, _, _, model = deployed
    kernels = model.int8_kernels
    if name == "small":
        expected = {"Conv2d": 4, "FullyConnected": 1, "Add": 1, "Concatenate2": 1, "MaxPooling2d": 1,
                    "GlobalAvgPooling2d": 1}
    else:  # the stem's conv (its SAME padding too) and the depthwise conv
        expected = {"Conv2d": 1, "DepthwiseConv2d": 1}
    assert {k: kernels.get(k, 0) for k in expected} == expected, kernels


def test_pte_runs_after_save_and_load_in_a_fresh_process(deployed, tmp_path):
    """The .pte file alone, loaded by ExecuTorch's runtime in a new interpreter (no qpasses import)."""
    _, _, shape, model = deployed
    x = torch.randn(shape)
    torch.save({"x": x, "expected": model(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        from executorch.runtime import Runtime
        io = torch.load({str(tmp_path / "io.pt")!r})
        method = Runtime.get().load_program({str(model.artifact)!r}).load_method("forward")
        out = method.execute([io["x"]])[0]
        assert torch.equal(out, io["expected"]), (out - io["expected"]).abs().max()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.parametrize("flow", list(REFERENCES))
def test_a_tf_same_pad_between_quantized_convs_runs_in_xnnpacks_int8_pad(flow):
    """The pad before a stride-2 depthwise conv (Lite0's blocks) reads a dequantized value: ExecuTorch's own
    partitioner config would run it at fp32 between two conversions."""
    shape = (1, 3, 32, 32)
    torch.manual_seed(0)
    reference = REFERENCES[flow](SamePadded().eval(), shape)
    model = deploy(reference, "xnnpack", torch.randn(shape))
    assert model.int8_kernels["StaticConstantPad"] == 1  # the other pad reads the float input
    assert model.int8_kernels["DepthwiseConv2d"] == 1 and model.int8_kernels["Conv2d"] == 2
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
    assert ((model(x) - expected).abs() <= output_step(reference) * 1.001).float().mean().item() >= 0.99


def test_a_pad_requantized_to_another_grid_is_refused_naming_it():
    """XNNPACK's int8 pad copies codes; ExecuTorch's XNNPACKQuantizer requantizes Lite0's pads to other grids."""
    shape = (1, 3, 32, 32)
    torch.manual_seed(0)
    reference = qpasses_reference(SamePadded().eval(), shape)
    quantize = next(iter(next(n for n in reference.graph.nodes if n.target == "pad1").users))
    for node in (quantize, *quantize.users):  # the pad's quantize and its dequantize: twice the step
        node.args = (node.args[0], node.args[1] * 2, *node.args[2:])
    reference.recompile()
    with pytest.raises(ExportError, match=r"node 'pad1' \(aten.constant_pad_nd.default\) runs in XNNPACK's float"):
        deploy(reference, "xnnpack", torch.randn(shape))


def test_asymmetric_weights_are_refused_naming_the_node():
    """ExecuTorch lowers weight zero points != 0 without a word, and XNNPACK computes wrong outputs."""
    reference = executorch_reference(SmallNet().eval(), (1, 3, 16, 16))
    dequantize = next(n for n in reference.graph.nodes if "dequantize_per_channel" in str(n.target))
    zero_points = reference.get_buffer(dequantize.args[2].target)
    zero_points.fill_(3)
    with pytest.raises(ExportError, match=r"node 'conv2d'.*non-zero zero points"):
        deploy(reference, "xnnpack", torch.randn(1, 3, 16, 16))


def test_a_quantized_op_left_to_portable_kernels_is_refused_naming_the_node():
    """A conv with int8 weights whose input is no int8 value (here the sine of one) has no XNNPACK kernel: the
    partitioner leaves it to ExecuTorch's portable float kernels."""
    reference = executorch_reference(SmallNet().eval(), (1, 3, 16, 16))
    conv = next(n for n in reference.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    with reference.graph.inserting_before(conv):
        sin = reference.graph.call_function(torch.ops.aten.sin.default, (conv.args[0],))
    conv.replace_input_with(conv.args[0], sin)
    reference.recompile()
    with pytest.raises(ExportError, match=rf"node '{conv.name}' \(aten.convolution.default\) fell back to "
                                          "ExecuTorch's portable float kernels"):
        deploy(reference, "xnnpack", torch.randn(1, 3, 16, 16))


def test_a_cat_of_inputs_on_other_grids_is_refused():
    """XNNPACK's int8 concatenate refuses (when the program loads) inputs on grids other than its output's."""
    reference = executorch_reference(SmallNet().eval(), (1, 3, 16, 16))
    cat = next(n for n in reference.graph.nodes if n.target is torch.ops.aten.cat.default)
    for q in cat.users:  # move the cat's output grid, and every reader of it along
        for node in (q, *q.users):
            node.args = (node.args[0], node.args[1] * 2, *node.args[2:])
    reference.recompile()
    with pytest.raises(ExportError, match=r"\(cat\) joins .* XNNPACK's int8 concatenate needs every input"):
        deploy(reference, "xnnpack", torch.randn(1, 3, 16, 16))


def test_a_float_model_is_refused():
    with pytest.raises(ExportError, match="no op runs in XNNPACK's int8 kernels"):
        deploy(SmallNet().eval(), "xnnpack", torch.randn(1, 3, 16, 16))


def test_ptq_for_xnnpack_ends_at_the_reference_graph():
    """xnnpack has no torch.ao kernels: PTQ stops at the reference graph, which deploy takes."""
    ptq = PTQ([torch.randn(1, 3, 8, 8)], backend="xnnpack", progress=False)
    assert [p.name for p in ptq.parts][-1] == "Reference" and "reference" in ptq.provides


def test_xnnpack_preset_observes_signed_activations_and_narrow_symmetric_weights():
    """The preset's grids are ExecuTorch's XNNPACKQuantizer's (int8 affine activations, int8 symmetric
    per-channel weights in [-127, 127]), and qpasses' observers calibrate signed activations."""
    backend = get_backend("xnnpack")
    config = backend.default_config()
    assert (config.activation.quant_min, config.activation.quant_max, config.activation.symmetric) == (-128, 127, False)
    assert (config.weight.quant_min, config.weight.quant_max, config.weight.axis) == (-127, 127, 0)
    assert config.weight.symmetric and not config.activation.reduce_range
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(3)]
    model = SmallNet().eval()
    gm = PassManager([FuseBN(), InsertObservers("xnnpack"), Calibrate(data, progress=False)]).run(model, data[0])
    observers = {name: m for name, m in gm.named_modules() if name.endswith("_obs")}
    assert observers
    for observer in observers.values():
        scale, zero_point = observer.qparams()
        assert observer.spec.dtype == torch.qint8
        assert -128 <= int(zero_point) <= 127
    # a ReLU's output spans [0, max]: its grid starts at the most negative code
    relu_codes = [int(m.qparams()[1]) for name, m in observers.items() if name.startswith("relu")]
    assert relu_codes and all(code == -128 for code in relu_codes)
