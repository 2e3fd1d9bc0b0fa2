"""Layer-by-layer (or block-by-block) propagation of calibration data along two paths at once, for passes
that fix each layer's quantization error given the errors of the layers before it (bias correction, AdaRound).

Both paths run one graph: the reference graph (``qpasses.passes.reference``) of a copy of the calibrated
graph, the simulation of the int codes the backend's kernels compute, with each conv/linear call given the
weight the pass chose for it and the layer's bias as it is now, in place of the weight codes the copy holds:

- the quantized path runs it as it is: every int8 value through its quantize → dequantize, each layer's
  weight the one ``weight_for`` returns (on its grid), its bias rounded as the backend's kernels round it;
- the float path passes every quantize and dequantize through and gives each layer its float weight (from
  before AdaRound rounded it, if it ran) and the bias it had when the sweep started: the model as it was.

The sweep goes node by node over all batches, keeping only values some later node still reads. A block (a
single-entry, single-exit region of the reference graph) is decided at once: the float path runs ahead to its
exit, and the block's quantized path can be replayed differentiably from its entry (``Block.run``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from qpasses import distributed
from qpasses.errors import QPassesError
from qpasses.graph.links import activation_bounds
from qpasses.graph.regions import Region, blocks
from qpasses.passes.base import PassContext
from qpasses.passes.calibrate import batch_inputs, model_device, to_device
from qpasses.passes.reference import DEQUANTIZE, QUANTIZE, build_reference
from qpasses.quant import lowering
from qpasses.quant.annotate import Annotation
from qpasses.quant.backends import get_backend
from qpasses.quant.fake_quant import bias_on_grid
from qpasses.quant.grids import Grids, weight_qparams_by_node
from qpasses.quant.lowering import weight_spec
from qpasses.quant.ops import Role
from qpasses.quant.spec import QuantSpec
from qpasses.quant.state import FLOAT_WEIGHT_KEY, INT8_OP_KEY, WEIGHT_QPARAMS_KEY, existing_state

Params = Mapping[fx.Node, Mapping[str, torch.Tensor]]


class Simulation:
    """The reference graph of the calibrated graph ``gm`` (built on a copy), run one node at a time along the
    quantized or the float path, each conv/linear call with parameters given per observed layer node."""

    def __init__(self, gm: fx.GraphModule, ann: Annotation):
        self.gm, self.ann = gm, ann
        self.backend = backend = get_backend(ann.backend)
        reference = copy.deepcopy(gm)
        layers = [n for n in reference.graph.nodes if ann.roles.get(n.name) is Role.COMPUTE]
        with lowering.quantized_engine(backend.engine):
            grids = Grids(reference, ann, backend, note=lambda _: None)  # Lower reports the widened grids
            # The grid of each layer's input: the int32 grid of its bias (Backend.quantized_bias) is s_in·s_w.
            self.input_scales = {n.name: grids.value_grid(n.args[0]).scale for n in layers}
        self.weight_qparams = weight_qparams_by_node(reference, ann)
        build_reference(reference, ann, backend, PassContext(example_inputs=()), grids, self.weight_qparams)
        _one_dequantize_per_quantize(reference.graph)
        self.reference = reference
        observed = {n.name: n for n in gm.graph.nodes}
        # The reference graph turns each conv/linear call into its functional form in place, under its name.
        self.layer_of = {n: observed[n.name] for n in reference.graph.nodes
                         if getattr(n.meta.get(INT8_OP_KEY), "role", None) is Role.COMPUTE}
        if len(self.layer_of) != len(layers):
            raise QPassesError(f"internal: the reference graph computes {len(self.layer_of)} of the "
                               f"{len(layers)} int8 conv/linear layers as calls the sweep can find")
        # Each call's dequantized weight codes: never run, the call is given the weight the pass chose instead.
        self.weight_nodes = {call.args[1] for call in self.layer_of}
        self.float_params = {}
        for node in self.layer_of.values():
            module = gm.get_submodule(node.target)
            bias = None if module.bias is None else module.bias.detach().clone()
            self.float_params[node] = {"weight": node.meta.get(FLOAT_WEIGHT_KEY, module.weight.detach().clone()),
                                       "bias": bias}

    def kernel_bias(self, layer: fx.Node, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``bias`` as ``layer``'s int8 kernel adds it: on the int32 grid ``s_in·s_w`` where the backend rounds it
        there (gradients pass straight through), with ``s_w`` the grid the layer's weight is on now."""
        if bias is None or not self.backend.quantized_bias:
            return bias
        weight_scale = layer.meta.get(WEIGHT_QPARAMS_KEY, self.weight_qparams[layer.name])[0]
        step = self.input_scales[layer.name] * torch.as_tensor(weight_scale).to(bias)
        return bias_on_grid(bias, step)

    def run(self, node: fx.Node, env: dict[fx.Node, object], params: Params, quantized: bool):
        """``node``'s value from its inputs' values ``env`` (get_attr constants are read from the graph): on the
        quantized path with ``params`` (each layer's weight, and bias if given, else its bias now), else on the
        float path. A dequantize whose quantize's input is in ``env`` passes gradients straight through to it."""
        def value(arg: fx.Node):
            if arg in env:
                return env[arg]
            if _dequantizes_codes(arg):  # the sweep keeps an int8 value as its codes
                return self.run(arg, env, params, quantized)
            return _fetch(self.reference, arg.target)

        if node in self.layer_of:
            layer = self.layer_of[node]
            if quantized:
                chosen = params[layer]
                module = self.gm.get_submodule(layer.target)
                weight, bias = chosen["weight"], self.kernel_bias(layer, chosen.get("bias", module.bias))
            else:
                weight, bias = self.float_params[layer]["weight"], self.float_params[layer]["bias"]
            args = (value(node.args[0]), weight, bias, *fx.map_arg(node.args[3:], value))
            return node.target(*args, **fx.map_arg(node.kwargs, value))
        if node.op == "call_function" and node.target in (QUANTIZE, DEQUANTIZE):
            source = node.args[0]
            if not quantized:
                return value(source)
            result = node.target(*fx.map_arg(node.args, value), **fx.map_arg(node.kwargs, value))
            if node.target is DEQUANTIZE and source.op == "call_function" and source.target is QUANTIZE:
                x = env.get(source.args[0])
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    result = x + (result - x).detach()
            return result
        return _execute(self.reference, node, fx.map_arg(node.args, value), fx.map_arg(node.kwargs, value))

    def float_outputs(self, inputs: tuple) -> Iterator[tuple[fx.Node, torch.Tensor]]:
        """Each layer (its node in the graph being rewritten) with its output on the float path for one batch of
        model ``inputs``, in graph order; each value is dropped after its last reader."""
        graph = self.reference.graph
        order, last_use = _last_uses(graph)
        placeholders = iter(inputs)
        env: dict[fx.Node, object] = {}
        for node in graph.nodes:
            if node.op == "output":
                break
            if node.op == "get_attr" or node in self.weight_nodes:
                continue
            env[node] = next(placeholders) if node.op == "placeholder" else self.run(node, env, {}, quantized=False)
            if node in self.layer_of:
                yield self.layer_of[node], env[node]
            for done in [n for n in env if last_use[n] <= order[node] and n is not node]:
                del env[done]


def _last_uses(graph: fx.Graph) -> tuple[dict[fx.Node, int], dict[fx.Node, int]]:
    """Each node's position, and the position of its last reader (its own without one); codes count as read
    as long as their dequantize is, which the sweep runs again for each reader."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in graph.nodes}
    for node in graph.nodes:
        if _dequantizes_codes(node):
            last_use[node.args[0]] = max(last_use[node.args[0]], last_use[node])
    return order, last_use


def _one_dequantize_per_quantize(graph: fx.Graph) -> None:
    """Let every reader of a quantized value read one dequantize (the reference graph gives each its own copy,
    as ``convert_pt2e`` does): the point after it is then a cut of the graph (``qpasses.graph.regions``), so a
    block ends on the dequantized value, not on the codes."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not QUANTIZE:
            continue
        first, *copies = [u for u in node.users if u.target is DEQUANTIZE]  # copies follow the first
        for other in copies:
            other.replace_all_uses_with(first)
            graph.erase_node(other)


@dataclass
class Layer:
    """One int8 conv/linear as the sweep reaches it."""

    node: fx.Node  # its node in the graph being rewritten
    module: nn.Module  # the layer in the graph being rewritten (its bias and weight may be changed)
    spec: QuantSpec  # its weight's spec, axis as lowering uses it
    quant_inputs: Sequence[torch.Tensor]  # its input on the quantized path, one tensor per batch
    float_outputs: list[torch.Tensor] | None  # what the float model's layer outputs, one tensor per batch
    block: Block  # the layer alone, as a block

    def run(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's int8 call in the reference graph on ``x`` with ``weight`` (bias as it is now)."""
        return self.block.run(x, {self.node: {"weight": weight}})


WeightFor = Callable[[Layer], torch.Tensor]


class Block:
    """A single-entry, single-exit region of the reference graph holding int8 conv/linear layers, as the sweep
    reaches it: its quantized path can be replayed with chosen weights, differentiably."""

    def __init__(self, simulation: Simulation, region: Region, quant_inputs: Sequence[torch.Tensor],
                 float_outputs: list[torch.Tensor] | None):
        self.simulation, self.region = simulation, region
        # The block's layers as nodes of the graph being rewritten, with their modules and weight specs.
        self.layers = [simulation.layer_of[n] for n in region.nodes if n in simulation.layer_of]
        self.modules = {n: simulation.gm.get_submodule(n.target) for n in self.layers}
        self.specs = {n: weight_spec(self.modules[n], simulation.ann.pairs[n.name].weight) for n in self.layers}
        self.quant_inputs = quant_inputs  # the entry's value on the quantized path, one tensor per batch
        self.float_outputs = float_outputs  # the exit's value on the float path, one tensor per batch (or None)

    def run(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """The exit's value on the quantized path from the entry's value ``x``, each layer with the parameters
        in ``params`` (its weight, and bias if given) in place of its own; activation quantization passes
        gradients straight through."""
        env: dict[fx.Node, object] = {self.region.entry: x}
        for node in self.region.nodes:
            if node not in self.simulation.weight_nodes:
                env[node] = self.simulation.run(node, env, params, quantized=True)
        return env[self.region.exit]

    def output_bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the bounds of the ReLU or clamp that alone reads the block's output (±inf without one)."""
        return activation_bounds(self.simulation.reference, self.region.exit, like)


BlockWeightsFor = Callable[[Block], dict[fx.Node, torch.Tensor]]
BlockOf = Callable[[fx.Node], "str | None"]


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


def sweep(gm: fx.GraphModule, ann: Annotation, batches: list[tuple], weight_for: WeightFor,
          simulation: Simulation | None = None, float_path: bool = True) -> int:
    """Propagate ``batches`` (tuples of model inputs) through the simulation of ``gm`` (``simulation``, None:
    built here); at each int8 conv/linear call ``weight_for(layer)``, which may change the layer's bias and
    returns the float weight the quantized path uses for it (on its grid). Without ``float_path`` only the
    quantized path runs (``Layer.float_outputs`` is None). Returns the number of layers visited."""
    def one_layer(block: Block) -> dict[fx.Node, torch.Tensor]:
        (node,) = block.layers
        return {node: weight_for(Layer(node, block.modules[node], block.specs[node], block.quant_inputs,
                                       block.float_outputs, block))}

    return sweep_blocks(gm, ann, batches, None, one_layer, simulation, float_path)


def sweep_blocks(gm: fx.GraphModule, ann: Annotation, batches: list[tuple], block_of: BlockOf | None,
                 weights_for: BlockWeightsFor, simulation: Simulation | None = None, float_path: bool = True) -> int:
    """Propagate ``batches`` as ``sweep`` does, a block at a time: the regions of the reference graph
    (``qpasses.graph.regions.blocks``) whose layers ``block_of`` (on the layers' nodes in ``gm``; None: every
    layer alone) puts in one block. At the first node of each block ``weights_for(block)`` returns the float
    weight (on its grid) the quantized path uses for each of its layers. Returns the number of layers visited.

    Memory: between two blocks the nodes run one batch at a time, and of each batch only the values later nodes
    read are kept, an int8 value as its codes (its dequantize is run again for each reader); a block holds its
    input (as codes where it is int8) and its float output for every batch while it is decided."""
    simulation = simulation if simulation is not None else Simulation(gm, ann)
    graph = simulation.reference.graph
    starts = _block_starts(simulation, block_of)
    inside = {n for region in starts.values() for n in region.nodes if n is not region.exit}
    segments: list[list[fx.Node]] = []  # the nodes from one block's first node to the next block's
    for node in graph.nodes:
        if node.op in ("get_attr", "output") or node in simulation.weight_nodes:
            continue  # constants are read from the graph; layers get the chosen weights
        if node in starts or not segments:
            segments.append([])
        segments[-1].append(node)
    order, last_use = _last_uses(graph)
    inputs = {n: i for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder")}
    quant: list[dict[fx.Node, object]] = [{} for _ in batches]  # per batch: the values later nodes read
    floats: list[dict[fx.Node, object]] = [{} for _ in batches]
    visited = 0
    was_training = gm.training
    gm.eval()
    simulation.reference.eval()
    try:
        with torch.no_grad():
            for segment in segments:
                params: dict[fx.Node, dict[str, torch.Tensor]] = {}
                if segment[0] in starts:
                    region = starts[segment[0]]
                    # The float path runs ahead to the block's exit, for the target of its reconstruction.
                    float_outputs = None
                    if float_path:
                        float_outputs = [_float_through(simulation, region, env) for env in floats]
                        for env, value in zip(floats, float_outputs, strict=True):
                            env[region.exit] = value
                    block = Block(simulation, region, _Values(simulation, region.entry, quant), float_outputs)
                    del float_outputs
                    found = weights_for(block)  # under no_grad: a pass that trains enables it itself
                    params = {n: {"weight": w.detach()} for n, w in found.items()}
                    visited += len(block.layers)
                    del block
                end = order[segment[-1]]
                for batch, q, f in zip(batches, quant, floats, strict=True):
                    for node in segment:
                        if node.op == "placeholder":
                            q[node] = batch[inputs[node]]
                            if float_path:
                                f[node] = q[node]
                            continue
                        # Computed ahead as a block's exit, or inside a block: read by nothing after it.
                        if float_path and node not in f and node not in inside:
                            f[node] = simulation.run(node, f, {}, quantized=False)
                        q[node] = simulation.run(node, q, params, quantized=True)
                        for env in (q, f):
                            for done in [n for n in env if last_use[n] <= order[node] and n is not node]:
                                del env[done]
                    for env in (q, f):  # dequantized values whose codes are kept are run again where read
                        for done in [n for n in env if last_use[n] <= end
                                     or (_dequantizes_codes(n) and n.args[0] in env)]:
                            del env[done]
    finally:
        gm.train(was_training)
    return visited


def _block_starts(simulation: Simulation, block_of: BlockOf | None) -> dict[fx.Node, Region]:
    """The first node of each block → the block: the regions ``block_of`` groups that hold layers, and each
    layer outside them alone."""
    layer_of = simulation.layer_of
    starts: dict[fx.Node, Region] = {}
    if block_of is not None:
        regions = blocks(simulation.reference.graph, lambda n: block_of(layer_of[n]) if n in layer_of else None)
        for region in regions:
            if any(n in layer_of for n in region.nodes):
                starts[next(n for n in region.nodes if n not in simulation.weight_nodes)] = region
    in_blocks = {n for region in starts.values() for n in region.nodes}
    for call in layer_of:
        if call not in in_blocks:
            starts[call] = Region([call], call.args[0], call)
    return starts


def _dequantizes_codes(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is DEQUANTIZE and isinstance(node.args[0], fx.Node)
            and node.args[0].target is QUANTIZE)


class _Values(Sequence):
    """``node``'s value on the quantized path in each batch's environment, run from its codes on each read
    where the environment keeps only those."""

    def __init__(self, simulation: Simulation, node: fx.Node, envs: list[dict[fx.Node, object]]):
        self.simulation, self.node, self.envs = simulation, node, envs

    def __len__(self) -> int:
        return len(self.envs)

    def __getitem__(self, batch: int) -> torch.Tensor:
        env = self.envs[batch]
        return env[self.node] if self.node in env else self.simulation.run(self.node, env, {}, quantized=True)


def _float_through(simulation: Simulation, region: Region, env: dict[fx.Node, object]):
    """The float path's value of ``region.exit`` in one batch, running the region's nodes on a scratch copy of
    the batch's environment ``env`` that drops each value after its last use in the region."""
    scratch = dict(env)
    nodes = [n for n in region.nodes if n not in simulation.weight_nodes]
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position.get(u, len(nodes)) for u in n.users), default=position[n]) for n in nodes}
    for i, node in enumerate(nodes):
        scratch[node] = simulation.run(node, scratch, {}, quantized=False)
        for done in [n for n in nodes[:i] if last_use[n] <= i and n in scratch]:
            del scratch[done]
    return scratch[region.exit]
