"""FuseBN: fold BatchNorm into the convolution or linear layer that feeds it."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qpasses.errors import QPassesError
from qpasses.graph.batchnorm import merge_batchnorms, remaining_batchnorms
from qpasses.graph.channels import record_output_stats, scale_output_channels
from qpasses.passes.base import Pass, PassContext, PassResult, Stage

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def fold_bn(producer: nn.Module, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``bn`` into ``producer``'s weight and bias, in place; returns the mean ``β`` and deviation ``|γ|``
    of the folded output that the BN's statistics imply (what data-free passes estimate ranges from)."""
    with torch.no_grad():
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        scale = gamma / std
        bias = producer.bias if producer.bias is not None else torch.zeros_like(bn.running_mean)
        producer.weight.copy_(scale_output_channels(producer.weight, scale, producer))
        new_bias = (bias - bn.running_mean) * scale + beta
        if producer.bias is None:
            producer.bias = nn.Parameter(new_bias.to(producer.weight.dtype), requires_grad=producer.weight.requires_grad)
        else:
            producer.bias.copy_(new_bias)
    return beta.detach().clone(), gamma.detach().abs()


class FuseBN(Pass):
    """Fold BatchNorm1d/2d/3d into the preceding Conv1d/2d/3d, ConvTranspose or Linear.

    Math: with ``s = γ / sqrt(σ² + ε)`` per output channel, ``BN(W x + b) = (s ⊙ W) x + (s (b − μ) + β)``,
    so ``W ← s ⊙ W`` (along output channels) and ``b ← s (b − μ) + β``.
    Requires: eval mode (BN must normalise with its running statistics); the producer's output read by
    the BN alone; producer and BN each called once (shared weights would change other call sites).
    BNs with an activation (timm's ``BatchNormAct2d``) were split into BN → act at tracing, so their BN
    folds like any other and the activation stays. Lone BNs stay in place, listed in the report.
    Preserves: the function, to float rounding. Provides: ``bn_folded``, and records the output mean ``β``
    and deviation ``|γ|`` of each folded layer (``qpasses.graph.channels.output_stats``) for data-free passes.
    """

    stage = Stage.FLOAT
    provides = frozenset({"bn_folded"})
    preserves_function = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        training = [name for name, m in gm.named_modules() if isinstance(m, _BatchNorm) and m.training]
        if training:
            raise QPassesError(
                f"BatchNorm '{training[0]}' is in training mode ({len(training)} BN module(s) are), where it "
                f"normalises with batch statistics that folding cannot reproduce; call model.eval() before "
                f"FuseBN, or use QAT(), which keeps BN during training and folds it at conversion"
            )
        kept = []
        folded = merge_batchnorms(
            gm, _PRODUCERS, lambda name, producer, bn: record_output_stats(gm, name, *fold_bn(producer, bn)), kept.append)
        for line in kept:
            ctx.note(line)
        if kept:
            ctx.stats["kept"] += len(kept)
        if folded:
            ctx.stats["folded"] += len(folded)
        lone = remaining_batchnorms(gm)
        ctx.stats["lone"] += len(lone)
        if lone:
            ctx.note(f"{len(lone)} BN module(s) have no foldable producer and stay: {', '.join(lone)}")
        gm.recompile()
        return PassResult(gm, modified=bool(folded))
