"""Lower: turn a calibrated, observed graph into real int8 kernels."""

from __future__ import annotations

import functools

import torch
import torch.fx as fx
from torch import nn

from qpasses.errors import QPassesError
from qpasses.graph.modules import unique_name
from qpasses.nn import ChannelClamp
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.insert_observers import ANNOTATION_KEY
from qpasses.quant import lowering
from qpasses.quant.annotate import Annotation
from qpasses.quant.backends import get_backend
from qpasses.quant.observers import Observer
from qpasses.quant.ops import Role

_SHAPE_QUERIES = ("size", "dim")
WEIGHT_QPARAMS_KEY = "weight_qparams"
# qnnpack's quantized clamp returns wrong values on channels-last tensors (its convs' output layout);
# measured on torch 2.14.1: up to the whole range off, exact once contiguous.
_CLAMP_NEEDS_CONTIGUOUS = ("qnnpack",)


class Lower(Pass):
    """Replace observed float ops by ``torch.ao.nn.quantized`` kernels of ``backend`` (x86/fbgemm, qnnpack).

    Math: each int8 op computes ``q_out = clamp(round(f(x) / s_out) + z_out, qmin, qmax)`` with weights
    ``q_w = clamp(round(w / s_w) + z_w)``; ``(s, z)`` come from the calibrated observers. Observers on
    values an int8 op produces disappear (the op writes at their scale); observers on float values become
    quantize; float ops get a dequantize in front, so quantize/dequantize appear only at real boundaries.
    Spec ranges narrower than 8 bits (sub-8-bit, reduce_range) are enforced by a clamp of the codes.
    A fused ``ChannelClamp`` (CLE's exact stand-in for ReLU6) disappears when its bounds are uniform, else it
    stays after the int8 op and clamps each channel's codes.
    Requires: ``calibrated``. Provides: ``lowered``. The result runs with the backend's engine (a forward
    pre-hook selects it), saves and loads, and can be TorchScripted.
    """

    stage = Stage.LOWER
    requires = frozenset({"calibrated"})
    provides = frozenset({"lowered"})
    invalidates = frozenset({"observed", "calibrated"})

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ann: Annotation | None = gm.meta.get(ANNOTATION_KEY)
        if ann is None:
            raise QPassesError("the graph carries no quantization annotation; run InsertObservers and Calibrate first")
        backend = get_backend(self.backend or ann.backend)
        if backend.name != ann.backend:
            raise QPassesError(f"observers were placed for backend '{ann.backend}', which differs from "
                               f"'{backend.name}'; lower with Lower('{ann.backend}') or insert observers for '{backend.name}'")
        with lowering.quantized_engine(backend.engine):
            _Lowering(gm, ann, ctx).run()
        gm.register_forward_pre_hook(functools.partial(lowering.use_engine, backend.engine))
        gm.meta["qpasses_backend"] = backend.name
        del gm.meta[ANNOTATION_KEY]
        gm.recompile()
        return PassResult(gm, modified=True)


class _Lowering:
    def __init__(self, gm: fx.GraphModule, ann: Annotation, ctx: PassContext):
        self.gm, self.ann, self.ctx = gm, ann, ctx
        self.graph = gm.graph
        self.quantized: dict[fx.Node, bool] = {}
        self.dequantized: dict[fx.Node, fx.Node] = {}
        self.erased_modules: set[str] = set()  # observers and folded activations no node calls any more

    def observer(self, node: fx.Node) -> Observer | None:
        if node.op != "call_module":
            return None
        module = self.gm.get_submodule(node.target)
        return module if isinstance(module, Observer) else None

    def output_qparams(self, node: fx.Node) -> tuple[float, int]:
        """Scale and zero point of the observer reading ``node``'s value (after its fused activation)."""
        value = next((self.graph_node(a) for a, p in self.ann.fused.items() if p == node.name), node)
        users = [u for u in value.users if self.observer(u) is not None]
        if not users:
            raise QPassesError(f"internal: no observer reads '{value.name}'")
        scale, zero_point = self.observer(users[0]).qparams()
        return float(scale), int(zero_point)

    def graph_node(self, name: str) -> fx.Node:
        return next(n for n in self.graph.nodes if n.name == name)

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if self.observer(node) is not None:
                self.lower_observer(node)
                continue
            role = self.ann.roles.get(node.name, Role.NONE)
            if node.op == "placeholder":
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
                self.mark_int8(node, *self.output_qparams(node.all_input_nodes[0]))
            elif role is Role.FUSED_ACT:
                producer = node.all_input_nodes[0]
                node.replace_all_uses_with(producer)
                self.erase(node)
            elif role in (Role.FIXED, Role.PRESERVING):
                inputs = [a for a in node.all_input_nodes if a in self.quantized]
                self.quantized[node] = bool(inputs) and self.quantized[inputs[0]]
                if self.quantized[node]:
                    node.meta["qstate"] = "int8"
            elif node.op in ("call_module", "call_function", "call_method"):
                if not (node.op == "call_method" and node.target in _SHAPE_QUERIES):
                    self.dequantize_inputs(node)
                self.quantized[node] = False
        referenced = {n.target for n in self.graph.nodes if n.op in ("call_module", "get_attr")}
        for name in sorted(self.erased_modules - referenced):
            self.gm.delete_submodule(name)

    def clamps_per_channel(self, node: fx.Node) -> bool:
        """A ChannelClamp whose bounds differ by channel: the producer's output range holds the widest
        bounds, the clamp stays to cut each channel at its own (on the int8 codes)."""
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        return isinstance(module, ChannelClamp) and not module.uniform

    def lower_observer(self, node: fx.Node) -> None:
        observer = self.observer(node)
        value = node.args[0]
        scale, zero_point = (float(v) for v in observer.qparams())
        zero_point = int(zero_point)
        spec = observer.spec
        if self.quantized.get(value, False):
            result = value
        else:
            target = unique_name(self.gm, f"{value.name}_quant")
            self.gm.add_submodule(target, lowering.quantize_stub(scale, zero_point, spec))
            with self.graph.inserting_before(node):
                result = self.graph.call_module(target, (value,))
            result.meta["qstate"] = "int8"
            self.ctx.stats["quantize"] += 1
        bounds = lowering.code_range(scale, zero_point, spec)
        if bounds is not None:
            with self.graph.inserting_before(node):
                if self.ann.backend in _CLAMP_NEEDS_CONTIGUOUS:
                    result = self.graph.call_method("contiguous", (result,))
                result = self.graph.call_function(torch.clamp, (result, *bounds))
            result.meta["qstate"] = "int8"
        result.meta["qparams"] = {"scale": scale, "zero_point": zero_point, "dtype": str(spec.dtype), "bits": spec.bits}
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
        scale, zero_point = self.output_qparams(node)
        module = self.gm.get_submodule(node.target)
        # qpasses.convert() puts the weight qparams QAT trained with there; PTQ observes the weight here.
        qmodule = lowering.quantized_compute(module, self.ann.pairs[node.name].weight, scale, zero_point,
                                             node.meta.get(WEIGHT_QPARAMS_KEY))
        self.replace_module(node.target, qmodule)
        self.mark_int8(node, scale, zero_point)
        self.ctx.stats["int8_" + type(module).__name__.lower()] += 1

    def lower_functional(self, node: fx.Node, role: Role) -> None:
        self.check_inputs_quantized(node)
        scale, zero_point = self.output_qparams(node) if role is Role.FUNCTIONAL else (1.0, 0)
        owner = node.args[0]
        self.replace_module(owner.target, lowering.quantized_functional(scale, zero_point))
        self.mark_int8(node, scale, zero_point)
        self.ctx.stats[f"int8_{node.target}"] += 1

    def lower_unary(self, node: fx.Node) -> None:
        self.check_inputs_quantized(node)
        scale, zero_point = self.output_qparams(node)
        if node.op == "call_module":
            self.replace_module(node.target, lowering.quantized_unary(self.gm.get_submodule(node.target), scale, zero_point))
        else:
            float_module = {"hardswish": nn.Hardswish(), "leaky_relu": nn.LeakyReLU(*node.args[1:2]),
                            "elu": nn.ELU(*node.args[1:2])}[node.target.__name__]
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

    def mark_int8(self, node: fx.Node, scale: float, zero_point: int) -> None:
        self.quantized[node] = True
        node.meta["qstate"] = "int8"
        node.meta["qparams"] = {"scale": scale, "zero_point": zero_point}

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

