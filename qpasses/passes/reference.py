"""Reference: the reference quantized graph, float ops between explicit quantize/dequantize ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qpasses.errors import QPassesError
from qpasses.graph.modules import unique_name
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.quant import lowering
from qpasses.quant.annotate import Annotation
from qpasses.quant.backends import Backend, get_backend
from qpasses.quant.fake_quant import bias_on_grid
from qpasses.quant.grids import Grid, Grids, WeightQParams, weight_qparams_by_node
from qpasses.quant.ops import Op, Role, computing_op, op_of, returns_input
from qpasses.quant.state import (
    INT8_OP_KEY,
    QPARAMS_KEY,
    QSTATE_KEY,
    WEIGHT_QPARAMS_KEY,
    existing_state,
    state_of,
)

QUANTIZE = torch.ops.quantized_decomposed.quantize_per_tensor.default
DEQUANTIZE = torch.ops.quantized_decomposed.dequantize_per_tensor.default
DEQUANTIZE_PER_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default


@dataclass(frozen=True)
class Int8Op:
    """What a node of the reference graph runs as in the int8 graph (``node.meta[INT8_OP_KEY]``), for the
    lowerings that read the reference graph: ``op``, its record in the op table; ``role``, as annotated (a
    clamp-like activation not folded into its producer is ``PRESERVING``); ``module``, the module the observed
    graph called (a conv/linear's, which the reference graph replaced by its functional form), None for a
    function or method call."""

    op: Op
    role: Role
    module: str | None

    def __deepcopy__(self, memo: dict) -> Int8Op:  # immutable
        return self


_INT8_ROLES = (Role.COMPUTE, Role.FUNCTIONAL, Role.DERIVED, Role.REQUANT, Role.FIXED, Role.PRESERVING,
               Role.FUSED_ACT)


def annotation_for(gm: fx.GraphModule, backend: str | None) -> tuple[Annotation, Backend]:
    """The annotation of a calibrated graph and the backend it is converted for (``backend``, None: the one its
    observers were placed for); one clear line when they do not fit."""
    ann: Annotation | None = state_of(gm).annotation
    if ann is None:
        raise QPassesError("the graph carries no quantization annotation; run InsertObservers and Calibrate first")
    chosen = get_backend(backend or ann.backend)
    if chosen.name != ann.backend:
        raise QPassesError(f"observers were placed for backend '{ann.backend}', which differs from "
                           f"'{chosen.name}'; convert with the backend '{ann.backend}' or insert observers for "
                           f"'{chosen.name}'")
    return ann, chosen


class Reference(Pass):
    """Turn a calibrated, observed graph into the reference quantized graph of ``backend``'s int8 kernels.

    The dialect is torchao ``convert_pt2e``'s: every int8 value is
    ``torch.ops.quantized_decomposed.quantize_per_tensor.default(x, scale, zero_point, qmin, qmax, dtype)``
    followed by ``dequantize_per_tensor.default`` with the same constant arguments (``dtype`` ``torch.uint8`` or
    ``torch.int8``; ``[qmin, qmax]`` is the value's code range, narrower than the container for sub-8-bit and
    reduce_range grids), one dequantize per reader. Convs, transposed convs and linears become ``F.conv2d``/
    ``F.linear``/… calls on a dequantized weight, ``dequantize_per_channel(int8 codes, scales, zero points,
    axis, qmin, qmax, torch.int8)`` (``dequantize_per_tensor`` for per-tensor weights), whose codes are buffers
    computed once at the weight qparams of the observer, AdaRound or QAT (``node.meta['weight_qparams']``);
    the bias is a float buffer (rounded to the int32 grid ``s_in·s_w`` where the backend's kernels do,
    ``Backend.quantized_bias``). FloatFunctional arithmetic becomes ``torch.add``/``mul``/``cat`` (add_relu:
    ``torch.add`` → ``torch.relu``). Ops left float have no quantize/dequantize around them.

    Grids (``qpasses.quant.grids``, shared with ``Lower``): an observed value gets its observer's grid, widened
    where the backend's add kernels need it; a fused activation runs float with the quantize after it; a
    fixed-range or derived op (sigmoid, ``mul_scalar``) is followed by the grid its kernel writes; a
    qparams-preserving op (pool, reshape) on an int8 value by its input's grid again, which the int8 graph
    computes on codes; a linear whose int8 kernel writes the model's output in float has no quantize after it;
    values in a cat group share the cat's grid; a ChannelClamp stays before its quantize. Identity and dropout
    calls are dropped. So the graph, run in float, is the simulation of the int codes the backend's kernels
    compute (to float rounding at ties). Each node that the int8 graph runs as an int8 op (a conv keeps the
    name of the call it replaces) carries an :class:`Int8Op` in ``node.meta[INT8_OP_KEY]``, which ``Lower``'s
    patterns read.

    Requires: ``calibrated`` (after PTQ's Calibrate, or a trained QAT graph at ``qpasses.qat.convert``).
    Provides: ``reference``. The result records ``state_of(gm).reference_backend``; it runs on any device, with
    ``torch.compile``, and exports with ``torch.export``.
    """

    stage = Stage.LOWER
    requires = frozenset({"calibrated"})
    provides = frozenset({"reference"})
    invalidates = frozenset({"observed", "calibrated"})

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ann, backend = annotation_for(gm, self.backend)
        build_reference(gm, ann, backend, ctx)
        state = state_of(gm)
        state.annotation, state.reference_backend = None, backend.name
        return PassResult(gm, modified=True)


def build_reference(gm: fx.GraphModule, ann: Annotation, backend: Backend, ctx: PassContext,
                    grids: Grids | None = None, weights: dict[str, WeightQParams] | None = None) -> None:
    """Rewrite the observed graph ``gm`` in place into the reference graph (see ``Reference``), on ``grids``
    (None: decided here) and with the weight qparams ``weights`` by node name (None: ``weight_qparams_by_node``).
    """
    if grids is None:
        with lowering.quantized_engine(backend.engine):  # fixed-range and derived grids are read from the kernels
            grids = Grids(gm, ann, backend, ctx.note)
    weights = weights if weights is not None else weight_qparams_by_node(gm, ann)
    _ReferenceBuilder(gm, ann, backend, ctx, grids, weights).run()
    gm.graph.lint()
    gm.recompile()


class _ReferenceBuilder:
    def __init__(self, gm: fx.GraphModule, ann: Annotation, backend: Backend, ctx: PassContext, grids: Grids,
                 weights: dict[str, WeightQParams]):
        self.gm, self.ann, self.backend, self.ctx, self.grids, self.weights = gm, ann, backend, ctx, grids, weights
        self.graph = gm.graph
        self.quantized: dict[fx.Node, bool] = {}  # whether the int8 graph holds the value as codes
        self.grid_after: dict[fx.Node, Grid] = {}  # node → the grid its value is quantized to right after it
        self.input_grid: dict[fx.Node, Grid] = {}  # int8 conv/linear → its input's grid
        self.replaced_modules: set[str] = set()
        self.kept_float: set[fx.Node] = set()  # observers whose float readers read the value before rounding

    def run(self) -> None:
        nodes = list(self.graph.nodes)
        for node in nodes:  # every decision first: the grids are read from the observed graph
            self.decide(node)
        for node in nodes:
            self.rewrite(node)
        self.one_dequantize_per_reader()
        referenced = {n.target for n in self.graph.nodes if n.op in ("call_module", "get_attr")}
        for name in sorted(self.replaced_modules - referenced):
            self.gm.delete_submodule(name)

    # -- decisions, on the observed graph (as ``Lower`` makes them)

    def decide(self, node: fx.Node) -> None:
        observer = self.grids.observer(node)
        role = self.ann.roles.get(node.name, Role.NONE)
        if observer is not None:
            self.grid_after[node] = self.grids.observer_grid(observer)
            self.quantized[node] = True
            if self.backend.float_reads_unrounded and self.writes_float(node.args[0]):
                self.kept_float.add(node)
        elif returns_input(self.gm, node):
            self.quantized[node] = self.quantized.get(node.args[0], False)
        elif role is Role.COMPUTE:
            grid = self.grids.value_grid(node.args[0])
            if grid is None:
                raise QPassesError(f"internal: int8 op '{node.name}' reads float value '{node.args[0].name}'")
            self.input_grid[node] = grid
            self.quantized[node] = node.name not in self.ann.float_output
        elif role in (Role.FUNCTIONAL, Role.REQUANT, Role.FUSED_ACT):
            self.quantized[node] = True
        elif role is Role.DERIVED:
            self.quantized[node] = True
            self.grid_after[node] = self.kernel_grid(node)
        elif role in (Role.FIXED, Role.PRESERVING):
            inputs = [a for a in node.all_input_nodes if a in self.quantized]
            self.quantized[node] = bool(inputs) and self.quantized[inputs[0]]
            if self.quantized[node]:
                self.grid_after[node] = self.kernel_grid(node)
        else:
            self.quantized[node] = False

    def writes_float(self, value: fx.Node) -> bool:
        """Whether the op computing an observed value (a node of the observed graph, whose names the decisions are
        keyed by) writes it in float before it is quantized, so that on a runtime keeping both
        (``Backend.float_reads_unrounded``) ops running float read it unrounded: an op left float, a graph input,
        a conv/linear without a folded activation or post-op (its kernel writes fp32, then a quantize), and
        reshapes of those. An int8 op with a folded activation or post-op, or an int8 add, cat, ... writes codes
        (PT2E's X86InductorQuantizer rounds a fused add's other input too)."""
        while self.ann.roles.get(value.name) is Role.PRESERVING and value.all_input_nodes:
            value = value.all_input_nodes[0]
        role = self.ann.roles.get(value.name, Role.NONE)
        return role in (Role.FLOAT, Role.NONE) or (role is Role.COMPUTE and value.name not in self.ann.fused.values())

    def reads_float(self, user: fx.Node) -> bool:
        """Whether ``user`` runs float: an op left float, or an identity or dropout that only such ops read."""
        if returns_input(self.gm, user):
            return bool(user.users) and all(self.reads_float(reader) for reader in user.users)
        return self.ann.roles.get(user.name) is Role.FLOAT

    def kernel_grid(self, node: fx.Node) -> Grid:
        with lowering.quantized_engine(self.backend.engine):
            grid = self.grids.value_grid(node)
        if grid is None:
            raise QPassesError(f"internal: no grid for int8 value '{node.name}'")
        return grid

    # -- rewriting

    def rewrite(self, node: fx.Node) -> None:
        role = self.ann.roles.get(node.name, Role.NONE)
        if self.grids.observer(node) is not None:
            self.replaced_modules.add(node.target)
            value = node.args[0]
            dequantized = self.quantize_dequantize(value, self.grid_after[node], before=node)
            unrounded = node in self.kept_float
            for user in list(node.users):  # ops running float read the value unrounded where the runtime keeps it
                user.replace_input_with(node, value if unrounded and self.reads_float(user) else dequantized)
            self.graph.erase_node(node)
            if not dequantized.users:  # only float ops read it
                quantized = dequantized.args[0]
                self.graph.erase_node(dequantized)
                self.graph.erase_node(quantized)
                self.ctx.stats["quantize"] -= 1
            return
        if returns_input(self.gm, node):
            self.replaced_modules.add(node.target)
            node.replace_all_uses_with(node.args[0])
            self.graph.erase_node(node)
            return
        if role in _INT8_ROLES and (self.quantized[node] or role is Role.COMPUTE):
            node.meta[INT8_OP_KEY] = Int8Op(op_of(self.gm, node), role,
                                            node.target if node.op == "call_module" else None)
        if role is Role.COMPUTE:
            node = self.compute(node)
        elif role in (Role.FUNCTIONAL, Role.DERIVED):
            node = self.float_functional(node)
        if node in self.grid_after:
            anchor = node.next
            dequantized = self.quantize_dequantize(node, self.grid_after[node], before=anchor)
            node.replace_all_uses_with(dequantized, delete_user_cb=lambda user: user is not dequantized.args[0])

    def quantize_dequantize(self, value: fx.Node, grid: Grid, before: fx.Node) -> fx.Node:
        """Insert ``quantize → dequantize`` of ``value`` at ``grid`` before ``before``; returns the dequantize."""
        args = (grid.scale, grid.zero_point, grid.qmin, grid.qmax, grid.dtype)
        with self.graph.inserting_before(before):
            quantized = self.graph.call_function(QUANTIZE, (value, *args))
            dequantized = self.graph.call_function(DEQUANTIZE, (quantized, *args))
        quantized.meta[QSTATE_KEY] = "int8"
        quantized.meta[QPARAMS_KEY] = {"scale": grid.scale, "zero_point": grid.zero_point,
                                       "qmin": grid.qmin, "qmax": grid.qmax}
        if "tensor_meta" in value.meta:
            dequantized.meta["tensor_meta"] = value.meta["tensor_meta"]
        self.ctx.stats["quantize"] += 1
        return dequantized

    def compute(self, node: fx.Node) -> fx.Node:
        """A conv/linear module call → its functional op on the dequantized int8 weight and the float bias."""
        module = self.gm.get_submodule(node.target)
        op = computing_op(module)
        if op is None or op.role is not Role.COMPUTE or len(node.args) != 1 or node.kwargs:
            raise QPassesError(f"no int8 reference form for {type(module).__name__} '{node.target}' called with "
                               f"{len(node.args)} argument(s); keep it float with QuantConfig overrides")
        self.replaced_modules.add(node.target)
        spec = lowering.weight_spec(module, self.ann.pairs[node.name].weight)
        codes, scale, zero_point = lowering.weight_codes(module.weight, spec, self.weights[node.name])
        base = node.target.replace(".", "_")
        with self.graph.inserting_before(node):
            weight_codes = self.buffer(f"{base}_weight_int8", codes)
            if spec.per_channel:
                weight = self.graph.call_function(DEQUANTIZE_PER_CHANNEL, (
                    weight_codes, self.buffer(f"{base}_weight_scale", scale),
                    self.buffer(f"{base}_weight_zero_point", zero_point), spec.axis, spec.code_min, spec.code_max,
                    codes.dtype))
            else:
                weight = self.graph.call_function(DEQUANTIZE, (weight_codes, float(scale), int(zero_point),
                                                               spec.code_min, spec.code_max, codes.dtype))
            bias = None if module.bias is None else self.buffer(f"{base}_bias", self.bias(node, module, scale, spec))
            x = node.args[0]
            if isinstance(module, nn.Linear):
                args = (x, weight, bias)
            elif isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d):
                args = (x, weight, bias, module.stride, module.padding, module.output_padding, module.groups,
                        module.dilation)
            else:
                padding = module.padding
                if module.padding_mode != "zeros":  # as nn.Conv*._conv_forward pads
                    x = self.graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice),
                                                 {"mode": module.padding_mode})
                    padding = (0,) * len(module.kernel_size)
                args = (x, weight, bias, module.stride, padding, module.dilation, module.groups)
        # The call becomes the functional op in place: it keeps its name, metadata and readers.
        node.op, node.target, node.args, node.kwargs = "call_function", op.reference[0], args, {}
        node.meta.pop(WEIGHT_QPARAMS_KEY, None)
        node.meta[QSTATE_KEY] = "int8" if self.quantized[node] else "int8_float_output"
        self.ctx.stats["int8_" + type(module).__name__.lower()] += 1
        return node

    def bias(self, node: fx.Node, module: nn.Module, weight_scale: torch.Tensor, spec) -> torch.Tensor:
        """The float bias, on the int32 grid ``s_in·s_w`` (per output channel) where the kernels round it there."""
        bias = module.bias.detach().float().clone()
        if not self.backend.quantized_bias:
            return bias
        step = self.input_grid[node].scale * weight_scale.to(bias.device)
        return bias_on_grid(bias, step)

    def buffer(self, name: str, value: torch.Tensor) -> fx.Node:
        target = unique_name(self.gm, name)
        self.gm.register_buffer(target, value)
        return self.graph.get_attr(target)

    def float_functional(self, node: fx.Node) -> fx.Node:
        """``owner.method(*args)`` on a FloatFunctional → the float ops it computes (its record's ``reference``),
        the first in place of the call; returns the last."""
        owner, *args = node.args
        first, *rest = op_of(self.gm, node).reference
        self.ctx.stats[f"int8_{node.target}"] += 1
        node.op, node.target, node.args = "call_function", first, tuple(args)
        last = node
        for function in rest:
            with self.graph.inserting_after(last):
                call = self.graph.call_function(function, (last,))
            call.meta = {key: value for key, value in last.meta.items() if key != INT8_OP_KEY}
            last.replace_all_uses_with(call, delete_user_cb=lambda user, call=call: user is not call)
            last = call
        if last is not node:
            for table in (self.quantized, self.grid_after):
                if node in table:
                    table[last] = table.pop(node)
        if not owner.users:
            self.replaced_modules.add(owner.target)
            self.graph.erase_node(owner)
        return last

    def one_dequantize_per_reader(self) -> None:
        """Each reader of an int8 value gets its own dequantize, as ``convert_pt2e`` emits them: a pattern
        (dequantize → conv → quantize) then owns the dequantize it matches."""
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target is not DEQUANTIZE or len(node.users) < 2:
                continue
            for user in list(node.users)[1:]:
                with self.graph.inserting_after(node):
                    copy = self.graph.call_function(DEQUANTIZE, node.args, dict(node.kwargs))
                copy.meta = dict(node.meta)
                user.replace_input_with(node, copy)


def is_reference(model: nn.Module) -> bool:
    """Whether ``model`` is a qpasses reference quantized graph."""
    state = existing_state(model)
    return state is not None and state.reference_backend is not None
