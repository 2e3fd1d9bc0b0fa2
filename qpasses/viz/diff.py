"""Which nodes a pass added, removed or changed, matching nodes of the two graphs by name."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from qpasses.graph.nx import node_kind

ADDED, REMOVED, CHANGED = "added", "removed", "changed"


@dataclass(frozen=True)
class GraphDiff:
    """Node names of ``after`` that are new or changed, and of ``before`` that are gone."""

    added: frozenset[str]
    removed: frozenset[str]
    changed: frozenset[str]

    def status(self, name: str) -> str | None:
        if name in self.added:
            return ADDED
        if name in self.removed:
            return REMOVED
        if name in self.changed:
            return CHANGED
        return None


def _signature(gm: fx.GraphModule, node: fx.Node) -> tuple[str, ...]:
    # The module class is part of it so that swapping the module behind a name (Conv2d for a quantized
    # Conv2d, say) counts as a change even though op, target and args stay the same.
    args = fx.node.map_arg(node.args, lambda n: n.name)
    kwargs = fx.node.map_arg(node.kwargs, lambda n: n.name)
    return node.op, str(node.target), node_kind(gm, node), repr(args), repr(kwargs)


def diff_graphs(before: fx.GraphModule, after: fx.GraphModule) -> GraphDiff:
    """Nodes are the same node when they have the same name; changed means other op, target, module or args."""
    old = {node.name: node for node in before.graph.nodes}
    new = {node.name: node for node in after.graph.nodes}
    changed = {
        name for name in old.keys() & new.keys()
        if _signature(before, old[name]) != _signature(after, new[name])
    }
    return GraphDiff(
        added=frozenset(new.keys() - old.keys()),
        removed=frozenset(old.keys() - new.keys()),
        changed=frozenset(changed),
    )
