"""AdaRound: learn, per weight, whether to round down or up (Nagel et al., "Up or Down?", 2020)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qpasses import distributed
from qpasses.errors import InputError
from qpasses.graph.channels import out_channels
from qpasses.graph.regions import parent_module
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.calibrate import progress
from qpasses.quant.layerwise import Block, annotation_of, collect_batches, sweep_blocks
from qpasses.quant.lowering import fake_quantize_weight, weight_qparams, weight_spec
from qpasses.quant.ops import Role
from qpasses.quant.spec import QuantSpec
from qpasses.quant.state import FLOAT_WEIGHT_KEY, WEIGHT_QPARAMS_KEY
from qpasses.validation import check_count, check_data

ADAROUND_REPORT_KEY = "qpasses_adaround"
# Stretch of the rectified sigmoid, from the paper: h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1).
_GAMMA, _ZETA = -0.1, 1.1


@dataclass
class RoundingResult:
    """Reconstruction error (mean squared, on the calibration batches) of one block's output after its activation."""

    layers: str  # the block's layers, comma-separated
    nearest: float  # with round-to-nearest weights
    learned: float  # with the learned rounding
    flipped: int  # weights rounded the other way than nearest (0 when nearest was kept)
    kept: bool  # the learned rounding was kept (False: it reconstructed worse, nearest was kept)


@dataclass(frozen=True)
class RoundedWeight:
    """One layer's parameters as AdaRound left them: ``weight`` on the grid of ``spec`` at ``qparams`` (the
    grid lowering must quantize it at), and ``bias`` where it learned one (``rescale``; else None, the layer's
    own is kept). ``learned_on``: a fingerprint of the data its block learned from (``_fingerprint``), which
    ``AdaRound(reuse=...)`` compares."""

    spec: QuantSpec
    weight: torch.Tensor
    qparams: tuple[torch.Tensor, torch.Tensor]
    bias: torch.Tensor | None = None
    learned_on: tuple[float, ...] | None = None

    @torch.no_grad()
    def apply(self, node: fx.Node, module: nn.Module) -> None:
        """Put these parameters in ``module`` (called by ``node``) and pin their grid; keep the float weight,
        which passes after it (BiasCorrection) measure quantization error against."""
        if self.bias is not None:
            if module.bias is None:
                module.bias = nn.Parameter(self.bias.clone())
            else:
                module.bias.copy_(self.bias)
        # Lowering quantizes at exactly these qparams: observers whose range depends on every value (mse)
        # would otherwise pick another grid for the rounded weights.
        node.meta[WEIGHT_QPARAMS_KEY] = tuple(t.clone() for t in self.qparams)
        node.meta.setdefault(FLOAT_WEIGHT_KEY, module.weight.detach().clone())
        module.weight.copy_(self.weight)


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
    """Adaptive rounding of conv/linear weights, layer by layer (or block by block), on calibration data.

    Math: with ``s`` the weight scale lowering will use, each weight is ``s · (⌊w/s⌋ + h(V))`` where
    ``h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)`` (ζ = 1.1, γ = −0.1) starts at the fractional part of ``w/s``.
    ``V`` minimises ``‖f(F(W̃; x_q)) − f(F(W; x))‖² + λ Σ (1 − |2h(V) − 1|^β)``, where ``F`` is one layer
    (``granularity="layer"``, as in the paper) or one block of the graph (``"block"``, BRECQ: Li et al.,
    2021); ``x_q`` its input in the quantized model (the reference graph's simulation of the int8 kernels,
    ``qpasses.quant.layerwise``), with earlier blocks already rounded, and activations quantized inside the
    block (gradients passed straight through); ``F(W; x)`` the float model's output;
    ``f`` the ReLU or clamp that alone reads that output, identity without one, so errors it cuts off cost
    nothing (the paper's asymmetric reconstruction). A block is a single-entry, single-exit region of the
    graph whose layers share a parent module (an inverted-residual or residual block, with its skip
    connection); a layer outside any such region is its own block. All the block's ``V`` are learned
    jointly, so a layer's rounding can undo the error of the layers before it in the block. Blocks have more
    free choices per constraint than layers and need more data: on Lite0 at 224×224 with 64 crops they match
    layer by layer (and take less time), on 16 crops at 96×96 they reconstruct worse (BENCHMARKS.md, dfq).
    With ``rescale``, each layer also learns a gain ``g`` per output channel (one for per-tensor weights) and
    a bias shift ``δ``, jointly with ``V``: its weight is ``g · s · (⌊w/s⌋ + h(V))`` and its bias ``b + δ``.
    Both are exact in the int8 model: the gain moves the weight's scale to ``g · s`` (codes unchanged),
    the shift is folded into the bias. They undo the systematic part of the rounding error (a channel's
    gain shrunk or grown by it, the mean shift bias correction removes) that ±1 steps only approximate.
    The regulariser is off for the first ``warmup`` fraction of ``iterations``, then ``β`` is annealed from
    ``beta[0]`` to ``beta[1]`` (cosine), pushing every ``h`` to 0 or 1. The result ``⌊w/s⌋ + [h ≥ ½]`` is
    one of the two grid points next to ``w``, within the layer's code range. The soft ``h`` can reconstruct
    far better than any hard choice, and where the loss outweighs the regulariser some ``h`` stay undecided
    at the end (pretrained Lite0 W4, blocks.0.0 at 1000 iterations: a fifth of them, and a hard rounding
    worse than nearest). So ``checkpoints`` times during the annealing the hard rounding is measured on all
    calibration batches, and the best one seen is kept; if even that reconstructs worse than
    round-to-nearest, the block keeps round-to-nearest.

    Each step reconstructs one calibration batch, drawn at random (a block's draws are seeded by ``seed`` and
    its layers' names). With ``rows``, a block that is a single conv2d or linear layer (every block with
    ``granularity="layer"``) instead reconstructs about ``rows`` output positions per step (at most as many as
    one batch has), drawn uniformly from all batches: for a conv, tiles of up to 8×8 positions at random
    corners of random samples (whole samples where the map is smaller), each computed from its input tile.
    Tiles from every sample are far less alike than one batch's images, so on the large early maps of a CNN a
    step costs a fraction of a whole batch's and learns about as much (BENCHMARKS.md, "AdaRound on sampled
    rows"). The checkpoints then measure each hard rounding on 4 fixed draws, and the best one against
    round-to-nearest on all batches. Memory: besides the codes of the block's input and its float output for
    every batch, which the sweep holds anyway, a float copy of the layer's input for every batch (padded: for
    Lite0's widest input at 224×224, 96×113×113 values per sample, 4.9 MB), and per step the drawn tiles.

    ``reuse`` (the ``rounded`` of an earlier run, with the same settings, on the same model): a block whose
    layers were all rounded there on the grids they have here, from the same data (the block's quantized input
    and float output on every batch, and its layers' float weights and biases, compared by a fingerprint of
    sums), takes that rounding, the one it would learn again (the draws are seeded per block), and learns
    nothing. AdaRound learns with the layers a configuration keeps float (``QuantConfig.keep_float``) float,
    as the simulation runs them, so with ``reuse`` a run keeping some layers float learns again exactly the
    layers whose input they change (those after them) and reuses the others' rounding.

    The rounded weights are stored on their grid and the grid's qparams in ``node.meta['weight_qparams']``,
    which lowering uses, so its round-to-nearest keeps them; the weights that set each channel's min and
    max round to nearest (in the optimisation too) and no rounded weight moves beyond them.
    The float weights stay in ``node.meta['float_weight']`` until lowering: passes after it (BiasCorrection)
    measure quantization error against the float model, not the rounded one.
    Quantization settings come from the PTQ pass in the pipeline. Requires: ``calibrated``. Provides:
    ``weights_rounded``. Per block, the reconstruction error with nearest and learned rounding is kept in
    ``gm.meta['qpasses_adaround']`` (:class:`RoundingResult`) and summarised in the report.
    Under torch.distributed every rank gets the same rounding as one process. Each optimisation step depends
    on the one before, and each layer's input on the rounding of the layers before it, so the steps run on
    every rank; the reconstruction errors measured on all batches (the checkpoints) are split over the ranks.
    It runs on the device the model is on (a GPU: ``model.cuda()`` before the pipeline).
    """

    stage = Stage.QUANTIZE
    requires = frozenset({"calibrated"})
    provides = frozenset({"weights_rounded"})

    def __init__(self, data: Iterable, num_batches: int | None = None, iterations: int = 1000,
                 regularization: float = 0.01, beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2,
                 lr: float = 1e-3, granularity: Literal["block", "layer"] = "layer", rescale: bool = False,
                 checkpoints: int = 10, rows: int | None = None, seed: int = 0,
                 reuse: Mapping[str, RoundedWeight] | None = None, progress: bool = True):
        check_count(iterations, "iterations", self.name, optional=False)
        check_count(checkpoints, "checkpoints", self.name, optional=False)
        check_count(rows, "rows", self.name)
        if not 0 <= warmup < 1 or regularization < 0 or lr <= 0:
            raise InputError(f"AdaRound needs 0 <= warmup < 1, regularization >= 0, lr > 0; got warmup={warmup!r}, "
                             f"regularization={regularization!r}, lr={lr!r}")
        if granularity not in ("block", "layer"):
            raise ValueError(f"AdaRound granularity must be 'block' or 'layer', not {granularity!r}")
        self.data = check_data(data, self.name)
        self.num_batches = check_count(num_batches, "num_batches", self.name)
        self.iterations, self.regularization, self.beta = iterations, regularization, beta
        self.warmup, self.lr, self.granularity, self.rescale = warmup, lr, granularity, rescale
        self.checkpoints, self.rows, self.seed, self.progress = checkpoints, rows, seed, progress
        self.reuse = dict(reuse or {})
        # After a run: each rounded layer's parameters, by module path (``ReuseRounding``, ``reuse``), and how
        # many layers took their rounding from ``reuse``.
        self.rounded: dict[str, RoundedWeight] = {}
        self.reused = 0

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ann = annotation_of(gm, self.name)
        batches = collect_batches(self.data, gm, self.num_batches, self.name)
        results: list[RoundingResult] = []
        self.rounded, self.reused = {}, 0
        block_of = parent_module if self.granularity == "block" else None
        ctx.stats["layers"] = sweep_blocks(gm, ann, batches, block_of,
                                           lambda block: self._reconstruct(block, results))
        ctx.stats["flipped"] = sum(r.flipped for r in results)
        kept = sum(r.kept for r in results)
        ctx.note(f"{kept} of {len(results)} {self.granularity}(s) keep the learned rounding (the others "
                 f"reconstructed worse than round-to-nearest and keep it); total error "
                 f"{sum(r.nearest for r in results):.4g} → {sum(min(r.learned, r.nearest) for r in results):.4g}")
        if self.reuse:
            ctx.stats["reused"] = self.reused
            ctx.note(f"{self.reused} layer(s) take the rounding given in reuse= (learned from the same data), "
                     f"{ctx.stats['layers'] - self.reused} learn it here")
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

    def _reuse(self, block: Block, fingerprint: tuple[float, ...]) -> dict[fx.Node, RoundedWeight] | None:
        """The rounding ``reuse`` holds for every layer of ``block``, when each was learned on the grid it has
        here from the data it sees here (the same fingerprint); else None."""
        found = {n: self.reuse.get(str(n.target)) for n in block.layers}
        if all(r is not None and r.learned_on == fingerprint and r.spec == block.specs[n]
               and r.weight.shape == block.modules[n].weight.shape for n, r in found.items()):
            return found
        return None

    @torch.enable_grad()
    def _reconstruct(self, block: Block, results: list[RoundingResult]) -> dict[fx.Node, torch.Tensor]:
        with torch.no_grad():
            fingerprint = _fingerprint(block)
        reused = self._reuse(block, fingerprint) if self.reuse else None
        if reused is not None:
            for n, rounded in reused.items():
                rounded.apply(n, block.modules[n])
                self.rounded[str(n.target)] = rounded
            self.reused += len(reused)
            return {n: rounded.weight for n, rounded in reused.items()}
        roundings = {n: _Rounding(n, block.modules[n], block.specs[n], self.rescale) for n in block.layers}
        activation = _activation(block)
        label = ", ".join(str(n.target) for n in block.layers)
        # Seeded per block by its layers' names: a block's draws do not depend on which blocks ran before it.
        generator = torch.Generator().manual_seed(self.seed * 2**32 + zlib.crc32(label.encode()))
        optimizer = torch.optim.Adam([p for r in roundings.values() for p in r.parameters()], lr=self.lr)
        rows = _Rows.of(block, activation) if self.rows is not None else None
        with torch.no_grad():
            nearest = {n: {"weight": r.nearest} for n, r in roundings.items()}
            nearest_error = _error(block, nearest, activation)
            if rows is not None:
                per_step = min(self.rows, rows.per_batch)
                # The checkpoints' sample: fixed, so the hard roundings they compare are measured alike.
                checked = [rows.draw(generator, per_step) for _ in range(_CHECKPOINT_DRAWS)]
        best_error, best_state = math.inf, {}
        every = max(1, self.iterations // self.checkpoints)
        steps = progress(range(self.iterations), self.iterations, f"AdaRound {label}", self.progress)
        for step in steps:
            soft = {n: r.soft() for n, r in roundings.items()}
            params = {n: r.params(soft[n]) for n, r in roundings.items()}
            if rows is not None:
                loss = rows.error(rows.draw(generator, per_step), params)
            else:
                k = int(torch.randint(len(block.quant_inputs), (1,), generator=generator))
                loss = _squared_error(block, k, block.run(block.quant_inputs[k], params), activation)
            beta = self._beta(step)
            if beta is not None:
                loss = loss + self.regularization * sum(h.numel() - (2 * h - 1).abs().pow(beta).sum() for h in soft.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (beta is not None and (step + 1) % every == 0) or step + 1 == self.iterations:
                with torch.no_grad():
                    hard = {n: r.params(r.hard()) for n, r in roundings.items()}
                    error = (_error(block, hard, activation) if rows is None
                             else float(sum(rows.error(drawn, hard) for drawn in checked)) / len(checked))
                if not best_state or error < best_error:
                    best_error, best_state = error, {n: r.state() for n, r in roundings.items()}

        with torch.no_grad():
            for n, r in roundings.items():
                r.load(best_state[n])
            learned = {n: r.params(r.hard()) for n, r in roundings.items()}
            if rows is not None:  # the checkpoints measured a sample: compare with nearest on all batches
                best_error = _error(block, learned, activation)
            kept = best_error <= nearest_error  # else too few iterations to beat nearest here: keep nearest
            flipped = sum(r.flipped() for r in roundings.values()) if kept else 0
            results.append(RoundingResult(label, nearest_error, best_error, flipped, kept))
            stored = {n: r.store(learned[n] if kept else nearest[n], fingerprint) for n, r in roundings.items()}
            self.rounded.update((str(n.target), rounded) for n, rounded in stored.items())
            return {n: rounded.weight for n, rounded in stored.items()}


# Sampled rows: the checkpoints measure each hard rounding on this many draws of ``rows`` output positions.
_CHECKPOINT_DRAWS = 4
# Sampled rows of a conv come in tiles of up to this many output positions a side: neighbours share most of
# their input, which the conv reads once per tile (single positions, gathered, cost 10× more on depthwise 5×5).
_TILE = 8


class _Rows:
    """A block that is one conv2d or linear call, reconstructed on sampled output positions ("rows": one
    sample's output at one spatial position, every output channel; for a linear, one row of its input),
    drawn uniformly from all calibration batches: for a conv, tiles of up to ``_TILE`` × ``_TILE`` positions
    (a whole sample where its map is smaller) at random corners of random samples, each computed from its
    input tile (the padding applied once) as the int8 kernel would (its bias on the kernel's grid). Holds a
    float copy of the block's quantized input for every calibration batch (padded), besides the codes and
    float outputs the sweep keeps."""

    def __init__(self, block: Block, activation: Callable[[torch.Tensor], torch.Tensor], call: fx.Node):
        (self.layer,) = block.layers
        self.module, self.simulation, self.activation = block.modules[self.layer], block.simulation, activation
        self.conv = call.target is F.conv2d
        inputs = [block.quant_inputs[k] for k in range(len(block.quant_inputs))]
        if self.conv:
            stride, padding, dilation, self.groups = call.args[3:7]
            self.stride, padding, self.dilation = (_pair(v) for v in (stride, padding, dilation))
            self.inputs = [F.pad(x, (padding[1], padding[1], padding[0], padding[0])) for x in inputs]
            self.targets = block.float_outputs
            out_size = self.targets[0].shape[2:]
            self.tile = tuple(min(_TILE, size) for size in out_size)
            kernel = self.module.weight.shape[2:]
            # A tile's output rows/columns, and the input rows/columns it reads, from its corner.
            self.out_steps = [torch.arange(t) for t in self.tile]
            self.in_steps = [torch.arange((t - 1) * s + (k - 1) * d + 1) for t, s, k, d
                             in zip(self.tile, self.stride, kernel, self.dilation, strict=True)]
            self.corners = [size - t + 1 for size, t in zip(out_size, self.tile, strict=True)]
            counts = [y.shape[0] * self.corners[0] * self.corners[1] for y in self.targets]
            self.per_tile = self.tile[0] * self.tile[1]
        else:
            self.inputs = [x.reshape(-1, x.shape[-1]) for x in inputs]
            self.targets = [y.reshape(-1, y.shape[-1]) for y in block.float_outputs]
            counts = [y.shape[0] for y in self.targets]
            self.per_tile = 1
        self.starts = torch.tensor([0, *counts]).cumsum(0)
        self.per_batch = max(y.numel() // y.shape[1] for y in block.float_outputs)  # output positions

    @staticmethod
    def of(block: Block, activation: Callable[[torch.Tensor], torch.Tensor]) -> _Rows | None:
        """The sampler for ``block``, or None where it is not a single conv2d (numeric padding) or linear call."""
        region = block.region
        calls = [n for n in region.nodes if n not in block.simulation.weight_nodes]
        if len(calls) != 1 or calls[0] is not region.exit or calls[0].target not in (F.conv2d, F.linear):
            return None
        call = calls[0]
        if call.target is F.conv2d and isinstance(call.args[4], str):  # 'same' / 'valid': not worth the case
            return None
        return _Rows(block, activation, call)

    def draw(self, generator: torch.Generator, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """About ``rows`` output positions (whole tiles, at least one) drawn uniformly, with replacement, from
        all batches, ``gather``ed."""
        count = max(1, round(rows / self.per_tile))
        return self.gather(torch.randint(int(self.starts[-1]), (count,), generator=generator).sort().values)

    def gather(self, picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tiles ``picked`` (ascending indices into all batches' tiles, batch by batch; a conv's are each
        sample's corners in row-major order, a linear's its rows): their inputs (tiles × in_channels × rows ×
        columns for a conv, rows × in_features for a linear) and float outputs (tiles × out_channels × tile
        rows × tile columns, or rows × out_features)."""
        bounds = torch.searchsorted(picked, self.starts).tolist()
        inputs, targets = [], []
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            local = (picked[lo:hi] - self.starts[k]).to(self.inputs[k].device)
            if not self.conv:
                inputs.append(self.inputs[k][local])
                targets.append(self.targets[k][local])
                continue
            per_sample = self.corners[0] * self.corners[1]
            sample, corner = local // per_sample, local % per_sample
            top, left = corner // self.corners[1], corner % self.corners[1]
            sample = sample[:, None, None]
            rows = (top * self.stride[0])[:, None] + self.in_steps[0].to(top.device)
            columns = (left * self.stride[1])[:, None] + self.in_steps[1].to(top.device)
            # Advanced indices around the channel slice: the result is tiles × rows × columns × channels.
            inputs.append(self.inputs[k][sample, :, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2))
            rows = top[:, None] + self.out_steps[0].to(top.device)
            columns = left[:, None] + self.out_steps[1].to(top.device)
            targets.append(self.targets[k][sample, :, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2))
        return torch.cat(inputs), torch.cat(targets)

    def output(self, inputs: torch.Tensor, params: dict[fx.Node, dict[str, torch.Tensor]]) -> torch.Tensor:
        """The layer's output on ``gather``ed inputs, with ``params``."""
        chosen = params[self.layer]
        bias = self.simulation.kernel_bias(self.layer, chosen.get("bias", self.module.bias))
        if self.conv:  # the padding is in the tiles already
            return F.conv2d(inputs, chosen["weight"], bias, self.stride, 0, self.dilation, self.groups)
        return F.linear(inputs, chosen["weight"], bias)

    def error(self, drawn: tuple[torch.Tensor, torch.Tensor], params: dict[fx.Node, dict[str, torch.Tensor]]
              ) -> torch.Tensor:
        """The mean squared reconstruction error after the activation on the drawn tiles, with ``params``."""
        inputs, targets = drawn
        return (self.activation(self.output(inputs, params)) - self.activation(targets)).pow(2).mean()


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[-1])


class _Rounding:
    """One layer's learnable rounding: ``h(V)`` per weight picks between the two grid points next to it;
    with ``rescale``, also a gain per output channel (on the weight scale) and a bias shift."""

    def __init__(self, node: fx.Node, module: nn.Module, spec: QuantSpec, rescale: bool):
        self.node, self.module, self.spec = node, module, spec
        self.weight = weight = module.weight.detach().clone()
        self.qparams = scale, zero_point = weight_qparams(weight, spec)
        self.nearest = fake_quantize_weight(weight, spec, (scale, zero_point))  # what lowering alone would do
        scale = _per_channel(scale.float(), weight, spec.axis)
        zero_point = _per_channel(zero_point.float(), weight, spec.axis)
        high, low = _channel_extremes(weight, spec.axis, True), _channel_extremes(weight, spec.axis, False)
        # Codes relative to the zero point, never beyond the weights that fix the scale.
        top = torch.minimum(torch.floor(high / scale), spec.quant_max - zero_point)
        bottom = torch.maximum(torch.ceil(low / scale), spec.quant_min - zero_point)
        floor = torch.floor(weight / scale)
        self.nearest_codes = torch.round(self.nearest / scale)
        # The weights that fix each channel's range round to nearest, as lowering alone would, in the
        # optimisation too: the others' rounding must be learned with them in place. Fixed up only afterwards,
        # they undid the learned choice of depthwise convs (2 of 9 weights per channel).
        extremes = (weight == high) | (weight == low)
        # The code with rounding h in [0, 1]: clamp(floor + h, bottom, top) (the nearest code at an extreme),
        # which is down + h · up with up 0 or 1, since the bounds are whole codes: one fused op per step.
        self.down = torch.where(extremes, self.nearest_codes, torch.clamp(floor, bottom, top))
        self.up = torch.where(extremes, 0.0, torch.clamp(floor + 1, bottom, top) - self.down)
        self.base, self.step = self.down * scale, self.up * scale
        fraction = (weight / scale - floor).clamp(0.0, 1.0 - 1e-6)
        self.v = (-torch.log((_ZETA - _GAMMA) / (fraction - _GAMMA) - 1)).requires_grad_(True)
        self.rescale = rescale
        self.log_gain = torch.zeros_like(scale).requires_grad_(rescale)
        self.bias = module.bias.detach() if module.bias is not None else weight.new_zeros(out_channels(module))
        self.bias_shift = torch.zeros_like(self.bias).requires_grad_(rescale)

    def parameters(self) -> list[torch.Tensor]:
        return [self.v, self.log_gain, self.bias_shift] if self.rescale else [self.v]

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in (self.v, self.log_gain, self.bias_shift)]

    def load(self, state: list[torch.Tensor]) -> None:
        for p, value in zip((self.v, self.log_gain, self.bias_shift), state, strict=True):
            p.copy_(value)

    def soft(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)

    def hard(self) -> torch.Tensor:
        return (self.soft() >= 0.5).float()

    def params(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layer's weight with rounding ``h`` (and its bias, when learned)."""
        weight = torch.addcmul(self.base, h, self.step)
        if not self.rescale:
            return {"weight": weight}
        return {"weight": weight * torch.exp(self.log_gain), "bias": self.bias + self.bias_shift}

    def flipped(self) -> int:
        return int((torch.addcmul(self.down, self.hard(), self.up) != self.nearest_codes).sum())

    def store(self, params: dict[str, torch.Tensor], learned_on: tuple[float, ...]) -> RoundedWeight:
        """Put ``params`` in the layer and pin the grid its weight is on (``RoundedWeight.apply``)."""
        scale, zero_point = self.qparams
        if "bias" in params:
            scale = scale * torch.exp(self.log_gain.detach()).reshape(scale.shape)
        rounded = RoundedWeight(self.spec, params["weight"].detach(), (scale, zero_point),
                                params["bias"].detach() if "bias" in params else None, learned_on)
        rounded.apply(self.node, self.module)
        return rounded


class ReuseRounding(Pass):
    """The rounding an earlier AdaRound run learned (``AdaRound.rounded``), put back on the layers of a graph
    captured from the same model, without learning it again.

    Each conv/linear quantized on the grid its rounding was learned on takes AdaRound's weights (and bias,
    with ``rescale``) and their pinned grid, as AdaRound would have left them. A layer kept float, or on
    another grid (raised to 8 bits, say), keeps its float weight: float, or rounded to nearest by lowering.
    Each layer's rounding was learned with the layers before it quantized as AdaRound's run quantized them,
    so where this graph quantizes other layers it is no longer the rounding AdaRound would learn here (the
    target search measures every model it builds this way). Requires: ``calibrated``. Provides:
    ``weights_rounded``."""

    stage = Stage.QUANTIZE
    requires = frozenset({"calibrated"})
    provides = frozenset({"weights_rounded"})

    def __init__(self, rounded: Mapping[str, RoundedWeight]):
        if not rounded:
            raise InputError("ReuseRounding needs the rounding of an AdaRound run that rounded at least one "
                             "layer (AdaRound.rounded after it ran)")
        self.rounded = rounded

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ann = annotation_of(gm, self.name)
        reused, other_grid = 0, 0
        for node in gm.graph.nodes:
            if ann.roles.get(node.name) is not Role.COMPUTE or str(node.target) not in self.rounded:
                continue
            rounded, module = self.rounded[str(node.target)], gm.get_submodule(node.target)
            if rounded.weight.shape != module.weight.shape:
                raise InputError(f"ReuseRounding: layer '{node.target}' has a weight of shape "
                                 f"{tuple(module.weight.shape)}, the rounding given for it {tuple(rounded.weight.shape)}: "
                                 f"reuse a rounding only on the model AdaRound rounded")
            if rounded.spec != weight_spec(module, ann.pairs[node.name].weight):
                other_grid += 1
                continue
            rounded.apply(node, module)
            reused += 1
        ctx.stats["reused"], ctx.stats["other_grid"] = reused, other_grid
        ctx.note(f"{reused} layer(s) take AdaRound's learned rounding; {other_grid} quantized on another grid "
                 f"than it was learned on round to nearest")
        return PassResult(gm, modified=reused > 0)


def _activation(block: Block) -> Callable[[torch.Tensor], torch.Tensor]:
    """The clamp of the activation that alone reads the block's output, per channel (dim 1, of any rank)."""
    reference = block.float_outputs[0]
    lower, upper = block.output_bounds(reference.new_zeros(reference.shape[1]))

    def clamp(y: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, *([1] * (y.dim() - 2)))
        return torch.clamp(y, lower.reshape(shape), upper.reshape(shape))

    return clamp


def _squared_error(block: Block, k: int, output: torch.Tensor,
                   activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The mean squared reconstruction error of ``output``, the block's output on batch ``k``."""
    return (activation(output) - activation(block.float_outputs[k])).pow(2).mean()


def _error(block: Block, params: dict[fx.Node, dict[str, torch.Tensor]],
           activation: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """The mean of the batches' errors; under torch.distributed each rank computes its share of the batches
    (a collective), and the sum runs over all of them in batch order on every rank, as in one process."""
    def batch_error(k: int) -> torch.Tensor:
        return _squared_error(block, k, block.run(block.quant_inputs[k], params), activation).cpu()

    errors = distributed.map_items(range(len(block.quant_inputs)), batch_error)
    return float(sum(errors) / len(errors))


def _fingerprint(block: Block) -> tuple[float, ...]:
    """What a block's rounding is learned from, summarised: per batch, the sum and the sum of squares (in
    float64) of its quantized input and of its float output, and each layer's float weight and bias now. Equal
    data gives equal sums; a rounding learned from other data (a layer before it kept float, another grid,
    another bias) differs in them."""
    def sums(t: torch.Tensor | None) -> list[float]:
        if t is None:
            return []
        t = t.detach().double()
        return [float(t.sum()), float(t.pow(2).sum())]

    values: list[float] = []
    for k in range(len(block.quant_inputs)):
        values += sums(block.quant_inputs[k]) + sums(block.float_outputs[k])
    for n in block.layers:
        values += sums(block.modules[n].weight) + sums(block.modules[n].bias)
    return tuple(values)
