"""Layer-by-layer propagation of calibration data along two paths at once, for passes that fix each
layer's quantization error given the errors of the layers before it (bias correction, AdaRound).

- the float path runs a frozen copy of the model as it was: float weights (those from before AdaRound
  rounded them, if it ran), no activation quantization;
- the quantized path runs the observed graph as lowering will execute it: each conv/linear with its
  weight on the grid the annotation chose (``weight_for`` decides which grid point, layer by layer) and
  each observed activation on its calibrated grid.

The sweep goes node by node over all batches, keeping only values some later node still reads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call

from qpasses.errors import QPassesError
from qpasses.passes.calibrate import batch_inputs
from qpasses.passes.insert_observers import ANNOTATION_KEY
from qpasses.quant.annotate import Annotation
from qpasses.quant.lowering import FLOAT_WEIGHT_KEY, on_grid, weight_spec
from qpasses.quant.observers import Observer
from qpasses.quant.ops import Role
from qpasses.quant.spec import QuantSpec


@dataclass
class Layer:
    """One int8 conv/linear as the sweep reaches it."""

    node: fx.Node
    module: nn.Module  # the layer in the graph being rewritten (its bias and weight may be changed)
    spec: QuantSpec  # its weight's spec, axis as lowering uses it
    quant_inputs: list[torch.Tensor]  # its input on the quantized path, one tensor per batch
    float_outputs: list[torch.Tensor]  # what the float model's layer outputs, one tensor per batch

    def run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer on ``x`` with ``weight`` in place of its own (bias as it is now)."""
        return functional_call(self.module, {"weight": weight}, (x,))


WeightFor = Callable[[Layer], torch.Tensor]


def annotation_of(gm: fx.GraphModule, pass_name: str) -> Annotation:
    """The quantization decisions InsertObservers published on the graph (backend, specs per node)."""
    ann = gm.meta.get(ANNOTATION_KEY)
    if ann is None:
        raise QPassesError(f"{pass_name} needs the quantization settings of a PTQ pass in the same pipeline: "
                           f"add PTQ(data, backend=...) (or InsertObservers + Calibrate) to it")
    return ann


def collect_batches(data: Iterable, gm: fx.GraphModule, num_batches: int | None, pass_name: str) -> list[tuple]:
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    batches = []
    for batch in data:
        if num_batches is not None and len(batches) >= num_batches:
            break
        batches.append(tuple(t.detach() for t in batch_inputs(batch, n_inputs)))
    if not batches:
        raise QPassesError(f"{pass_name}: the data yielded no batches; give at least one")
    return batches


def _fetch(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _execute(gm: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict):
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    raise QPassesError(f"internal: cannot execute node '{node.name}' ({node.op})")


def sweep(gm: fx.GraphModule, ann: Annotation, batches: list[tuple], weight_for: WeightFor) -> int:
    """Propagate ``batches`` (tuples of model inputs) through ``gm``; at each int8 conv/linear call
    ``weight_for(layer)``, which may change the layer's bias and returns the float weight the quantized
    path uses for it (on its grid). Returns the number of layers visited."""
    reference = copy.deepcopy(gm)
    ref_nodes = {n.name: n for n in reference.graph.nodes}
    with torch.no_grad():
        for node in ref_nodes.values():
            if FLOAT_WEIGHT_KEY in node.meta:
                reference.get_submodule(node.target).weight.copy_(node.meta[FLOAT_WEIGHT_KEY])
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in gm.graph.nodes}
    float_env: dict[fx.Node, list] = {}
    quant_env: dict[fx.Node, list] = {}
    placeholders = iter(range(len(batches[0])))
    visited = 0
    was_training = gm.training
    gm.eval()
    reference.eval()
    try:
        with torch.no_grad():
            for node in gm.graph.nodes:
                if node.op == "output":
                    break
                if node.op == "placeholder":
                    index = next(placeholders)
                    float_env[node] = quant_env[node] = [batch[index] for batch in batches]
                elif node.op == "get_attr":
                    float_env[node] = [_fetch(reference, node.target)] * len(batches)
                    quant_env[node] = [_fetch(gm, node.target)] * len(batches)
                else:
                    module = gm.get_submodule(node.target) if node.op == "call_module" else None
                    if isinstance(module, Observer):
                        float_env[node] = float_env[node.args[0]]
                    else:
                        float_env[node] = _run_all(reference, ref_nodes[node.name], float_env, len(batches))
                    if isinstance(module, Observer):
                        scale, zero_point = module.qparams()
                        quant_env[node] = [on_grid(x, scale, zero_point, module.spec)
                                           for x in quant_env[node.args[0]]]
                    elif ann.roles.get(node.name) is Role.COMPUTE:
                        inputs = quant_env[node.args[0]]
                        layer = Layer(node, module, weight_spec(module, ann.pairs[node.name].weight),
                                      inputs, float_env[node])
                        with torch.enable_grad():
                            weight = weight_for(layer)
                        quant_env[node] = [layer.run(x, weight.detach()) for x in inputs]
                        visited += 1
                    else:
                        quant_env[node] = _run_all(gm, node, quant_env, len(batches))
                for done in [n for n in float_env if last_use[n] <= order[node] and n is not node]:
                    del float_env[done], quant_env[done]
    finally:
        gm.train(was_training)
    return visited


def _run_all(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, list], n_batches: int) -> list:
    """``node`` (of ``gm``) on every batch; its inputs are looked up by name among the nodes of ``env``."""
    by_name = {n.name: n for n in env}
    results = []
    for b in range(n_batches):
        args = fx.map_arg(node.args, lambda a, b=b: env[by_name[a.name]][b])
        kwargs = fx.map_arg(node.kwargs, lambda a, b=b: env[by_name[a.name]][b])
        results.append(_execute(gm, node, args, kwargs))
    return results
