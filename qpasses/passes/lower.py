"""Lower: turn a calibrated, observed graph into real int8 kernels."""

from __future__ import annotations

import copy
import itertools
import logging

import torch
import torch.fx as fx
from torch import nn
from torch.fx.operator_schemas import normalize_function
from torch.utils._pytree import tree_map

from qpasses.errors import QPassesError
from qpasses.graph.match import is_max_pool
from qpasses.graph.modules import unique_name
from qpasses.nn import ChannelClamp, CropStart2d, SamePad2d, ShiftedSamePad2d
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.reference import Reference, annotation_for, build_reference
from qpasses.quant import lowering
from qpasses.quant.annotate import Annotation
from qpasses.quant.backends import Backend, get_backend
from qpasses.quant.grids import Grids
from qpasses.quant.observers import Observer
from qpasses.quant.ops import REQUANT_FUNCTION_MODULES, Role, returns_input, role_of, runs_clamp_kernel
from qpasses.quant.state import FLOAT_WEIGHT_KEY, QPARAMS_KEY, QSTATE_KEY, WEIGHT_QPARAMS_KEY, state_of

_SHAPE_QUERIES = ("size", "dim")


def _module_of_call(node: fx.Node) -> nn.Module:
    """The module that computes functional call ``node`` (``F.leaky_relu(x, negative_slope=0.2)`` →
    ``nn.LeakyReLU(0.2)``), from all of its arguments, positional or keyword."""
    call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    options = dict(call.kwargs)
    options.pop("input")
    return REQUANT_FUNCTION_MODULES[node.target](**options)


class Lower(Pass):
    """Replace observed float ops by ``torch.ao.nn.quantized`` kernels of ``backend`` (x86/fbgemm, qnnpack).

    Math: each int8 op computes ``q_out = clamp(round(f(x) / s_out) + z_out, qmin, qmax)`` with weights
    ``q_w = clamp(round(w / s_w) + z_w)``; ``(s, z)`` come from the calibrated observers. Observers on
    values an int8 op produces disappear (the op writes at their scale); observers on float values become
    quantize; float ops get a dequantize in front, so quantize/dequantize appear only at real boundaries.
    Quantize and the FloatFunctional arithmetic become direct calls of ``torch.quantize_per_tensor`` and
    ``torch.ops.quantized.*`` with constant qparams (no module, no Python layer per op, as torch.ao FX).
    Spec ranges narrower than 8 bits (sub-8-bit, reduce_range) are enforced by a clamp of the codes; a
    clamp read only by a max pool moves after it (``max(clamp(x)) = clamp(max(x))``, on fewer values).
    Identity and dropout modules, which return their input at inference, are removed: every node of the
    lowered graph costs a call at run time.
    A fused ``ChannelClamp`` (CLE's exact stand-in for ReLU6) disappears when its bounds are uniform, else it
    stays after the int8 op and clamps each channel's codes.
    Requires: ``calibrated``. Provides: ``lowered``. The result runs with the backend's engine (its first
    op, a ``QuantizedEngine`` module, selects it), saves and loads, and can be TorchScripted. It keeps the
    reference quantized graph of the same decisions (``Reference``) in ``state_of(result).reference``.
    Grids are decided once, in ``qpasses.quant.grids``, for both.
    """

    stage = Stage.LOWER
    requires = frozenset({"calibrated"})
    provides = frozenset({"lowered"})
    invalidates = frozenset({"observed", "calibrated"})

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ann, backend = annotation_for(gm, self.backend)
        _to_cpu(gm, backend.name, ctx)
        reference = _reference_of(gm, backend)
        with lowering.quantized_engine(backend.engine):
            _Lowering(gm, ann, ctx).run()
        lowering.select_engine_first(gm, backend.engine)
        state = state_of(gm)
        state.annotation, state.backend, state.reference = None, backend.name, reference
        gm.recompile()
        return PassResult(gm, modified=True)


def _reference_of(gm: fx.GraphModule, backend: Backend) -> fx.GraphModule:
    """The reference quantized graph of the calibrated graph ``gm`` (``Reference``, on a copy), which the lowered
    model keeps for its exporters: the same grid decisions, so the same codes."""
    reference = copy.deepcopy(gm)
    state = state_of(reference)
    build_reference(reference, state.annotation, backend, PassContext(example_inputs=()))  # notes: Lower's own
    state.annotation, state.reference_backend = None, backend.name
    state.properties = (state.properties - Reference.invalidates) | Reference.provides
    return reference


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


class _Lowering:
    def __init__(self, gm: fx.GraphModule, ann: Annotation, ctx: PassContext):
        self.gm, self.ann, self.ctx = gm, ann, ctx
        self.backend = get_backend(ann.backend)
        self.graph = gm.graph
        self.quantized: dict[fx.Node, bool] = {}
        self.dequantized: dict[fx.Node, fx.Node] = {}
        self.erased_modules: set[str] = set()  # observers and folded activations no node calls any more
        self.code_clamps: list[fx.Node] = []  # clamps of codes to a spec's range narrower than 8 bits
        self.lowered_modules: dict[str, nn.Module] = {}  # module name → the float module its int8 form replaced
        self.grids = Grids(gm, ann, self.backend, ctx.note)  # decided before the graph changes

    def observer(self, node: fx.Node) -> Observer | None:
        return self.grids.observer(node)

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if self.observer(node) is not None:
                self.lower_observer(node)
                continue
            role = self.ann.roles.get(node.name, Role.NONE)
            if returns_input(self.gm, node):
                node.replace_all_uses_with(node.args[0])
                self.erase(node)
            elif node.op == "placeholder":
                self.quantized[node] = False
            elif node.op == "output":
                self.dequantize_inputs(node)
            elif role is Role.COMPUTE:
                self.lower_compute(node)
            elif role in (Role.FUNCTIONAL, Role.DERIVED):
                self.lower_functional(node, role)
            elif role is Role.REQUANT:
                self.lower_unary(node)
            elif role is Role.FUSED_ACT and self.clamps_per_channel(node):
                produced = node.all_input_nodes[0].meta[QPARAMS_KEY]  # the int8 op before it writes at these
                self.mark_int8(node, produced["scale"], produced["zero_point"])
            elif role is Role.FUSED_ACT:
                producer = node.all_input_nodes[0]
                node.replace_all_uses_with(producer)
                self.erase(node)
            elif role in (Role.FIXED, Role.PRESERVING):
                inputs = [a for a in node.all_input_nodes if a in self.quantized]
                self.quantized[node] = bool(inputs) and self.quantized[inputs[0]]
                if self.quantized[node]:
                    node.meta[QSTATE_KEY] = "int8"
                    self.clamp_contiguous(node)
            elif node.op in ("call_module", "call_function", "call_method"):
                if not (node.op == "call_method" and node.target in _SHAPE_QUERIES):
                    self.dequantize_inputs(node)
                self.quantized[node] = False
        if not self.backend.clamp_needs_contiguous:
            for clamp in self.code_clamps:
                self.sink_below_max_pool(clamp)
        referenced = {n.target for n in self.graph.nodes if n.op in ("call_module", "get_attr")}
        for name in sorted(self.erased_modules - referenced):
            self.gm.delete_submodule(name)

    def clamp_contiguous(self, node: fx.Node) -> None:
        """On backends whose clamp kernel is wrong on channels-last data, a clamp-like op kept on int8 codes
        (a ReLU6 whose producer has other readers) reads its input made contiguous."""
        if not (self.backend.clamp_needs_contiguous and role_of(self.gm, node) is Role.FUSED_ACT
                and runs_clamp_kernel(self.gm, node)):
            return
        value = node.args[0]
        with self.graph.inserting_before(node):
            contiguous = self.graph.call_method("contiguous", (value,))
        contiguous.meta = {**value.meta, QSTATE_KEY: "int8"}
        node.replace_input_with(value, contiguous)
        self.quantized[contiguous] = True

    def sink_below_max_pool(self, clamp: fx.Node) -> None:
        """Swap ``clamp`` with the max pool that alone reads it; that pool then reads the clamp's input.

        Max pooling outputs values of its input, so it commutes with a clamp (the max of clamped values is
        the clamped max), and after it the clamp reads fewer values (a quarter after a stride-2 pool).
        """
        if len(clamp.users) != 1:
            return
        pool = next(iter(clamp.users))
        if not is_max_pool(self.gm, pool) or pool.args[0] is not clamp:
            return
        pool.replace_input_with(clamp, clamp.args[0])
        pool.append(clamp)
        pool.replace_all_uses_with(clamp, delete_user_cb=lambda user: user is not clamp)
        clamp.args = (pool, *clamp.args[1:])
        if "tensor_meta" in pool.meta:
            clamp.meta["tensor_meta"] = pool.meta["tensor_meta"]

    def clamps_per_channel(self, node: fx.Node) -> bool:
        """A ChannelClamp whose bounds differ by channel: the producer's output range holds the widest
        bounds, the clamp stays to cut each channel at its own (on the int8 codes)."""
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        return isinstance(module, ChannelClamp) and not module.uniform

    def lower_observer(self, node: fx.Node) -> None:
        observer = self.observer(node)
        value = node.args[0]
        grid = self.grids.observer_grid(observer)
        if self.quantized.get(value, False):
            result = value
        else:
            quantize, qparams = lowering.quantize_call(grid)
            with self.graph.inserting_before(node):
                result = self.graph.create_node("call_function", quantize, (value, *qparams),
                                                name=f"{value.name}_quant")
            result.meta[QSTATE_KEY] = "int8"
            self.ctx.stats["quantize"] += 1
        bounds = lowering.code_range(grid)
        if bounds is not None:
            with self.graph.inserting_before(node):
                if self.backend.clamp_needs_contiguous:
                    result = self.graph.call_method("contiguous", (result,))
                result = self.graph.call_function(torch.clamp, (result, *bounds))
            result.meta[QSTATE_KEY] = "int8"
            self.code_clamps.append(result)
        result.meta[QPARAMS_KEY] = {"scale": grid.scale, "zero_point": grid.zero_point,
                                    "dtype": str(grid.quantized_dtype), "bits": observer.spec.bits}
        node.replace_all_uses_with(result)
        self.erase(node)
        self.quantized[result] = True

    def erase(self, node: fx.Node) -> None:
        if node.op == "call_module":
            self.erased_modules.add(node.target)
        self.graph.erase_node(node)

    def check_inputs_quantized(self, node: fx.Node) -> None:
        for arg in node.all_input_nodes:
            if arg in self.quantized and not self.quantized[arg]:
                raise QPassesError(f"internal: int8 op '{node.name}' reads float value '{arg.name}'")

    def lower_compute(self, node: fx.Node) -> None:
        self.check_inputs_quantized(node)
        if node.name in self.ann.float_output:
            self.lower_float_output(node)
            return
        scale, zero_point = self.grids.output_qparams(node)
        module = self.symmetric_same_padding(node, self.float_module(node), scale, zero_point)
        # qpasses.convert() puts the weight qparams QAT trained with there; PTQ observes the weight here.
        qmodule = lowering.quantized_compute(module, self.ann.pairs[node.name].weight, scale, zero_point,
                                             node.meta.get(WEIGHT_QPARAMS_KEY))
        node.meta.pop(FLOAT_WEIGHT_KEY, None)
        self.replace_module(node.target, qmodule)
        self.mark_int8(node, scale, zero_point)
        self.ctx.stats["int8_" + type(module).__name__.lower()] += 1

    def lower_float_output(self, node: fx.Node) -> None:
        """A linear that writes the model's output in float: the int8 kernel that dequantizes its accumulator."""
        module = self.float_module(node)
        lowered = lowering.float_output_compute(module, self.ann.pairs[node.name].weight,
                                                node.meta.get(WEIGHT_QPARAMS_KEY))
        node.meta.pop(FLOAT_WEIGHT_KEY, None)
        self.replace_module(node.target, lowered)
        self.quantized[node] = False
        node.meta[QSTATE_KEY] = "int8_float_output"
        self.ctx.stats["float_output_" + type(module).__name__.lower()] += 1

    def symmetric_same_padding(self, node: fx.Node, conv: nn.Module, scale: float, zero_point: int) -> nn.Module:
        """A stride-2 depthwise conv after 'SAME' padding, rewritten to pad symmetrically itself.

        fbgemm runs depthwise convs on a fast path only when they pad (k − 1) / 2 on every side, so
        SamePad2d → Conv2d(padding=0) becomes ShiftedSamePad2d → Conv2d(padding=(k − 1) / 2) → CropStart2d,
        which reads the same pixels. Returns the float conv to lower.
        """
        pad = node.args[0]
        if not (type(conv) is nn.Conv2d and conv.groups == conv.in_channels and conv.padding == (0, 0)
                and ShiftedSamePad2d.applies(conv.kernel_size, conv.stride, conv.dilation)
                and isinstance(pad, fx.Node) and pad.op == "call_module" and len(pad.users) == 1):
            return conv
        same = self.gm.get_submodule(pad.target)
        if not (type(same) is SamePad2d and same.value == 0 and same.kernel_size == conv.kernel_size
                and same.stride == conv.stride and same.dilation == conv.dilation):
            return conv
        self.replace_module(pad.target, ShiftedSamePad2d(conv.kernel_size, conv.stride))
        padded = copy.copy(conv)
        padded.padding = tuple((k - 1) // 2 for k in conv.kernel_size)
        target = unique_name(self.gm, f"{node.name}_crop")
        self.gm.add_submodule(target, CropStart2d())
        with self.graph.inserting_after(node):
            crop = self.graph.call_module(target, (node,))
        node.replace_all_uses_with(crop, delete_user_cb=lambda user: user is not crop)
        crop.meta = dict(node.meta)
        node.meta.pop("tensor_meta", None)  # the padded conv's output is one row and column larger
        self.mark_int8(crop, scale, zero_point)
        return padded

    def lower_functional(self, node: fx.Node, role: Role) -> None:
        """``owner.method(*args)`` on a FloatFunctional becomes a direct call of the quantized op."""
        self.check_inputs_quantized(node)
        scale, zero_point = self.grids.output_qparams(node) if role is Role.FUNCTIONAL else (1.0, 0)
        owner, *args = node.args
        op, args, kwargs = lowering.quantized_functional_call(node.target, tuple(args), dict(node.kwargs),
                                                              scale, zero_point)
        with self.graph.inserting_before(node):
            call = self.graph.call_function(op, args, kwargs)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        self.ctx.stats[f"int8_{node.target}"] += 1
        self.erase(node)
        if not owner.users:
            self.erased_modules.add(owner.target)
            self.graph.erase_node(owner)
        self.mark_int8(call, scale, zero_point)

    def lower_unary(self, node: fx.Node) -> None:
        self.check_inputs_quantized(node)
        scale, zero_point = self.grids.output_qparams(node)
        if node.op == "call_module":
            qmodule = lowering.quantized_unary(self.float_module(node), scale, zero_point)  # may rename the target
            self.replace_module(node.target, qmodule)
        else:
            float_module = _module_of_call(node)
            target = unique_name(self.gm, f"{node.name}_q")
            self.gm.add_submodule(target, lowering.quantized_unary(float_module, scale, zero_point))
            with self.graph.inserting_before(node):
                new = self.graph.call_module(target, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            self.graph.erase_node(node)
            node = new
        self.mark_int8(node, scale, zero_point)
        self.ctx.stats["int8_unary"] += 1

    def float_module(self, node: fx.Node) -> nn.Module:
        """The float module ``node`` calls, which its int8 form will replace. A module called from several
        places (``conv(conv(x))``) gets an int8 module per call: each call writes at its own qparams, so a
        call after the first is pointed at a new name, and the weights are packed once per call."""
        float_module = self.lowered_modules.get(node.target)
        if float_module is not None:
            node.target = unique_name(self.gm, f"{node.target}_{node.name}")
            self.gm.add_submodule(node.target, float_module)
        self.lowered_modules[node.target] = self.gm.get_submodule(node.target)
        return self.lowered_modules[node.target]

    def mark_int8(self, node: fx.Node, scale: float, zero_point: int) -> None:
        self.quantized[node] = True
        node.meta[QSTATE_KEY] = "int8"
        node.meta[QPARAMS_KEY] = {"scale": scale, "zero_point": zero_point}

    def replace_module(self, target: str, module) -> None:
        parent, _, child = target.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, child, module)

    def dequantize_inputs(self, node: fx.Node) -> None:
        def swap(arg):
            if isinstance(arg, fx.Node) and self.quantized.get(arg, False):
                if arg not in self.dequantized:
                    with self.graph.inserting_after(arg):
                        self.dequantized[arg] = self.graph.call_method("dequantize", (arg,))
                    self.ctx.stats["dequantize"] += 1
                return self.dequantized[arg]
            return arg

        node.args = fx.map_arg(node.args, swap)
        node.kwargs = fx.map_arg(node.kwargs, swap)

