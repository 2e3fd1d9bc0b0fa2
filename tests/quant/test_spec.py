import pytest
import torch
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver as TorchMinMax
from torch.ao.quantization.observer import PerChannelMinMaxObserver as TorchPerChannelMinMax

from qpasses.quant.observers import MinMaxObserver
from qpasses.quant.spec import QuantConfig, QuantPair, QuantSpec, compute_qparams, int16_pair_sum_overflows

# torch's observers warn that reduce_range will be deprecated; the comparison uses it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(signed=False, symmetric=False), (0, 255)),
        (dict(signed=True, symmetric=True), (-128, 127)),
        (dict(signed=False, symmetric=False, reduce_range=True), (0, 127)),
        (dict(signed=True, symmetric=True, reduce_range=True), (-64, 63)),
        (dict(signed=True, symmetric=True, narrow_range=True), (-127, 127)),
        (dict(signed=True, symmetric=True, narrow_range=True, reduce_range=True), (-63, 63)),
        (dict(signed=False, symmetric=False, bits=4), (0, 15)),
        (dict(signed=True, symmetric=False, bits=4), (-8, 7)),
        (dict(signed=True, symmetric=True, bits=4, narrow_range=True), (-7, 7)),
        (dict(signed=False, symmetric=True, bits=4, reduce_range=True), (0, 7)),
        (dict(signed=True, symmetric=True, bits=2, narrow_range=True), (-1, 1)),
        (dict(signed=True, symmetric=True, bits=3, reduce_range=True), (-2, 1)),
    ],
)
def test_quant_range(kwargs, expected):
    spec = QuantSpec(**kwargs)
    assert (spec.quant_min, spec.quant_max) == expected


@pytest.mark.parametrize(
    ("kwargs", "grid", "codes"),
    [
        (dict(signed=False, symmetric=False, reduce_range=True, headroom=True), (0, 127), (0, 255)),
        (dict(signed=True, symmetric=True, reduce_range=True, headroom=True, narrow_range=True), (-63, 63), (-127, 127)),
        (dict(signed=False, symmetric=False, reduce_range=True), (0, 127), (0, 127)),
        (dict(signed=False, symmetric=False, headroom=True), (0, 255), (0, 255)),  # nothing reduced, no headroom
        (dict(signed=False, symmetric=False, bits=6, reduce_range=True, headroom=True), (0, 31), (0, 63)),
    ],
)
def test_headroom_clips_codes_at_the_unreduced_range(kwargs, grid, codes):
    spec = QuantSpec(**kwargs)
    assert (spec.quant_min, spec.quant_max) == grid
    assert (spec.code_min, spec.code_max) == codes
    assert ("codes [" in str(spec)) == (grid != codes)


def test_derived_properties():
    u = QuantSpec(signed=False, symmetric=False)
    s = QuantSpec(signed=True, symmetric=True, axis=0)
    assert (u.dtype, u.qscheme, u.per_channel) == (torch.quint8, torch.per_tensor_affine, False)
    assert (s.dtype, s.qscheme, s.per_channel) == (torch.qint8, torch.per_channel_symmetric, True)
    assert QuantSpec(signed=True, symmetric=False, axis=1).qscheme == torch.per_channel_affine
    assert QuantSpec(signed=True, symmetric=True).qscheme == torch.per_tensor_symmetric
    assert u.replace(bits=4).quant_max == 15 and u.bits == 8
    assert QuantSpec(signed=False, symmetric=False, observer="histogram").observer == "percentile"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bits=1), r"bits must be an int in \[2, 8\]"),
        (dict(bits=9), r"bits must be an int in \[2, 8\]"),
        (dict(bits=8.0), r"bits must be an int"),
        (dict(bits=2, reduce_range=True), "needs bits >= 3"),
        (dict(observer="kl"), "observer 'kl' is unknown; choose one of: minmax, moving_average"),
        (dict(percentile=0.0), r"percentile must be in \(0, 100\]"),
        (dict(percentile=100.5), r"percentile must be in \(0, 100\]"),
        (dict(averaging_constant=0.0), r"averaging_constant must be in \(0, 1\]"),
        (dict(signed=False, narrow_range=True), "needs signed=True and symmetric=True"),
        (dict(axis=0, observer="entropy"), "'entropy' observer is per tensor only"),
        (dict(axis=1.5), "axis must be None"),
    ],
)
def test_spec_validation(kwargs, message):
    base = dict(signed=True, symmetric=True)
    with pytest.raises(ValueError, match=message):
        QuantSpec(**{**base, **kwargs})
    with pytest.raises(ValueError, match=message):
        QuantSpec(**base).replace(**kwargs)


def test_compute_qparams_by_hand():
    lo, hi = torch.tensor(-1.0), torch.tensor(3.0)
    scale, zp = compute_qparams(lo, hi, QuantSpec(signed=False, symmetric=False))
    assert (
        scale.item() == pytest.approx(4 / 255) and zp.item() == 64
    )  # 0 - round(-1 / (4/255)) = round(63.75)
    scale, zp = compute_qparams(lo, hi, QuantSpec(signed=True, symmetric=False))
    assert scale.item() == pytest.approx(4 / 255) and zp.item() == -64
    scale, zp = compute_qparams(lo, hi, QuantSpec(signed=True, symmetric=True))
    assert scale.item() == pytest.approx(3 / 127.5) and zp.item() == 0
    # Symmetric unsigned (after ReLU): the whole grid covers [0, max].
    scale, zp = compute_qparams(torch.tensor(0.0), torch.tensor(2.0), QuantSpec(signed=False, symmetric=True))
    assert scale.item() == pytest.approx(2 / 255) and zp.item() == 0
    # The range always contains 0.
    scale, zp = compute_qparams(
        torch.tensor(2.0), torch.tensor(3.0), QuantSpec(signed=False, symmetric=False)
    )
    assert scale.item() == pytest.approx(3 / 255) and zp.item() == 0
    # A constant-zero tensor gets the smallest scale, not a division by zero.
    scale, zp = compute_qparams(
        torch.tensor(0.0), torch.tensor(0.0), QuantSpec(signed=False, symmetric=False)
    )
    assert scale.item() == torch.finfo(torch.float32).eps and zp.item() == 0
    # 4 bits, per channel.
    scale, zp = compute_qparams(
        torch.tensor([-1.0, 0.0]),
        torch.tensor([2.0, 1.5]),
        QuantSpec(signed=False, symmetric=False, bits=4, axis=0),
    )
    assert torch.allclose(scale, torch.tensor([3 / 15, 1.5 / 15])) and zp.tolist() == [5, 0]


def _torch_kwargs(spec: QuantSpec) -> dict:
    kwargs = dict(dtype=spec.dtype, qscheme=spec.qscheme, reduce_range=spec.reduce_range)
    if spec.bits < 8 or spec.narrow_range:
        # torch takes a custom range as given (its reduce_range halving of custom ranges differs).
        kwargs.update(quant_min=spec.quant_min, quant_max=spec.quant_max, reduce_range=False)
    return kwargs


TORCH_COMPARABLE = [
    QuantSpec(signed=False, symmetric=False),
    QuantSpec(signed=False, symmetric=False, reduce_range=True),
    QuantSpec(signed=True, symmetric=False),
    QuantSpec(signed=True, symmetric=True),
    QuantSpec(signed=True, symmetric=True, reduce_range=True),
    QuantSpec(signed=True, symmetric=True, narrow_range=True),
    QuantSpec(signed=True, symmetric=True, bits=4),
    QuantSpec(signed=False, symmetric=False, bits=3),
]


@pytest.mark.parametrize("spec", TORCH_COMPARABLE, ids=str)
@pytest.mark.parametrize("shift", [-0.5, 0.0, 2.0])
def test_qparams_agree_with_torch_per_tensor(spec, shift):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 8, generator=g) * 1.7 + shift for _ in range(3)]
    ours, theirs = MinMaxObserver(spec), TorchMinMax(**_torch_kwargs(spec))
    for b in batches:
        ours(b)
        theirs(b)
    scale, zp = ours.qparams()
    ref_scale, ref_zp = theirs.calculate_qparams()
    torch.testing.assert_close(scale, ref_scale.reshape(scale.shape))
    assert torch.equal(zp, ref_zp.reshape(zp.shape).long())


@pytest.mark.parametrize("spec", TORCH_COMPARABLE, ids=str)
@pytest.mark.parametrize("axis", [0, 1])
def test_qparams_agree_with_torch_per_channel(spec, axis):
    spec = spec.replace(axis=axis)
    g = torch.Generator().manual_seed(1)
    ours = MinMaxObserver(spec)
    kwargs = _torch_kwargs(spec)
    kwargs["qscheme"] = spec.qscheme
    theirs = TorchPerChannelMinMax(ch_axis=axis, **kwargs)
    for _ in range(3):
        b = torch.randn(6, 5, 3, generator=g) * torch.rand(6, 5, 1, generator=g) * 3 + 0.3
        ours(b)
        theirs(b)
    scale, zp = ours.qparams()
    ref_scale, ref_zp = theirs.calculate_qparams()
    assert scale.shape == (b.shape[axis],)
    torch.testing.assert_close(scale, ref_scale)
    assert torch.equal(zp, ref_zp.long())


def test_int16_pair_sum_overflow():
    w8 = QuantSpec(signed=True, symmetric=True)
    assert int16_pair_sum_overflows(QuantSpec(signed=False, symmetric=False), w8)  # 2·255·128
    assert not int16_pair_sum_overflows(QuantSpec(signed=False, symmetric=False, reduce_range=True), w8)
    assert not int16_pair_sum_overflows(QuantSpec(signed=False, symmetric=False, bits=7), w8)


class _MyConv(nn.Conv2d):
    pass


def test_for_node_precedence():
    w = QuantSpec(signed=True, symmetric=True)
    a = QuantSpec(signed=False, symmetric=False)
    conv_pair = QuantPair(w.replace(axis=0), a)
    my_pair = QuantPair(w.replace(bits=4), a.replace(bits=4))
    head_pair = QuantPair(w.replace(bits=6), a)
    config = QuantConfig(
        weight=w,
        activation=a,
        by_module_type={nn.Conv2d: conv_pair, _MyConv: my_pair, nn.Linear: None},
        by_name={"head.*": head_pair, "head.fc": QuantPair(w, a), "stem.*": None},
        keep_float={"head.skip*"},
    )
    assert config.for_node("layer1.conv", nn.Conv2d) == conv_pair
    assert config.for_node("layer1.conv", _MyConv) == my_pair  # the most specific class wins
    assert config.for_node("fc", nn.Linear) is None  # a None module-type entry keeps it float
    assert (
        config.for_node("head.fc", nn.Linear) == head_pair
    )  # by_name beats by_module_type; first pattern wins
    assert config.for_node("stem.conv", nn.Conv2d) is None
    assert config.for_node("head.skip_add", None) is None  # keep_float beats by_name
    assert config.for_node("add_3", None) == QuantPair(w, a)
    assert config.for_node("relu", nn.ReLU) == QuantPair(w, a)


def test_with_bits():
    w = QuantSpec(signed=True, symmetric=True, axis=0)
    a = QuantSpec(signed=False, symmetric=False, reduce_range=True)
    first = QuantPair(w, a.replace(reduce_range=False))
    config = QuantConfig(weight=w, activation=a, by_name={"conv1": first}, keep_float={"fc"})
    four = config.with_bits(4)
    assert (four.weight.bits, four.activation.bits) == (4, 4)
    assert four.weight.axis == 0 and four.activation.quant_max == 15  # a 4-bit grid needs no reduce_range
    assert four.by_name == {"conv1": first} and four.keep_float == {"fc"}
    assert config.with_bits(8).activation.reduce_range  # 8 bits still overflows an int16 pair sum
    four.keep_float.add("x")
    assert config.keep_float == {"fc"}


def test_with_weight_bits_keeps_activations_and_drops_reduce_range_once_it_cannot_overflow():
    w = QuantSpec(signed=True, symmetric=True, axis=0)
    a = QuantSpec(signed=False, symmetric=False, reduce_range=True, observer="mse")
    config = QuantConfig(weight=w, activation=a, keep_float={"fc"})
    four = config.with_weight_bits(4)
    assert four.weight.bits == 4 and four.weight.axis == 0
    assert four.activation == a.replace(reduce_range=False)  # W4A8: 2·255·8 fits an int16 pair sum
    assert four.activation.quant_max == 255
    assert config.with_weight_bits(8).activation == a
    assert four.keep_float == {"fc"} and four.keep_float is not config.keep_float
