"""A networkx view of an fx graph, for graph algorithms and pattern search."""

from __future__ import annotations

import networkx as nx
import torch.fx as fx


def node_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short label: the module class for ``call_module``, the function name otherwise."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A ``DiGraph`` with one vertex per fx node (keyed by node name) and an edge per data dependency.

    Vertex attributes: ``node`` (the fx node), ``op``, ``target``, ``kind``, ``shape`` (or None).
    """
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if hasattr(meta, "shape") else None
        graph.add_node(node.name, node=node, op=node.op, target=str(node.target),
                       kind=node_kind(gm, node), shape=shape)
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            graph.add_edge(src.name, node.name)
    return graph
