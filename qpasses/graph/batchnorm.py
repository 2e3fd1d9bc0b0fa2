"""Producer → BatchNorm pairs: finding the ones that can be merged, and merging them.

FuseBN folds each BN into its producer; FoldBNForTraining puts both into one QAT block. Both take the
same pairs for the same reasons and remove the BN nodes the same way, so that lives here once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qpasses.graph.channels import out_channels
from qpasses.graph.match import find_chains, is_module


def cannot_merge(producer_node: fx.Node, bn_node: fx.Node, producer: nn.Module, bn: _BatchNorm,
                 calls: Counter) -> str | None:
    """Why ``bn`` cannot merge into ``producer``, or None."""
    if not bn.track_running_stats or bn.running_mean is None:
        return "it has no running statistics (track_running_stats=False)"
    for node in (producer_node, bn_node):
        if calls[node.target] > 1:
            return f"'{node.target}' is called {calls[node.target]} times (shared weights)"
    if bn.num_features != out_channels(producer):
        return f"BN has {bn.num_features} features but the producer has {out_channels(producer)} outputs"
    meta = producer_node.meta.get("tensor_meta")
    if isinstance(producer, nn.Linear) and (meta is None or len(meta.shape) != 2):
        return "BatchNorm1d after Linear folds only for 2-D (batch, features) outputs"
    return None


def merge_batchnorms(gm: fx.GraphModule, producer_types: tuple[type[nn.Module], ...],
                     merge: Callable[[str, nn.Module, _BatchNorm], None], note: Callable[[str], None]) -> list[str]:
    """For each producer → BN pair (the producer's output read by the BN alone, each called once), call
    ``merge(producer name, producer, bn)``, then drop the BN from the graph and the module tree.

    ``note`` receives why a pair was kept. Returns the merged BNs' names; ``gm`` still needs ``recompile()``.
    """
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    merged = []
    for producer_node, bn_node in find_chains(gm, [is_module(*producer_types), is_module(_BatchNorm)]):
        producer, bn = gm.get_submodule(producer_node.target), gm.get_submodule(bn_node.target)
        reason = cannot_merge(producer_node, bn_node, producer, bn, calls)
        if reason:
            note(f"kept BN '{bn_node.target}' after '{producer_node.target}': {reason}")
            continue
        merge(producer_node.target, producer, bn)
        bn_node.replace_all_uses_with(producer_node)
        gm.graph.erase_node(bn_node)
        merged.append(bn_node.target)
    for target in merged:
        gm.delete_submodule(target)
    return merged


def remaining_batchnorms(gm: fx.GraphModule) -> list[str]:
    """The BN modules the graph still calls, sorted."""
    return sorted({n.target for n in gm.graph.nodes
                   if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _BatchNorm)})
