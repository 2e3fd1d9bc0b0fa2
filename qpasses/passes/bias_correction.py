"""BiasCorrection: remove the mean output shift that quantizing each layer's weights causes."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn

from qpasses.errors import QPassesError
from qpasses.graph.channels import constant_input_response, output_stats
from qpasses.graph.links import channel_bounds, find_links, link_activation
from qpasses.nn import SamePad2d
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.calibrate import batch_inputs
from qpasses.passes.insert_observers import ANNOTATION_KEY
from qpasses.quant.annotate import Annotation
from qpasses.quant.layerwise import Layer, sweep
from qpasses.quant.lowering import fake_quantize_weight, weight_spec
from qpasses.quant.ops import Role


def annotation_of(gm: fx.GraphModule, pass_name: str) -> Annotation:
    """The quantization decisions InsertObservers published on the graph (backend, specs per node)."""
    ann = gm.meta.get(ANNOTATION_KEY)
    if ann is None:
        raise QPassesError(f"{pass_name} needs the quantization settings of a PTQ pass in the same pipeline: "
                           f"add PTQ(data, backend=...) (or InsertObservers + Calibrate) to it")
    return ann


def collect_batches(data: Iterable, gm: fx.GraphModule, num_batches: int | None, pass_name: str) -> list[tuple]:
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    batches = []
    for batch in data:
        if num_batches is not None and len(batches) >= num_batches:
            break
        batches.append(tuple(t.detach() for t in batch_inputs(batch, n_inputs)))
    if not batches:
        raise QPassesError(f"{pass_name}: the data yielded no batches; give at least one")
    return batches


def _channel_mean(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over everything but the channel dim (dim 1, or the last dim of a linear layer's 2-D output)."""
    total = sum(o.transpose(0, 1).reshape(o.shape[1], -1).sum(dim=1) for o in outputs)
    count = sum(o.numel() // o.shape[1] for o in outputs)
    return total / count


def _clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``E[clamp(X, lo, hi)]`` for ``X ~ N(mean, std²)``, per channel."""
    std = std.clamp(min=1e-12)
    normal = torch.distributions.Normal(0.0, 1.0)
    a, b = (lo - mean) / std, (hi - mean) / std
    cdf_a, cdf_b = normal.cdf(a), normal.cdf(b)
    pdf_a, pdf_b = normal.log_prob(a).exp(), normal.log_prob(b).exp()
    inside = mean * (cdf_b - cdf_a) + std * (pdf_a - pdf_b)
    below = torch.where(torch.isfinite(lo), lo * cdf_a, torch.zeros_like(lo))
    above = torch.where(torch.isfinite(hi), hi * (1 - cdf_b), torch.zeros_like(hi))
    return inside + below + above


class BiasCorrection(Pass):
    """Subtract, per output channel, the mean error weight quantization adds: ``b ← b − E[(Q(W) − W) x]``.

    Empirical (``data`` given, Nagel et al. 2019 sec. 4.2 with data): calibration batches are propagated
    through the float model and, side by side, through the model as it will run quantized (weights on their
    grids, activations on their calibrated grids); layer by layer, in graph order, ``b ← b − (E[y_q] − E[y])``
    with ``y_q`` the layer's output on the quantized path, so each correction also absorbs the mean error
    that earlier layers and activation quantization leave.
    Analytical (``data=None``, data-free): ``E[x]`` of a layer's input channel is the mean of the previous
    layer's output, modelled as ``N(β, γ²)`` from its folded BatchNorm and clipped by the activation between;
    ``b ← b − Σ (Q(W) − W)[:, c, k] · E[x_c]``. Layers whose input has no BN statistics are left as they are.

    The quantization settings (backend, weight spec per layer, activation grids) are those InsertObservers
    chose for the PTQ pass in the same pipeline. Requires: ``calibrated``; runs after AdaRound when both are
    present (so it corrects the weights that will be lowered). Provides: ``bias_corrected``.
    """

    stage = Stage.QUANTIZE
    requires = frozenset({"calibrated"})
    after = frozenset({"weights_rounded"})
    provides = frozenset({"bias_corrected"})

    def __init__(self, data: Iterable | None = None, num_batches: int | None = None):
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be at least 1, got {num_batches}")
        self.data = data
        self.num_batches = num_batches

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ann = annotation_of(gm, self.name)
        if self.data is None:
            self._analytical(gm, ann, ctx)
        else:
            batches = collect_batches(self.data, gm, self.num_batches, self.name)
            ctx.stats["batches"] = len(batches)
            ctx.stats["corrected"] = sweep(gm, ann, batches, self._correct)
        return PassResult(gm, modified=ctx.stats["corrected"] > 0)

    @staticmethod
    def _correct(layer: Layer) -> torch.Tensor:
        weight = fake_quantize_weight(layer.module.weight, layer.spec)
        quantized = [layer.run(x, weight) for x in layer.quant_inputs]
        shift = _channel_mean(quantized) - _channel_mean(layer.float_outputs)
        with torch.no_grad():
            if layer.module.bias is None:
                layer.module.bias = nn.Parameter(-shift)
            else:
                layer.module.bias.sub_(shift)
        return weight

    @staticmethod
    def _analytical(gm: fx.GraphModule, ann: Annotation, ctx: PassContext) -> None:
        stats = output_stats(gm)
        for link in find_links(gm):
            node, producer = link.consumer, link.producer.target
            if ann.roles.get(node.name) is not Role.COMPUTE or producer not in stats:
                continue
            activation = link_activation(gm, link, also=(SamePad2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d))
            if activation is None and link.between:
                continue
            mean, std = stats[producer].mean, stats[producer].std
            if activation is None:
                expected_input = mean
            else:
                expected_input = _clipped_normal_mean(mean, std, *channel_bounds(gm, activation, mean))
            module = gm.get_submodule(node.target)
            spec = weight_spec(module, ann.pairs[node.name].weight)
            error = fake_quantize_weight(module.weight, spec) - module.weight.detach()
            shift = constant_input_response(module, expected_input, weight=error)
            with torch.no_grad():
                if module.bias is None:
                    module.bias = nn.Parameter(-shift)
                else:
                    module.bias.sub_(shift)
            ctx.stats["corrected"] += 1
