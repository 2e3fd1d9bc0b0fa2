import torch
from torch import nn

from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.graph.channels import output_stats
from qpasses.nn import ChannelClamp
from qpasses.passes import CLE, FuseBN, HighBiasAbsorption, ReplaceFunctional


def high_bias_net(act: nn.Module, consumer_padding: int = 0) -> nn.Sequential:
    """conv → BN → act → conv where the BN says every channel sits around 5 ± 0.5: a high bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), act, nn.Conv2d(6, 4, 3 if consumer_padding else 1,
                                                                                 padding=consumer_padding))
    bn = model[1]
    with torch.no_grad():
        model[0].weight.mul_(0.05)  # pre-activations stay within about ±0.5 of the BN's mean
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(0.5)
        bn.bias.copy_(torch.linspace(4.0, 6.0, 6))
    return model.eval()


def inputs(seed=0):
    return torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_exact_through_relu_that_never_clips():
    model = high_bias_net(nn.ReLU())
    x = inputs()
    pm = PassManager([FuseBN(), HighBiasAbsorption()])
    gm = pm.run(model, x)
    shift = torch.linspace(4.0, 6.0, 6) - 3 * 0.5  # β − 3|γ|
    with torch.no_grad():
        pre = model[1](model[0](x))
        assert bool((pre > shift.view(1, -1, 1, 1)).all())  # the shifted ReLU never clips
        assert sqnr(model(x), gm(x)) > 80
        # the absorbed part left the activation, channel by channel
        after = gm.get_submodule("2")(gm.get_submodule("0")(x))
        assert torch.allclose(after, pre - shift.view(1, -1, 1, 1), atol=1e-5)
    record = [r for r in pm.report.records if r.name == "HighBiasAbsorption"][0]
    assert record.stats["absorbed"] == 1 and record.stats["channels_shifted"] == 6
    assert torch.allclose(output_stats(gm)["0"].mean, torch.full((6,), 1.5), atol=1e-5)


def test_relu6_upper_bound_moves_with_the_shift():
    model = high_bias_net(nn.ReLU6())
    x = inputs()
    gm = PassManager([FuseBN(), CLE(), HighBiasAbsorption()]).run(model, x)
    clamp = gm.get_submodule("2")
    assert isinstance(clamp, ChannelClamp)
    equalized = PassManager([FuseBN(), CLE()]).run(model, x).get_submodule("2")
    assert bool((clamp.upper < equalized.upper - 1e-3).all())  # HBA lowered each channel's bound further
    assert torch.equal(clamp.lower, equalized.lower)
    with torch.no_grad():
        assert sqnr(model(x), gm(x)) > 80


def test_consumer_with_zero_padding_is_skipped():
    model = high_bias_net(nn.ReLU(), consumer_padding=1)
    pm = PassManager([FuseBN(), HighBiasAbsorption()])
    gm = pm.run(model, inputs())
    record = [r for r in pm.report.records if r.name == "HighBiasAbsorption"][0]
    assert record.stats.get("absorbed", 0) == 0
    assert any("zero padding" in note for note in record.notes)
    assert torch.equal(gm.get_submodule("0").bias, PassManager([FuseBN()]).run(model, inputs()).get_submodule("0").bias)


def test_clipping_relu_is_an_approximation_and_preserving_passes_after_it_still_verify():
    model = high_bias_net(nn.ReLU())
    with torch.no_grad():
        model[0].weight.mul_(200)  # now pre-activations often fall below μ − 3σ: absorption is approximate
    x = inputs()
    # ReplaceFunctional claims to preserve the function: it is verified against the output after HBA
    pm = PassManager([FuseBN(), HighBiasAbsorption(), ReplaceFunctional()])
    gm = pm.run(model, x)
    assert [r.name for r in pm.report.records] == ["trace", "FuseBN", "HighBiasAbsorption", "ReplaceFunctional"]
    with torch.no_grad():
        assert sqnr(model(x), gm(x)) < 60
