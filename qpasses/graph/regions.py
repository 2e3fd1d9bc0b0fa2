"""Single-entry, single-exit regions of a traced graph, for passes that rewrite a block of layers at once.

A *cut* is a point of the node order where exactly one value is live (computed before it, read after it):
everything after the cut depends on everything before it only through that value. The nodes between two
consecutive cuts form a region that reads one value from before it and hands one value on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx


@dataclass
class Region:
    """Consecutive nodes of a graph that read, of the values computed before them, only ``entry`` (get_attr
    constants aside) and of which later nodes read only ``exit``."""

    nodes: list[fx.Node]
    entry: fx.Node
    exit: fx.Node


def _computation(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]


def single_entry_regions(graph: fx.Graph) -> list[Region]:
    """The graph's computation split at every cut, in order; empty if the graph has several inputs (no cut)."""
    nodes = _computation(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or not nodes:
        return []
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in graph.nodes}
    regions: list[Region] = []
    entry, start = placeholders[0], 0
    live: set[fx.Node] = {entry}
    for i, node in enumerate(nodes):
        live = {n for n in live if last_use[n] > order[node]}
        if node.users:
            live.add(node)
        if len(live) == 1 and node in live:
            regions.append(Region(nodes[start:i + 1], entry, node))
            entry, start = node, i + 1
    return regions


def blocks(graph: fx.Graph, block_of: Callable[[fx.Node], str | None]) -> list[Region]:
    """The single-entry regions merged into blocks: a region whose ``block_of`` names (None for nodes outside
    any block) agree on one block, the same as the region before it holds, joins that region, and so does a
    region naming none (an activation, an observer: what follows a block's last layer belongs to it). A region
    spanning several blocks (a residual connection around them) is one block."""
    merged: list[Region] = []
    current: str | None = None
    for region in single_entry_regions(graph):
        names = {b for b in map(block_of, region.nodes) if b is not None}
        key = _common_prefix(names) if names else None
        if merged and (key is None or key == current):
            merged[-1] = Region(merged[-1].nodes + region.nodes, merged[-1].entry, region.exit)
        else:
            merged.append(region)
            current = key if key is not None else current
    return merged


def _common_prefix(paths: set[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def parent_module(node: fx.Node) -> str | None:
    """The path of the module holding a call_module node's module (``blocks.1.0`` for ``blocks.1.0.conv_pw``),
    None for other nodes."""
    if node.op != "call_module":
        return None
    return node.target.rpartition(".")[0]
