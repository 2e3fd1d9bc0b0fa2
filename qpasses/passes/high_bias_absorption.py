"""HighBiasAbsorption: move what a layer's bias adds to every output into the next layer's bias."""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from qpasses.graph.channels import constant_input_response, output_stats, reaches_padding, shift_output_stats
from qpasses.graph.links import (
    Link,
    channel_bounds,
    find_links,
    is_relu,
    link_activation,
    replace_with_channel_clamp,
)
from qpasses.nn import ChannelClamp
from qpasses.passes.base import Pass, PassContext, PassResult, Stage


class HighBiasAbsorption(Pass):
    """Absorb the part of each channel's output that is (almost) always there into the next layer.

    Math (Nagel et al. 2019, sec. 4.1): a layer's pre-activation output in channel ``c`` is modelled as
    ``N(β[c], γ[c]²)`` from the BatchNorm FuseBN folded into it (rescaled by CLE). With the activation's
    lower bound ``lo`` (0 for ReLU, ReLU6), ``k = sigmas`` (3 by default) and
    ``h[c] = clamp(β − k·|γ| − lo, 0, hi − lo)``: ``b1 ← b1 − h``, the activation becomes
    ``clamp(·, lo, hi − h)`` (a ``ChannelClamp``; ReLU stays ReLU), and ``b2 ← b2 + Σ W2[:, c, k] · h[c]``.
    That is exact wherever the activation does not clip at ``lo``, i.e. where ``x ≥ lo + h``, which holds
    for all but about 0.1% of values when the BN statistics describe the data; elsewhere it is an
    approximation, so the pass does not claim to preserve the function: the report shows its SQNR.

    Only links whose consumer sees the constant everywhere qualify: no zero padding in the consumer
    (1×1 convs, ``padding=0``, Linear) or between, not a transposed conv, and between the layers exactly
    one ReLU or clamp-like activation plus identity ops. Layers without recorded statistics are skipped.
    Requires: ``bn_folded``; runs after CLE when both are present. Provides: ``bias_absorbed``.
    """

    stage = Stage.FLOAT
    requires = frozenset({"bn_folded"})
    after = frozenset({"equalized"})
    provides = frozenset({"bias_absorbed"})

    def __init__(self, sigmas: float = 3.0):
        if sigmas < 0:
            raise ValueError(f"HighBiasAbsorption: sigmas must be >= 0, got {sigmas}")
        self.sigmas = sigmas

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        skipped: Counter = Counter()
        stats = output_stats(gm)
        for link in find_links(gm):
            reason = self._unsuitable(gm, link, stats)
            if reason:
                skipped[reason] += 1
                continue
            self._absorb(gm, link, ctx)
        for reason, count in sorted(skipped.items()):
            ctx.note(f"skipped {count} link(s): {reason}")
        gm.recompile()
        return PassResult(gm, modified=ctx.stats["absorbed"] > 0)

    def _unsuitable(self, gm: fx.GraphModule, link: Link, stats: dict) -> str | None:
        consumer = gm.get_submodule(link.consumer.target)
        if link.producer.target not in stats:
            return "no BatchNorm statistics for the producer (nothing was folded into it)"
        if isinstance(consumer, _ConvTransposeNd) or reaches_padding(consumer):
            return "the consumer reads zero padding, where the absorbed constant would be missing"
        if link_activation(gm, link) is None:
            return "not exactly one ReLU/clamp activation (plus identities) between the layers"
        return None

    def _absorb(self, gm: fx.GraphModule, link: Link, ctx: PassContext) -> None:
        producer = gm.get_submodule(link.producer.target)
        consumer = gm.get_submodule(link.consumer.target)
        activation = link_activation(gm, link)
        stats = output_stats(gm)[link.producer.target]
        lower, upper = channel_bounds(gm, activation, stats.mean)
        if not bool(torch.isfinite(lower).all()):
            ctx.stats["unbounded_below"] += 1
            return
        shift = torch.clamp(stats.mean - self.sigmas * stats.std - lower, min=0.0)
        shift = torch.minimum(shift, upper - lower)
        if not bool((shift > 0).any()):
            ctx.stats["nothing_to_absorb"] += 1
            return
        with torch.no_grad():
            if producer.bias is None:
                producer.bias = nn.Parameter(torch.zeros_like(shift))
            producer.bias.sub_(shift)
            absorbed = constant_input_response(consumer, shift)
            if consumer.bias is None:
                consumer.bias = nn.Parameter(absorbed)
            else:
                consumer.bias.add_(absorbed)
        shift_output_stats(gm, link.producer.target, shift)
        if not is_relu(gm, activation):
            replace_with_channel_clamp(gm, activation, ChannelClamp(lower, upper - shift))
        ctx.stats["absorbed"] += 1
        ctx.stats["channels_shifted"] += int((shift > 0).sum())
