import math

import pytest
import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from qpasses.analysis.metrics import latency, model_size, mse, sqnr, ssim, topk_agreement

pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_:UserWarning")


def test_sqnr():
    ref = torch.ones(100)
    assert sqnr(ref, ref.clone()) == math.inf
    assert sqnr(ref, ref + 0.1) == pytest.approx(20.0)  # 10·log10(100 / (100 · 0.01))
    nested_ref = {"depth": ref, "aux": (ref, [ref * 2])}
    nested_test = {"depth": ref + 0.1, "aux": (ref + 0.01, [ref * 2])}
    assert sqnr(nested_ref, nested_test) == pytest.approx(20.0)  # the worst leaf
    q = torch.quantize_per_tensor(ref * 0.5, 0.1, 0, torch.quint8)
    assert sqnr(ref * 0.5, q) == math.inf  # 0.5 is on the grid: the dequantized tensor is exact
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr(ref, torch.ones(3))


def test_mse():
    assert mse(torch.zeros(4), torch.tensor([1.0, -1.0, 2.0, 0.0])) == pytest.approx(1.5)


def test_topk_agreement():
    ref = torch.tensor([[5.0, 1.0, 0.0], [0.0, 5.0, 1.0], [1.0, 0.0, 5.0], [5.0, 4.0, 0.0]])
    test = ref.clone()
    test[3] = torch.tensor([4.0, 5.0, 0.0])  # top-1 flips to class 1, class 0 stays second
    assert topk_agreement(ref, test) == 0.75
    assert topk_agreement(ref, test, k=2) == 1.0
    dense_ref = ref.T.reshape(1, 3, 2, 2)  # 4 positions, classes along dim 1
    dense_test = test.T.reshape(1, 3, 2, 2)
    assert topk_agreement(dense_ref, dense_test) == 0.75
    assert topk_agreement(ref[0], ref[0]) == 1.0
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        topk_agreement(ref, test, k=4)


def test_ssim():
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(2, 1, 32, 32, generator=g).cumsum(-1)  # smooth-ish ramps
    assert ssim(depth, depth.clone(), data_range=float(depth.max())) == pytest.approx(1.0)
    noisy = depth + torch.randn(depth.shape, generator=g) * 0.5
    value = ssim(depth, noisy, data_range=float(depth.max()))
    assert 0.0 < value < 0.99
    # Constant images a and b: σ = 0, so SSIM = (2ab + C1) / (a² + b² + C1).
    a, b, c1 = 0.2, 0.6, (0.01 * 1.0) ** 2
    const = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b), data_range=1.0)
    assert const == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    with pytest.raises(ValueError, match="smaller than the 11-pixel window"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), data_range=1.0)


def test_model_size_float_and_packed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4))
    plain = model_size(model)
    params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert params < plain["serialized_bytes"] < params + 4096
    assert plain["packed_bytes"] is None
    four = model_size(model, bits=4)
    # conv weight 216 and linear weight 32 elements at 4 bits; everything else (biases, BN) as stored.
    others = params - (216 + 32) * 4
    assert four["packed_bytes"] == (216 + 32) // 2 + others
    assert four["weight_bits"] == {"0.weight": 4, "2.weight": 4}


def test_model_size_finds_sub_8_bit_quantized_weights():
    model = nn.Module()
    model.conv = nnq.Conv2d(3, 8, 3)
    model.fc = nnq.Linear(8, 4)
    g = torch.Generator().manual_seed(0)
    w4 = torch.randint(-8, 8, (8, 3, 3, 3), generator=g).float()  # a 4-bit grid in the int8 container
    model.conv.set_weight_bias(
        torch.quantize_per_channel(
            w4 * 0.1,
            torch.full((8,), 0.1, dtype=torch.double),
            torch.zeros(8, dtype=torch.long),
            0,
            torch.qint8,
        ),
        torch.zeros(8),
    )
    w8 = torch.randint(-128, 128, (4, 8), generator=g).float()
    model.fc.set_weight_bias(torch.quantize_per_tensor(w8, 1.0, 0, torch.qint8), torch.zeros(4))
    size = model_size(model)
    assert size["weight_bits"] == {"conv.weight": 4, "fc._packed_params._packed_params.0": 8}
    others = sum(
        t.numel() * t.element_size()
        for k, t in model.state_dict().items()
        if isinstance(t, torch.Tensor) and not t.is_quantized
    )
    others += 4 * 4  # the linear bias inside its packed (weight, bias) tuple
    assert size["packed_bytes"] == 216 // 2 + 8 * 5 + 32 + 5 + others


def test_latency_returns_positive_times_and_restores_threads():
    before = torch.get_num_threads()
    result = latency(nn.Linear(8, 8), torch.randn(2, 8), warmup=1, iters=5, threads=1)
    assert set(result) == {"median_ms", "p90_ms", "mean_ms"}
    assert all(v > 0 for v in result.values())
    assert result["p90_ms"] >= result["median_ms"]
    assert torch.get_num_threads() == before
