"""Layer-by-layer (or block-by-block) propagation of calibration data along two paths at once, for passes
that fix each layer's quantization error given the errors of the layers before it (bias correction, AdaRound).

- the float path runs a frozen copy of the model as it was: float weights (those from before AdaRound
  rounded them, if it ran), no activation quantization;
- the quantized path runs the observed graph as lowering will execute it: each conv/linear with its
  weight on the grid the annotation chose (``weight_for`` decides which grid point, layer by layer) and
  each observed activation on its calibrated grid.

The sweep goes node by node over all batches, keeping only values some later node still reads. A block (a
single-entry, single-exit region) is decided at once: the float path runs ahead to its exit, and the block's
quantized path can be replayed differentiably from its entry (``Block.run``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call

from qpasses import distributed
from qpasses.errors import QPassesError
from qpasses.graph.regions import Region
from qpasses.passes.calibrate import batch_inputs, model_device, to_device
from qpasses.quant.annotate import Annotation
from qpasses.quant.lowering import on_grid, weight_spec
from qpasses.quant.observers import Observer
from qpasses.quant.ops import Role
from qpasses.quant.spec import QuantSpec
from qpasses.quant.state import FLOAT_WEIGHT_KEY, existing_state


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


class Block:
    """A single-entry, single-exit region holding int8 conv/linear layers, as the sweep reaches it: its
    quantized path can be replayed with chosen weights, differentiably."""

    def __init__(self, gm: fx.GraphModule, region: Region, layers: list[fx.Node], ann: Annotation,
                 quant_inputs: list[torch.Tensor], float_outputs: list[torch.Tensor]):
        self.gm, self.region, self.layers = gm, region, layers
        self.modules = {n: gm.get_submodule(n.target) for n in layers}
        self.specs = {n: weight_spec(self.modules[n], ann.pairs[n.name].weight) for n in layers}
        self.quant_inputs = quant_inputs  # the entry's value on the quantized path, one tensor per batch
        self.float_outputs = float_outputs  # the exit's value on the float path, one tensor per batch
        self._observed = {}
        for node in region.nodes:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, Observer):
                self._observed[node] = (*module.qparams(), module.spec)

    def run(self, x: torch.Tensor, params: dict[fx.Node, dict[str, torch.Tensor]]) -> torch.Tensor:
        """The exit's value on the quantized path from the entry's value ``x``, each layer with the parameters
        in ``params`` (its weight, and bias if given) in place of its own; activation quantization passes
        gradients straight through."""
        env = {self.region.entry: x}

        def value(arg: fx.Node) -> torch.Tensor:
            return env[arg] if arg in env else _fetch(self.gm, arg.target)  # a get_attr (regions hold none)

        for node in self.region.nodes:
            if node in self._observed:
                observed = env[node.args[0]]
                env[node] = observed + (on_grid(observed, *self._observed[node]) - observed).detach()
            elif node in self.modules:
                env[node] = functional_call(self.modules[node], params[node], (env[node.args[0]],))
            else:
                args, kwargs = fx.map_arg(node.args, value), fx.map_arg(node.kwargs, value)
                env[node] = _execute(self.gm, node, args, kwargs)
        return env[self.region.exit]


BlockWeightsFor = Callable[[Block], dict[fx.Node, torch.Tensor]]


def annotation_of(gm: fx.GraphModule, pass_name: str) -> Annotation:
    """The quantization decisions InsertObservers published on the graph (backend, specs per node)."""
    state = existing_state(gm)
    ann = state.annotation if state is not None else None
    if ann is None:
        raise QPassesError(f"{pass_name} needs the quantization settings of a PTQ pass in the same pipeline: "
                           f"add PTQ(data, backend=...) (or InsertObservers + Calibrate) to it")
    return ann


def collect_batches(data: Iterable, gm: fx.GraphModule, num_batches: int | None, pass_name: str) -> list[tuple]:
    """The model inputs of the first ``num_batches`` batches of ``data``, on the model's device."""
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    device = model_device(gm)
    batches = []
    for batch in data:
        if num_batches is not None and len(batches) >= num_batches:
            break
        batches.append(tuple(t.detach() for t in to_device(batch_inputs(batch, n_inputs), device)))
    if not batches:
        raise QPassesError(f"{pass_name}: the data yielded no batches; give at least one")
    return batches


def collect_shard(data: Iterable, gm: fx.GraphModule, num_batches: int | None,
                  pass_name: str) -> tuple[list[int], list[tuple], int]:
    """This rank's share of ``collect_batches``: the batches' indices, the batches and how many there are in
    all. Under torch.distributed batch
    ``i`` goes to rank ``i % world_size`` (every rank keeps all of them when there are fewer batches than
    ranks); without it, all batches. Per-batch results are then reduced in index order
    (``distributed.gather_indexed``), as one process would."""
    batches = collect_batches(data, gm, num_batches, pass_name)
    if len(batches) < distributed.rank_and_size()[1]:
        return list(range(len(batches))), batches, len(batches)
    indices = list(distributed.split(len(batches)))
    return indices, [batches[i] for i in indices], len(batches)


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
    def one_layer(block: Block) -> dict[fx.Node, torch.Tensor]:
        (node,) = block.layers
        return {node: weight_for(Layer(node, block.modules[node], block.specs[node], block.quant_inputs,
                                       block.float_outputs))}

    return sweep_blocks(gm, ann, batches, [], one_layer)


def sweep_blocks(gm: fx.GraphModule, ann: Annotation, batches: list[tuple], regions: list[Region],
                 weights_for: BlockWeightsFor) -> int:
    """Propagate ``batches`` through ``gm`` as ``sweep`` does, a block at a time: at the first node of each
    of ``regions`` holding int8 conv/linear layers (an int8 layer outside them is a block of its own) call
    ``weights_for(block)``, which returns the float weight (on its grid) the quantized path uses for each of
    the block's layers. Returns the number of layers visited."""
    reference = copy.deepcopy(gm)
    ref_nodes = {n.name: n for n in reference.graph.nodes}
    with torch.no_grad():
        for node in ref_nodes.values():
            if FLOAT_WEIGHT_KEY in node.meta:
                reference.get_submodule(node.target).weight.copy_(node.meta[FLOAT_WEIGHT_KEY])
    is_layer = {n: ann.roles.get(n.name) is Role.COMPUTE for n in gm.graph.nodes}
    starts: dict[fx.Node, Region] = {}
    for region in regions:
        if any(is_layer[n] for n in region.nodes):
            starts[region.nodes[0]] = region
    in_blocks = {n for region in starts.values() for n in region.nodes}
    inside = {n for region in starts.values() for n in region.nodes if n is not region.exit}
    for node in gm.graph.nodes:
        if is_layer[node] and node not in in_blocks:
            starts[node] = Region([node], node.args[0], node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in gm.graph.nodes}
    float_env: dict[fx.Node, list] = {}
    quant_env: dict[fx.Node, list] = {}
    weights: dict[fx.Node, torch.Tensor] = {}
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
                if node in starts:
                    region = starts[node]
                    # The float path runs ahead to the block's exit, for the target of its reconstruction.
                    _float_through(reference, ref_nodes, region, float_env, len(batches))
                    block = Block(gm, region, [n for n in region.nodes if is_layer[n]], ann,
                                  quant_env[region.entry], float_env[region.exit])
                    with torch.enable_grad():
                        found = weights_for(block)
                    weights.update({n: w.detach() for n, w in found.items()})
                    visited += len(block.layers)
                if node.op == "placeholder":
                    index = next(placeholders)
                    float_env[node] = quant_env[node] = [batch[index] for batch in batches]
                elif node.op == "get_attr":
                    float_env[node] = [_fetch(reference, node.target)] * len(batches)
                    quant_env[node] = [_fetch(gm, node.target)] * len(batches)
                else:
                    module = gm.get_submodule(node.target) if node.op == "call_module" else None
                    # Computed ahead as a block's exit, or inside a block: read by nothing after it.
                    if node not in float_env and node not in inside:
                        float_env[node] = _float_value(reference, ref_nodes, node, float_env, len(batches))
                    if isinstance(module, Observer):
                        scale, zero_point = module.qparams()
                        quant_env[node] = [on_grid(x, scale, zero_point, module.spec)
                                           for x in quant_env[node.args[0]]]
                    elif is_layer[node]:
                        weight = weights.pop(node)
                        quant_env[node] = [functional_call(module, {"weight": weight}, (x,))
                                           for x in quant_env[node.args[0]]]
                    else:
                        quant_env[node] = _run_all(gm, node, quant_env, len(batches))
                for done in [n for n in quant_env if last_use[n] <= order[node] and n is not node]:
                    float_env.pop(done, None)
                    del quant_env[done]
    finally:
        gm.train(was_training)
    return visited


def _float_through(reference: fx.GraphModule, ref_nodes: dict[str, fx.Node], region: Region,
                   float_env: dict[fx.Node, list], n_batches: int) -> None:
    """Put the float path's value of ``region.exit`` in ``float_env``, running the region's nodes on a
    scratch copy of the environment that drops each value after its last use in the region."""
    scratch = dict(float_env)
    position = {n: i for i, n in enumerate(region.nodes)}
    last_use = {n: max((position.get(u, len(region.nodes)) for u in n.users), default=position[n])
                for n in region.nodes}
    for node in region.nodes:
        for constant in (a for a in node.all_input_nodes if a.op == "get_attr"):
            scratch[constant] = [_fetch(reference, constant.target)] * n_batches
    for i, node in enumerate(region.nodes):
        scratch[node] = _float_value(reference, ref_nodes, node, scratch, n_batches)
        for done in [n for n in region.nodes[:i] if last_use[n] <= i and n in scratch]:
            del scratch[done]
    float_env[region.exit] = scratch[region.exit]


def _float_value(reference: fx.GraphModule, ref_nodes: dict[str, fx.Node], node: fx.Node,
                 env: dict[fx.Node, list], n_batches: int) -> list:
    """``node``'s value on every batch on the float path (``reference``, whose nodes ``ref_nodes`` names):
    observers pass their input through."""
    if node.op == "call_module" and isinstance(reference.get_submodule(node.target), Observer):
        return env[node.args[0]]
    return _run_all(reference, ref_nodes[node.name], env, n_batches)


def _run_all(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, list], n_batches: int) -> list:
    """``node`` (of ``gm``) on every batch; its inputs are looked up by name among the nodes of ``env``."""
    by_name = {n.name: n for n in env}
    results = []
    for b in range(n_batches):
        args = fx.map_arg(node.args, lambda a, b=b: env[by_name[a.name]][b])
        kwargs = fx.map_arg(node.kwargs, lambda a, b=b: env[by_name[a.name]][b])
        results.append(_execute(gm, node, args, kwargs))
    return results
