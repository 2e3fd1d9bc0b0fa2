"""FoldBNForTraining: merge conv/linear → BatchNorm into one QAT block that keeps BN trainable."""

from __future__ import annotations

from collections import Counter

import torch.fx as fx
from torch.nn.modules.batchnorm import _BatchNorm

from qpasses.graph.match import find_chains, is_module
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.fuse_bn import FuseBN
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
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        absorbed = []
        for producer_node, bn_node in find_chains(gm, [is_module(*BN_ABSORBING_TYPES), is_module(_BatchNorm)]):
            producer, bn = gm.get_submodule(producer_node.target), gm.get_submodule(bn_node.target)
            reason = FuseBN.cannot_fold(producer_node, bn_node, producer, bn, calls)
            if reason:
                ctx.note(f"kept BN '{bn_node.target}' after '{producer_node.target}': {reason}")
                ctx.stats["kept"] += 1
                continue
            to_qat(producer, producer_node.target, bn)
            bn_node.replace_all_uses_with(producer_node)
            gm.graph.erase_node(bn_node)
            absorbed.append(bn_node.target)
            ctx.stats["blocks"] += 1
        for target in absorbed:
            gm.delete_submodule(target)
        lone = sorted({n.target for n in gm.graph.nodes if n.op == "call_module"
                       and isinstance(gm.get_submodule(n.target), _BatchNorm)})
        if lone:
            ctx.note(f"{len(lone)} BN module(s) have no producer to merge with and stay float: {', '.join(lone)}")
        gm.recompile()
        return PassResult(gm, modified=bool(absorbed))
