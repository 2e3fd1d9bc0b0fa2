import dataclasses
import math

import pytest
import torch
from torch import nn

from qpasses import PassManager
from qpasses.errors import PlanError
from qpasses.passes import PTQ, BiasCorrection, FuseBN
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.bias_correction import FloatTarget, _mean_matching_shift, _shift_variance, _shrink
from qpasses.quant.backends import get_backend
from qpasses.quant.layerwise import annotation_of
from qpasses.quant.lowering import weight_qparams, weight_spec
from qpasses.quant.ops import Role
from qpasses.quant.spec import QuantSpec
from qpasses.quant.state import WEIGHT_QPARAMS_KEY


def net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Conv2d):
                m.weight.add_(0.1)  # weights with a common offset: rounding errors do not average out
    model.train()
    with torch.no_grad():
        for x in batches(8, seed=100):
            model(x)  # BN statistics of this very data, so the analytical correction has something true to use
    return model.eval()


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) + 0.5 for _ in range(n)]


def w4a8(backend="qnnpack"):
    """4-bit weights, except the first layer: its input has no BN statistics, so the analytical correction
    cannot reach it and the comparison is about the layers it can correct."""
    config = get_backend(backend).default_config()
    return dataclasses.replace(config, weight=config.weight.replace(bits=4), by_name={"0": config.default_pair})


def mean_output_error(model, qm, data):
    with torch.no_grad():
        diff = torch.cat([qm(x) - model(x) for x in data])
    return float(diff.mean(dim=(0, 2, 3)).abs().mean())


@pytest.mark.parametrize("analytical", [False, True])
def test_reduces_the_mean_output_error(analytical):
    model = net()
    calib, evals = batches(6, seed=1), batches(6, seed=2)
    plain = PassManager([FuseBN(), PTQ(calib, backend="qnnpack", config=w4a8(), progress=False)]).run(model, calib[0])
    correction = BiasCorrection() if analytical else BiasCorrection(calib)
    pm = PassManager([FuseBN(), correction, PTQ(calib, backend="qnnpack", config=w4a8(), progress=False)])
    corrected = pm.run(model, calib[0])
    before, after = mean_output_error(model, plain, evals), mean_output_error(model, corrected, evals)
    assert after < 0.7 * before, (before, after)
    names = [r.name for r in pm.report.records]
    assert names.index("Calibrate") < names.index("BiasCorrection") < names.index("Lower")
    record = pm.report.records[names.index("BiasCorrection")]
    assert record.stats["corrected"] == (2 if analytical else 3)  # analytical: layers after a folded BN only


class PinCoarserWeightGrid(Pass):
    """Stands in for AdaRound: pins, for lowering, another weight grid than the observed one (3× its scale)."""

    stage = Stage.QUANTIZE
    requires = frozenset({"calibrated"})
    provides = frozenset({"weights_rounded"})

    def run(self, gm, ctx: PassContext) -> PassResult:
        ann = annotation_of(gm, self.name)
        for node in gm.graph.nodes:
            if ann.roles.get(node.name) is Role.COMPUTE:
                module = gm.get_submodule(node.target)
                scale, zero_point = weight_qparams(module.weight, weight_spec(module, ann.pairs[node.name].weight))
                node.meta[WEIGHT_QPARAMS_KEY] = (scale * 3, zero_point)
        return PassResult(gm, modified=True)


@pytest.mark.parametrize("analytical", [False, True])
def test_corrects_the_weight_grid_lowering_uses(analytical):
    model = net()
    calib, evals = batches(6, seed=1), batches(6, seed=2)

    def quantize(*passes):
        ptq = PTQ(calib, backend="qnnpack", config=w4a8(), progress=False)
        return PassManager([FuseBN(), PinCoarserWeightGrid(), *passes, ptq]).run(model, calib[0])

    plain, corrected = quantize(), quantize(BiasCorrection() if analytical else BiasCorrection(calib))
    before, after = mean_output_error(model, plain, evals), mean_output_error(model, corrected, evals)
    assert after < 0.5 * before, (before, after)


def test_needs_a_quantization_pass_in_the_pipeline():
    with pytest.raises(PlanError, match="calibrated"):
        PassManager([FuseBN(), BiasCorrection()]).plan(net())


def mostly_inactive():
    """A 1×1 conv + ReLU whose output channel is clipped at 90% of the positions. On the 4-bit grid (scale
    7 / 7.5) its weights −3.9 and 7 become −3.73 and 6.53. Clipped positions: input (10, 0), pre-activation
    −39 → −37.3 (+1.7, which ReLU discards). Active ones: input (0, 1), output 7 → 6.53 (−0.47)."""
    model = nn.Sequential(nn.Conv2d(2, 1, 1), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([-3.9, 7.0]).reshape(1, 2, 1, 1))
        model[0].bias.zero_()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        active = torch.rand(4, 1, 8, 8, generator=g) < 0.1
        data.append(torch.cat([(~active) * 10.0, active * 1.0], dim=1))
    return model, data


def test_empirical_correction_ignores_errors_the_activation_clips():
    model, data = mostly_inactive()
    config = dataclasses.replace(get_backend("qnnpack").default_config(), weight=QuantSpec(signed=True, symmetric=True,
                                                                                           bits=4))
    corrected = PassManager([BiasCorrection(data), PTQ(data, backend="qnnpack", config=config, progress=False)]).run(
        model, data[0])
    plain = PassManager([PTQ(data, backend="qnnpack", config=config, progress=False)]).run(model, data[0])
    with torch.no_grad():
        errors = [float(torch.cat([(qm(x) - model(x)).abs() for x in data]).max()) for qm in (plain, corrected)]
    # The mean over all positions (+1.5) would pull the active outputs down to about 5.1.
    assert errors[1] < 0.5 * errors[0], errors


def test_the_shift_undoes_an_offset_through_a_clipping_activation():
    g = torch.Generator().manual_seed(0)
    y = [torch.rand(4, 3, 5, 5, generator=g) * 12 - 3 for _ in range(3)]  # around ReLU6's [0, 6] on both sides
    offset = torch.tensor([0.5, -0.25, 0.0]).reshape(1, 3, 1, 1)
    quantized = [t + offset for t in y]
    lower, upper = torch.zeros(3), torch.full((3,), 6.0)
    shift = _mean_matching_shift(quantized, FloatTarget.of(y, lower, upper))
    assert torch.allclose(shift, offset.flatten(), atol=1e-5)
    unbounded = _mean_matching_shift(quantized, FloatTarget.of(y, torch.full((3,), -math.inf), torch.full((3,), math.inf)))
    assert torch.allclose(unbounded, offset.flatten(), atol=1e-5)  # no activation: the plain mean error


def test_the_shift_matches_the_mean_the_next_layer_reads_where_noise_crosses_the_clip():
    # Zero-mean noise around a mostly negative pre-activation: averaging y_q − y only where either passes the
    # ReLU counts the noise that lifts values above 0 and not the noise that keeps them below (biased up).
    g = torch.Generator().manual_seed(1)
    y = [torch.randn(8, 2, 6, 6, generator=g) - 1.5 for _ in range(4)]
    quantized = [t + torch.randn(t.shape, generator=g) for t in y]
    quantized[0][:, 1] = -5.0  # channel 1: every position stays clipped on both paths...
    for t in y:
        t[:, 1] = -5.0
    lower, upper = torch.zeros(2), torch.full((2,), math.inf)
    shift = _mean_matching_shift(quantized[:1], FloatTarget.of(y[:1], lower, upper))
    assert float(shift[1]) == 0.0  # ...so there is nothing to correct
    shift = _mean_matching_shift(quantized, FloatTarget.of(y, lower, upper))
    fed = torch.cat([torch.relu(t[:, 0] - shift[0]) for t in quantized]).mean()
    assert abs(float(fed) - float(torch.cat([torch.relu(t[:, 0]) for t in y]).mean())) < 1e-4


def test_a_linear_on_sequences_is_corrected_per_output_feature():
    # A transformer's linears read (batch, tokens, features): their channels are the last dim, not dim 1.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6)).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.add_(0.1)
    g = torch.Generator().manual_seed(3)
    calib, evals = ([torch.randn(4, 5, 8, generator=g) + 0.5 for _ in range(6)] for _ in range(2))
    config = dataclasses.replace(get_backend("qnnpack").default_config(),
                                 weight=get_backend("qnnpack").default_config().weight.replace(bits=4))

    def quantize(*passes):
        return PassManager([*passes, PTQ(calib, backend="qnnpack", config=config, progress=False)]).run(model, calib[0])

    def mean_error(qm):
        with torch.no_grad():
            return float(torch.cat([qm(x) - model(x) for x in evals]).mean(dim=(0, 1)).abs().mean())

    plain, corrected = quantize(), quantize(BiasCorrection(calib))
    assert mean_error(corrected) < 0.7 * mean_error(plain), (mean_error(plain), mean_error(corrected))


def shrunk(quantized, y, lower, upper):
    """The raw mean-matching shift and the one BiasCorrection keeps."""
    target = FloatTarget.of(y, lower, upper)
    shift = _mean_matching_shift(quantized, target)
    return shift, _shrink(shift, _shift_variance(quantized, target, shift))


def unclipped(channels):
    return torch.full((channels,), -math.inf), torch.full((channels,), math.inf)


@pytest.mark.parametrize("bounds", ["none", "relu6"])
def test_a_shift_the_samples_agree_on_keeps_nearly_all_its_correction(bounds):
    g = torch.Generator().manual_seed(0)
    y = [torch.rand(4, 16, 5, 5, generator=g) * 12 - 3 for _ in range(2)]  # 8 samples, around ReLU6's [0, 6]
    offset = torch.linspace(-0.5, 0.5, 16).reshape(1, 16, 1, 1)
    quantized = [t + offset + 0.1 * torch.randn(t.shape, generator=g) for t in y]  # + position noise: se ≈ 0.007
    lower, upper = unclipped(16) if bounds == "none" else (torch.zeros(16), torch.full((16,), 6.0))
    raw, kept = shrunk(quantized, y, lower, upper)
    assert torch.allclose(raw, offset.flatten(), atol=0.03)
    assert torch.allclose(kept, raw, rtol=0.02, atol=1e-3), (raw, kept)


def test_a_shift_that_is_noise_across_the_samples_is_shrunk_towards_zero():
    # Each sample's output moved by its own offset (mean 0 across samples): the 8 samples' mean error is noise
    # of about 0.5 / √8 per channel, which a correction would add to every other input.
    g = torch.Generator().manual_seed(0)
    y = [torch.randn(4, 128, 5, 5, generator=g) for _ in range(2)]
    quantized = [t + 0.5 * torch.randn(4, 128, 1, 1, generator=g) for t in y]
    raw, kept = shrunk(quantized, y, *unclipped(128))
    assert float(raw.abs().mean()) > 0.1
    assert float(kept.abs().mean()) < 0.2 * float(raw.abs().mean()), (raw, kept)


def test_with_one_sample_the_shift_is_kept_whole():
    g = torch.Generator().manual_seed(0)
    y = [torch.randn(1, 4, 5, 5, generator=g)]
    quantized = [y[0] + torch.randn(1, 4, 1, 1, generator=g)]
    target = FloatTarget.of(y, *unclipped(4))
    shift = _mean_matching_shift(quantized, target)
    assert _shift_variance(quantized, target, shift) is None
    assert torch.equal(_shrink(shift, None), shift)
