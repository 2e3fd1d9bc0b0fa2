"""Per-node SQNR of a quantized (lowered or fake-quant) GraphModule against the float one it came from.

Both graphs run on the same inputs; each node of the quantized graph is compared with the float node of
the same name, which is the value it computes wherever the passes kept the name (tracing names nodes
after modules, and the passes rename nothing they keep). Where the float node was followed by nodes the
quantized graph no longer has (a folded BatchNorm, a ReLU fused into the conv's output range), the node
stands for the last of them, so a fused conv is compared with the float ReLU's output, not with its
pre-activation (where lowering enforces the activation's upper bound with a separate clamp, as for ReLU6
with a wider 8-bit range, the conv's own value is above the bound and the clamp after it is the one that
matches). Nodes that ``+`` or ``torch.cat`` became (FloatFunctional calls) are paired by their
inputs; quantize, dequantize and range clamps carry the value of their input.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.fx as fx

from qpasses.analysis.metrics import sqnr
from qpasses.graph.trace import as_input_tuple

SQNR_KEY = "sqnr_db"


def node_values(gm: fx.GraphModule, inputs: tuple) -> dict[str, torch.Tensor]:
    """The tensor each node of ``gm`` computes on ``inputs``, dequantized, by node name (eval mode, no grad).

    Runs a copy, so that observers in ``gm`` do not count ``inputs`` as calibration data.
    """
    values: dict[str, torch.Tensor] = {}
    gm = copy.deepcopy(gm)

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, torch.Tensor):
                tensor = result.dequantize() if result.is_quantized else result
                if tensor.is_floating_point():
                    values[n.name] = tensor.detach()
            return result

    gm.eval()
    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return values


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if n.op != "get_attr"]


def _counterpart(float_node: fx.Node, kept: set[str]) -> fx.Node:
    """``float_node``, or the end of the chain of unary ops after it that the other graph folded away."""
    node = float_node
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.name in kept or user.op == "output" or len(_data_inputs(user)) != 1:
            break
        node = user
    return node


def match_nodes(reference: fx.GraphModule, model: fx.GraphModule) -> dict[str, str]:
    """``{node of model: node of reference}`` for the nodes of ``model`` that compute a float value.

    Same name first (followed by folded unary ops, see the module docstring). A renamed node (a
    quantized op call that replaced ``+``) matches the reference node, absent from ``model``, that
    reads the same matched inputs; a node with one input and no match (quantize, dequantize, range
    clamp) carries the value of its input.
    """
    float_nodes = {n.name: n for n in reference.graph.nodes}
    kept = {n.name for n in model.graph.nodes}
    float_of: dict[fx.Node, fx.Node] = {}
    for node in model.graph.nodes:
        if node.op in ("output", "get_attr"):
            continue
        match = float_nodes.get(node.name)
        if match is None:
            sources = [float_of.get(n) for n in _data_inputs(node)]
            if not sources or any(s is None for s in sources):
                continue
            match = next((user for user in sources[0].users
                          if user.name not in kept and _data_inputs(user) == sources), None)
            if match is None and len(sources) == 1:
                match = sources[0]
        if match is not None:
            float_of[node] = _counterpart(match, kept)
    return {node.name: match.name for node, match in float_of.items() if node.op != "placeholder"}


def node_sqnr(reference: fx.GraphModule, model: fx.GraphModule, example_inputs: Any,
              write_meta: bool = True) -> dict[str, float]:
    """SQNR in dB of every node of ``model`` that has a counterpart in the float ``reference``.

    ``reference`` is the float graph before quantization (e.g. the PassManager's ``"traced"`` snapshot),
    ``model`` the quantized one; both run on ``example_inputs``; nodes are paired by :func:`match_nodes`.
    With ``write_meta`` each compared node of ``model`` gets ``node.meta['sqnr_db']`` (what ``qpasses.viz``
    colours with ``heat=True``); identical values give ``inf``. Returns ``{node name: dB}`` in
    ``model``'s graph order.
    """
    inputs = as_input_tuple(example_inputs)
    float_values = node_values(reference, inputs)
    quant_values = node_values(model, inputs)
    nodes = {n.name: n for n in model.graph.nodes}
    result: dict[str, float] = {}
    for name, float_name in match_nodes(reference, model).items():
        value, expected = quant_values.get(name), float_values.get(float_name)
        if value is None or expected is None or value.shape != expected.shape:
            continue
        result[name] = sqnr(expected, value)
        if write_meta:
            nodes[name].meta[SQNR_KEY] = result[name]
    return result


def worst_nodes(sqnr_by_node: dict[str, float], k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` nodes with the lowest finite SQNR, worst first: where to look for the accuracy drop."""
    finite = [(name, db) for name, db in sqnr_by_node.items() if math.isfinite(db)]
    return sorted(finite, key=lambda item: item[1])[:k]
