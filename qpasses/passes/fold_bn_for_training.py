"""FoldBNForTraining: merge conv/linear → BatchNorm into one QAT block that keeps BN trainable."""

from __future__ import annotations

import torch.fx as fx

from qpasses.graph.batchnorm import merge_batchnorms, remaining_batchnorms
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.quant.qat_modules import BN_ABSORBING_TYPES, to_qat


class FoldBNForTraining(Pass):
    """Replace each conv/linear → BN pair by a QAT block (``qpasses.quant.qat_modules``) holding both.

    Math: with ``s = γ / sqrt(σ²_running + ε)``, the block computes ``BN_batch(conv(x, s ⊙ W) / s + b)`` in
    training (BN statistics updated) and the folded layer ``conv(x, s ⊙ W, s (b − μ) + β)`` in eval mode
    or once BN statistics are frozen; ``InsertFakeQuant`` later fake-quantizes ``s ⊙ W``, the weight the
    deployed model uses, so training sees the deployed weight's rounding. An activation after the BN
    stays a node of its own (the annotation folds it into the output range).
    Requires: nothing (the model may be in training mode). Preserves: the function in eval mode, to float
    rounding. Provides: ``qat_blocks``. Pairs that FuseBN could not fold either (shared layers, no
    running statistics) and BNs after transposed convs stay, listed in the report.
    """

    stage = Stage.FLOAT
    provides = frozenset({"qat_blocks"})
    preserves_function = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        kept = []
        absorbed = merge_batchnorms(gm, BN_ABSORBING_TYPES, lambda name, producer, bn: to_qat(producer, name, bn),
                                    kept.append)
        for line in kept:
            ctx.note(line)
        if kept:
            ctx.stats["kept"] += len(kept)
        if absorbed:
            ctx.stats["blocks"] += len(absorbed)
        lone = remaining_batchnorms(gm)
        if lone:
            ctx.note(f"{len(lone)} BN module(s) have no producer to merge with and stay float: {', '.join(lone)}")
        gm.recompile()
        return PassResult(gm, modified=bool(absorbed))
