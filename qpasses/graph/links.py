"""Chains of weighted layers joined channel by channel: what cross-layer equalization and bias absorption
act on.

A link ``L1 → a1 → … → L2`` joins two conv/linear layers through single-consumer ops that act on each
channel separately and commute with a positive per-channel scale, ``a(x / s) = a(x) / s``: ReLU,
LeakyReLU, identity, dropout, zero padding, pooling, flatten to ``(N, C)``; and clamp-like activations
(ReLU6, hardtanh, clamp, ChannelClamp), which commute once their bounds are divided by ``s`` too.
Each intermediate value is read only by the next op, so rescaling inside the link changes nothing else.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qpasses.graph.channels import WEIGHTED
from qpasses.graph.match import single_consumer
from qpasses.graph.modules import set_module, unique_name
from qpasses.graph.nx import to_networkx
from qpasses.nn import ChannelClamp, SamePad2d
from qpasses.quant.ops import clamp_bounds, is_clamp_like, op_of

_HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_HOMOGENEOUS_FUNCTIONS = (F.relu, F.leaky_relu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout)


@dataclass
class Link:
    """``producer`` → ``between`` (in order) → ``consumer``; the channels of ``producer``'s output are the
    input channels of ``consumer``."""

    producer: fx.Node
    between: list[fx.Node]
    consumer: fx.Node


@dataclass
class Chain:
    """Layers ``L0 → L1 → … → Lk`` joined by links (``links[i]`` joins ``layers[i]`` and ``layers[i + 1]``)."""

    layers: list[fx.Node]
    links: list[Link] = field(default_factory=list)

    def __str__(self) -> str:
        return " → ".join(n.target for n in self.layers)


def clamp_like(gm: fx.GraphModule, node: fx.Node) -> bool:
    """ReLU6, hardtanh, clamp and ChannelClamp with numeric bounds (ReLU counts as homogeneous)."""
    if not is_clamp_like(gm, node):
        return False
    lo, hi = clamp_bounds(gm, node)
    return all(b is None or isinstance(b, int | float) for b in (lo, hi))


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    op = op_of(gm, node)
    return op is not None and op.name == "relu"


def channel_bounds(gm: fx.GraphModule, node: fx.Node, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (lower, upper) of a ReLU or clamp-like ``node``, ±inf where unbounded."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(module, ChannelClamp):
        return module.lower.clone(), module.upper.clone()
    lo, hi = (0.0, math.inf) if is_relu(gm, node) else bounds(gm, node)
    return torch.full_like(like, lo), torch.full_like(like, hi)


def activation_after(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The ReLU or clamp-like op that is the only reader of ``node``'s output, or None."""
    users = list(node.users)
    if len(users) == 1 and (is_relu(gm, users[0]) or clamp_like(gm, users[0])):
        return users[0]
    return None


def activation_bounds(gm: fx.GraphModule, node: fx.Node, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (lower, upper) of the activation that alone reads ``node``'s output (±inf without one):
    the only part of ``node``'s output error that reaches the next layer is inside them."""
    activation = activation_after(gm, node)
    if activation is None:
        return torch.full_like(like, -math.inf), torch.full_like(like, math.inf)
    return channel_bounds(gm, activation, like)


def link_activation(gm: fx.GraphModule, link: Link, also: tuple[type[nn.Module], ...] = ()) -> fx.Node | None:
    """The one ReLU or clamp-like op of ``link`` when everything else between is identity-like (identity,
    dropout, flatten, or a module of ``also``); None otherwise."""
    activations = [n for n in link.between if is_relu(gm, n) or clamp_like(gm, n)]
    others = [n for n in link.between if n not in activations]
    plain = (nn.Identity, nn.Dropout, nn.Flatten, *also)
    if len(activations) != 1 or not all(
            n.op == "call_module" and isinstance(gm.get_submodule(n.target), plain) for n in others):
        return None
    return activations[0]


def needs_rescaling(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a link op's parameters change when the channels through it are divided by a scale."""
    if not clamp_like(gm, node):
        return False
    lo, hi = clamp_bounds(gm, node)
    return not (lo in (None, 0) and hi is None)


def bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float]:
    """A clamp-like op's (lower, upper), ±inf where unbounded."""
    lo, hi = clamp_bounds(gm, node)
    return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _channelwise(gm: fx.GraphModule, node: fx.Node, through: tuple[type[nn.Module], ...]) -> bool:
    if len(node.all_input_nodes) != 1:
        return False
    if clamp_like(gm, node):
        return True
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _HOMOGENEOUS_MODULES + through):
            return True
        if isinstance(module, SamePad2d):
            return module.value == 0
        if isinstance(module, nn.Flatten):
            shape = _shape(node.all_input_nodes[0])
            return module.start_dim == 1 and shape is not None and all(d == 1 for d in shape[2:])
        return False
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target == "relu"


def _channels_on_dim1(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Linear layers act on the last dim; as a link end their tensor must be ``(N, features)``."""
    if isinstance(gm.get_submodule(node.target), nn.Linear):
        shape = _shape(node)
        inputs = [_shape(a) for a in node.all_input_nodes]
        return shape is not None and len(shape) == 2 and all(s is not None and len(s) == 2 for s in inputs)
    return True


def find_links(gm: fx.GraphModule, graph: nx.DiGraph | None = None,
               through: tuple[type[nn.Module], ...] = ()) -> list[Link]:
    """Every link between two weighted layers, each layer called once (shared weights are left alone);
    modules of the types ``through`` count as identities (e.g. observers, for passes that only read)."""
    graph = graph if graph is not None else to_networkx(gm)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def weighted(node: fx.Node) -> bool:
        return (node.op == "call_module" and calls[node.target] == 1
                and isinstance(gm.get_submodule(node.target), WEIGHTED) and _channels_on_dim1(gm, node))

    links = []
    for node in gm.graph.nodes:
        if not weighted(node):
            continue
        between, current = [], node
        while True:
            name = single_consumer(graph, current.name)
            if name is None:
                break
            nxt = graph.nodes[name]["node"]
            if len(nxt.all_input_nodes) != 1:
                break
            if weighted(nxt):
                links.append(Link(node, between, nxt))
                break
            if not _channelwise(gm, nxt, through):
                break
            between.append(nxt)
            current = nxt
    return links


def find_layer_chains(gm: fx.GraphModule, graph: nx.DiGraph | None = None) -> list[Chain]:
    """Links joined end to start into maximal chains, in graph order."""
    links = find_links(gm, graph)
    by_producer = {link.producer: link for link in links}
    consumers = {link.consumer for link in links}
    chains = []
    for link in links:
        if link.producer in consumers:
            continue
        chain = Chain([link.producer])
        current: Link | None = link
        while current is not None:
            chain.links.append(current)
            chain.layers.append(current.consumer)
            current = by_producer.get(current.consumer)
        chains.append(chain)
    return chains


def replace_with_channel_clamp(gm: fx.GraphModule, node: fx.Node, clamp: ChannelClamp) -> fx.Node:
    """Put ``clamp`` where the clamp-like ``node`` is: in its module slot when only this node calls it,
    else as a new module; returns the node that now computes the clamp."""
    if node.op == "call_module" and sum(1 for n in gm.graph.nodes if n.target == node.target) == 1:
        set_module(gm, node.target, clamp)
        return node
    target = unique_name(gm, f"{node.name}_clamp")
    gm.add_submodule(target, clamp)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(target, (node.all_input_nodes[0],))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new
