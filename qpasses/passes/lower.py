"""Lower: turn a calibrated, observed graph into real int8 kernels, by patterns over its reference graph."""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.operator_schemas import normalize_function
from torch.utils._pytree import tree_map

from qpasses.errors import QPassesError
from qpasses.graph.modules import unique_name
from qpasses.nn import ChannelClamp, CropStart2d, SamePad2d, ShiftedSamePad2d
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.reference import (
    DEQUANTIZE,
    DEQUANTIZE_PER_CHANNEL,
    QUANTIZE,
    Int8Op,
    Reference,
    annotation_for,
    build_reference,
)
from qpasses.quant import lowering
from qpasses.quant.backends import Backend
from qpasses.quant.grids import Grid, Grids, weight_qparams_by_node
from qpasses.quant.ops import Role, clamp_bounds, op_of, runs_clamp_kernel
from qpasses.quant.state import (
    FLOAT_WEIGHT_KEY,
    INT8_OP_KEY,
    QPARAMS_KEY,
    QSTATE_KEY,
    WEIGHT_QPARAMS_KEY,
    state_of,
)

_SHAPE_QUERIES = ("size", "dim")


class Lower(Pass):
    """Replace observed float ops by ``torch.ao.nn.quantized`` kernels of ``backend`` (x86/fbgemm, onednn, qnnpack).

    Math: each int8 op computes ``q_out = clamp(round(f(x) / s_out) + z_out, qmin, qmax)`` with weights
    ``q_w = clamp(round(w / s_w) + z_w)``. The pass first builds the reference quantized graph
    (``qpasses.passes.Reference``: float ops between quantize/dequantize, the simulation of these codes) and
    then lowers that graph by a table of patterns, as torch.ao's ``_lower_to_native_backend`` lowers its
    reference graph, so the kernels compute the codes the reference simulates:

    - ``dq → F.conv2d/F.linear(dq_per_channel(int8 weight)) [→ clamp-like activation] → q``: the int8 module of
      the conv/linear (its record's ``lowering`` in ``qpasses.quant.ops``) writing at ``q``'s grid, in place of
      the module the observed graph called (a module called twice gets one per call); the activation disappears
      where that grid already clips at its bounds, else it stays on the codes (a ChannelClamp with bounds that
      differ by channel always stays). Without ``q`` (a linear writing the model's output in float):
      ``FloatOutputLinear``. A stride-2 depthwise conv after SAME padding pads symmetrically itself
      (``ShiftedSamePad2d`` → conv → ``CropStart2d``), which fbgemm runs on its fast path.
    - ``dq → torch.add [→ torch.relu] → q`` (and ``mul``, ``cat``, the scalar forms) from a FloatFunctional:
      a direct call of ``torch.ops.quantized.add[_relu]`` with constant qparams (no module, as torch.ao FX).
    - ``dq → hardswish/leaky_relu/elu → q``: the int8 module at ``q``'s grid; fixed-range ops (sigmoid, tanh)
      and qparams-preserving ops (pools, reshapes) run on the codes, their ``q`` being the grid they keep.
    - a float value's ``q``: ``torch.quantize_per_tensor``; ``dq`` read by a float op: one ``.dequantize()``
      per value (shape queries read the codes); ``dq → q`` on the same grid: the codes themselves.

    Spec ranges narrower than 8 bits (sub-8-bit, reduce_range) are enforced by a clamp of the codes after the
    op that writes them (a clamp read only by a max pool moves after it: ``max(clamp(x)) = clamp(max(x))``, on
    fewer values); qnnpack's clamp kernels read channels-last data made contiguous first.
    Requires: ``calibrated``. Provides: ``lowered``. The result runs with the backend's engine (its first
    op, a ``QuantizedEngine`` module, selects it), saves and loads, and can be TorchScripted. It keeps the
    reference graph it was lowered from in ``state_of(result).reference``; grids are decided once, in
    ``qpasses.quant.grids``.
    """

    stage = Stage.LOWER
    requires = frozenset({"calibrated"})
    provides = frozenset({"lowered"})
    invalidates = frozenset({"observed", "calibrated"})

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ann, backend = annotation_for(gm, self.backend)
        if backend.engine is None:
            raise QPassesError(f"backend '{backend.name}' has no torch.ao int8 kernels to lower to: end at the reference "
                               "graph (PTQ(..., lower=False) or Reference()) and deploy it with qpasses.lower")
        _to_cpu(gm, backend.name, ctx)
        state = state_of(gm)
        with lowering.quantized_engine(backend.engine):
            grids = Grids(gm, ann, backend, ctx.note)
            # The reference's own counters (a quantize per value) would double the kernels' in the report.
            build_reference(gm, ann, backend, PassContext(example_inputs=()), grids, weight_qparams_by_node(gm, ann))
            state.annotation, state.reference_backend = None, backend.name
            reference = copy.deepcopy(gm)
            state_of(reference).properties = (state.properties - Reference.invalidates) | Reference.provides
            _PatternLowering(gm, backend, ctx).run()
        lowering.select_engine_first(gm, backend.engine)
        state.reference_backend, state.backend, state.reference = None, backend.name, reference
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified=True)


def _to_cpu(gm: fx.GraphModule, backend: str, ctx: PassContext) -> None:
    """Move a graph calibrated or trained on another device (a GPU) to the CPU, where the int8 kernels run,
    with the tensors passes left in node metadata (AdaRound's grids and float weights); say so in the report
    and in the ``qpasses`` logger (``convert`` has no report)."""
    devices = {t.device for t in itertools.chain(gm.parameters(), gm.buffers()) if t.device.type != "cpu"}
    if not devices:
        return
    gm.cpu()
    for node in gm.graph.nodes:
        for key in (WEIGHT_QPARAMS_KEY, FLOAT_WEIGHT_KEY):
            if key in node.meta:
                node.meta[key] = tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, node.meta[key])
    message = (f"lowering moved the model from {', '.join(sorted(map(str, devices)))} to the CPU: "
               f"the {backend} int8 kernels run on CPU only")
    ctx.note(message)
    logging.getLogger("qpasses").info(message)


def _grid(quantize: fx.Node) -> Grid:
    """The grid of a reference graph's ``quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype)``."""
    return Grid(*quantize.args[1:6])


def _is_quantize(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is QUANTIZE


def _qparams_meta(grid: Grid) -> dict:
    return {"scale": grid.scale, "zero_point": grid.zero_point, "dtype": str(grid.quantized_dtype),
            "bits": (grid.qmax - grid.qmin).bit_length()}


def _is_max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A max pooling call that returns only the pooled values (each a value of its input), no indices."""
    op = op_of(gm, node)
    if op is None or op.name != "max_pool":
        return False
    if node.op == "call_module":
        return not gm.get_submodule(node.target).return_indices
    return not node.kwargs.get("return_indices", len(node.args) > 6 and node.args[6])


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


class _PatternLowering:
    """Rewrites a reference graph in place into torch.ao kernels, one pattern per role of its int8 ops."""

    def __init__(self, gm: fx.GraphModule, backend: Backend, ctx: PassContext):
        self.gm, self.graph, self.backend, self.ctx = gm, gm.graph, backend, ctx
        self.codes: dict[fx.Node, Grid] = {}  # node of the lowered graph → the grid of the int8 tensor it holds
        self.code_clamps: list[fx.Node] = []  # clamps of codes to a grid narrower than its 8-bit container
        # module path → the float module its int8 form replaced (None for a conv/linear: the reference holds it)
        self.float_modules: dict[str, nn.Module | None] = {}
        self.dropped_modules: set[str] = set()  # folded activations' modules
        self.dropped_attributes: set[str] = set()  # the reference graph's weight codes, scales and biases
        self.patterns: dict[Role, Callable[[fx.Node, Int8Op], None]] = {
            Role.COMPUTE: self.compute,
            Role.FUNCTIONAL: self.functional,
            Role.DERIVED: self.functional,
            Role.REQUANT: self.requant,
            Role.FIXED: self.on_codes,
            Role.PRESERVING: self.on_codes,
        }

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node._erased:  # consumed by the pattern of an op before it
                continue
            info: Int8Op | None = node.meta.get(INT8_OP_KEY)
            if _is_quantize(node):
                self.quantize(node)
            elif info is not None and info.role in self.patterns:
                self.patterns[info.role](node, info)
        self.dequantize_float_reads()
        if not self.backend.clamp_needs_contiguous:
            for clamp in self.code_clamps:
                self.sink_below_max_pool(clamp)
        self.delete_unused_state()

    # -- the patterns, anchored at the reference graph's int8 op (its inputs' patterns already ran)

    def compute(self, node: fx.Node, info: Int8Op) -> None:
        """``dq → F.conv*/F.linear(dq(int8 weight), bias) [→ activations] → q``: the int8 module."""
        if not node.users:  # a result nothing reads (a module called for nothing): no kernel to run
            self.erase_unused([node])
            return
        function = node.target
        x, weight, bias, *geometry = node.args
        padded = None
        if x.op == "call_function" and x.target is torch.nn.functional.pad:  # the reference's non-zero padding
            padded, x = x, x.args[0]
        if x.target is not DEQUANTIZE or x.args[0] not in self.codes:
            raise QPassesError(f"internal: int8 op '{node.name}' reads float value '{x.name}'")
        x = x.args[0]
        options = self.conv_options(function, geometry, padded)
        qweight = self.weight(weight)
        fbias = None if bias is None else self.gm.get_buffer(bias.target)
        old_inputs = node.all_input_nodes
        tail, quantize = self.output(node, info, may_write_float=True)
        node.meta.pop(FLOAT_WEIGHT_KEY, None)
        if quantize is None:
            self.install(node, info.module, lowering.float_output_linear(qweight, fbias), (x,))
            self.ctx.stats["float_output_" + info.op.name] += 1
            self.erase_unused(old_inputs)
            return
        grid = _grid(quantize)
        crop = self.symmetric_same_padding(node, x, qweight, options)
        qmodule = lowering.quantized_compute(info.op.lowering, qweight, fbias, grid.scale, grid.zero_point, **options)
        self.install(node, info.module, qmodule, (x,))
        self.erase_unused(old_inputs)
        if crop is not None:
            tail = crop if tail is node else tail
        self.ctx.stats["int8_" + info.op.name] += 1
        self.write(quantize, tail, grid)

    def functional(self, node: fx.Node, info: Int8Op) -> None:
        """``dq → torch.add [→ torch.relu] → q`` (a FloatFunctional's reference form): the quantized op, called
        with the output qparams where its role requantizes (the scalar forms derive theirs)."""
        self.read_codes(node)
        tail, quantize = self.output(node, info)
        grid = _grid(quantize)
        kwargs = dict(node.kwargs)
        if info.role is Role.FUNCTIONAL:
            kwargs.update(scale=grid.scale, zero_point=grid.zero_point)
        node.target, node.kwargs = info.op.lowering, kwargs
        self.ctx.stats[f"int8_{info.op.name}"] += 1
        self.write(quantize, tail, grid)

    def requant(self, node: fx.Node, info: Int8Op) -> None:
        """``dq → hardswish/leaky_relu/elu → q``: the int8 module writing at ``q``'s grid (a functional call's
        module is built from all its arguments: ``F.leaky_relu(x, negative_slope=0.2)`` → ``nn.LeakyReLU(0.2)``)."""
        self.read_codes(node)
        tail, quantize = self.output(node, info)
        grid = _grid(quantize)
        if node.op == "call_module":
            float_module = self.float_modules.get(node.target) or self.gm.get_submodule(node.target)
            path = node.target
        else:
            call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
            options = dict(call.kwargs)
            options.pop("input")
            float_module, path = info.op.modules[0](**options), unique_name(self.gm, f"{node.name}_q")
        qmodule = info.op.lowering(float_module, grid.scale, grid.zero_point)
        self.install(node, path, qmodule, (node.args[0],), float_module)
        self.ctx.stats["int8_unary"] += 1
        self.write(quantize, tail, grid)

    def on_codes(self, node: fx.Node, info: Int8Op) -> None:
        """``dq → op → q`` for an op whose kernel keeps its input's grid (pool, reshape, a clamp-like activation
        not folded) or fixes its own (sigmoid, tanh): the op itself on the codes, at ``q``'s grid."""
        self.read_codes(node, only_codes=info.role is Role.FIXED)
        self.clamp_contiguous(node)
        _, quantize = self.output(node, info)
        self.write(quantize, node, _grid(quantize), narrow=False)

    def quantize(self, quantize: fx.Node) -> None:
        """A ``q`` no int8 op wrote: of a float value, ``torch.quantize_per_tensor``; of an int8 value's ``dq`` on
        the same grid, the codes themselves."""
        value, grid = quantize.args[0], _grid(quantize)
        if value.target is DEQUANTIZE and self.codes.get(value.args[0]) == grid:
            quantize.replace_all_uses_with(value.args[0])
            self.graph.erase_node(quantize)
            return
        function, qparams = lowering.quantize_call(grid)
        with self.graph.inserting_before(quantize):
            call = self.graph.create_node("call_function", function, (value, *qparams), name=f"{value.name}_quant")
        self.ctx.stats["quantize"] += 1
        self.write(quantize, call, grid)

    # -- the parts patterns share

    def read_codes(self, node: fx.Node, only_codes: bool = True) -> None:
        """Point ``node``'s reads of dequantized int8 values (the reference's ``dq``) at the int8 values; with
        ``only_codes``, every value it reads must be one (a qparams-preserving op may read sizes too)."""
        def codes(arg):
            return arg.args[0] if arg.target is DEQUANTIZE and arg.args[0] in self.codes else arg

        node.args, node.kwargs = fx.map_arg(node.args, codes), fx.map_arg(node.kwargs, codes)
        float_input = next((a for a in node.all_input_nodes if a not in self.codes), None) if only_codes else None
        if float_input is not None:
            raise QPassesError(f"internal: int8 op '{node.name}' reads float value '{float_input.name}'")


    def output(self, node: fx.Node, info: Int8Op, may_write_float: bool = False) -> tuple[fx.Node, fx.Node | None]:
        """The node whose value the reference quantizes after ``node``'s op, and that quantize (None: the op writes
        float, which only ``may_write_float`` ops do). Passes the later functions of the op's reference form (``add_relu``'s ReLU, which its kernel
        computes: dropped) and clamp-like activations folded into its range (dropped where the grid clips at
        their bounds, else kept on the codes)."""
        for _ in info.op.reference[1:]:
            inner = _sole_user(node)
            inner.replace_all_uses_with(node)
            self.graph.erase_node(inner)
        tail, activations = node, []
        while (user := _sole_user(tail)) is not None and getattr(user.meta.get(INT8_OP_KEY), "role", None) \
                is Role.FUSED_ACT:
            activations.append(user)
            tail = user
        quantize = _sole_user(tail)
        if quantize is None or not _is_quantize(quantize):
            if not may_write_float:
                raise QPassesError(f"internal: int8 op '{node.name}' has no quantize after it in the reference graph")
            return tail, None
        grid = _grid(quantize)
        for activation in activations:
            if self.clips_at_grid(activation, grid):
                if activation is tail:
                    tail = activation.args[0]
                activation.replace_all_uses_with(activation.args[0])
                if activation.op == "call_module":
                    self.dropped_modules.add(activation.target)
                self.graph.erase_node(activation)
            else:
                self.clamp_contiguous(activation)
        return tail, quantize

    def clips_at_grid(self, activation: fx.Node, grid: Grid) -> bool:
        """Whether quantizing to ``grid`` clamps at ``activation``'s bounds already (its codes' range lies within
        them), so the activation changes no code. A ChannelClamp whose bounds differ by channel never does."""
        if activation.op == "call_module":
            module = self.gm.get_submodule(activation.target)
            if isinstance(module, ChannelClamp) and not module.uniform:
                return False
        lo, hi = clamp_bounds(self.gm, activation)
        if not all(b is None or isinstance(b, int | float) for b in (lo, hi)):
            return False
        return ((lo is None or round(lo / grid.scale) + grid.zero_point <= grid.qmin)
                and (hi is None or round(hi / grid.scale) + grid.zero_point >= grid.qmax))

    def write(self, quantize: fx.Node, value: fx.Node, grid: Grid, narrow: bool = True) -> None:
        """``value`` (an int8 tensor on ``grid``) takes the place of the reference's ``quantize``; where ``narrow``
        (it was just requantized) and the grid's codes are narrower than its container, clamped to them."""
        value.meta.update({QSTATE_KEY: "int8", QPARAMS_KEY: _qparams_meta(grid)})
        bounds = lowering.code_range(grid) if narrow else None
        if bounds is not None:
            with self.graph.inserting_before(quantize):
                if self.backend.clamp_needs_contiguous:
                    value = self.graph.call_method("contiguous", (value,))
                value = self.graph.call_function(torch.clamp, (value, *bounds))
            value.meta.update({QSTATE_KEY: "int8", QPARAMS_KEY: _qparams_meta(grid)})
            self.code_clamps.append(value)
        quantize.replace_all_uses_with(value)
        self.graph.erase_node(quantize)
        self.codes[value] = grid

    def install(self, node: fx.Node, path: str, module: nn.Module, args: tuple,
                float_module: nn.Module | None = None) -> None:
        """Make ``node`` call the int8 ``module`` on ``args``, at ``path`` where the observed graph called the float
        module. A module called from several places (``conv(conv(x))``) gets an int8 module per call: each call
        writes at its own qparams, so a call after the first gets a new name."""
        if path in self.float_modules:
            path = unique_name(self.gm, f"{path}_{node.name}")
        self.float_modules[path] = float_module
        self.gm.add_submodule(path, module)  # replaces the float module there
        node.op, node.target, node.args, node.kwargs = "call_module", path, args, {}

    def weight(self, dequantized: fx.Node) -> torch.Tensor:
        """The quantized weight a reference ``dequantize_per_channel``/``_per_tensor`` of int8 codes reads."""
        codes, *qparams = dequantized.args
        tensor = self.gm.get_buffer(codes.target)
        if dequantized.target is DEQUANTIZE_PER_CHANNEL:
            scale, zero_point, axis = qparams[:3]
            return lowering.quantized_weight(tensor, self.gm.get_buffer(scale.target),
                                             self.gm.get_buffer(zero_point.target), axis)
        scale, zero_point = qparams[:2]
        return lowering.quantized_weight(tensor, torch.tensor(scale), torch.tensor(zero_point), None)

    @staticmethod
    def conv_options(function, geometry: list, padded: fx.Node | None) -> dict:
        """The geometry of the reference's ``F.conv*``/``F.conv_transpose*`` call (empty for ``F.linear``), with
        the padding its ``F.pad`` applied for a padding mode other than zeros."""
        if not geometry:
            return {}
        if function.__name__.startswith("conv_transpose"):
            return dict(zip(("stride", "padding", "output_padding", "groups", "dilation"), geometry, strict=True))
        options = dict(zip(("stride", "padding", "dilation", "groups"), geometry, strict=True))
        options["padding_mode"] = "zeros"
        if padded is not None:  # F.pad's (last dim left, right, …): the padding of each dim, first dim first
            pads = padded.args[1]
            options["padding"] = tuple(pads[2 * i] for i in reversed(range(len(pads) // 2)))
            options["padding_mode"] = padded.kwargs["mode"]
        return options

    def symmetric_same_padding(self, node: fx.Node, x: fx.Node, weight: torch.Tensor,
                               options: dict) -> fx.Node | None:
        """A stride-2 depthwise conv after 'SAME' padding, rewritten to pad symmetrically itself; returns the
        crop after it (None: not rewritten).

        fbgemm runs depthwise convs on a fast path only when they pad (k − 1) / 2 on every side, so
        SamePad2d → Conv2d(padding=0) becomes ShiftedSamePad2d → Conv2d(padding=(k − 1) / 2) → CropStart2d,
        which reads the same pixels. ``options`` (the conv's) get the new padding.
        """
        kernel_size = tuple(weight.shape[2:])
        stride, dilation = options.get("stride"), options.get("dilation")
        if not (node.target is torch.nn.functional.conv2d and weight.shape[1] == 1
                and options["padding"] == (0, 0) and options["padding_mode"] == "zeros"
                and ShiftedSamePad2d.applies(kernel_size, stride, dilation)
                and x.op == "call_module" and [u.target for u in x.users] == [DEQUANTIZE]
                and next(iter(x.users)).users.keys() == {node}):
            return None
        same = self.gm.get_submodule(x.target)
        if not (type(same) is SamePad2d and same.value == 0 and same.kernel_size == kernel_size
                and same.stride == tuple(stride) and same.dilation == tuple(dilation)):
            return None
        self.gm.add_submodule(x.target, ShiftedSamePad2d(kernel_size, stride))
        options["padding"] = tuple((k - 1) // 2 for k in kernel_size)
        target = unique_name(self.gm, f"{node.name}_crop")
        self.gm.add_submodule(target, CropStart2d())
        with self.graph.inserting_after(node):
            crop = self.graph.call_module(target, (node,))
        node.replace_all_uses_with(crop, delete_user_cb=lambda user: user is not crop)
        crop.meta = dict(node.meta)
        node.meta.pop("tensor_meta", None)  # the padded conv's output is one row and column larger
        return crop

    def clamp_contiguous(self, node: fx.Node) -> None:
        """On backends whose clamp kernel is wrong on channels-last data, a clamp-like op kept on int8 codes
        (a ReLU6 whose producer has other readers) reads its input made contiguous."""
        if not (self.backend.clamp_needs_contiguous and node.meta.get(INT8_OP_KEY) is not None
                and node.meta[INT8_OP_KEY].op.role is Role.FUSED_ACT and runs_clamp_kernel(self.gm, node)):
            return
        value = node.args[0]
        with self.graph.inserting_before(node):
            contiguous = self.graph.call_method("contiguous", (value,))
        contiguous.meta = {**value.meta, QSTATE_KEY: "int8"}
        node.replace_input_with(value, contiguous)

    def sink_below_max_pool(self, clamp: fx.Node) -> None:
        """Swap ``clamp`` with the max pool that alone reads it; that pool then reads the clamp's input.

        Max pooling outputs values of its input, so it commutes with a clamp (the max of clamped values is
        the clamped max), and after it the clamp reads fewer values (a quarter after a stride-2 pool).
        """
        pool = _sole_user(clamp)
        if pool is None or not _is_max_pool(self.gm, pool) or pool.args[0] is not clamp:
            return
        pool.replace_input_with(clamp, clamp.args[0])
        pool.append(clamp)
        pool.replace_all_uses_with(clamp, delete_user_cb=lambda user: user is not clamp)
        clamp.args = (pool, *clamp.args[1:])
        if "tensor_meta" in pool.meta:
            clamp.meta["tensor_meta"] = pool.meta["tensor_meta"]

    def dequantize_float_reads(self) -> None:
        """Each ``dq`` left reads an int8 value for a float op or the output: one ``.dequantize()`` per value
        (placed after it), except for shape queries, which read the codes."""
        dequantized: dict[fx.Node, fx.Node] = {}
        for node in list(self.graph.nodes):
            if node.target is not DEQUANTIZE or node.args[0] not in self.codes:
                continue
            value = node.args[0]
            for user in list(node.users):
                if user.op == "call_method" and user.target in _SHAPE_QUERIES:
                    user.replace_input_with(node, value)
            if node.users:
                if value not in dequantized:
                    with self.graph.inserting_after(value):
                        dequantized[value] = self.graph.call_method("dequantize", (value,))
                    self.ctx.stats["dequantize"] += 1
                node.replace_all_uses_with(dequantized[value])
            self.graph.erase_node(node)

    def erase_unused(self, nodes: list[fx.Node]) -> None:
        """Erase the reference nodes a pattern consumed (weight dequantizes, their buffers, padding, a conv/linear
        call nothing reads) once nothing reads them; the int8 values patterns wrote stay."""
        for node in nodes:
            if node.users or node._erased or node in self.codes:
                continue
            inputs = node.all_input_nodes
            if node.op == "get_attr":
                self.dropped_attributes.add(node.target)
            self.graph.erase_node(node)
            self.erase_unused(inputs)

    def delete_unused_state(self) -> None:
        referenced = {n.target for n in self.graph.nodes if n.op in ("call_module", "get_attr")}
        for name in sorted(self.dropped_modules - referenced):
            self.gm.delete_submodule(name)
        for name in sorted(self.dropped_attributes - referenced):
            parent, _, child = name.rpartition(".")
            delattr(self.gm.get_submodule(parent) if parent else self.gm, child)
