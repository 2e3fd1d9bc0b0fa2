"""Pattern search on the networkx view: single-consumer chains such as conv → bn → act."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import networkx as nx
import torch.fx as fx
from torch import nn

from qpasses.graph.nx import to_networkx

Predicate = Callable[[fx.GraphModule, fx.Node], bool]


def is_module(*types: type[nn.Module]) -> Predicate:
    """Matches ``call_module`` nodes whose module is an instance of one of ``types``."""

    def match(gm: fx.GraphModule, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(gm.get_submodule(node.target), types)

    return match


def is_function(*targets: Callable) -> Predicate:
    """Matches ``call_function`` nodes calling one of ``targets``."""

    def match(gm: fx.GraphModule, node: fx.Node) -> bool:
        return node.op == "call_function" and node.target in targets

    return match


def is_method(*names: str) -> Predicate:
    """Matches ``call_method`` nodes calling one of the tensor methods ``names``."""

    def match(gm: fx.GraphModule, node: fx.Node) -> bool:
        return node.op == "call_method" and node.target in names

    return match


def any_of(*predicates: Predicate) -> Predicate:
    def match(gm: fx.GraphModule, node: fx.Node) -> bool:
        return any(p(gm, node) for p in predicates)

    return match


def single_consumer(graph: nx.DiGraph, name: str) -> str | None:
    """The one node that reads ``name``'s output, or None if zero or several do."""
    users = list(graph.successors(name))
    return users[0] if len(users) == 1 else None


def find_chains(
    gm: fx.GraphModule, pattern: Sequence[Predicate], graph: nx.DiGraph | None = None
) -> list[list[fx.Node]]:
    """All chains ``n0 → n1 → … → nk`` with ``pattern[i](gm, ni)``, where each ``ni`` (i < k) has
    exactly one consumer, ``n(i+1)``, and each ``n(i+1)`` has ``ni`` as its only graph input.

    Chains are returned in graph order and do not overlap (the earliest start wins).
    """
    if not pattern:
        return []
    graph = graph if graph is not None else to_networkx(gm)
    taken: set[str] = set()
    chains = []
    for start in gm.graph.nodes:
        if start.name in taken or not pattern[0](gm, start):
            continue
        chain = [start]
        for predicate in pattern[1:]:
            nxt = single_consumer(graph, chain[-1].name)
            if nxt is None or nxt in taken:
                break
            node = graph.nodes[nxt]["node"]
            if graph.in_degree(nxt) != 1 or not predicate(gm, node):
                break
            chain.append(node)
        if len(chain) == len(pattern):
            chains.append(chain)
            taken.update(n.name for n in chain)
    return chains
