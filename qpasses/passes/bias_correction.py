"""BiasCorrection: remove the mean output shift that quantizing each layer's weights causes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from qpasses import distributed
from qpasses.graph.channels import constant_input_response, output_stats
from qpasses.graph.links import activation_bounds, channel_bounds, find_links, link_activation
from qpasses.nn import SamePad2d
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.quant.annotate import Annotation
from qpasses.quant.layerwise import Layer, Simulation, annotation_of, collect_shard, sweep
from qpasses.quant.lowering import fake_quantize_weight, float_weight, weight_spec
from qpasses.quant.observers import Observer
from qpasses.quant.ops import Role
from qpasses.quant.state import WEIGHT_QPARAMS_KEY
from qpasses.validation import check_count, check_data


def _channels_on_dim_1(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer's output with its channels on dim 1: a linear's are its last dim, after any (batch, sequence)
    dims, e.g. a transformer's ``(batch, tokens, features)``."""
    return y.movedim(-1, 1) if isinstance(module, nn.Linear) and y.dim() > 2 else y


def _by_channel(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (channels, everything else): channels on dim 1 (see ``_channels_on_dim_1``)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _clamped_sums(y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                  shift: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per sample (dim 0) and channel (dim 1), the sum of ``clamp(y − shift, lower, upper)`` over the positions
    of one batch's ``y``, as ``(samples, channels)``, and the number of positions of one sample."""
    y = y.reshape(y.shape[0], y.shape[1], -1)
    return torch.clamp(y - shift[:, None], lower[:, None], upper[:, None]).sum(dim=2), y.shape[2]


@dataclass
class SampleSums:
    """Per-sample clamped sums of every batch, gathered in batch order: ``sums`` ``(samples, channels)`` with
    ``positions[s]`` the positions sample ``s`` sums over."""

    sums: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def gather(cls, parts: dict[int, tuple[torch.Tensor, int]], like: torch.Tensor) -> SampleSums:
        """The ``_clamped_sums`` of each batch by batch index; under torch.distributed every rank's batches."""
        parts = distributed.gather_indexed(parts)
        sums = torch.cat([batch_sums.to(like.device) for batch_sums, _ in parts])
        positions = torch.cat([torch.full((len(batch_sums),), count, dtype=like.dtype, device=like.device)
                               for batch_sums, count in parts])
        return cls(sums, positions)

    def mean(self) -> torch.Tensor:
        """Per channel, the mean over every position of every sample."""
        return self.sums.sum(dim=0) / self.positions.sum()


@dataclass
class FloatTarget:
    """What the float model's output ``y`` of one layer tells its correction, per batch (by index), kept instead
    of the outputs themselves: per sample and channel the sum of ``f(y)`` (``f`` the clamp to ``(lower,
    upper)``) with the number of positions of a sample, and per channel ``max |y|``."""

    lower: torch.Tensor
    upper: torch.Tensor
    sums: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    peaks: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, index: int, y: torch.Tensor) -> None:
        """Count batch ``index``'s output ``y`` (channels on dim 1)."""
        self.sums[index] = _clamped_sums(y, self.lower, self.upper, torch.zeros_like(self.lower))
        self.peaks[index] = _by_channel(y).abs().amax(dim=1)

    @classmethod
    def of(cls, outputs: list[torch.Tensor], lower: torch.Tensor, upper: torch.Tensor,
           indices: list[int] | None = None) -> FloatTarget:
        """The target of ``outputs``, the batches ``indices`` (default: all)."""
        target = cls(lower, upper)
        for i, y in zip(range(len(outputs)) if indices is None else indices, outputs, strict=True):
            target.add(i, y)
        return target


def _mean_matching_shift(quantized: list[torch.Tensor], target: FloatTarget, steps: int = 40,
                         indices: list[int] | None = None) -> torch.Tensor:
    """Per channel, the shift ``δ`` of smallest magnitude with ``E[f(y_q − δ)] = E[f(y)]``, ``f`` the clamp to
    ``(target.lower, target.upper)``: the next layer then reads the float model's mean input. Without an
    activation it is ``E[y_q − y]``. ``E[f(y_q − δ)]`` falls monotonically in ``δ``, so bisection from ``0``
    finds it. ``quantized`` holds the batches ``indices`` (default: all; this rank's, under torch.distributed),
    ``target`` the float outputs' sums of the same batches."""
    indices = list(range(len(quantized))) if indices is None else indices
    lower = target.lower
    goal = SampleSums.gather(target.sums, lower).mean()

    def gap(shift: torch.Tensor) -> torch.Tensor:
        return _quantized_sums(quantized, target, shift, indices).mean() - goal

    reach = torch.zeros_like(lower)  # |δ| ≤ max|y_q| + max|y|: past it every y_q − δ is clipped or beyond y
    peaks = {i: _by_channel(yq).abs().amax(dim=1) + target.peaks[i] for i, yq in zip(indices, quantized, strict=True)}
    for peak in distributed.gather_indexed(peaks):
        reach = torch.maximum(reach, peak.to(reach.device))
    direction = torch.sign(gap(torch.zeros_like(lower)))
    near, far = torch.zeros_like(lower), direction * reach  # the gap keeps direction's sign at near, not at far
    for _ in range(steps):
        middle = (near + far) / 2
        same_side = torch.sign(gap(middle)) == direction
        near, far = torch.where(same_side, middle, near), torch.where(same_side, far, middle)
    return far


def _quantized_sums(quantized: list[torch.Tensor], target: FloatTarget, shift: torch.Tensor,
                    indices: list[int]) -> SampleSums:
    """The per-sample sums of ``f(y_q − shift)`` over every rank's batches."""
    return SampleSums.gather({i: _clamped_sums(y, target.lower, target.upper, shift)
                              for i, y in zip(indices, quantized, strict=True)}, shift)


def _unclipped_fraction(quantized: list[torch.Tensor], target: FloatTarget, shift: torch.Tensor,
                        indices: list[int]) -> torch.Tensor:
    """Per channel, the fraction of positions where ``y_q − shift`` lies strictly inside the clamp's bounds:
    ``−d/dδ E[f(y_q − δ)]`` at ``shift``."""
    counts = {}
    for i, y in zip(indices, quantized, strict=True):
        moved = y.reshape(y.shape[0], y.shape[1], -1) - shift[:, None]
        inside = (moved > target.lower[:, None]) & (moved < target.upper[:, None])
        counts[i] = (inside.sum(dim=2).to(shift.dtype), moved.shape[2])
    return SampleSums.gather(counts, shift).mean()


def _shift_variance(quantized: list[torch.Tensor], target: FloatTarget, shift: torch.Tensor,
                    indices: list[int] | None = None) -> torch.Tensor | None:
    """Per channel, the squared standard error of ``_mean_matching_shift``'s ``shift`` over the samples (the
    entries of dim 0 of every batch), ``None`` with one sample (see ``BiasCorrection``)."""
    indices = list(range(len(quantized))) if indices is None else indices
    moved, goal = _quantized_sums(quantized, target, shift, indices), SampleSums.gather(target.sums, shift)
    samples = len(moved.positions)
    if samples < 2:
        return None
    residual = moved.sums - goal.sums  # per sample, n_s · g_s(δ)
    total = moved.positions.sum()
    deviations = residual - moved.positions[:, None] * (residual.sum(dim=0) / total)
    gap_variance = samples / (samples - 1) * deviations.square().sum(dim=0) / total ** 2
    slope = _unclipped_fraction(quantized, target, shift, indices)
    return gap_variance / slope.clamp(min=torch.finfo(shift.dtype).eps) ** 2


def _shrink(shift: torch.Tensor, variance: torch.Tensor | None) -> torch.Tensor:
    """Each channel's ``shift`` times ``τ² / (τ² + variance)``, ``τ²`` the layer's spread of true shifts
    estimated from all its channels (see ``BiasCorrection``); ``shift`` whole without a ``variance``."""
    if variance is None:  # one sample: no spread to judge against
        return shift
    prior = (shift.square() - variance).mean().clamp(min=0)
    return torch.where(variance > 0, shift * prior / (prior + variance).clamp(min=torch.finfo(shift.dtype).tiny),
                       shift)


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
    through the float model and through the model as it will run quantized, the reference graph's simulation
    of the backend's int codes (``qpasses.quant.layerwise``); layer by layer, in graph order, ``b ← b − δ`` with ``δ``
    (per channel, smallest ``|δ|``) solving ``E[f(y_q − δ)] = E[f(y)]``: ``y_q`` the layer's output on the
    quantized path, so each correction also absorbs the mean error that earlier layers and activation
    quantization leave, and ``f`` the ReLU or clamp that alone reads the layer (identity without one, where
    ``δ = E[y_q − y]``): the next layer then reads the float model's mean input. Matching the means before
    the activation instead corrects errors it clips away: on pretrained Lite0 the plain mean corrected its
    head for errors ReLU6 discards, costing ~5 dB of logit SQNR; and averaging only where ``y`` or ``y_q`` is
    unclipped is biased wherever the error is large (at 4 bits): the positions a positive error lifts above
    a ReLU's 0 are counted, those it leaves below are not.

    Shrinkage: ``δ̂`` is measured on a few calibration samples, and where the error it corrects changes from
    sample to sample it is partly those samples' noise, which the bias would then add to every other input
    (BENCHMARKS.md, coverage). So each channel keeps ``δ̂`` only as far as it stands out of its standard error ``s``:
    ``b ← b − δ̂ · τ² / (τ² + s²)``. ``s`` per channel, over the samples (the entries of dim 0 of every batch;
    sample ``k`` has ``n_k`` positions): with ``g_k(δ) = Σ_k f(y_q − δ) − Σ_k f(y)`` (sums over sample ``k``'s
    positions), the gap ``G(δ) = Σ_k g_k(δ) / N`` (``N = Σ n_k``) is 0 at ``δ̂``; as the mean of ``S``
    independent samples' clusters, ``Var G = S/(S−1) · Σ_k (g_k − n_k G)² / N²``, and by the delta method
    ``s² = Var G / p²`` with ``p = −dG/dδ``, the fraction of positions where ``y_q − δ̂`` lies strictly
    inside ``f``'s bounds (without an activation ``p = 1`` and ``s`` is the standard error of the per-sample
    mean errors). ``τ²/(τ² + s²)`` is the posterior mean's factor under a normal prior ``δ ~ N(0, τ²)`` over the
    layer's channels with ``δ̂ ~ N(δ, s²)``: the scale that minimises the expected squared bias the correction
    leaves on new inputs. ``τ²`` is estimated from the layer's channels, ``max(0, mean_c(δ̂_c² − s_c²))``
    (empirical Bayes, the moment form: unbiased, as ``E[δ̂²] = τ² + s²``, and, unlike the maximum-likelihood
    form, not weighted by the noisy ``s`` of 8 samples). A shift the samples agree on (``s ≪ |δ̂|``) is kept
    almost whole; a layer whose shifts are no larger than their noise is left nearly uncorrected; a channel
    with ``s = 0`` keeps its ``δ̂``. With one sample there is no spread to judge against and ``δ̂`` is kept whole.
    Memory: the float model runs first, one batch at a time, and only per-sample, per-channel sums of each
    layer's output are kept (``FloatTarget``); the quantized path then keeps each batch's int8 values as codes
    between layers, and holds one layer's output of every batch while it decides that layer's ``δ``.
    Under torch.distributed each rank propagates its share of the batches (batch ``i`` on rank
    ``i % world_size``) and the per-sample sums are gathered in batch order: every rank gets the biases one
    process would.
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
        self.data = check_data(data, self.name, optional=True)
        self.num_batches = check_count(num_batches, "num_batches", self.name)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ann = annotation_of(gm, self.name)
        if self.data is None:
            self._analytical(gm, ann, ctx)
        else:
            indices, batches, ctx.stats["batches"] = collect_shard(self.data, gm, self.num_batches, self.name)
            simulation = Simulation(gm, ann)
            targets = self._float_targets(gm, simulation, batches, indices)
            ctx.stats["corrected"] = sweep(gm, ann, batches, lambda layer: self._correct(layer, targets[layer.node],
                                                                                         indices),
                                           simulation, float_path=False)
        return PassResult(gm, modified=ctx.stats["corrected"] > 0)

    @staticmethod
    def _float_targets(gm: fx.GraphModule, simulation: Simulation, batches: list[tuple],
                       indices: list[int]) -> dict[fx.Node, FloatTarget]:
        """Each layer's ``FloatTarget``, from the float path run one batch at a time: the float outputs of every
        batch are never held at once."""
        targets: dict[fx.Node, FloatTarget] = {}
        for index, batch in zip(indices, batches, strict=True):
            for node, y in simulation.float_outputs(batch):
                y = _channels_on_dim_1(gm.get_submodule(node.target), y)
                if node not in targets:
                    targets[node] = FloatTarget(*activation_bounds(gm, node, y.new_zeros(y.shape[1])))
                targets[node].add(index, y)
        return targets

    @staticmethod
    def _correct(layer: Layer, target: FloatTarget, indices: list[int]) -> torch.Tensor:
        # On the grid lowering will use: the one AdaRound pinned, if it ran.
        weight = fake_quantize_weight(layer.module.weight, layer.spec, layer.node.meta.get(WEIGHT_QPARAMS_KEY))
        quantized = [_channels_on_dim_1(layer.module, layer.run(x, weight)) for x in layer.quant_inputs]
        shift = _mean_matching_shift(quantized, target, indices=indices)
        shift = _shrink(shift, _shift_variance(quantized, target, shift, indices))
        with torch.no_grad():
            if layer.module.bias is None:
                layer.module.bias = nn.Parameter(-shift)
            else:
                layer.module.bias.sub_(shift)
        return weight

    @staticmethod
    def _analytical(gm: fx.GraphModule, ann: Annotation, ctx: PassContext) -> None:
        stats = output_stats(gm)
        for link in find_links(gm, through=(Observer,)):
            node, producer = link.consumer, link.producer.target
            if ann.roles.get(node.name) is not Role.COMPUTE or producer not in stats:
                continue
            activation = link_activation(gm, link, also=(Observer, SamePad2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d))
            if activation is None and any(not isinstance(gm.get_submodule(n.target), Observer)
                                          for n in link.between if n.op == "call_module"):
                continue
            mean, std = stats[producer].mean, stats[producer].std
            if activation is None:
                expected_input = mean
            else:
                expected_input = _clipped_normal_mean(mean, std, *channel_bounds(gm, activation, mean))
            module = gm.get_submodule(node.target)
            spec = weight_spec(module, ann.pairs[node.name].weight)
            error = fake_quantize_weight(module.weight, spec, node.meta.get(WEIGHT_QPARAMS_KEY)) - float_weight(node, module)
            shift = constant_input_response(module, expected_input, weight=error)
            with torch.no_grad():
                if module.bias is None:
                    module.bias = nn.Parameter(-shift)
                else:
                    module.bias.sub_(shift)
            ctx.stats["corrected"] += 1
