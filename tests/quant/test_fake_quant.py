import pytest
import torch
import torch.nn.functional as F

from qpasses.quant.fake_quant import FakeQuantize, LearnableFakeQuantize, make_fake_quant
from qpasses.quant.observers import make_observer
from qpasses.quant.spec import QuantSpec

SPECS = {
    "u8 affine": QuantSpec(signed=False, symmetric=False),
    "u7 reduce_range": QuantSpec(signed=False, symmetric=False, reduce_range=True),
    "u4 affine": QuantSpec(signed=False, symmetric=False, bits=4),
    "s8 symmetric per-channel": QuantSpec(signed=True, symmetric=True, axis=0),
    "s4 symmetric per-channel": QuantSpec(signed=True, symmetric=True, axis=0, bits=4),
}


def quantize_dequantize(x, scale, zero_point, spec):
    """The real quantizer: torch's quantized tensor, codes clamped to the spec's (sub-8-bit) range."""
    if spec.per_channel:
        q = torch.quantize_per_channel(x, scale.double(), zero_point.long(), spec.axis, spec.dtype)
        shape = [-1] + [1] * (x.dim() - 1)
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    else:
        q = torch.quantize_per_tensor(x, float(scale), int(zero_point), spec.dtype)
    codes = q.int_repr().long().clamp(spec.quant_min, spec.quant_max)
    return (codes - zero_point) * scale


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("name", list(SPECS))
def test_forward_equals_quantize_dequantize(name, learnable):
    spec = SPECS[name]
    torch.manual_seed(0)
    fq = make_fake_quant(spec, kind="weight" if spec.per_channel else "activation", learnable=learnable)
    first = torch.randn(6, 5, 3, 3) * torch.linspace(0.5, 2.0, 6).reshape(-1, 1, 1, 1)
    fq(first)
    x = torch.randn(6, 5, 3, 3) * 1.5  # partly outside the range: clipped
    out = fq(x)
    scale, zero_point = fq.qparams()
    torch.testing.assert_close(out, quantize_dequantize(x, scale, zero_point, spec), rtol=0, atol=1e-6)
    step = scale.reshape(-1, 1, 1, 1) if spec.per_channel else scale
    assert len(torch.unique(torch.round(out / step))) <= spec.quant_max - spec.quant_min + 1


@pytest.mark.parametrize("learnable", [False, True])
def test_straight_through_gradient_passes_inside_the_range_only(learnable):
    spec = QuantSpec(signed=False, symmetric=False, bits=4)
    fq = make_fake_quant(spec, learnable=learnable).train()
    fq(torch.linspace(-1.0, 1.0, 50))
    fq.eval()
    x = torch.linspace(-2.0, 2.0, 101, requires_grad=True)
    fq(x).sum().backward()
    scale, zero_point = fq.qparams()
    # min/max tracking: torch's mask on the rounded code; LSQ: on the unrounded x / s + z
    codes = x.detach() / scale + zero_point
    codes = codes if learnable else torch.round(codes)
    inside = (codes >= spec.quant_min) & (codes <= spec.quant_max)
    assert 0 < int(inside.sum()) < x.numel()
    torch.testing.assert_close(x.grad, inside.float())


def test_lsq_scale_gradient_is_the_lsq_formula():
    spec = QuantSpec(signed=False, symmetric=False, bits=4)
    fq = LearnableFakeQuantize(spec, learn_zero_point=True)
    fq(torch.linspace(-1.0, 3.0, 64))
    x = torch.randn(200) * 2
    fq(x).sum().backward()
    s, z = float(fq.scale.detach()), float(torch.round(fq.zero_point.detach()))
    codes = x / s + z
    per_element = torch.where(codes < spec.quant_min, spec.quant_min - z,
                              torch.where(codes > spec.quant_max, spec.quant_max - z, torch.round(x / s) - x / s))
    grad_factor = 1.0 / (x.numel() * spec.quant_max) ** 0.5
    torch.testing.assert_close(fq.scale.grad, per_element.sum() * grad_factor, rtol=1e-4, atol=1e-6)
    # d/dz of (clamp(round(x/s) + z) − z)·s: −s where clipped, 0 inside
    clipped = (codes < spec.quant_min) | (codes > spec.quant_max)
    torch.testing.assert_close(fq.zero_point.grad, -s * clipped.sum().float(), rtol=1e-4, atol=1e-5)


def test_learned_zero_point_only_for_affine_grids():
    symmetric = LearnableFakeQuantize(QuantSpec(signed=True, symmetric=True), learn_zero_point=True)
    affine = LearnableFakeQuantize(QuantSpec(signed=False, symmetric=False), learn_zero_point=True)
    assert not symmetric.zero_point.requires_grad and affine.zero_point.requires_grad
    assert not LearnableFakeQuantize(QuantSpec(signed=False, symmetric=False)).zero_point.requires_grad


def test_activation_ranges_track_training_batches_only():
    spec = QuantSpec(signed=False, symmetric=False, averaging_constant=0.5)
    fq = FakeQuantize(spec).train()
    fq(torch.tensor([0.0, 1.0]))
    fq(torch.tensor([0.0, 3.0]))
    assert float(fq.max_val) == pytest.approx(2.0)  # 1 + 0.5 · (3 − 1)
    fq.eval()
    fq(torch.tensor([0.0, 100.0]))
    assert float(fq.max_val) == pytest.approx(2.0)
    fq.train()
    fq.observer_enabled.fill_(0)
    fq(torch.tensor([0.0, 100.0]))
    assert float(fq.max_val) == pytest.approx(2.0)
    fq.fake_quant_enabled.fill_(0)
    x = torch.tensor([0.123, 7.0])
    assert torch.equal(fq(x), x)


def test_weight_ranges_follow_the_current_weight_in_any_mode():
    fq = FakeQuantize(QuantSpec(signed=True, symmetric=True, axis=0), kind="weight").eval()
    fq(torch.tensor([[1.0, -2.0], [0.5, 0.1]]))
    fq(torch.tensor([[3.0, -1.0], [0.2, 0.1]]))
    torch.testing.assert_close(fq.max_val, torch.tensor([3.0, 0.2]))
    torch.testing.assert_close(fq.min_val, torch.tensor([-1.0, 0.1]))


@pytest.mark.parametrize("learnable", [False, True])
def test_initialize_from_a_calibrated_observer(learnable):
    spec = QuantSpec(signed=False, symmetric=False, bits=4, observer="mse")
    observer = make_observer(spec)
    observer(torch.randn(1000))
    fq = make_fake_quant(spec, learnable=learnable)
    fq.initialize_from(observer)
    assert fq.calibrated
    for got, want in zip(fq.qparams(), observer.qparams(), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("learnable", [False, True])
def test_average_on_codes_rounds_as_the_int8_kernel(learnable):
    """A 4×4 average of integer codes is a true tie (k + ½) when the sum is 8 mod 16: the kernel rounds it to
    even, and so must ``from_steps(pool(to_steps(x)))``; its gradients are those of fake-quantizing the pooled
    value (straight through; LSQ's for a learned scale)."""
    spec = QuantSpec(signed=False, symmetric=False)
    fq = make_fake_quant(spec, learnable=learnable)
    fq(torch.linspace(-1.0, 3.0, 64))
    fq.eval()
    g = torch.Generator().manual_seed(0)
    x = fq(torch.rand(64, 8, 4, 4, generator=g) * 4 - 1).detach().requires_grad_()
    scale, zero_point = fq.qparams()
    codes = torch.round(x.detach() / scale) + zero_point
    assert bool((codes.sum((2, 3)) % 16 == 8).any())  # the data holds ties
    kernel = F.adaptive_avg_pool2d(torch.quantize_per_tensor(x.detach(), float(scale), int(zero_point), torch.quint8), 1)
    out = fq.from_steps(F.adaptive_avg_pool2d(fq.to_steps(x), 1))
    assert torch.equal(torch.round(out.detach() / scale) + zero_point, kernel.int_repr().float())
    # At the ties LSQ's round(v) − v follows the float side; elsewhere the gradients must be the same.
    ties = (codes.sum((2, 3), keepdim=True) % 16 == 8)
    weights = torch.randn(out.shape, generator=g) * ~ties
    (out * weights).sum().backward()
    grads = [x.grad.clone()] + ([fq.scale.grad.clone()] if learnable else [])
    x.grad = None
    fq.zero_grad()
    (fq.fake_quantize(F.adaptive_avg_pool2d(x, 1)) * weights).sum().backward()
    expected = [x.grad] + ([fq.scale.grad] if learnable else [])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert float(grads[0].abs().sum()) > 0
