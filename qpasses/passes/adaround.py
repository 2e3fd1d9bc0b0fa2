"""AdaRound: learn, per weight, whether to round down or up (Nagel et al., "Up or Down?", 2020)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx

from qpasses.graph.links import activation_bounds
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.calibrate import progress
from qpasses.quant.layerwise import Layer, annotation_of, collect_batches, sweep
from qpasses.quant.lowering import FLOAT_WEIGHT_KEY, WEIGHT_QPARAMS_KEY, fake_quantize_weight, weight_qparams

ADAROUND_REPORT_KEY = "qpasses_adaround"
# Stretch of the rectified sigmoid, from the paper: h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1).
_GAMMA, _ZETA = -0.1, 1.1


@dataclass
class RoundingResult:
    """Reconstruction error (mean squared, on the calibration batches) of one layer's output after its activation."""

    layer: str
    nearest: float  # with round-to-nearest weights
    learned: float  # with the learned rounding
    flipped: int  # weights rounded the other way than nearest (0 when nearest was kept)
    kept: bool  # the learned rounding was kept (False: it reconstructed worse, nearest was kept)


def _per_channel(t: torch.Tensor, weight: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return t.reshape([1] * weight.dim())
    shape = [1] * weight.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _channel_extremes(weight: torch.Tensor, axis: int | None, largest: bool) -> torch.Tensor:
    if axis is None:
        value = weight.max() if largest else weight.min()
        return value.reshape([1] * weight.dim())
    dims = [d for d in range(weight.dim()) if d != axis]
    return weight.amax(dim=dims, keepdim=True) if largest else weight.amin(dim=dims, keepdim=True)


class AdaRound(Pass):
    """Adaptive rounding of conv/linear weights, layer by layer, on calibration data.

    Math: with ``s`` the weight scale lowering will use, each weight is ``s · (⌊w/s⌋ + h(V))`` where
    ``h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)`` (ζ = 1.1, γ = −0.1) starts at the fractional part of ``w/s``.
    ``V`` minimises ``‖f(W̃ x_q) − f(W x)‖²`` (``x_q``: the layer's input in the quantized model, with earlier
    layers already rounded; ``W x``: the float model's output; ``f``: the ReLU or clamp that alone reads the
    layer's output, identity without one, so errors the activation cuts off cost nothing, as in the paper's
    asymmetric reconstruction) ``+ λ Σ (1 − |2h(V) − 1|^β)``, the regulariser
    off for the first ``warmup`` fraction of ``iterations``, then with ``β`` annealed from ``beta[0]`` to
    ``beta[1]`` (cosine), pushing every ``h`` to 0 or 1. The result ``⌊w/s⌋ + [h ≥ ½]`` is one of the two
    grid points next to ``w``, within the layer's code range. A layer whose learned rounding reconstructs
    worse than round-to-nearest on the calibration batches (too few iterations) keeps round-to-nearest.

    The rounded weights are stored on their grid and the grid's qparams in ``node.meta['weight_qparams']``,
    which lowering uses, so its round-to-nearest keeps them; the weights that set each channel's min and
    max keep their float values (rounded to nearest, in the optimisation too) and no rounded weight moves
    beyond them.
    The float weights stay in ``node.meta['float_weight']`` until lowering: passes after it (BiasCorrection)
    measure quantization error against the float model, not the rounded one.
    Quantization settings come from the PTQ pass in the pipeline. Requires: ``calibrated``. Provides:
    ``weights_rounded``. Per layer, the reconstruction error with nearest and learned rounding is kept in
    ``gm.meta['qpasses_adaround']`` (:class:`RoundingResult`) and summarised in the report.
    """

    stage = Stage.QUANTIZE
    requires = frozenset({"calibrated"})
    provides = frozenset({"weights_rounded"})

    def __init__(self, data: Iterable, num_batches: int | None = None, iterations: int = 1000,
                 regularization: float = 0.01, beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2,
                 lr: float = 1e-3, seed: int = 0, progress: bool = True):
        if iterations < 1 or not 0 <= warmup < 1 or regularization < 0 or lr <= 0:
            raise ValueError("AdaRound needs iterations >= 1, 0 <= warmup < 1, regularization >= 0, lr > 0")
        self.data, self.num_batches = data, num_batches
        self.iterations, self.regularization, self.beta = iterations, regularization, beta
        self.warmup, self.lr, self.seed, self.progress = warmup, lr, seed, progress

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ann = annotation_of(gm, self.name)
        batches = collect_batches(self.data, gm, self.num_batches, self.name)
        results: list[RoundingResult] = []
        generator = torch.Generator().manual_seed(self.seed)
        ctx.stats["layers"] = sweep(gm, ann, batches, lambda layer: self._round(gm, layer, generator, results))
        ctx.stats["flipped"] = sum(r.flipped for r in results)
        kept = sum(r.kept for r in results)
        ctx.note(f"{kept} of {len(results)} layer(s) keep the learned rounding (the others reconstructed worse "
                 f"than round-to-nearest and keep it); total error {sum(r.nearest for r in results):.4g} → "
                 f"{sum(min(r.learned, r.nearest) for r in results):.4g}")
        gm.meta[ADAROUND_REPORT_KEY] = results
        return PassResult(gm, modified=True)

    def _beta(self, step: int) -> float | None:
        """The regulariser's exponent at ``step``, None during warm-up."""
        start = self.warmup * self.iterations
        if step < start:
            return None
        done = (step - start) / max(self.iterations - start, 1)
        high, low = self.beta
        return low + 0.5 * (high - low) * (1 + math.cos(math.pi * done))

    def _round(self, gm: fx.GraphModule, layer: Layer, generator: torch.Generator,
               results: list[RoundingResult]) -> torch.Tensor:
        spec = layer.spec
        activation = _activation(gm, layer)
        weight = layer.module.weight.detach()
        scale, zero_point = weight_qparams(weight, spec)
        # Lowering quantizes at exactly these qparams: observers whose range depends on every value (mse)
        # would otherwise pick another grid for the rounded weights.
        layer.node.meta[WEIGHT_QPARAMS_KEY] = (scale.clone(), zero_point.clone())
        nearest = fake_quantize_weight(weight, spec, (scale, zero_point))  # what lowering alone would do
        scale = _per_channel(scale.float(), weight, spec.axis)
        zero_point = _per_channel(zero_point.float(), weight, spec.axis)
        high, low = _channel_extremes(weight, spec.axis, True), _channel_extremes(weight, spec.axis, False)
        # Codes relative to the zero point, never beyond the weights that fix the scale.
        top = torch.minimum(torch.floor(high / scale), spec.quant_max - zero_point)
        bottom = torch.maximum(torch.ceil(low / scale), spec.quant_min - zero_point)
        floor = torch.floor(weight / scale)
        # The weights that fix each channel's range round to nearest (lowering rounds their float values), in the
        # optimisation too: the others' rounding must be learned with them in place. Fixed up only afterwards,
        # they undid the learned choice of depthwise convs (2 of 9 weights per channel).
        extremes = (weight == high) | (weight == low)
        fraction = (weight / scale - floor).clamp(0.0, 1.0 - 1e-6)
        v = (-torch.log((_ZETA - _GAMMA) / (fraction - _GAMMA) - 1)).requires_grad_(True)

        def soft(v: torch.Tensor) -> torch.Tensor:
            return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)

        def on_grid(h: torch.Tensor) -> torch.Tensor:
            return torch.where(extremes, nearest, torch.minimum(torch.maximum(floor + h, bottom), top) * scale)

        optimizer = torch.optim.Adam([v], lr=self.lr)
        steps = progress(range(self.iterations), self.iterations, f"AdaRound {layer.node.target}", self.progress)
        for step in steps:
            k = int(torch.randint(len(layer.quant_inputs), (1,), generator=generator))
            h = soft(v)
            loss = (activation(layer.run(layer.quant_inputs[k], on_grid(h)))
                    - activation(layer.float_outputs[k])).pow(2).mean()
            beta = self._beta(step)
            if beta is not None:
                loss = loss + self.regularization * (1 - (2 * h - 1).abs().pow(beta)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        with torch.no_grad():
            final = on_grid((soft(v) >= 0.5).float())
            nearest_error, learned_error = _error(layer, nearest, activation), _error(layer, final, activation)
            if learned_error > nearest_error:  # too few iterations to beat nearest here: keep nearest
                final = nearest
            results.append(RoundingResult(layer.node.target, nearest_error, learned_error,
                                          int((final != nearest).sum()), kept=final is not nearest))
            layer.node.meta.setdefault(FLOAT_WEIGHT_KEY, weight.clone())
            layer.module.weight.copy_(torch.where(extremes, weight, final))
        return final


def _activation(gm: fx.GraphModule, layer: Layer) -> Callable[[torch.Tensor], torch.Tensor]:
    """The clamp of the activation that alone reads ``layer``'s output, per channel (dim 1)."""
    reference = layer.float_outputs[0]
    lower, upper = activation_bounds(gm, layer.node, torch.zeros(reference.shape[1]))
    shape = (1, -1, *([1] * (reference.dim() - 2)))
    lower, upper = lower.reshape(shape), upper.reshape(shape)
    return lambda y: torch.clamp(y, lower, upper)


def _error(layer: Layer, weight: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> float:
    errors = [(activation(layer.run(x, weight)) - activation(y)).pow(2).mean()
              for x, y in zip(layer.quant_inputs, layer.float_outputs, strict=True)]
    return float(sum(errors) / len(errors))
