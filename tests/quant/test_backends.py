"""The backend table against the real kernels of each engine."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import nn

from qpasses.cpu import OVERRIDE_ENV, cpu_int8_features
from qpasses.errors import QPassesError
from qpasses.quant.backends import BACKENDS, UnsupportedSpecError, get_backend
from qpasses.quant.observers import MinMaxObserver
from qpasses.quant.spec import QuantConfig, QuantPair, QuantSpec

pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")

# torch.ao's engines; the rows of other runtimes (onnx, openvino) are measured on them in tests/lower
AVAILABLE = [name for name, b in BACKENDS.items() if b.available and b.runtime is None]


@pytest.fixture
def engine():
    """Sets ``torch.backends.quantized.engine`` for one test and restores it afterwards."""
    previous = torch.backends.quantized.engine

    def use(name: str) -> None:
        torch.backends.quantized.engine = BACKENDS[name].engine

    yield use
    torch.backends.quantized.engine = previous


def _quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    # The observer kind does not matter to the kernels; min/max keeps these many small cases fast.
    obs = MinMaxObserver(spec.replace(observer="minmax"))
    obs(x)
    scale, zp = obs.qparams()
    if spec.per_channel:
        return torch.quantize_per_channel(x, scale.double(), zp, spec.axis, spec.dtype)
    return torch.quantize_per_tensor(x, float(scale), int(zp), spec.dtype)


def _run(kind: str, pair: QuantPair, in_ch: int = 4, out_ch: int = 8, x=None, w=None):
    """Quantizes input, weight and output with ``pair`` and runs the quantized module.

    Returns (kernel output dequantized, reference on the dequantized operands, float reference, output step).
    """
    g = torch.Generator().manual_seed(0)
    if kind == "conv":
        x = torch.randn(2, in_ch, 8, 8, generator=g) if x is None else x
        w = torch.randn(out_ch, in_ch, 3, 3, generator=g) * 0.3 if w is None else w
        module, op = nnq.Conv2d(in_ch, out_ch, 3), F.conv2d
    elif kind == "conv_transpose":
        x = torch.randn(2, in_ch, 6, 6, generator=g) if x is None else x
        w = torch.randn(in_ch, out_ch, 3, 3, generator=g) * 0.3 if w is None else w
        module, op = nnq.ConvTranspose2d(in_ch, out_ch, 3), F.conv_transpose2d
    else:
        x = torch.randn(5, in_ch * 4, generator=g) if x is None else x
        w = torch.randn(out_ch, in_ch * 4, generator=g) * 0.3 if w is None else w
        module, op = nnq.Linear(in_ch * 4, out_ch), F.linear
    bias = torch.randn(out_ch, generator=g) * 0.1
    xq, wq = _quantize(x, pair.activation), _quantize(w, pair.weight)
    exact_operands = op(xq.dequantize(), wq.dequantize(), bias)
    float_ref = op(x, w, bias)
    out_obs = MinMaxObserver(pair.activation.replace(axis=None))
    out_obs(float_ref)
    scale, zp = out_obs.qparams()
    module.set_weight_bias(wq, bias)
    module.scale, module.zero_point = float(scale), int(zp)
    return module(xq).dequantize(), exact_operands, float_ref, float(scale)


def test_engines_present():
    assert {"x86", "fbgemm", "qnnpack"} <= set(torch.backends.quantized.supported_engines)


@pytest.mark.parametrize("name", AVAILABLE)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize(("per_channel", "bits"), [(None, 8), (True, 8), (False, 8), (None, 4)])
def test_default_specs_run_on_the_kernels(engine, name, kind, per_channel, bits):
    backend = get_backend(name)
    engine(name)
    config = backend.default_config(per_channel=per_channel, bits=bits)
    backend.check_config(config)
    out, exact, float_ref, step = _run(kind, config.default_pair)
    # The kernel rounds once at the output (plus the int32 bias): within about one output step of the
    # computation on its dequantized operands...
    assert (out - exact).abs().max().item() <= 1.01 * step
    # ...and within a few steps of the float model.
    assert (out - float_ref).abs().max().item() <= (6 if bits == 8 else 3) * step


SPECS = {
    "u8 act": QuantSpec(signed=False, symmetric=False),
    "s8 act": QuantSpec(signed=True, symmetric=False),
    "u8 act per-channel": QuantSpec(signed=False, symmetric=False, axis=1),
    "s8 sym w": QuantSpec(signed=True, symmetric=True),
    "s8 affine w": QuantSpec(signed=True, symmetric=False),
    "u8 affine w": QuantSpec(signed=False, symmetric=False),
    "s8 sym w per-channel": QuantSpec(signed=True, symmetric=True, axis=0),
    "s8 affine w per-channel": QuantSpec(signed=True, symmetric=False, axis=0),
}


@pytest.mark.parametrize("name", AVAILABLE)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("act", ["u8 act", "s8 act", "u8 act per-channel"])
@pytest.mark.parametrize(
    "weight", ["s8 sym w", "s8 affine w", "u8 affine w", "s8 sym w per-channel", "s8 affine w per-channel"]
)
def test_check_agrees_with_the_kernels(engine, name, kind, act, weight):
    """``Backend.check_module`` rejects exactly the combinations the kernels refuse or get wrong."""
    backend = get_backend(name)
    engine(name)
    pair = QuantPair(SPECS[weight], SPECS[act])
    module = nn.Conv2d(4, 8, 3) if kind == "conv" else nn.Linear(16, 8)
    try:
        backend.check_module(module, pair.weight, pair.activation)
        expected_ok = True
    except UnsupportedSpecError:
        expected_ok = False
    try:
        out, exact, _, step = _run(kind, pair)
        kernel_ok = (out - exact).abs().max().item() <= 1.01 * step
    except RuntimeError:
        kernel_ok = False
    assert kernel_ok == expected_ok


@pytest.mark.parametrize("name", AVAILABLE)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_bias_arithmetic_is_what_the_table_says(engine, name, kind, per_channel):
    """``quantized_bias``: the kernel adds round(b / (s_in·s_w)) to its int32 accumulator; otherwise b in float.
    Biases sit ¼–¾ of the way between int32 steps and s_in·s_w / s_out ≈ ¼, so the two differ visibly."""
    engine(name)
    g = torch.Generator().manual_seed(0)
    in_ch, out_ch, s_in, z_in = 4, 6, 0.05, 3
    x_codes = torch.randint(0, 16, (8, in_ch, 6, 6), generator=g).float()
    w_codes = torch.randint(-20, 21, (out_ch, in_ch, 3, 3), generator=g).float()
    if kind == "linear":
        x_codes, w_codes = x_codes.flatten(1)[:, : in_ch * 9], w_codes.flatten(1)
    s_w = torch.rand(out_ch, generator=g) * 0.01 + 0.005 if per_channel else torch.full((out_ch,), 0.007)
    step = s_in * s_w.double()
    s_out = float(step.mean()) / 0.2317  # not a simple ratio: exact ties would test tie-breaking instead
    bias = ((torch.randint(-50, 50, (out_ch,), generator=g) + 0.25 + 0.5 * torch.rand(out_ch, generator=g)) * step).float()
    w = w_codes * s_w.reshape(-1, *[1] * (w_codes.dim() - 1))
    qw = (torch.quantize_per_channel(w, s_w.double(), torch.zeros(out_ch, dtype=torch.long), 0, torch.qint8)
          if per_channel else torch.quantize_per_tensor(w, 0.007, 0, torch.qint8))
    module = nnq.Conv2d(in_ch, out_ch, 3, padding=1) if kind == "conv" else nnq.Linear(in_ch * 9, out_ch)
    module.set_weight_bias(qw, bias)
    module.scale, module.zero_point = s_out, 128
    got = module(torch.quantize_per_tensor((x_codes - z_in) * s_in, s_in, z_in, torch.quint8)).int_repr().double()
    op = (lambda a, b: F.conv2d(a, b, padding=1)) if kind == "conv" else F.linear
    acc = op(x_codes.double() - z_in, w_codes.double())
    shape = [1, -1] + [1] * (acc.dim() - 2)
    bias_steps = (bias.double() / step).reshape(shape)

    def requantize(bias_in_steps: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round((acc + bias_in_steps) * step.reshape(shape) / s_out) + 128, 0, 255)

    quantized, in_float = requantize(torch.round(bias_steps)), requantize(bias_steps)
    expected, other = (quantized, in_float) if BACKENDS[name].quantized_bias else (in_float, quantized)
    assert float((got != other).double().mean()) > 0.02
    assert float((got != expected).double().mean()) < 0.002  # values within float error of a tie


@pytest.mark.parametrize("name", AVAILABLE)
def test_conv_transpose_table(engine, name):
    backend = get_backend(name)
    engine(name)
    act = backend.activation
    axis = backend.per_channel_conv_transpose_axis
    for weight in (
        QuantSpec(signed=True, symmetric=False),
        QuantSpec(signed=True, symmetric=True, axis=0),
        QuantSpec(signed=True, symmetric=True, axis=1),
        QuantSpec(signed=True, symmetric=True),
    ):
        for in_ch, out_ch in ((4, 8), (6, 6)):
            module = nn.ConvTranspose2d(in_ch, out_ch, 3)
            try:
                backend.check_module(module, weight)
                expected_ok = True
            except UnsupportedSpecError:
                expected_ok = False
            try:
                out, exact, _, step = _run("conv_transpose", QuantPair(weight, act), in_ch, out_ch)
                kernel_ok = (out - exact).abs().max().item() <= 1.01 * step
            except RuntimeError:
                kernel_ok = False
            # The x86/onednn symmetric bug only shows on CPUs with VNNI, where those weights go to oneDNN.
            vnni = cpu_int8_features().avx512_vnni
            if not vnni and backend.symmetric_conv_transpose_wrong and expected_ok is False and kernel_ok:
                continue
            assert kernel_ok == expected_ok, (weight, in_ch, out_ch, axis)


def test_x86_symmetric_conv_transpose_is_wrong_on_vnni(engine):
    """A sentinel for the torch bug the table works around: when it fails, the bug is fixed and
    ``symmetric_conv_transpose_wrong`` can go."""
    if not cpu_int8_features().avx512_vnni:
        pytest.skip("x86 routes symmetric weights to oneDNN only on CPUs with VNNI")
    engine("x86")
    out, exact, _, step = _run(
        "conv_transpose",
        QuantPair(QuantSpec(signed=True, symmetric=True), get_backend("x86").activation),
        4,
        8,
    )
    assert (out - exact).abs().max().item() > 10 * step
    with pytest.raises(
        UnsupportedSpecError,
        match="x86: symmetric-weight ConvTranspose2d with in_channels=4 != "
        "out_channels=8 gives wrong results.*use symmetric=False",
    ):
        get_backend("x86").check_module(nn.ConvTranspose2d(4, 8, 3), QuantSpec(signed=True, symmetric=True))


KERNELS = {  # under x86 on a VNNI CPU: oneDNN, fbgemm's depthwise kernel, oneDNN, fbgemm's GEMM
    "conv": lambda: nn.Conv2d(64, 4, 3, padding=1),
    "depthwise": lambda: nn.Conv2d(128, 128, 3, padding=1, groups=128),
    "small depthwise": lambda: nn.Conv2d(32, 32, 5, padding=2, groups=32),
    "linear": lambda: nn.Linear(64, 4),
}


def saturation_ratio(kind: str, activation: QuantSpec, weight: QuantSpec) -> float:
    """The current engine's output over the exact result for ``KERNELS[kind]`` when every activation code is the
    top of ``activation``'s grid and every weight code is 127: where a sum of two u8×s8 products into int16
    saturates (1.0: exact)."""
    float_module, top = KERNELS[kind](), float(activation.quant_max)
    if isinstance(float_module, nn.Linear):
        x = torch.full((1, float_module.in_features), top)
        module, products = nnq.Linear(float_module.in_features, float_module.out_features), float_module.in_features
    else:
        x = torch.full((1, float_module.in_channels, 12, 12), top)
        module = nnq.Conv2d(float_module.in_channels, float_module.out_channels, float_module.kernel_size,
                            padding=float_module.padding, groups=float_module.groups)
        products = float_module.weight[0].numel()
    w = torch.full(float_module.weight.shape, 127.0)
    out_ch = w.shape[0]
    if weight.per_channel:
        ones, zeros = torch.ones(out_ch, dtype=torch.double), torch.zeros(out_ch, dtype=torch.long)
        wq = torch.quantize_per_channel(w, ones, zeros, 0, torch.qint8)
    else:
        wq = torch.quantize_per_tensor(w, 1.0, 0, torch.qint8)
    module.set_weight_bias(wq, None)
    exact = top * 127 * products
    module.scale, module.zero_point = exact / 200, 0
    y = module(torch.quantize_per_tensor(x, 1.0, 0, activation.dtype)).dequantize()
    return y.flatten(2)[0, 0, 6 * 12 + 6].item() / exact if y.dim() == 4 else y[0, 0].item() / exact


def input_spec(name: str, kind: str, cpu=None) -> tuple[QuantSpec, QuantSpec]:
    """The default activation and weight specs of backend ``name`` for the input of ``KERNELS[kind]``: 7-bit steps
    where the table says its kernel needs them on ``cpu`` (None: this one), as annotation decides."""
    backend = get_backend(name)
    config = backend.default_config(cpu=cpu)
    if not backend.saturates(KERNELS[kind](), config.weight, cpu):
        return config.activation.replace(reduce_range=False), config.weight
    return config.activation, config.weight


@pytest.mark.parametrize("name", AVAILABLE)
@pytest.mark.parametrize("kind", list(KERNELS))
def test_default_activations_are_exact_on_this_cpu(engine, name, kind):
    """The table's activation bits for each kernel on this machine's CPU (with AVX-512 VNNI: 8 for x86 except into
    fbgemm's depthwise kernels, 8 for onednn; else 7), re-measured at the inputs where int16 pair sums saturate:
    the kernels give the exact integer result."""
    engine(name)
    assert saturation_ratio(kind, *input_spec(name, kind)) == pytest.approx(1.0, abs=0.01)


def test_fbgemms_depthwise_kernel_adds_int16_pairs_even_with_vnni(engine):
    """Why x86 keeps 7-bit steps into depthwise convs of more than 100 groups on VNNI CPUs too: fbgemm runs them,
    and its depthwise kernels saturate with full-range inputs (oneDNN, which takes those of up to 100, does not)."""
    engine("x86")
    full = get_backend("x86").default_config().activation.replace(reduce_range=False)
    weight = get_backend("x86").weight
    assert saturation_ratio("depthwise", full, weight) < 0.6
    if cpu_int8_features().avx512_vnni:
        assert saturation_ratio("small depthwise", full, weight) == pytest.approx(1.0, abs=0.01)


_EMULATED_CPU_PROBE = textwrap.dedent("""
    import torch
    from qpasses.cpu import cpu_int8_features
    from tests.quant.test_backends import input_spec, saturation_ratio
    for name in ("fbgemm", "x86", "onednn"):
        torch.backends.quantized.engine = name
        for override in ("novnni", "vnni"):
            for kind in ("conv", "linear"):
                activation, weight = input_spec(name, kind, cpu_int8_features(override))
                print(name, override, kind, activation.quant_max, saturation_ratio(kind, activation, weight))
""")


def test_activation_bits_follow_int32_accumulation_on_an_emulated_cpu_without_vnni():
    """With fbgemm and oneDNN held to their AVX2 kernels (as on a CPU without AVX-512 VNNI), the 7-bit steps the
    table gives convs and linears for such a CPU are exact, and the full range it gives them on VNNI CPUs
    saturates (~50% lost)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("needs an x86 CPU with AVX2")
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    env.pop(OVERRIDE_ENV, None)
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", _EMULATED_CPU_PROBE], env=env, capture_output=True,
                            text=True, timeout=120, check=True, cwd=Path(__file__).resolve().parents[2])
    rows = {tuple(line.split()[:3]): (int(line.split()[3]), float(line.split()[4])) for line in result.stdout.splitlines()}
    assert len(rows) == 12
    for (name, cpu, kind), (top, ratio) in rows.items():
        if cpu == "novnni" or name == "fbgemm":  # the fbgemm preset is 7-bit into every kernel on every CPU
            assert top == 127 and ratio == pytest.approx(1.0, abs=0.01), (name, cpu, kind)
        else:
            assert top == 255 and ratio < 0.6, (name, cpu, kind)  # 2·255·127 pair sums clipped to 32767


def test_the_table_says_which_kernels_need_reduce_range_on_which_cpu():
    vnni, novnni = cpu_int8_features("vnni"), cpu_int8_features("novnni")
    weight, affine = QuantSpec(signed=True, symmetric=True, axis=0), QuantSpec(signed=True, symmetric=False, axis=0)
    modules = {kind: build() for kind, build in KERNELS.items()}
    x86, onednn = get_backend("x86"), get_backend("onednn")
    assert {k: x86.saturates(m, weight, vnni) for k, m in modules.items()} == {
        "conv": False, "depthwise": True, "small depthwise": False, "linear": False}
    assert x86.saturates(modules["small depthwise"], affine, vnni)  # asymmetric weights: fbgemm's kernel
    assert not any(onednn.saturates(m, weight, vnni) for m in modules.values())
    for name in ("x86", "onednn", "fbgemm"):
        assert all(get_backend(name).saturates(m, weight, novnni) for m in modules.values()), name
    assert all(get_backend("fbgemm").saturates(m, weight, vnni) for m in modules.values())
    assert not any(get_backend("qnnpack").saturates(m, weight, cpu) for m in modules.values() for cpu in (vnni, novnni))
    assert "has AVX-512 VNNI" in x86.reduce_range_reason(vnni) and "more than 100 groups" in x86.reduce_range_reason(vnni)
    assert "has no AVX-512 VNNI" in x86.reduce_range_reason(novnni)
    assert "more than 100 groups" not in onednn.reduce_range_reason(vnni)
    assert x86.has_saturating_kernels(vnni) and not onednn.has_saturating_kernels(vnni)
    assert onednn.default_config(cpu=vnni).activation.quant_max == 255  # nothing to protect: plainly 8-bit
    assert onednn.default_config(cpu=novnni).activation.quant_max == 127
    assert not get_backend("qnnpack").has_saturating_kernels(novnni)


def test_the_cpu_override_reaches_the_table(monkeypatch):
    weight = get_backend("x86").weight
    monkeypatch.setenv(OVERRIDE_ENV, "novnni")
    assert get_backend("x86").saturates(nn.Linear(4, 4), weight)
    monkeypatch.setenv(OVERRIDE_ENV, "vnni")
    assert not get_backend("x86").saturates(nn.Linear(4, 4), weight)


def test_default_configs():
    x86 = get_backend("x86").default_config()
    assert x86.activation.quant_max == 127 and x86.activation.dtype == torch.quint8  # where a kernel needs it
    assert x86.weight.axis == 0 and x86.weight.symmetric and x86.weight.dtype == torch.qint8
    assert get_backend("x86").default_config(bits=4).activation.quant_max == 15  # 4 bits cannot saturate
    assert get_backend("x86").default_config(per_channel=False).weight.axis is None
    qnnpack = get_backend("qnnpack").default_config()
    assert qnnpack.weight.axis is None and qnnpack.activation.quant_max == 255
    assert get_backend("qnnpack").default_config(per_channel=True).weight.axis == 0


def test_error_messages():
    with pytest.raises(QPassesError, match="unknown backend 'tpu'; known: x86, fbgemm, qnnpack, onednn"):
        get_backend("tpu")
    qnnpack = get_backend("qnnpack")
    with pytest.raises(
        UnsupportedSpecError,
        match=r"^qnnpack: signed activations \(qint8\) are not supported by its kernels; "
        r"use signed=False",
    ):
        qnnpack.check(QuantSpec(signed=True, symmetric=True), "activation")
    with pytest.raises(UnsupportedSpecError, match=r"^xnnpack: unsigned activations \(quint8\) .*use signed=True"):
        get_backend("xnnpack").check(QuantSpec(signed=False, symmetric=False), "activation")
    with pytest.raises(UnsupportedSpecError, match=r"fbgemm: unsigned weights \(quint8\) .*use signed=True"):
        get_backend("fbgemm").check(QuantSpec(signed=False, symmetric=False), "weight")
    with pytest.raises(
        UnsupportedSpecError, match="onednn: asymmetric weights .* zero point 0; use symmetric=True"
    ):
        get_backend("onednn").check(QuantSpec(signed=True, symmetric=False), "weight")
    with pytest.raises(UnsupportedSpecError, match="per-channel activations"):
        qnnpack.check(QuantSpec(signed=False, symmetric=False, axis=1), "activation")
    with pytest.raises(ValueError, match="role must be"):
        qnnpack.check(QuantSpec(signed=False, symmetric=False), "bias")
    config = get_backend("x86").default_config()
    config = QuantConfig(
        config.weight,
        config.activation,
        by_name={"head.*": QuantPair(config.weight, QuantSpec(signed=True, symmetric=True))},
    )
    with pytest.raises(
        UnsupportedSpecError, match=r"by_name\['head.\*'\] activation: x86: signed activations"
    ):
        get_backend("x86").check_config(config)
    with pytest.raises(UnsupportedSpecError, match="fbgemm: per-channel weights of ConvTranspose2d"):
        get_backend("fbgemm").check_module(
            nn.ConvTranspose2d(4, 4, 3), QuantSpec(signed=True, symmetric=True, axis=1)
        )
    with pytest.raises(
        UnsupportedSpecError, match="qnnpack: per-channel ConvTranspose2d weights must be split along axis 1"
    ):
        qnnpack.check_module(nn.ConvTranspose2d(4, 4, 3), QuantSpec(signed=True, symmetric=True, axis=0))
    with pytest.raises(UnsupportedSpecError, match="Linear weights must be split along axis 0"):
        qnnpack.check_module(nn.Linear(4, 4), QuantSpec(signed=True, symmetric=True, axis=1))


@pytest.mark.parametrize("name", AVAILABLE)
def test_clamp_kernel_on_channels_last_is_what_the_table_says(engine, name):
    """``clamp_needs_contiguous``: relu6 / hardtanh / clamp on a channels-last quint8 tensor (a conv's output
    layout) differ from the contiguous result where the table says so, and match it elsewhere; relu never."""
    engine(name)
    x = torch.quantize_per_tensor(torch.randn(2, 8, 5, 5) * 10, 0.2, 128, torch.quint8)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for op in (F.relu6, lambda t: F.hardtanh(t, -1.0, 2.0), lambda t: torch.clamp(t, -3.0, 4.0)):
        wrong = not torch.equal(op(x).int_repr(), op(channels_last).int_repr())
        assert wrong == BACKENDS[name].clamp_needs_contiguous
    assert torch.equal(F.relu(x).int_repr(), F.relu(channels_last).int_repr())


@pytest.mark.parametrize("name", AVAILABLE)
def test_add_scale_ratio_is_what_the_table_says(engine, name):
    """``add_scale_ratio``: quantized add runs for input/output scale ratios just inside the range and is
    refused just outside it (where the table has no limit, everything runs)."""
    engine(name)
    x = torch.rand(1, 4, 3, 3)
    limits = BACKENDS[name].add_scale_ratio
    low, high = limits if limits is not None else (2.0**-14, 2.0**8)
    for ratio, legal in ((low * 1.001, True), (high / 1.001, True), (low / 1.001, False), (high * 1.001, False)):
        a = torch.quantize_per_tensor(x, 0.01 * ratio, 0, torch.quint8)
        b = torch.quantize_per_tensor(x, 0.01, 0, torch.quint8)
        try:
            torch.ops.quantized.add(a, b, 0.01, 0)
            runs = True
        except RuntimeError:
            runs = False
        assert runs == (legal or limits is None)
