import copy

import pytest
import torch
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import nn

from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.cpu import OVERRIDE_ENV, cpu_int8_features
from qpasses.errors import PassError, QPassesError
from qpasses.export import qdq_model
from qpasses.passes import PTQ, Calibrate, DynamicQuant, FuseBN, InsertObservers, Lower
from qpasses.quant.backends import UnsupportedSpecError
from qpasses.quant.observers import Observer
from qpasses.quant.spec import QuantConfig, QuantSpec
from tests.nets import TinyUNet, randomize_bn

BACKENDS = ["x86", "qnnpack"]


def calibration(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def quantize(model, shape, backend="x86", passes=(), **kw):
    data = calibration(shape)
    pm = PassManager([*passes, PTQ(data, backend=backend, progress=False, **kw)])
    qm = pm.run(model, data[0])
    return qm, pm


def module_types(gm):
    """Every class of every module, with its bases (qpasses' picklable quantized convs subclass torch's)."""
    return {cls for m in gm.modules() for cls in type(m).__mro__}


class ConvAct(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 8, 3, padding=1), act

    def forward(self, x):
        return self.act(self.conv(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", [nn.Identity(), nn.ReLU(), nn.ReLU6(), nn.Hardswish(), nn.Sigmoid(), nn.Hardtanh(0.0, 2.0)])
def test_conv_with_each_activation_matches_float(backend, act):
    torch.manual_seed(0)
    model = ConvAct(act).eval()
    qm, pm = quantize(model, (2, 3, 8, 8), backend)
    assert nnq.Conv2d in module_types(qm)
    x = calibration((2, 3, 8, 8), seed=5)[0]
    assert sqnr(model(x), qm(x)) > 25
    assert not any(isinstance(m, Observer) for m in qm.modules())
    observed = [r for r in pm.report.records if r.name == "InsertObservers"][0]
    clamp_like = isinstance(act, nn.ReLU | nn.ReLU6 | nn.Hardtanh)
    assert observed.stats["fused_activations"] == int(clamp_like)  # observed after the activation, not before


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu6_is_folded_into_the_output_range(backend):
    torch.manual_seed(0)
    model = ConvAct(nn.ReLU6()).eval()
    with torch.no_grad():
        model.conv.weight.mul_(20)  # pre-activations far beyond 6, as in the Lite0 stem
    qm, pm = quantize(model, (2, 3, 8, 8), backend)
    assert nn.ReLU6 not in module_types(qm)
    x = calibration((2, 3, 8, 8), seed=5)[0]
    out = qm(x)
    beyond = qm(x * 3)  # past the calibrated range: x86's headroom must not carry codes past 6
    assert float(out.min()) >= 0.0 and float(beyond.max()) <= 6.0 + 1e-6
    scale = [r for r in pm.report.records if r.name == "InsertObservers"][0]
    assert scale.stats["fused_activations"] == 1
    # quantizing before ReLU6 would spread 256 codes over the ±100s pre-activation range
    assert sqnr(model(x), out) > 25


def test_every_lowered_op_pattern_matches_float():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            a = F.relu(self.a(x))
            b = self.b(a)
            s = F.relu(a + b)
            m = s * torch.sigmoid(b)
            c = torch.cat([self.pool(self.up(m)), s], dim=1)
            p = F.adaptive_avg_pool2d(F.hardswish(c), 1).flatten(1)
            return self.fc(p) + 0.5

    torch.manual_seed(0)
    model = Net().eval()
    # quantize_output: the last add is int8 only where the output is read as int8 codes
    qm, pm = quantize(model, (2, 3, 8, 8), quantize_output=True)
    types = module_types(qm)
    for t in (nnq.Conv2d, nnq.ConvTranspose2d, nnq.Linear, nnq.Hardswish):
        assert t in types, t
    # The arithmetic runs as direct quantized op calls (as torch.ao's convert_fx emits), with no module left.
    called = {n.target for n in qm.graph.nodes if n.op == "call_function"}
    ops = torch.ops.quantized
    assert {ops.add_relu, ops.mul, ops.cat, ops.add_scalar, torch.quantize_per_tensor} <= called
    assert not types & {nnq.QFunctional, nnq.FloatFunctional, nnq.Quantize}
    x = calibration((2, 3, 8, 8), seed=9)[0]
    assert sqnr(model(x), qm(x)) > 20
    lowered = pm.report.records[-1]
    assert lowered.name == "Lower" and lowered.stats["quantize"] == 1 and lowered.stats["dequantize"] == 1
    assert F.hardswish not in {n.target for n in qm.graph.nodes}  # became a quantized module call


def test_3d_pools_run_on_int8_codes_like_their_2d_forms():
    # Pooled in float, the pooled values got a fresh, narrower grid fitted to the calibration clips, which
    # clipped other clips' values (r3d_18: 15 dB; on the codes, the pool keeps the wider grid before it: 20 dB).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.max, self.avg = nn.Conv3d(3, 8, 3, padding=1), nn.MaxPool3d(2), nn.AvgPool3d(2)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            y = self.avg(self.max(F.relu(self.conv(x))))
            return self.fc(F.adaptive_avg_pool3d(y, 1).flatten(1))

    torch.manual_seed(0)
    model = Net().eval()
    qm, pm = quantize(model, (2, 3, 8, 8, 8))
    lowered = pm.report.records[-1]
    assert lowered.stats["quantize"] == 1 and lowered.stats.get("dequantize", 0) == 0  # no float island at the pools
    x = calibration((2, 3, 8, 8, 8), seed=4)[0]
    assert sqnr(model(x), qm(x)) > 25


def test_float_fallback_around_ops_without_int8_kernels_is_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Conv2d(3, 4, 1), nn.SiLU(), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    model = Net().eval()
    qm, pm = quantize(model, (1, 3, 6, 6))
    observers = [r for r in pm.report.records if r.name == "InsertObservers"][0]
    assert observers.stats["float_ops"] == 1
    assert any("SiLU 'act' has no int8 kernel" in n for n in observers.notes)
    lowered = pm.report.records[-1]
    assert lowered.stats["quantize"] == 2 and lowered.stats["dequantize"] == 2
    x = calibration((1, 3, 6, 6), seed=3)[0]
    assert sqnr(model(x), qm(x)) > 25


def test_keep_float_by_name_and_nothing_to_quantize():
    model = ConvAct(nn.ReLU()).eval()
    config = QuantConfig(weight=QuantSpec(signed=True, symmetric=True, axis=0),
                         activation=QuantSpec(signed=False, symmetric=False, reduce_range=True),
                         keep_float={"conv"})
    with pytest.raises(PassError, match="nothing to quantize"):
        quantize(model, (1, 3, 4, 4), config=config)


def test_backend_spec_errors_say_what_is_impossible():
    signed = QuantConfig(weight=QuantSpec(signed=True, symmetric=True), activation=QuantSpec(signed=True, symmetric=False))
    with pytest.raises(UnsupportedSpecError, match="qnnpack"):
        PTQ(calibration((1, 3, 4, 4)), backend="qnnpack", config=signed)
    with pytest.raises(QPassesError, match="x86"):
        PTQ(calibration((1, 3, 4, 4)), backend="tpu")


def test_calibration_errors():
    model = ConvAct(nn.ReLU()).eval()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(PassError, match="no batches"):
        PassManager([PTQ([], progress=False)]).run(model, x)
    with pytest.raises(PassError, match="NaN/Inf"):
        PassManager([PTQ([torch.full((1, 3, 4, 4), float("nan"))], progress=False)]).run(model, x)
    with pytest.raises(PassError, match=r"batch 1: the model fails on inputs of shape \[\(1, 5, 4, 4\)\]"):
        PassManager([PTQ([x, torch.randn(1, 5, 4, 4)], progress=False)]).run(model, x)


def test_calibration_reads_input_label_batches_and_respects_num_batches():
    model = ConvAct(nn.ReLU()).eval()
    batches = [(torch.randn(2, 3, 4, 4), torch.tensor([0, 1])) for _ in range(5)]
    pm = PassManager([PTQ(batches, num_batches=3, progress=False)])
    pm.run(model, batches[0][0])
    assert [r for r in pm.report.records if r.name == "Calibrate"][0].stats["batches"] == 3


def test_verification_forwards_do_not_calibrate():
    model = ConvAct(nn.ReLU()).eval()
    pm = PassManager([FuseBN(), InsertObservers()])
    gm = pm.run(model, torch.randn(1, 3, 4, 4))
    assert all(m.batches_seen == 0 for m in gm.modules() if isinstance(m, Observer))


@pytest.mark.parametrize("bits", [4, 6])
def test_sub_8_bit_weights_and_activations_use_n_bit_codes(bits):
    torch.manual_seed(0)
    model = ConvAct(nn.ReLU()).eval()
    qm, _ = quantize(model, (2, 3, 8, 8), bits=bits)
    conv = qm.conv
    codes = conv.weight().int_repr()
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    x = calibration((2, 3, 8, 8), seed=1)[0]
    out_scale = conv.scale
    levels = torch.unique(torch.round(qm(x) / out_scale))
    assert len(levels) <= 2**bits
    assert sqnr(model(x), qm(x)) > 6 * bits - 25


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_flow_on_resnet18_and_lite0_small(backend):
    import timm
    import torchvision

    for model in (torchvision.models.resnet18(), timm.create_model("tf_efficientnet_lite0")):
        model = randomize_bn(model).eval()
        qm, pm = quantize(model, (1, 3, 64, 64), backend, passes=[FuseBN()])
        x = calibration((1, 3, 64, 64), seed=2)[0]
        assert sqnr(model(x), qm(x)) > 10, type(model).__name__
        assert pm.report.records[-1].stats["int8_conv2d"] > 15


def test_lowered_model_saves_loads_and_scripts(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(TinyUNet()).eval()
    qm, _ = quantize(model, (1, 3, 16, 16), passes=[FuseBN()])
    x = calibration((1, 3, 16, 16), seed=4)[0]
    expected = qm(x)
    torch.save(qm, tmp_path / "q.pt")
    torch.testing.assert_close(torch.load(tmp_path / "q.pt", weights_only=False)(x), expected)
    clone = copy.deepcopy(qm)
    torch.testing.assert_close(clone(x), expected)
    scripted = torch.jit.freeze(torch.jit.trace(qm, x).eval())
    torch.testing.assert_close(scripted(x), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_padded_stride_2_depthwise_convs_lower_to_symmetric_padding(backend):
    from timm.layers import Conv2dSame

    from qpasses.nn import CropStart2d, ShiftedSamePad2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), Conv2dSame(8, 8, 5, stride=2, groups=8), nn.ReLU()).eval()
    qm, _ = quantize(model, (2, 3, 14, 14), backend)
    types = module_types(qm)
    assert ShiftedSamePad2d in types and CropStart2d in types
    conv = next(m for m in qm.modules() if isinstance(m, nnq.Conv2d) and m.groups == 8)
    assert conv.padding == (2, 2)
    for shape in ((2, 3, 14, 14), (1, 3, 15, 12)):  # 'SAME' depends on the input size
        x = torch.randn(*shape)
        assert qm(x).shape == model(x).shape
        assert sqnr(model(x), qm(x)) > 25


def test_shifted_padding_keeps_a_per_channel_clamp_after_cle():
    from timm.layers import Conv2dSame

    from qpasses.nn import ChannelClamp, CropStart2d
    from qpasses.passes import CLE

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), Conv2dSame(8, 8, 3, stride=2, groups=8), nn.ReLU6(),
                          nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(0.2, 5, 8)[:, None, None, None])  # unequal ranges for CLE to equalize
    qm, _ = quantize(model, (2, 3, 14, 14), "qnnpack", passes=[CLE()])
    types = module_types(qm)
    assert ChannelClamp in types and CropStart2d in types
    x = calibration((2, 3, 14, 14), seed=5)[0]
    assert sqnr(model(x), qm(x)) > 20


def test_lower_needs_its_own_backend_and_the_plan_shows_the_parts():
    model = ConvAct(nn.ReLU()).eval()
    data = calibration((1, 3, 4, 4))
    plan = PassManager([PTQ(data, recipe=False)]).plan()  # the recipe's passes: tests/passes/test_ptq_target.py
    assert [p.name for p in plan.passes] == ["ReplaceFunctional", "InsertObservers", "Calibrate", "Lower"]
    with pytest.raises(PassError, match="observers were placed for backend 'x86'"):
        PassManager([InsertObservers("x86"), Calibrate(data, progress=False), Lower("qnnpack")]).run(model, data[0])


def test_dynamic_quantization_of_linear_and_lstm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 4)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.fc(out[:, -1])

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 5, 8)
    for dtype in (torch.qint8, torch.float16):
        pm = PassManager([DynamicQuant(dtype)])
        qm = pm.run(model, x)
        assert torch.ao.nn.quantized.dynamic.Linear in module_types(qm)
        assert torch.ao.nn.quantized.dynamic.LSTM in module_types(qm)
        assert sqnr(model(x), qm(x)) > 25
    with pytest.raises(PassError, match="nothing to quantize dynamically"):
        PassManager([DynamicQuant()]).run(ConvAct(nn.ReLU()).eval(), torch.randn(1, 3, 4, 4))


def test_reduce_range_only_where_a_gemm_reads_the_value(monkeypatch):
    monkeypatch.setenv(OVERRIDE_ENV, "novnni")  # x86 reduces the range on CPUs without AVX-512 VNNI
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            h = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1)  # read by the linear, through pooling
            return self.fc(h)  # logits: read by no conv or linear

    # the logits are observed only when asked to be rounded to 8 bits (x86 writes them float by default)
    gm = PassManager([InsertObservers("x86", quantize_output=True)]).run(Net().eval(), torch.randn(1, 3, 8, 8))
    specs = {name: m.spec for name, m in gm.named_modules() if isinstance(m, Observer)}
    assert specs["x_obs"].reduce_range and specs["relu_obs"].reduce_range
    assert not specs["fc_obs"].reduce_range
    qnnpack = PassManager([InsertObservers("qnnpack")]).run(Net().eval(), torch.randn(1, 3, 8, 8))
    assert not any(m.spec.reduce_range for m in qnnpack.modules() if isinstance(m, Observer))


class StemPoolNet(nn.Module):
    """A ResNet stem: conv → ReLU → max pool, with no-op modules between, then a conv reading the pool."""

    def __init__(self):
        super().__init__()
        self.stem, self.keep, self.drop = nn.Conv2d(3, 8, 3, padding=1), nn.Identity(), nn.Dropout(0.5)
        self.pool, self.conv = nn.MaxPool2d(2), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv(self.drop(self.pool(self.keep(F.relu(self.stem(x))))))


def test_reduce_range_clamp_runs_after_the_max_pool_with_the_same_codes():
    torch.manual_seed(0)
    qm, _ = quantize(StemPoolNet().eval(), (2, 3, 16, 16), "fbgemm")
    pool = next(n for n in qm.graph.nodes if n.target == "pool")
    clamp = next(iter(pool.users))
    assert clamp.target is torch.clamp and clamp.args[0] is pool  # the clamp reads 4× fewer codes
    assert pool.args[0].target == "stem"
    # the graph as lowered before: clamp, then pool; max pooling commutes with the clamp, bit for bit
    before = copy.deepcopy(qm)
    pool_b = next(n for n in before.graph.nodes if n.target == "pool")
    clamp_b = next(iter(pool_b.users))
    readers = list(clamp_b.users)
    clamp_b.args = (pool_b.args[0], *clamp_b.args[1:])
    pool_b.args = (clamp_b, *pool_b.args[1:])
    clamp_b.append(pool_b)
    for reader in readers:
        reader.replace_input_with(clamp_b, pool_b)
    before.graph.lint()
    before.recompile()
    x = calibration((2, 3, 16, 16), seed=3)[0] * 3  # beyond the calibrated range: the clamp bites
    input_clamp = next(n for n in qm.graph.nodes if n.target is torch.clamp)
    stem_codes = qm.stem(quantize_input(qm, x).clamp(*input_clamp.args[1:]))
    assert int(stem_codes.int_repr().max()) > 127
    assert torch.equal(qm(x), before(x))


def quantize_input(gm, x):
    """``x`` quantized as the lowered ``gm`` quantizes its input."""
    quantize = next(n for n in gm.graph.nodes if n.target is torch.quantize_per_tensor)
    return torch.quantize_per_tensor(x, *quantize.args[1:])


def clamps(gm):
    return [n for n in gm.graph.nodes if n.target is torch.clamp]


def test_x86_headroom_needs_no_clamp_and_equals_fbgemm_inside_the_range(monkeypatch):
    monkeypatch.setenv(OVERRIDE_ENV, "novnni")  # x86's 7-bit grid, for CPUs without AVX-512 VNNI
    torch.manual_seed(0)
    model = StemPoolNet().eval()
    # Without the recipe: bias correction measures each backend's own kernels, so its biases would differ.
    x86, _ = quantize(model, (2, 3, 16, 16), "x86", recipe=False)
    fbgemm, _ = quantize(model, (2, 3, 16, 16), "fbgemm", recipe=False)
    assert not clamps(x86) and clamps(fbgemm)
    # same observers, same 7-bit steps: identical wherever no code passes 127
    inside = calibration((2, 3, 16, 16), seed=3)[0] * 0.25
    assert torch.equal(x86(inside), fbgemm(inside))
    beyond = calibration((2, 3, 16, 16), seed=3)[0] * 3
    stem_codes = x86.stem(quantize_input(x86, beyond)).int_repr()
    assert int(stem_codes.max()) > 127  # past the calibrated range, up to the u8 container's 255
    assert not torch.equal(x86(beyond), fbgemm(beyond))


def test_x86_headroom_stops_at_a_folded_relu6_that_feeds_a_conv(monkeypatch):
    monkeypatch.setenv(OVERRIDE_ENV, "novnni")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(20)
    qm, _ = quantize(model, (2, 3, 8, 8), "x86")
    assert clamps(qm)  # the ReLU6's 6 is the top of a 7-bit range: its codes stop at 127, not 255
    x = calibration((2, 3, 8, 8), seed=5)[0]  # the ×20 pre-activations pass 6 even on calibration-like data
    assert sqnr(model(x), qm(x)) > 25


class DepthwiseNet(nn.Module):
    """conv → ReLU6 → a depthwise conv of 128 groups (fbgemm's kernel under x86) → a 1×1 conv → linear."""

    def __init__(self):
        super().__init__()
        self.expand, self.act = nn.Conv2d(3, 128, 1), nn.ReLU6()
        self.depthwise, self.project = nn.Conv2d(128, 128, 3, padding=1, groups=128), nn.Conv2d(128, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.project(self.depthwise(self.act(self.expand(x)))).mean((2, 3)))


def test_x86_activation_bits_follow_the_cpu_and_the_report_says_why(monkeypatch):
    def run(**kw):
        torch.manual_seed(0)
        observed = PassManager([InsertObservers("x86", **kw)])
        gm = observed.run(DepthwiseNet().eval(), torch.randn(1, 3, 8, 8))
        reduced = {name for name, m in gm.named_modules() if isinstance(m, Observer) and m.spec.reduce_range}
        return reduced, [n for n in observed.report.records[-1].notes if n.startswith("x86: ")]

    monkeypatch.setenv(OVERRIDE_ENV, "vnni")
    reduced, said = run()
    assert reduced == {"act_obs"}  # only the depthwise conv's input: every other kernel accumulates in int32
    # 4 observed values: the logits fc writes stay float (QuantConfig.quantize_output=False)
    assert len(said) == 1 and said[0].startswith(
        "x86: 8-bit activations, 7-bit steps (reduce_range) on the 1 of 4 observed values read by kernels that add "
        "int16 pairs: this CPU, ")
    assert "has AVX-512 VNNI" in said[0] and "override QPASSES_CPU_INT8=vnni" in said[0]
    monkeypatch.setenv(OVERRIDE_ENV, "novnni")
    reduced, said = run()
    assert reduced == {"x_obs", "act_obs", "depthwise_obs", "project_obs"}  # every conv/linear input
    assert "on the 4 of 4 observed values" in said[0] and "has no AVX-512 VNNI" in said[0]
    assert run(bits=4) == (set(), ["x86: 4-bit activations: 4-bit grids cannot overflow an int16 pair sum"])
    given = QuantConfig(weight=QuantSpec(signed=True, symmetric=True), activation=QuantSpec(signed=False, symmetric=False))
    assert run(config=given) == (set(), ["x86: 8-bit activations: as the given config asks"])
    monkeypatch.setenv(OVERRIDE_ENV, "vnni")
    onednn = PassManager([InsertObservers("onednn")])
    onednn.run(DepthwiseNet().eval(), torch.randn(1, 3, 8, 8))
    assert [n for n in onednn.report.records[-1].notes if n.startswith("onednn: ")] == [
        f"onednn: 8-bit activations: this CPU, {cpu_int8_features()}, has AVX-512 VNNI: onednn's u8×s8 kernels add "
        "every product into int32, exact with 8-bit activations (quantize for a CPU without VNNI with "
        "QPASSES_CPU_INT8=novnni)"]


def test_x86_model_on_this_cpu_matches_its_reference_where_int16_pair_sums_would_saturate():
    """The lowered x86 model on this machine's CPU equals the float simulation of its grids (the QDQ view) where
    full-range codes would saturate the depthwise kernel's int16 pair sums (ReLU6 at its top, every depthwise
    weight code 127): 0 output steps apart; with 8-bit inputs there, 31."""
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    with torch.no_grad():
        model.expand.weight.abs_()
        model.depthwise.weight.fill_(0.1)
    data = [torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) + 2 for i in range(2)]
    qm = PassManager([PTQ(data, backend="x86", progress=False)]).run(model, data[0])
    x = data[0]
    assert float((qdq_model(qm, x[:1])(x) - qm(x)).abs().max()) <= qm.fc.scale


def test_a_clamp_with_a_positive_lower_bound_is_not_folded_into_the_grid():
    torch.manual_seed(0)
    model = ConvAct(nn.Hardtanh(1.0, 2.0)).eval()
    for backend in BACKENDS:
        qm, _ = quantize(model, (2, 3, 8, 8), backend)
        out = qm(calibration((2, 3, 8, 8), seed=5)[0])
        assert float(out.min()) >= 0.98, backend  # a grid holds 0, so only the clamp itself can cut at 1


def test_identity_and_dropout_leave_the_lowered_graph():
    torch.manual_seed(0)
    model = StemPoolNet().eval()
    qm, _ = quantize(model, (2, 3, 16, 16))
    called = {type(qm.get_submodule(n.target)) for n in qm.graph.nodes if n.op == "call_module"}
    assert not called & {nn.Identity, nn.Dropout}
    x = calibration((2, 3, 16, 16), seed=3)[0]
    assert sqnr(model(x), qm(x)) > 25
