"""CLE: cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from qpasses.errors import InputError
from qpasses.graph.channels import (
    divide_output_channels,
    divide_output_stats,
    input_channel_ranges,
    is_depthwise,
    multiply_input_channels,
    output_channel_ranges,
    output_stats,
)
from qpasses.graph.links import (
    Chain,
    Link,
    bounds,
    channel_bounds,
    clamp_like,
    find_layer_chains,
    is_relu,
    needs_rescaling,
    replace_with_channel_clamp,
)
from qpasses.nn import ChannelClamp
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.validation import check_count

CLE_REPORT_KEY = "qpasses_cle"


@dataclass
class LinkRanges:
    """Per-channel weight ranges on both sides of one link, before and after equalization."""

    producer: str
    consumer: str
    before: tuple[torch.Tensor, torch.Tensor]  # (producer's output-channel ranges, consumer's input-channel ranges)
    after: tuple[torch.Tensor, torch.Tensor]

    @staticmethod
    def spread(ranges: torch.Tensor) -> float:
        """max / median over channels of a layer's per-channel ranges: how much of a per-tensor grid the
        typical channel gets (the median, since pruned channels with ~0 weights would dominate a min)."""
        nonzero = ranges[ranges > 0]
        return float(nonzero.max() / nonzero.median()) if nonzero.numel() else 1.0


def _ranges(gm: fx.GraphModule, link: Link) -> tuple[torch.Tensor, torch.Tensor]:
    return (output_channel_ranges(gm.get_submodule(link.producer.target)),
            input_channel_ranges(gm.get_submodule(link.consumer.target)))


def _activation_estimate(gm: fx.GraphModule, link: Link) -> torch.Tensor | None:
    """Per channel, the largest value the link's activation typically takes, ``min(μ + 3σ, upper)`` from the
    producer's BN statistics (as rescaled so far); None without statistics."""
    stats = output_stats(gm).get(link.producer.target)
    if stats is None:
        return None
    estimate = torch.clamp(stats.mean + 3 * stats.std, min=1e-12)
    for node in link.between:
        if clamp_like(gm, node) or is_relu(gm, node):
            estimate = torch.minimum(estimate, channel_bounds(gm, node, estimate)[1])
    return estimate.clamp(min=1e-12)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """Channels whose weights are all zero on one side have no range to balance: leave them (scale 1)."""
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


class CLE(Pass):
    """Cross-layer equalization: rescale the channels between consecutive layers so each channel's weight
    range is the same on both sides, which is what per-tensor weight quantization needs.

    Math, for a link ``L2(a(L1 x))`` with ``a`` commuting with positive per-channel scales
    (``a(z / s) = a(z) / s``): with ``r1[c]`` the range of ``L1``'s output channel ``c`` and ``r2[c]`` of
    ``L2``'s input channel ``c``, ``s = sqrt(r1 / r2)``; ``W1[c] ← W1[c] / s``, ``b1[c] ← b1[c] / s``,
    ``W2[:, c] ← W2[:, c] · s``, after which both ranges are ``sqrt(r1 · r2)``. For a conv → depthwise →
    conv triplet the three ranges are balanced at once to their geometric mean ``g = cbrt(r1 r2 r3)``:
    ``s12 = r1 / g``, ``s23 = r2 · s12 / g``. Chains longer than that are swept link by link, repeatedly,
    until the largest ``|log s|`` of a sweep is below ``tolerance`` or ``max_iterations`` sweeps ran.

    Activations: ReLU, LeakyReLU, identity, pooling, zero padding commute with the scales. ReLU6, hardtanh
    and clamps do not (they clip at fixed values); they become a ``ChannelClamp`` whose bounds are divided
    by ``s`` too, ``s · clamp(z / s, lo / s, hi / s) = clamp(z, lo, hi)``, so the model computes exactly
    what it did (lowering folds the clamp into the int8 op's range, or clamps the codes per channel).
    Grouped convs are indexed group by group, transposed convs by their ``[in, out / groups]`` layout.

    Equalizing weights moves their imbalance into the activations (a channel divided by ``s < 1`` grows),
    which per-tensor activation grids pay for. ``activation_growth`` (off by default) bounds that: no
    channel's estimated activation range (``min(μ + 3σ, upper bound)`` from the folded BN statistics) may
    exceed ``activation_growth ×`` the largest one before CLE; scales are raised where they would. Still
    exact; it trades weight balance for activation range.

    Requires: ``bn_folded``. Provides: ``equalized``. Preserves: the function (verified). BN statistics
    recorded by FuseBN are rescaled with the channels, for HighBiasAbsorption. The ranges before and after,
    per link, are kept in ``gm.meta['qpasses_cle']`` (a list of :class:`LinkRanges`) and summarised in the
    report.
    """

    stage = Stage.FLOAT
    requires = frozenset({"bn_folded"})
    provides = frozenset({"equalized"})
    preserves_function = True

    def __init__(self, tolerance: float = 1e-3, max_iterations: int = 50, activation_growth: float | None = None):
        check_count(max_iterations, "max_iterations", self.name, optional=False)
        if tolerance <= 0:
            raise InputError(f"CLE needs tolerance > 0, got {tolerance!r}")
        if activation_growth is not None and activation_growth <= 0:
            raise ValueError(f"CLE: activation_growth must be > 0, got {activation_growth}")
        self.tolerance = tolerance
        self.max_iterations = max_iterations
        self.activation_growth = activation_growth

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        chains = find_layer_chains(gm)
        report: list[LinkRanges] = []
        for chain in chains:
            before = [_ranges(gm, link) for link in chain.links]
            sweeps = self._equalize(gm, chain, ctx)
            for link, ranges in zip(chain.links, before, strict=True):
                report.append(LinkRanges(link.producer.target, link.consumer.target, ranges, _ranges(gm, link)))
            ctx.stats["sweeps_max"] = max(ctx.stats["sweeps_max"], sweeps)
            spreads = [LinkRanges.spread(r[0]) for r in before]
            after = [LinkRanges.spread(_ranges(gm, link)[0]) for link in chain.links]
            ctx.note(f"{chain}: {sweeps} sweep(s); output-channel range max/median "
                     + ", ".join(f"{a:.1f}→{b:.1f}" for a, b in zip(spreads, after, strict=True)))
        ctx.stats["chains"] = len(chains)
        ctx.stats["links"] = sum(len(c.links) for c in chains)
        gm.meta[CLE_REPORT_KEY] = report
        gm.recompile()
        return PassResult(gm, modified=bool(chains))

    def _equalize(self, gm: fx.GraphModule, chain: Chain, ctx: PassContext) -> int:
        modules = [gm.get_submodule(n.target) for n in chain.layers]
        ceilings = [self._activation_ceiling(gm, link) for link in chain.links]
        for sweep in range(1, self.max_iterations + 1):
            largest = 0.0
            i = 0
            while i < len(chain.links):
                if i + 1 < len(chain.links) and is_depthwise(modules[i + 1]):
                    r1, r2 = output_channel_ranges(modules[i]), output_channel_ranges(modules[i + 1])
                    r3 = input_channel_ranges(modules[i + 2])
                    mean = torch.pow(r1 * r2 * r3, 1.0 / 3.0)
                    s12 = self._bounded(gm, chain.links[i], _safe(r1 / mean), ceilings[i])
                    s23 = self._bounded(gm, chain.links[i + 1], _safe(r2 * s12 / mean), ceilings[i + 1])
                    scales = [s12, s23]
                    if sweep == 1:
                        ctx.stats["triplets"] += 1
                else:
                    r1, r2 = _ranges(gm, chain.links[i])
                    scales = [self._bounded(gm, chain.links[i], _safe(torch.sqrt(r1 / r2)), ceilings[i])]
                    if sweep == 1:
                        ctx.stats["pairs"] += 1
                for scale in scales:
                    self._apply(gm, chain.links[i], scale, ctx)
                    largest = max(largest, float(scale.log().abs().max()))
                    i += 1
            if largest < math.log1p(self.tolerance):
                return sweep
        ctx.note(f"{chain}: ranges still moving after {self.max_iterations} sweeps; raise max_iterations")
        return self.max_iterations

    def _activation_ceiling(self, gm: fx.GraphModule, link: Link) -> float | None:
        """With ``activation_growth``: the most any channel between the layers may reach after scaling,
        ``growth × max_c A[c]`` with ``A`` the estimated range of the link's activation before CLE."""
        estimate = _activation_estimate(gm, link) if self.activation_growth is not None else None
        return None if estimate is None else self.activation_growth * float(estimate.max())

    @staticmethod
    def _bounded(gm: fx.GraphModule, link: Link, scale: torch.Tensor, ceiling: float | None) -> torch.Tensor:
        """``scale``, raised where dividing the activation by it would take a channel above ``ceiling``."""
        if ceiling is None:
            return scale
        return torch.maximum(scale, _activation_estimate(gm, link) / ceiling)

    @staticmethod
    def _apply(gm: fx.GraphModule, link: Link, scale: torch.Tensor, ctx: PassContext) -> None:
        """Divide the link's channels by ``scale``: producer outputs, clamp bounds; consumer inputs × scale."""
        divide_output_channels(gm.get_submodule(link.producer.target), scale)
        multiply_input_channels(gm.get_submodule(link.consumer.target), scale)
        divide_output_stats(gm, link.producer.target, scale)
        for j, node in enumerate(link.between):
            if not needs_rescaling(gm, node):
                continue
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, ChannelClamp):
                module.lower.div_(scale)
                module.upper.div_(scale)
                continue
            lo, hi = bounds(gm, node)
            clamp = ChannelClamp(torch.full_like(scale, lo) / scale, torch.full_like(scale, hi) / scale)
            link.between[j] = replace_with_channel_clamp(gm, node, clamp)
            ctx.stats["clamps"] += 1
