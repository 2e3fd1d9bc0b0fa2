"""The model's output: a linear writing it computes int8 and writes float by default (where the engine has such a
kernel); ``quantize_output=True`` rounds it to 8 bits as before. QAT, the layerwise passes and the QDQ export
compute what the lowered model computes."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import qpasses
from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.export import qdq_model
from qpasses.passes import PTQ, QAT, BiasCorrection, InsertObservers
from qpasses.quant.lowering import FloatOutputLinear, QuantizedLinear
from qpasses.quant.observers import Observer
from qpasses.viz.describe import describe


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1), 1))


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 10, 10, generator=g) for _ in range(n)]


def model():
    torch.manual_seed(0)
    return Classifier().eval()


def ptq(backend="x86", **kw):
    data = batches()
    pm = PassManager([PTQ(data, backend=backend, progress=False, **kw)])
    return pm.run(model(), data[0]), pm


def fc_input(qm, x):
    """The (quantized) value the lowered model's ``fc`` reads."""
    seen = []
    handle = qm.fc.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    qm(x)
    handle.remove()
    return seen[0]


def notes(pm):
    return [n for r in pm.report.records for n in r.notes]


@pytest.mark.parametrize("backend", ["x86", "fbgemm"])
def test_logits_stay_float_and_are_the_int8_linear_accumulator(backend):
    qm, pm = ptq(backend)
    assert isinstance(qm.fc, FloatOutputLinear)
    weight = qm.fc.weight()
    assert weight.dtype == torch.qint8  # the weight is packed int8, on its grid
    x = batches(1, seed=3)[0]
    out = qm(x)
    assert out.dtype == torch.float32 and not out.is_quantized
    # int8 input codes × int8 weight codes, dequantized, plus the float bias: nothing rounds the output
    expected = F.linear(fc_input(qm, x).dequantize(), weight.dequantize(), qm.fc.bias())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, Observer) for m in qm.modules())
    assert any(n.startswith("output stays float: Linear 'fc'") for n in notes(pm))
    fc = next(n for n in qm.graph.nodes if n.target == "fc")
    assert describe(qm, fc).qstate == "int8_float_output"
    observed = next(r for r in pm.report.records if r.name == "InsertObservers")
    assert observed.stats["float_outputs"] == 1


def test_quantize_output_restores_the_8_bit_logits():
    float_out, _ = ptq()
    rounded, pm = ptq(quantize_output=True)
    assert type(rounded.fc) is QuantizedLinear
    assert any(n.op == "call_method" and n.target == "dequantize" for n in rounded.graph.nodes)
    assert not any(n.startswith("output stays float") for n in notes(pm))
    x = batches(1, seed=3)[0]
    # same calibration, same input codes: the 8-bit logits are the float ones rounded to the fc's output grid
    torch.testing.assert_close(fc_input(rounded, x).dequantize(), fc_input(float_out, x).dequantize())
    step, zero_point = rounded.fc.scale, rounded.fc.zero_point
    codes = rounded(x) / step
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    # the 8-bit logits are the float ones rounded, and clipped at the calibrated range (a logit past it here)
    clipped = float_out(x).clamp((0 - zero_point) * step, (255 - zero_point) * step)
    assert float((rounded(x) - clipped).abs().max()) <= step / 2 + 1e-5
    assert float((float_out(x) / step - (float_out(x) / step).round()).abs().max()) > 0.1  # float is off-grid


def test_only_values_no_int8_op_reads_stay_float():
    class TwoHeads(nn.Module):  # fc's value is also read by another linear: it must be on a grid
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.fc(x)
            return self.head(h), h

    gm = PassManager([InsertObservers("x86")]).run(TwoHeads().eval(), torch.randn(2, 6))
    observed = {n.args[0].name for n in gm.graph.nodes
                if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Observer)}
    assert "fc" in observed and "head" not in observed


def test_qnnpack_rounds_the_logits_and_says_why():
    qm, pm = ptq("qnnpack")
    assert type(qm.fc) is QuantizedLinear
    assert any("no qnnpack int8 kernel for it writes float" in n for n in notes(pm))


def test_qat_convert_agrees_with_the_fake_quant_model_and_with_ptq():
    qat = PassManager([QAT("x86")]).run(model(), batches()[0])
    fc = next(n for n in qat.graph.nodes if n.target == "fc")
    assert not any(u.op == "call_module" and isinstance(qat.get_submodule(u.target), Observer) for u in fc.users)
    for x in batches(3, seed=1):
        qat(x)  # ranges from training-mode forwards
    qat.eval()
    lowered = qpasses.convert(qat)
    assert isinstance(lowered.fc, FloatOutputLinear)
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), qat(x), rtol=1e-4, atol=1e-4)


def test_qdq_view_and_onnx_runtime_compute_the_lowered_float_logits(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from qpasses.export import onnx as export_onnx

    qm, _ = ptq("x86")
    x = batches(1, seed=3)[0]
    expected = qm(x)
    torch.testing.assert_close(qdq_model(qm, x)(x), expected, rtol=1e-4, atol=1e-4)
    path = export_onnx(qm, x, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    assert graph.node[-1].op_type != "DequantizeLinear"  # the logits leave the graph unrounded
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0])
    # ONNX Runtime's int8 kernels may round the input of the pooled mean differently (one step at most)
    assert float((got - expected).abs().max()) <= 0.02 * float(expected.abs().max())


def test_bias_correction_simulates_the_float_logits():
    data = batches()
    qm = PassManager([PTQ(data, progress=False), BiasCorrection(data)]).run(model(), data[0])
    assert isinstance(qm.fc, FloatOutputLinear)
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        reference = model()(x)
    # the correction's quantized path ends at the fc without rounding its output, as the lowered model does
    assert float((qm(x) - reference).pow(2).mean()) < float(reference.pow(2).mean()) * 1e-2
    assert isinstance(qm, fx.GraphModule)


def test_float_output_linear_survives_save_load_deepcopy_and_torchscript(tmp_path):
    import copy

    from qpasses.export import torchscript

    qm, _ = ptq("x86")
    x = batches(1, seed=3)[0]
    torch.save(qm, tmp_path / "m.pt")
    loaded = qpasses.load(tmp_path / "m.pt")
    assert isinstance(loaded.fc, FloatOutputLinear) and loaded.fc.packed_for == "x86"
    assert torch.equal(loaded(x), qm(x))
    assert torch.equal(copy.deepcopy(qm)(x), qm(x))
    scripted = torchscript(qm, x)
    torch.jit.save(scripted, tmp_path / "s.pt")
    assert torch.equal(torch.jit.load(tmp_path / "s.pt")(x), qm(x))


class Block(nn.Module):
    """A transformer block's shape: qkv before a float op, fc1 before GELU, a residual stream read by a layer norm."""

    def __init__(self):
        super().__init__()
        self.norm, self.qkv, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = x + torch.softmax(self.qkv(self.norm(x)), dim=-1)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(self.norm(x))


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_values_nothing_reads_as_int8_are_not_rounded(backend):
    torch.manual_seed(0)
    model = Block().eval()
    data = [torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    pm = PassManager([PTQ(data, backend=backend, recipe=False, progress=False)])
    qm = pm.run(model, data[0])
    observed = next(r for r in pm.report.records if r.name == "InsertObservers")
    ann_notes = " ".join(observed.notes)
    # the adds feed only layer norms (float): they run float, on their dequantized inputs
    assert "nothing reads its value as int8" in ann_notes
    float_outputs = {n.target for n in qm.graph.nodes
                     if n.op == "call_module" and isinstance(qm.get_submodule(n.target), FloatOutputLinear)}
    if backend == "x86":  # fbgemm has the kernel: every linear here feeds a float op or the output
        assert float_outputs == {"qkv", "fc1", "fc2", "head"}
    else:
        assert not float_outputs
    assert not any(n.op == "call_function" and n.target is torch.ops.quantized.add for n in qm.graph.nodes)
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(9))
    rounded = PassManager([PTQ(data, backend=backend, recipe=False, progress=False, quantize_output=True)]).run(model, x)
    assert sqnr(model(x), qm(x)) > 25
    assert sqnr(model(x), qm(x)) >= sqnr(model(x), rounded(x)) - 0.5
