import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.graph.channels import input_channel_ranges, output_channel_ranges, output_stats
from qpasses.nn import ChannelClamp
from qpasses.passes import CLE, PTQ, FuseBN
from qpasses.passes.cle import CLE_REPORT_KEY
from tests.nets import randomize_bn

ACTS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky": lambda: nn.LeakyReLU(0.1), "identity": nn.Identity,
    "hardtanh": lambda: nn.Hardtanh(-1.0, 2.0),
}


def skew_channels(model: nn.Module, seed: int) -> nn.Module:
    """Give every output channel its own magnitude (spanning ~100×), so there is something to equalize."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                shape = (m.weight.shape[0],) + (1,) * (m.weight.dim() - 1)
                m.weight.mul_(torch.exp(torch.randn(shape, generator=g) * 1.5))
            elif isinstance(m, nn.ConvTranspose2d):
                shape = (1, m.weight.shape[1]) + (1,) * (m.weight.dim() - 2)
                m.weight.mul_(torch.exp(torch.randn(shape, generator=g) * 1.5))
    return model


def build(blocks: list[tuple[str, str, int]], head: bool, seed: int) -> nn.Sequential:
    """conv / grouped (groups=2) / depthwise / transposed conv blocks with BN and an activation; optionally
    pool → flatten → linear → act → linear."""
    torch.manual_seed(seed)
    layers, channels = [], 4
    for kind, act, width in blocks:
        if kind == "conv":
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width)]
            channels = width
        elif kind == "grouped":
            layers += [nn.Conv2d(channels, width, 3, padding=1, groups=2), nn.BatchNorm2d(width)]
            channels = width
        elif kind == "depthwise":
            layers += [nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False), nn.BatchNorm2d(channels)]
        elif kind == "transposed":
            layers += [nn.ConvTranspose2d(channels, width, 2, stride=2, groups=2), nn.BatchNorm2d(width)]
            channels = width
        layers.append(ACTS[act]())
    if head:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 6), nn.ReLU6(), nn.Linear(6, 3)]
    else:
        layers.append(nn.Conv2d(channels, 3, 1))
    return skew_channels(randomize_bn(nn.Sequential(*layers), seed), seed).eval()


def assert_equalized(gm, rtol=2e-2):
    links = gm.meta[CLE_REPORT_KEY]
    assert links
    for link in links:
        out_ranges, in_ranges = link.after
        both = (out_ranges > 1e-12) & (in_ranges > 1e-12)
        assert torch.allclose(out_ranges[both], in_ranges[both], rtol=rtol), (link.producer, link.consumer)
        # and equalization did something: channel ranges were not equal to begin with
        assert log_mismatch(link.before) > log_mismatch(link.after)


def log_mismatch(ranges):
    out_ranges, in_ranges = ranges
    both = (out_ranges > 1e-12) & (in_ranges > 1e-12)
    return float((out_ranges[both] / in_ranges[both]).log().abs().max())


blocks = st.lists(
    st.tuples(st.sampled_from(["conv", "grouped", "depthwise", "transposed"]), st.sampled_from(sorted(ACTS)),
              st.sampled_from([4, 6, 8])),
    min_size=1, max_size=4,
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=blocks, head=st.booleans(), seed=st.integers(0, 1000))
def test_random_nets_keep_their_function_and_get_equalized(blocks, head, seed):
    model = build(blocks, head, seed)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    pm = PassManager([FuseBN(), CLE()])  # verifies SQNR >= 60 dB against the original after CLE
    gm = pm.run(model, x)
    with torch.no_grad():
        assert sqnr(model(x), gm(x)) > 60
    assert_equalized(gm)
    # clipping activations became per-channel clamps, never plain ReLUs
    clipping = sum(isinstance(m, nn.ReLU6 | nn.Hardtanh) for m in model.modules())
    remaining = sum(isinstance(m, nn.ReLU6 | nn.Hardtanh) for m in gm.modules())
    assert remaining + sum(isinstance(m, ChannelClamp) for m in gm.modules()) == clipping


def test_triplet_balances_all_three_ranges():
    model = build([("conv", "relu6", 8), ("depthwise", "relu6", 8)], head=False, seed=3)
    pm = PassManager([FuseBN(), CLE()])
    gm = pm.run(model, torch.randn(1, 4, 8, 8))
    record = [r for r in pm.report.records if r.name == "CLE"][0]
    assert record.stats["triplets"] == 1 and record.stats.get("pairs", 0) == 0
    first, depthwise, last = gm.get_submodule("0"), gm.get_submodule("3"), gm.get_submodule("6")
    r1, r2, r3 = output_channel_ranges(first), output_channel_ranges(depthwise), input_channel_ranges(last)
    assert torch.allclose(r1, r2, rtol=1e-2) and torch.allclose(r2, r3, rtol=1e-2)
    spread_before = float(output_channel_ranges(model.get_submodule("3")).max() / output_channel_ranges(model.get_submodule("3")).min())
    assert spread_before > 2


def test_grouped_conv_ranges_are_read_per_group():
    conv = nn.Conv2d(4, 6, 1, groups=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 13.0).reshape(6, 2, 1, 1))
    # group 0: outputs 0-2 read inputs 0-1; group 1: outputs 3-5 read inputs 2-3
    assert input_channel_ranges(conv).tolist() == [5.0, 6.0, 11.0, 12.0]
    assert output_channel_ranges(conv).tolist() == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    transposed = nn.ConvTranspose2d(4, 6, 1, groups=2, bias=False)  # weight [in, out / groups]
    with torch.no_grad():
        transposed.weight.copy_(torch.arange(1.0, 13.0).reshape(4, 3, 1, 1))
    assert input_channel_ranges(transposed).tolist() == [3.0, 6.0, 9.0, 12.0]
    assert output_channel_ranges(transposed).tolist() == [4.0, 5.0, 6.0, 10.0, 11.0, 12.0]


def test_relu6_that_really_clips_is_kept_exactly():
    model = build([("conv", "relu6", 8), ("conv", "relu6", 8)], head=False, seed=1)
    with torch.no_grad():
        model[0].weight.mul_(20)  # pre-activations far beyond 6: ReLU6 clips a lot
    x = torch.randn(2, 4, 8, 8)
    gm = PassManager([FuseBN(), CLE()]).run(model, x)
    clamps = [m for m in gm.modules() if isinstance(m, ChannelClamp)]
    assert len(clamps) == 2 and not clamps[0].uniform
    with torch.no_grad():
        assert sqnr(model(x), gm(x)) > 60


@pytest.mark.parametrize("backend", ["qnnpack", "x86"])
def test_per_channel_clamp_survives_lowering(backend):
    model = build([("conv", "relu6", 8), ("depthwise", "relu6", 8)], head=False, seed=2)
    data = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    qm = PassManager([FuseBN(), CLE(), PTQ(data, backend=backend, progress=False)]).run(model, data[0])
    kept = [m for m in qm.modules() if isinstance(m, ChannelClamp)]
    assert kept and all(not m.uniform for m in kept)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert sqnr(model(x), qm(x)) > 20


def test_channel_clamp_on_codes_equals_dequantize_clamp_quantize():
    clamp = ChannelClamp(torch.tensor([0.0, -1.0, 0.5]), torch.tensor([1.0, 2.5, 0.7]))
    x = torch.randn(2, 3, 5, 5) * 2
    q = torch.quantize_per_tensor(x, 0.03, 100, torch.quint8)
    expected = torch.quantize_per_tensor(clamp(q.dequantize()), 0.03, 100, torch.quint8)
    assert torch.equal(clamp(q).int_repr(), expected.int_repr())
    assert torch.equal(clamp(x), torch.maximum(torch.minimum(x, clamp.upper.view(1, 3, 1, 1)), clamp.lower.view(1, 3, 1, 1)))


def test_cle_requires_folded_bn_and_inserts_it():
    model = build([("conv", "relu", 4)], head=False, seed=0)
    plan = PassManager([CLE()]).plan(model)
    assert [p.name for p in plan.passes] == ["FuseBN", "CLE"]
    with pytest.raises(ValueError, match="tolerance"):
        CLE(tolerance=0)


def test_shared_and_branching_layers_are_left_alone():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h) + self.c(h)  # h has two readers: rescaling it would need both to agree

    model = skew_channels(Branchy(), 0).eval()
    pm = PassManager([FuseBN(), CLE()])
    gm = pm.run(model, torch.randn(1, 3, 4, 4))
    assert [r for r in pm.report.records if r.name == "CLE"][0].stats["links"] == 0
    assert torch.equal(gm.a.weight, model.a.weight)


def test_does_not_mutate_the_users_model():
    model = build([("conv", "relu6", 8), ("depthwise", "relu", 8)], head=True, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    PassManager([FuseBN(), CLE()]).run(model, torch.randn(1, 4, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pretrained_lite0_small_inputs_keeps_function_and_equalizes():
    from tools.bench.common import pretrained_lite0

    model = pretrained_lite0()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pm = PassManager([FuseBN(), CLE()])
    gm = pm.run(model, x)
    with torch.no_grad():
        assert sqnr(model(x), gm(x)) > 60
    stats = [r for r in pm.report.records if r.name == "CLE"][0].stats
    assert stats["triplets"] >= 16  # every conv → depthwise → conv of the 16 blocks
    assert stats["clamps"] > 0
    assert_equalized(gm)


def test_activation_growth_bounds_the_estimated_activation_ranges():
    model = build([("conv", "relu", 8), ("depthwise", "relu", 8), ("conv", "relu", 6)], head=False, seed=7)
    x = torch.randn(2, 4, 8, 8)

    def estimates(gm):
        return {name: torch.clamp(s.mean + 3 * s.std, min=0) for name, s in output_stats(gm).items()}

    folded = estimates(PassManager([FuseBN()]).run(model, x))
    free = estimates(PassManager([FuseBN(), CLE()]).run(model, x))
    bounded_gm = PassManager([FuseBN(), CLE(activation_growth=1.0)]).run(model, x)  # still verified exact
    bounded = estimates(bounded_gm)
    # the last layer's output feeds no link: only producers of links are bounded
    for name in ("0", "3", "6"):
        assert float(bounded[name].max()) <= float(folded[name].max()) * 1.01
    assert any(float(free[n].max()) > float(folded[n].max()) * 1.5 for n in ("0", "3", "6"))
