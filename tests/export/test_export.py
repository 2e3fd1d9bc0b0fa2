import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from qpasses import PassManager
from qpasses.errors import ExportError
from qpasses.export import onnx as export_onnx
from qpasses.export import qdq_model, torchscript
from qpasses.passes import PTQ, FuseBN
from qpasses.passes.reference import QUANTIZE
from qpasses.quant.backends import get_backend
from qpasses.quant.state import existing_state
from tests.nets import RandomNet, TinyUNet, randomize_bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
numpy_helper = onnx.numpy_helper

BLOCKS = [("conv", "relu", 8), ("depthwise", "relu6", 8), ("residual_relu", "relu", 8), ("cat", "hardswish", 8),
          ("gate", "identity", 16), ("scale", "identity", 16)]


def batches(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def quantized(backend, shape=(2, 3, 32, 32), model=None, bits=None):
    """The backend's preset (per-channel weights and 7-bit activations on x86/fbgemm, per-tensor on qnnpack) with
    min/max activation observers, which calibrate much faster than the preset's MSE search."""
    torch.manual_seed(0)
    model = randomize_bn(model or RandomNet(BLOCKS)).eval()
    data = batches(shape)
    config = get_backend(backend).default_config(bits=bits)
    config = dataclasses.replace(config, activation=config.activation.replace(observer="minmax"))
    return PassManager([FuseBN(), PTQ(data, backend=backend, config=config, progress=False)]).run(model, data[0][:1])


def run_ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0])


def constants(model):
    """Every initializer and Constant node output of an ONNX graph, by name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def activation_scales(qm, x):
    """Scales of every int8 activation the lowered model computes (quantize stubs, convs, functionals, ...)."""
    scales = set()

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_quantized:
                scales.add(np.float32(out.q_scale()))
            return out

    Recorder(qm).run(x)
    return scales


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_torchscript_gives_the_eager_outputs_and_survives_save_load(backend, tmp_path):
    qm = quantized(backend, (1, 3, 32, 32), model=TinyUNet())
    x = batches((1, 3, 32, 32), n=1, seed=7)[0]
    scripted = torchscript(qm, x)
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert torch.equal(scripted(x), qm(x))
    torch.jit.save(scripted, tmp_path / "m.pt")
    assert torch.equal(torch.jit.load(tmp_path / "m.pt")(x), qm(x))


def test_exports_refuse_float_models_and_unknown_modes(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ExportError, match="lowered by qpasses"):
        torchscript(model, x)
    with pytest.raises(ExportError, match="lowered by qpasses"):
        export_onnx(model, x, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="reduce_range must be one of"):
        qdq_model(quantized("x86"), torch.randn(1, 3, 32, 32), reduce_range="drop")


def test_a_lowered_model_without_its_reference_graph_is_refused_in_one_line():
    qm = copy.deepcopy(quantized("x86"))
    existing_state(qm).reference = None  # as lowered by a qpasses from before Lower kept it
    with pytest.raises(ExportError, match="keeps no reference quantized graph"):
        qdq_model(qm, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_qdq_view_is_the_lowered_model_in_float(backend):
    qm = quantized(backend)
    x = batches((1, 3, 32, 32), n=1, seed=3)[0]
    view = qdq_model(qm, x)
    assert not any(p.is_quantized for p in view.state_dict().values())
    step = qm.head.scale
    # same grids and weights: only the rounding of requantization inside the int8 kernels can differ
    assert float((view(x) - qm(x)).abs().max()) <= 2 * step
    assert torch.equal(qm(x), qm(x))  # the lowered model still runs (nothing was taken from it)


def test_onnx_qdq_nodes_carry_qpasses_scales_per_channel_and_7_bit_clips(tmp_path):
    qm = quantized("fbgemm")
    x = batches((1, 3, 32, 32), n=1, seed=3)[0]
    model = onnx.load(str(export_onnx(qm, x, tmp_path / "m.onnx")))
    values = constants(model)
    nodes = model.graph.node
    quantize = [n for n in nodes if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in nodes if n.op_type == "DequantizeLinear"]
    assert quantize and dequantize
    written = {np.float32(values[n.input[1]]) for n in quantize if values[n.input[1]].ndim == 0}
    assert written == activation_scales(qm, x)
    # weights: int8 codes with per-channel scales along the output channels, as qpasses packed them
    head_scales = qm.head.weight().q_per_channel_scales().float().numpy()
    per_channel = [n for n in dequantize if values.get(n.input[1], np.zeros(())).ndim == 1
                   and values[n.input[0]].dtype != np.int32]  # int32: the biases, on the grid s_in·s_w
    assert any(np.array_equal(values[n.input[1]], head_scales) for n in per_channel)
    # stored as the int8 codes themselves (no float copy, no QuantizeLinear of a constant)
    head_codes = qm.head.weight().int_repr().numpy()
    assert any(np.array_equal(values.get(n.input[0]), head_codes) for n in per_channel)
    assert all(values[n.input[0]].dtype == np.int8 for n in per_channel)
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4 for t in model.graph.initializer)
    assert all(next(a.i for a in n.attribute if a.name == "axis") == 0 for n in per_channel)
    # fbgemm's 7-bit activations: a Clip of the uint8 codes to [0, 127] between Q and DQ
    clips = [n for n in nodes if n.op_type == "Clip" and any(n.input[0] == q.output[0] for q in quantize)]
    assert clips and all(int(values[c.input[2]]) == 127 for c in clips)


def test_widened_7_bit_ranges_cover_the_same_interval_on_256_codes(tmp_path):
    qm = quantized("fbgemm")
    x = batches((1, 3, 32, 32), n=1, seed=3)[0]
    model = onnx.load(str(export_onnx(qm, x, tmp_path / "w.onnx", reduce_range="widen")))
    values = constants(model)
    quantize = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert not any(n.op_type == "Clip" and n.input[0] in quantize for n in model.graph.node)  # no code clips
    input_quantize = next(n for n in qm.graph.nodes if n.target is torch.quantize_per_tensor)
    scale, zero_point = input_quantize.args[1:3]
    first = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    widened_scale, widened_zero_point = float(values[first.input[1]]), int(values[first.input[2]])
    lo, hi = (0 - zero_point) * scale, (127 - zero_point) * scale
    assert widened_scale == pytest.approx(scale * 127 / 255, rel=1e-6)
    assert (0 - widened_zero_point) * widened_scale == pytest.approx(lo, abs=widened_scale)
    assert (255 - widened_zero_point) * widened_scale == pytest.approx(hi, abs=widened_scale)


@pytest.mark.parametrize(("backend", "reduce_range", "size"), [("x86", "keep", 32), ("fbgemm", "keep", 32),
                                                               ("fbgemm", "widen", 48),
                                                               ("qnnpack", "keep", 64)])
def test_onnx_runtime_matches_the_fake_quant_model_within_two_steps(backend, reduce_range, size, tmp_path):
    qm = quantized(backend, (2, 3, size, size))
    weight = qm.head.weight()
    assert (weight.qscheme() == torch.per_channel_affine) == (backend != "qnnpack")
    x = batches((1, 3, size, size), n=1, seed=11)[0]
    path = export_onnx(qm, x, tmp_path / "m.onnx", reduce_range=reduce_range)
    optimized = tmp_path / "opt.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0])
    expected = qdq_model(qm, x, reduce_range)(x)
    step = qm.head.scale if reduce_range == "keep" else qm.head.scale * 127 / 255
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 2 * max(step, qm.head.scale)
    # ONNX Runtime really runs int8 convolutions (it fuses DQ → Conv → Q), not float ones
    assert any(n.op_type == "QLinearConv" for n in onnx.load(str(optimized)).graph.node)


def test_sub_8_bit_activations_export_exactly(tmp_path):
    qm = quantized("x86", bits=4)
    x = batches((1, 3, 32, 32), n=1, seed=5)[0]
    view = qdq_model(qm, x)
    assert float((view(x) - qm(x)).abs().max()) <= 2 * qm.head.scale
    path = export_onnx(qm, x, tmp_path / "m4.onnx")
    assert float((run_ort(path, x) - view(x)).abs().max()) <= 2 * qm.head.scale
    nodes = onnx.load(str(path)).graph.node
    quantize = {n.output[0] for n in nodes if n.op_type == "QuantizeLinear"}
    assert any(n.op_type == "Clip" and n.input[0] in quantize for n in nodes)  # the 16-level ranges, on codes


def test_a_clamp_moved_after_a_max_pool_narrows_the_grid_of_the_conv_before_it():
    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.pool, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3)

        def forward(self, x):
            return self.head(self.pool(torch.relu(self.stem(x))))

    qm = quantized("fbgemm", (2, 3, 16, 16), model=Stem())
    x = batches((1, 3, 16, 16), n=1, seed=3)[0]
    pool = next(n for n in qm.graph.nodes if n.target == "pool")
    assert next(iter(pool.users)).target is torch.clamp  # Lower runs the 7-bit clamp after the pool
    keep, widened = qdq_model(qm, x), qdq_model(qm, x, reduce_range="widen")
    assert float((keep(x) - qm(x)).abs().max()) <= 2 * qm.head.scale
    grids = [n.args[1:5] for n in widened.graph.nodes if n.target is QUANTIZE]
    stem_step = qm.stem.scale * 127 / 255
    # the stem's output and the pool's: both on the finer 256-code grid of the same interval
    assert sum(scale == pytest.approx(stem_step) and (lo, hi) == (0, 255) for scale, _, lo, hi in grids) == 2
