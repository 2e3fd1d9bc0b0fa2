import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpasses
from qpasses import PassManager
from qpasses.errors import QPassesError
from qpasses.passes import PTQ, QAT, FuseBN, InsertObservers, Reference
from qpasses.passes.reference import DEQUANTIZE, DEQUANTIZE_PER_CHANNEL, QUANTIZE, is_reference
from qpasses.quant.backends import get_backend
from qpasses.quant.observers import Observer
from qpasses.quant.spec import QuantConfig, QuantSpec
from qpasses.quant.state import existing_state, properties_of
from tests.nets import conv_bn_act, randomize_bn

BACKENDS = ["x86", "qnnpack", "onednn"]
DIALECT = {QUANTIZE, DEQUANTIZE, DEQUANTIZE_PER_CHANNEL}


class Net(nn.Module):
    """conv-BN-ReLU, max pool, residual add, cat, hardswish, sigmoid gate, average pool, a conv head."""

    def __init__(self, head: str = "conv"):
        super().__init__()
        self.stem = conv_bn_act(3, 8)
        self.b = conv_bn_act(8, 8, act=nn.Identity)
        self.c = conv_bn_act(8, 4, act=nn.Hardswish)
        self.gate = nn.Conv2d(12, 12, 1)
        self.head = nn.Conv2d(12, 5, 1) if head == "conv" else nn.Linear(12, 5)

    def forward(self, x):
        h = F.max_pool2d(self.stem(x), 2)
        h = h + self.b(h)
        h = torch.cat([h, self.c(h)], dim=1)
        h = h * torch.sigmoid(self.gate(h))
        if isinstance(self.head, nn.Linear):
            return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))
        return self.head(F.avg_pool2d(h, 2))


def batches(n=4, shape=(2, 3, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def quantize(model, backend, lower, data=None, **kw):
    data = data or batches()
    return PassManager([FuseBN(), PTQ(data, backend=backend, progress=False, recipe=False, lower=lower, **kw)]).run(
        model, data[0])


def output_step(reference: nn.Module) -> float:
    """The scale of the quantize the reference graph's output is read from."""
    (out,) = [n for n in reference.graph.nodes if n.op == "output"]
    dequantize = out.args[0]
    assert dequantize.target is DEQUANTIZE
    return dequantize.args[1]


def assert_within_one_step(a: torch.Tensor, b: torch.Tensor, step: float, share: float = 0.99) -> None:
    close = (a - b).abs() <= step * 1.001
    assert close.float().mean().item() >= share, f"{(~close).sum().item()} of {a.numel()} values differ by more"
    assert (a - b).abs().max().item() <= 2.001 * step


def assert_reference_dialect(gm: torch.fx.GraphModule) -> None:
    assert not any(isinstance(m, Observer | torch.ao.nn.quantized.FloatFunctional) for m in gm.modules())
    assert not any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in gm.modules())
    quantizes = 0
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = str(node.target)
            assert node.target in DIALECT or not name.startswith(("quantized.", "quantized_decomposed.")), name
            assert node.target not in (torch.quantize_per_tensor, torch.quantize_per_channel), node.name
        if node.op == "call_method":
            assert node.target not in ("dequantize", "int_repr"), node.name
        if node.target is QUANTIZE:
            quantizes += 1
            users = list(node.users)
            assert users and all(u.target is DEQUANTIZE and u.args[1:] == node.args[1:] for u in users)
        if node.target is DEQUANTIZE:
            assert len(node.users) == 1  # one dequantize per reader, as convert_pt2e
    assert quantizes > 0
    for name, buffer in gm.named_buffers():
        if name.endswith("_weight_int8"):
            assert buffer.dtype == torch.int8


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_graph_is_the_dialect_and_matches_the_lowered_model(backend):
    torch.manual_seed(0)
    model = randomize_bn(Net()).eval()
    reference = quantize(model, backend, lower=False)
    lowered = quantize(model, backend, lower=True)
    assert_reference_dialect(reference)
    assert is_reference(reference) and existing_state(reference).reference_backend == backend
    assert existing_state(reference).backend is None  # not a lowered model: the torch.ao exporters refuse it
    assert "reference" in properties_of(reference) and "lowered" not in properties_of(reference)
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        assert_within_one_step(reference(x), lowered(x), output_step(reference))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_and_export_take_the_reference_graph(backend):
    torch.manual_seed(0)
    reference = quantize(randomize_bn(Net()).eval(), backend, lower=False)
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        expected = reference(x)
        torch._dynamo.reset()
        compiled = torch.compile(reference, backend="aot_eager")(x)
        explanation = torch._dynamo.explain(reference)(x)
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0  # captured whole
        exported = torch.export.export(reference, (x,))
        by_export = exported.module()(x)
    assert_within_one_step(compiled, expected, output_step(reference))
    assert torch.equal(by_export, expected)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "quantized_decomposed.quantize_per_tensor.default" in targets
    weights = "channel" if get_backend(backend).weight.per_channel else "tensor"
    assert f"quantized_decomposed.dequantize_per_{weights}.default" in targets


def test_a_linear_writing_float_logits_has_no_quantize_after_it():
    torch.manual_seed(0)
    model = randomize_bn(Net(head="linear")).eval()
    reference = quantize(model, "x86", lower=False)
    lowered = quantize(model, "x86", lower=True)
    (out,) = [n for n in reference.graph.nodes if n.op == "output"]
    assert out.args[0].target is F.linear
    assert out.args[0].args[0].target is DEQUANTIZE
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        a, b = reference(x), lowered(x)
    # The same int8 inputs and weights, accumulated in float here and in int32 there.
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


def test_narrow_codes_are_the_quantize_range_and_fused_activations_precede_it():
    torch.manual_seed(0)
    model = randomize_bn(Net()).eval()
    config = get_backend("x86").default_config().with_bits(4)
    reference = quantize(model, "x86", lower=False, config=config)
    lowered = quantize(model, "x86", lower=True, config=config)
    quantizes = [n for n in reference.graph.nodes if n.target is QUANTIZE]
    # Every observed value is on 4-bit codes; the sigmoid kernel writes its own 8-bit grid.
    assert {(n.args[3], n.args[4]) for n in quantizes if n.args[0].target is not torch.sigmoid} == {(0, 15)}
    assert [(n.args[1:5]) for n in quantizes if n.args[0].target is torch.sigmoid] == [(1 / 256, 0, 0, 255)]
    weights = [n for n in reference.graph.nodes if n.target is DEQUANTIZE_PER_CHANNEL]
    assert weights and all((n.args[4], n.args[5]) == (-8, 7) for n in weights)
    assert all(reference.get_buffer(n.args[0].target).abs().max() <= 8 for n in weights)
    stem_act = next(n for n in reference.graph.nodes if n.op == "call_module" and n.target == "stem.2")
    assert [u.target for u in stem_act.users] == [QUANTIZE]  # the quantize sits after the folded ReLU
    # 640 values: on 4-bit codes a rounding tie the kernels break otherwise moves a code that the next layer
    # turns into two output steps; 160 values are too few for a 1% share. The head's 2×2 average pool makes
    # ties of a quarter of its values; torch before 2.14 breaks them to even on the stored code, not on the
    # code less the zero point as the reference (and later torch) does, so with an odd zero point every one of
    # them moves a code: 13 of the 640 outputs by two steps here (4 with the squared-error activation ranges).
    x = torch.cat(batches(4, seed=7))
    with torch.no_grad():
        share = 0.99 if _average_pool_breaks_ties_on_code_less_zero_point() else 0.97
        assert_within_one_step(reference(x), lowered(x), output_step(reference), share)


def _average_pool_breaks_ties_on_code_less_zero_point() -> bool:
    """Codes 0, 0, 1, 1 at zero point 1 average to the tie −0.5 (code less zero point: rounds to 0, code 1) or,
    taken on the stored codes, to the tie 0.5 (rounds to code 0)."""
    codes = torch.tensor([[[[0, 0], [1, 1]]]], dtype=torch.uint8)
    pooled = F.avg_pool2d(torch._make_per_tensor_quantized_tensor(codes, 1.0, 1), 2)
    return pooled.int_repr().item() == 1


def test_qnnpack_widened_add_grid_and_rounded_bias():
    """A ReLU branch that never fires has a degenerate grid; qnnpack's add needs it widened, and the
    reference quantizes at the widened grid that Lower uses. qnnpack rounds the bias at s_in·s_w."""

    class DeadBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            nn.init.constant_(self.b.weight, -1.0)
            nn.init.constant_(self.b.bias, -100.0)

        def forward(self, x):
            return self.a(x) + F.relu(self.b(x))

    model = DeadBranch().eval()
    data = [torch.rand(2, 3, 4, 4) for _ in range(2)]
    # quantize_output: the add writes the output, and is int8 only where the output is read as int8 codes
    pm = PassManager([PTQ(data, backend="qnnpack", progress=False, recipe=False, lower=False, quantize_output=True)])
    reference = pm.run(model, data[0])
    assert any("widened the grid" in note for r in pm.report.records for note in r.notes)
    lowered = PassManager([PTQ(data, backend="qnnpack", progress=False, recipe=False, quantize_output=True)]).run(
        model, data[0])
    with torch.no_grad():
        assert_within_one_step(reference(data[1]), lowered(data[1]), output_step(reference), share=1.0)
    conv = next(n for n in reference.graph.nodes if n.target is F.conv2d)
    input_scale = conv.args[0].args[1]
    weight = conv.args[1]
    step = input_scale * weight.args[1]
    bias = reference.get_buffer(conv.args[2].target)
    assert torch.allclose(bias / step, torch.round(bias / step), atol=1e-3)


def test_reference_refuses_a_graph_without_observers_and_a_different_backend():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(QPassesError, match="no quantization annotation"):
        Reference().run(torch.fx.symbolic_trace(model), None)
    observed = PassManager([InsertObservers("x86")]).run(model, x)
    with pytest.raises(QPassesError, match="observers were placed for backend 'x86'"):
        Reference("qnnpack").run(observed, None)


def test_ptq_with_a_target_cannot_stop_at_the_reference():
    with pytest.raises(qpasses.errors.InputError, match="measures and returns the deployed model"):
        PTQ(batches(), target_sqnr=30.0, lower=False)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_qat_convert_to_the_reference_computes_the_lowered_codes(backend):
    torch.manual_seed(0)
    model = randomize_bn(Net(head="linear"))
    qm = PassManager([QAT(backend=backend, bits=4)]).run(model, batches(1)[0])
    qm.train()
    optimizer = torch.optim.SGD(qm.parameters(), lr=0.01)
    for x in batches(2, seed=1):
        loss = qm(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    reference = qpasses.qat.convert(qm, lower=False)
    lowered = qpasses.qat.convert(qm)
    assert_reference_dialect(reference)
    assert existing_state(reference).reference_backend == backend and "reference" in properties_of(reference)
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        a, b, fake = reference(x), lowered(x), qm.eval()(x)
    # QAT simulates the kernels' codes: the reference graph is that simulation, the lowered model runs it.
    assert torch.allclose(a, fake, rtol=0, atol=1e-5 * fake.abs().max().item())
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


def test_reference_survives_save_load_and_deepcopy(tmp_path):
    torch.manual_seed(0)
    reference = quantize(randomize_bn(Net()).eval(), "x86", lower=False)
    x = batches(1, seed=7)[0]
    path = tmp_path / "reference.pt"
    torch.save(reference, path)
    for copied in (qpasses.load(path), copy.deepcopy(reference)):
        assert existing_state(copied).reference_backend == "x86"
        # The same graph, node for node (int8 weight codes are not folded into float constants on load).
        assert [(n.name, n.op, str(n.target)) for n in copied.graph.nodes] == \
            [(n.name, n.op, str(n.target)) for n in reference.graph.nodes]
        assert_reference_dialect(copied)
        with torch.no_grad():
            assert torch.equal(copied(x), reference(x))


def test_sub_8_bit_per_tensor_weights_dequantize_per_tensor():
    torch.manual_seed(0)
    config = QuantConfig(weight=QuantSpec(signed=True, symmetric=True, bits=6),
                         activation=QuantSpec(signed=False, symmetric=False))
    reference = quantize(randomize_bn(Net()).eval(), "qnnpack", lower=False, config=config)
    weights = [n for n in reference.graph.nodes if n.op == "call_function" and n.target is DEQUANTIZE
               and n.args[0].op == "get_attr"]
    assert weights and all((n.args[3], n.args[4], n.args[5]) == (-32, 31, torch.int8) for n in weights)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_a_lowered_model_keeps_its_reference_graph_through_save_load_and_deepcopy(backend, tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(Net()).eval()
    lowered = quantize(model, backend, lower=True)
    x = batches(1, seed=7)[0]
    path = tmp_path / "lowered.pt"
    torch.save(lowered, path)
    for copied in (lowered, qpasses.load(path), copy.deepcopy(lowered)):
        reference = existing_state(copied).reference
        assert is_reference(reference) and existing_state(reference).reference_backend == backend
        assert len(reference.graph.nodes) == len(existing_state(lowered).reference.graph.nodes)
        assert_reference_dialect(reference)
        with torch.no_grad():
            assert_within_one_step(reference(x), copied(x), output_step(reference))
    with torch.no_grad():  # the same graph PTQ(lower=False) returns
        assert torch.equal(existing_state(lowered).reference(x), quantize(model, backend, lower=False)(x))


def test_the_registry_builds_a_pipeline_ending_at_the_reference():
    from qpasses.passes.registry import PassOptions, build_pipeline

    data = batches(2)
    options = PassOptions(backend="qnnpack", calibration=lambda: data, progress=False)
    reference = PassManager(build_pipeline("fusebn,observe,calibrate,reference", options)).run(
        randomize_bn(Net()).eval(), data[0])
    assert existing_state(reference).reference_backend == "qnnpack"
    assert_reference_dialect(reference)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_ptq_with_its_recipe_ends_at_the_reference(backend):
    torch.manual_seed(0)
    model = randomize_bn(Net()).eval()
    data = batches()
    pm = PassManager([FuseBN(), PTQ(data, backend=backend, progress=False, lower=False)])
    reference = pm.run(model, data[0])
    names = [r.name for r in pm.report.records]
    assert names[-1] == "Reference" and "Lower" not in names
    assert_reference_dialect(reference)
    lowered = PassManager([FuseBN(), PTQ(data, backend=backend, progress=False)]).run(model, data[0])
    with torch.no_grad():
        assert torch.equal(existing_state(lowered).reference(data[1]), reference(data[1]))


def test_a_backend_without_torch_ao_kernels_ends_at_the_reference(monkeypatch):
    import dataclasses

    from qpasses.quant import backends

    monkeypatch.setitem(backends.BACKENDS, "runtime_only",
                        dataclasses.replace(get_backend("qnnpack"), name="runtime_only", engine=None))
    torch.manual_seed(0)
    model = randomize_bn(Net()).eval()
    data = batches()
    reference = quantize(model, "runtime_only", lower=True, data=data)  # nothing to lower to
    assert existing_state(reference).reference_backend == "runtime_only"
    assert_reference_dialect(reference)
    with torch.no_grad():  # the same grids as the preset it copies
        assert torch.equal(reference(data[1]), quantize(model, "qnnpack", lower=False, data=data)(data[1]))
    observed = PassManager([FuseBN(), InsertObservers("runtime_only")]).run(model, data[0])
    with pytest.raises(QPassesError, match="no torch.ao int8 kernels"):
        qpasses.passes.Lower().run(observed, None)


class LayerScaleBlock(nn.Module):
    """ConvNeXt's pattern: a float op (GroupNorm) whose value a conv and a residual add both read (through an
    identity shortcut, as timm writes it), and a branch ending in a layer-scale mul by a parameter."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(1, 8)
        self.conv, self.shortcut = nn.Conv2d(8, 8, 3, padding=1), nn.Identity()
        self.gamma = nn.Parameter(torch.linspace(0.1, 1.0, 8).reshape(1, 8, 1, 1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.norm(self.stem(x))
        return self.head(self.shortcut(y) + self.gamma * self.conv(y))


def arithmetic_inputs(reference: torch.fx.GraphModule) -> dict[str, list[object]]:
    """For each add/mul of a reference graph, the targets of the nodes it reads."""
    return {n.name: [a.target for a in n.all_input_nodes] for n in reference.graph.nodes
            if n.op in ("call_function", "call_method") and n.target in (torch.add, torch.mul, "add", "mul")}


def test_inductor_runs_add_and_mul_float_on_unrounded_values():
    """The inductor preset computes an add or mul that is no conv's post-op in float, on its inputs before any
    rounding (a convert_pt2e graph's semantics): only the inputs of the three convs are quantized. A torch.ao
    engine's reference keeps int8 add/mul reading dequantized codes."""
    torch.manual_seed(0)
    model, data = LayerScaleBlock().eval(), batches()
    pm = PassManager([PTQ(data, backend="inductor", progress=False, recipe=False)])
    reference = pm.run(model, data[0])
    notes = [n for r in pm.report.records for n in r.notes]
    # the add for want of an int8 kernel; the mul, which only that float add reads, as nothing reads it as int8
    assert sum("no int8 add kernel of its own" in n for n in notes) == 1
    assert sum("'mul_1': nothing reads its value as int8" in n for n in notes) == 1
    inputs = arithmetic_inputs(reference)
    assert len(inputs) == 2 and all(DEQUANTIZE not in targets for targets in inputs.values()), inputs
    quantized = [n.args[0] for n in reference.graph.nodes if n.target is QUANTIZE]
    # the convs' inputs only: x, the norm, the (float) add
    assert sorted(n.op for n in quantized) == ["call_method", "call_module", "placeholder"], quantized
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        assert qpasses.analysis.metrics.sqnr(model(x), reference(x)) > 25
    x86 = quantize(LayerScaleBlock().eval(), "x86", lower=False, data=data)
    assert all(DEQUANTIZE in targets for targets in arithmetic_inputs(x86).values())


class SqueezeExcite(nn.Module):
    """MobileNetV3's gate: a conv's value scaled per channel by hardsigmoid(fc2(relu(fc1(pool(value)))))."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.gate, self.head = nn.Hardsigmoid(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.stem(x))
        scale = self.gate(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(y * scale)


def test_inductor_computes_a_gate_that_only_a_float_mul_reads_in_float():
    """On inductor the gate's mul runs float, so nothing reads the hardsigmoid as int8: it runs float on fc2's
    unrounded value (fc2's kernel writes fp32), as in PT2E's graph, and writes float. Rounded there, fc2's value
    would clip whatever the few pooled calibration values did not reach. A torch.ao engine runs the gate int8."""
    torch.manual_seed(0)
    model, data = SqueezeExcite().eval(), batches()
    reference = quantize(model, "inductor", lower=False, data=data)
    gate = next(n for n in reference.graph.nodes if n.op == "call_module" and n.target == "gate")
    assert gate.args[0].target is torch.conv2d, gate.args[0]  # fc2's value, not a dequantize of it
    assert all(user.target is not QUANTIZE for user in gate.users)
    quantized = sorted(str(n.args[0]) for n in reference.graph.nodes if n.target is QUANTIZE)
    assert quantized == ["adaptive_avg_pool2d", "mul_1", "relu", "relu_1", "x"], quantized  # the convs' inputs
    x86 = quantize(SqueezeExcite().eval(), "x86", lower=False, data=data)
    x86_gate = next(n for n in x86.graph.nodes if n.op == "call_module" and n.target == "gate")
    assert x86_gate.args[0].target is DEQUANTIZE and any(u.target is QUANTIZE for u in x86_gate.users)


class PyramidPooling(nn.Module):
    """deeplabv3's ASPP in small: two conv-ReLU branches and a pooled branch upsampled back, concatenated, read by
    a conv; the first branch is also read by a conv of its own (so it is rounded for that conv anyway)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b, self.pool = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.side, self.project = nn.Conv2d(4, 2, 1), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        a = F.relu(self.a(y))
        pooled = F.interpolate(F.relu(self.pool(F.adaptive_avg_pool2d(y, 1))), size=y.shape[-2:], mode="bilinear")
        return self.project(torch.cat([a, F.relu(self.b(y)), pooled], dim=1)), self.side(a)


def test_inductor_runs_cat_float_and_rounds_its_value_once():
    """The inductor preset computes a cat in float (PT2E's graph): a branch only the cat reads is not rounded on a
    grid of its own, the cat's value is quantized once for the conv that reads it; a branch a conv reads as int8
    too is written rounded by its int8 kernel, and the cat reads that. A torch.ao engine's reference keeps the
    int8 cat reading dequantized codes."""
    torch.manual_seed(0)
    model, data = PyramidPooling().eval(), batches()
    pm = PassManager([PTQ(data, backend="inductor", progress=False, recipe=False)])
    reference = pm.run(model, data[0])
    assert any("concatenates int8 codes only of one grid" in n for r in pm.report.records for n in r.notes)
    (cat,) = [n for n in reference.graph.nodes if n.target in (torch.cat, "cat")]
    assert [a.target is DEQUANTIZE for a in cat.args[-1]] == [True, False, False], cat.args
    quantized = {n.args[0].name for n in reference.graph.nodes if n.target is QUANTIZE}
    # the convs' inputs only: x, the stem's value, the pooled value, branch a (read by `side`), the cat
    assert len(quantized) == 5 and cat.name in quantized, quantized
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        assert all(qpasses.analysis.metrics.sqnr(f, q) > 25 for f, q in zip(model(x), reference(x), strict=True))
    x86 = quantize(PyramidPooling().eval(), "x86", lower=False, data=data)
    (x86_cat,) = [n for n in x86.graph.nodes if n.target in (torch.cat, "cat")]
    assert all(a.target is DEQUANTIZE for a in x86_cat.args[-1])


class TwoBranches(nn.Module):
    """Two conv-ReLU branches only a cat reads, the cat read by a conv: the branches can share the cat's grid."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))


def test_inductor_keeps_a_cat_int8_where_its_inputs_share_its_grid():
    """inductor's int8 cat concatenates codes of one grid: where every input of a cat can be written on the cat's
    grid by its own kernel, the cat stays int8 and reads codes of one scale."""
    data = batches()
    reference = PassManager([PTQ(data, backend="inductor", progress=False, recipe=False)]).run(
        TwoBranches().eval(), data[0])
    (cat,) = [n for n in reference.graph.nodes if n.target in (torch.cat, "cat")]
    assert all(a.target is DEQUANTIZE for a in cat.args[-1]), cat.args
    assert len({a.args[1] for a in cat.args[-1]}) == 1, cat.args


class ReluIntoFloatAdd(nn.Module):
    """A conv + ReLU read only by a residual add whose value no int8 op reads (the interpolate is the output)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        e = F.relu(self.a(x))
        return F.interpolate(F.relu(self.b(e)) + e, scale_factor=2.0)


def test_inductor_rounds_a_conv_relu_that_an_add_reads():
    """Under the inductor preset nothing reads ``b``'s value as int8, yet its conv + ReLU writes codes, not float:
    torchao's inductor lowering fails on conv → ReLU → add over fp32 values (a binary post-op on a kernel with the
    ReLU fused); the add then reads two dequantized values, as in PT2E's graphs."""
    data = batches()
    reference = PassManager([PTQ(data, backend="inductor", progress=False, recipe=False)]).run(
        ReluIntoFloatAdd().eval(), data[0])
    (add,) = [n for n in reference.graph.nodes if n.target == "add"]  # the FloatFunctional's, args[0] its module
    assert [a.target for a in add.args[1:]] == [DEQUANTIZE, DEQUANTIZE], add.args


@pytest.mark.parametrize("backend", ["inductor", "x86"])
def test_default_preset_clips_a_heavy_tailed_activation_less_than_the_squared_error_would(backend):
    """The x86 and inductor presets' range search minimises Σ|q(x) − x|³ (``QuantSpec.error_power``): on a
    heavy-tailed conv input it keeps more of the tail than the squared error's search, and still clips its farthest
    values."""
    g = torch.Generator().manual_seed(0)
    data = [torch.empty(4, 3, 16, 16).exponential_(generator=g) * torch.randn(4, 3, 16, 16, generator=g).sign()
            for _ in range(2)]  # Laplace
    preset = get_backend(backend).default_config()

    def input_step(activation: QuantSpec | None) -> float:
        config = None if activation is None else QuantConfig(weight=preset.weight, activation=activation)
        reference = PassManager([PTQ(data, backend=backend, config=config, progress=False, recipe=False,
                                     lower=False)]).run(nn.Conv2d(3, 4, 1).eval(), data[0])
        (quantize_input,) = [n for n in reference.graph.nodes if n.target is QUANTIZE and n.args[0].op == "placeholder"]
        return float(quantize_input.args[1])

    cubed, squared = input_step(None), input_step(preset.activation.replace(error_power=2.0))
    full = input_step(preset.activation.replace(observer="minmax", error_power=2.0))
    assert squared < cubed < full
