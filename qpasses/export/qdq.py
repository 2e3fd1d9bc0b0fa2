"""The float QDQ view of a lowered model: what ONNX calls quantize-dequantize format.

Every int8 value of the lowered graph becomes ``fake_quant(x) = (clamp(round(x / s) + z, qmin, qmax) − z) · s``
with the scale ``s``, zero point ``z`` and code range ``[qmin, qmax]`` the lowered model uses for it; every
int8 op becomes its float op on dequantized inputs, with weights dequantized from their int8 codes and
fake-quantized again (per channel where they are), so ``torch.onnx`` writes QuantizeLinear/DequantizeLinear
pairs carrying qpasses' own parameters. Runtimes that fuse QDQ (ONNX Runtime, OpenVINO, TensorRT) run the
int8 kernels; in torch the view is qpasses' fake-quant model.

Narrow code ranges. ONNX QDQ knows only the full 8-bit ranges, so:
  - ``[0, 127]`` (reduce_range, 7-bit, for fbgemm on CPUs without VNNI) exports exactly as
    QuantizeLinear → Clip(0, 127) on the uint8 codes → DequantizeLinear (``reduce_range="keep"``), or, with
    ``reduce_range="widen"``, as the same real interval spread over 256 codes:
    ``s' = 127 s / 255``, ``z' = round(z · 255 / 127)``. The 7-bit limit comes from fbgemm's saturating
    ``vpmaddubsw``; ONNX Runtime's int8 kernels do not need it, so widening halves the rounding step.
    x86's ``headroom`` grids (7-bit steps, codes running on to 255) have no clamp and export as they run.
  - other ranges (sub-8-bit, reduce_range on signed codes, narrow_range) export exactly as the 8-bit QDQ
    pair followed by a float Clip to the range's real bounds.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.ao.nn.quantized as nnq
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qpasses.errors import ExportError
from qpasses.graph.match import is_max_pool
from qpasses.graph.trace import as_input_tuple
from qpasses.quant import lowering
from qpasses.quant.backends import Backend, get_backend
from qpasses.quant.state import QPARAMS_KEY, existing_state

ReduceRange = Literal["keep", "widen"]
REDUCE_RANGE_MODES = ("keep", "widen")

_CONV = {
    nnq.Conv1d: F.conv1d, nnq.Conv2d: F.conv2d, nnq.Conv3d: F.conv3d,
}
_CONV_TRANSPOSE = {nnq.ConvTranspose1d: F.conv_transpose1d, nnq.ConvTranspose2d: F.conv_transpose2d}
# The float op of each quantized functional op Lower emits (its output qparams dropped: the fake-quant after
# it applies them).
_FLOAT_FUNCTIONAL = {
    torch.ops.quantized.add: torch.add,
    torch.ops.quantized.add_relu: torch.add,  # then a ReLU
    torch.ops.quantized.mul: torch.mul,
    torch.ops.quantized.cat: torch.cat,
    torch.ops.quantized.add_scalar: operator.add,
    torch.ops.quantized.mul_scalar: operator.mul,
}
# Code ranges torch.onnx writes as QDQ (opset 13): the 8-bit containers and unsigned 7-bit.
_ONNX_RANGES = {(0, 255), (-128, 127), (0, 127)}


@dataclass(frozen=True)
class Grid:
    """One value's integer grid: real value ``(code − zero_point) · scale`` for codes in ``[qmin, qmax]``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def widened(self) -> Grid:
        """The same real interval over the full 8-bit container (for 128-code reduce_range grids)."""
        lo, hi = (-128, 127) if self.qmin < 0 else (0, 255)
        zero_point = lo + round((self.zero_point - self.qmin) * 255 / 127)
        return Grid(self.scale * 127 / 255, min(max(zero_point, lo), hi), lo, hi)


def lowered_backend(model: nn.Module) -> Backend | None:
    """The backend ``Lower`` lowered ``model`` for (``QuantState.backend``), None for any other model."""
    state = existing_state(model)
    return get_backend(state.backend) if state is not None and state.backend is not None else None


def is_lowered(model: nn.Module) -> bool:
    return lowered_backend(model) is not None


def _check_lowered(model: nn.Module, what: str) -> None:
    if not is_lowered(model):
        raise ExportError(f"{what} needs a model lowered by qpasses (the result of PassManager([..., PTQ(...)]).run); "
                          f"got a {type(model).__name__} without int8 kernels")


def _container(dtype: torch.dtype) -> tuple[int, int]:
    return (-128, 127) if dtype == torch.qint8 else (0, 255)


def _record_grids(model: fx.GraphModule, inputs: tuple) -> dict[str, Grid]:
    """Grid of every node whose lowered output is a quantized tensor, read from one forward pass."""
    grids: dict[str, Grid] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, torch.Tensor) and result.is_quantized:
                if result.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                    raise ExportError(f"node '{n.name}' produces a per-channel quantized activation; "
                                      "QDQ export supports per-tensor activations only")
                codes = _container(result.dtype)
                grids[n.name] = Grid(float(result.q_scale()), int(result.q_zero_point()), *codes)
            return result

    with lowering.quantized_engine(lowered_backend(model).engine), torch.no_grad():
        Recorder(model).run(*inputs)
    return grids


class _ViewBuilder:
    def __init__(self, model: fx.GraphModule, inputs: tuple, reduce_range: ReduceRange):
        self.model, self.reduce_range = model, reduce_range
        self.grids = _record_grids(model, inputs)
        self.graph = fx.Graph()
        self.attrs: dict[str, Any] = {}
        self.env: dict[fx.Node, Any] = {}
        self.absorbed: set[fx.Node] = set()  # clamps whose range their producer's fake-quant applies
        self.copied_modules: dict[str, str] = {}  # lowered model's float submodule → its name in the view

    # -- helpers

    def register(self, name: str, value: Any) -> str:
        name = name.replace(".", "_")
        base, i = name, 1
        while name in self.attrs:
            name, i = f"{base}_{i}", i + 1
        self.attrs[name] = value
        return name

    def attr(self, name: str, value: Any) -> fx.Node:
        return self.graph.get_attr(self.register(name, value))

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def mapped(self, value: Any) -> Any:
        return fx.map_arg(value, lambda n: self.env[n])

    def code_clamp(self, node: fx.Node) -> Grid | None:
        """The narrowed grid of a ``torch.clamp`` on a quantized value, else None: Lower's clamps of codes to
        a spec's range, and clamp activations that keep their input's grid (bounds round to codes)."""
        if node.op != "call_function" or node.target is not torch.clamp:
            return None
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.name not in self.grids:
            return None
        grid = self.grids[source.name]
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
        qmin = grid.qmin if lo is None else max(grid.qmin, grid.zero_point + round(lo / grid.scale))
        qmax = grid.qmax if hi is None else min(grid.qmax, grid.zero_point + round(hi / grid.scale))
        return Grid(grid.scale, grid.zero_point, qmin, qmax)

    def fake_quant(self, value: fx.Node, grid: Grid, bits: int | None = None) -> fx.Node:
        if self.reduce_range == "widen" and bits == 8 and grid.qmax - grid.qmin == 127:
            grid = grid.widened()
        if (grid.qmin, grid.qmax) in _ONNX_RANGES and grid.qmin <= grid.zero_point <= grid.qmax:
            return self.call(torch.fake_quantize_per_tensor_affine, value, grid.scale, grid.zero_point,
                             grid.qmin, grid.qmax)
        lo, hi = (-128, 127) if grid.qmin < 0 else (0, 255)
        out = self.call(torch.fake_quantize_per_tensor_affine, value, grid.scale, grid.zero_point, lo, hi)
        return self.call(torch.clamp, out, (grid.qmin - grid.zero_point) * grid.scale,
                         (grid.qmax - grid.zero_point) * grid.scale)

    def output_grid(self, node: fx.Node) -> tuple[Grid, int | None]:
        """``node``'s grid, narrowed by the code clamp that alone reads it (which then becomes a no-op), or
        that alone reads the max pool that alone reads it (Lower moves clamps after max pools; the pool's
        own grid absorbs the clamp, so ``"widen"`` keeps the finer steps on both)."""
        users = list(node.users)
        if len(users) == 1 and (narrowed := self.code_clamp(users[0])) is not None:
            self.absorbed.add(users[0])
            return narrowed, users[0].meta.get(QPARAMS_KEY, {}).get("bits")
        if len(users) == 1 and is_max_pool(self.model, users[0]) and len(users[0].users) == 1:
            clamp = next(iter(users[0].users))
            if (narrowed := self.code_clamp(clamp)) is not None:
                return narrowed, clamp.meta.get(QPARAMS_KEY, {}).get("bits")
        return self.grids[node.name], None

    def weight(self, node: fx.Node, qweight: torch.Tensor) -> fx.Node:
        value = self.attr(f"{node.target}.weight", qweight.dequantize())
        lo, hi = _container(qweight.dtype)
        if qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales = self.attr(f"{node.target}.weight_scale", qweight.q_per_channel_scales().float())
            zero_points = self.attr(f"{node.target}.weight_zero_point",
                                    qweight.q_per_channel_zero_points().int())
            return self.call(torch.fake_quantize_per_channel_affine, value, scales, zero_points,
                             qweight.q_per_channel_axis(), lo, hi)
        return self.call(torch.fake_quantize_per_tensor_affine, value, float(qweight.q_scale()),
                         int(qweight.q_zero_point()), lo, hi)

    # -- nodes

    def build(self) -> fx.GraphModule:
        for node in self.model.graph.nodes:
            self.env[node] = self.visit(node)
        return fx.GraphModule(self.attrs, self.graph, class_name=f"{type(self.model).__name__}QDQ")

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.graph.node_copy(node)
        if node.op == "output":
            return self.graph.output(self.mapped(node.args[0]))
        if node.op == "get_attr":
            return self.attr(node.target, copy.deepcopy(_fetch(self.model, node.target)))
        if node in self.absorbed:
            return self.env[node.args[0]]
        if (narrowed := self.code_clamp(node)) is not None:
            return self.fake_quant(self.env[node.args[0]], narrowed, node.meta.get(QPARAMS_KEY, {}).get("bits"))
        if node.op == "call_method" and node.target == "dequantize":
            return self.env[node.args[0]]
        value = self.float_op(node)
        if node.name in self.grids:
            return self.fake_quant(value, *self.output_grid(node))
        return value

    def float_op(self, node: fx.Node) -> fx.Node:
        args, kwargs = self.mapped(node.args), self.mapped(node.kwargs)
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            if isinstance(module, tuple(_CONV)):
                return self.conv(node, module, args[0])
            if isinstance(module, tuple(_CONV_TRANSPOSE)):
                fn = next(f for cls, f in _CONV_TRANSPOSE.items() if isinstance(module, cls))
                return self.call(fn, args[0], self.weight(node, module.weight()), self.bias(node, module),
                                 module.stride, module.padding, module.output_padding, module.groups,
                                 module.dilation)
            if isinstance(module, nnq.Linear):
                return self.call(F.linear, args[0], self.weight(node, module.weight()), self.bias(node, module))
            if isinstance(module, nnq.Hardswish):
                return self.call(F.hardswish, args[0])
            if isinstance(module, nnq.LeakyReLU):
                return self.call(F.leaky_relu, args[0], module.negative_slope)
            if isinstance(module, nnq.ELU):
                return self.call(F.elu, args[0], module.alpha)
            if type(module).__module__.startswith("torch.ao.nn.quantized"):
                raise ExportError(f"QDQ export has no float equivalent for {type(module).__name__} '{node.target}'")
            if node.target not in self.copied_modules:
                self.copied_modules[node.target] = self.register(node.target, copy.deepcopy(module))
            return self.graph.call_module(self.copied_modules[node.target], args, kwargs)
        if node.op == "call_function" and node.target is torch.quantize_per_tensor:
            return args[0]  # the fake-quant that follows is the quantize
        if node.op == "call_function" and node.target in _FLOAT_FUNCTIONAL:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("scale", "zero_point")}
            value = self.call(_FLOAT_FUNCTIONAL[node.target], *args, **kwargs)
            return self.call(F.relu, value) if node.target is torch.ops.quantized.add_relu else value
        if node.op == "call_function" and str(node.target).startswith("quantized."):
            raise ExportError(f"QDQ export has no float equivalent for {node.target} ('{node.name}')")
        return self.graph.node_copy(node, lambda n: self.env[n])

    def conv(self, node: fx.Node, module: nn.Module, x: fx.Node) -> fx.Node:
        if module.padding_mode != "zeros":
            raise ExportError(f"QDQ export supports zero-padded convs only; '{node.target}' pads with "
                              f"'{module.padding_mode}'")
        fn = next(f for cls, f in _CONV.items() if isinstance(module, cls))
        return self.call(fn, x, self.weight(node, module.weight()), self.bias(node, module), module.stride,
                         module.padding, module.dilation, module.groups)

    def bias(self, node: fx.Node, module: nn.Module) -> fx.Node | None:
        bias = module.bias()
        return None if bias is None else self.attr(f"{node.target}.bias", bias.detach().clone())


def _fetch(model: nn.Module, target: str) -> Any:
    value: Any = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def qdq_model(model: fx.GraphModule, example_inputs: Any, reduce_range: ReduceRange = "keep") -> fx.GraphModule:
    """The float QDQ view of the lowered ``model`` (see the module docstring); ``model`` is not modified.

    ``example_inputs`` run the lowered model once to read the grid of every int8 value.
    """
    _check_lowered(model, "qdq_model")
    if reduce_range not in REDUCE_RANGE_MODES:
        raise ExportError(f"reduce_range must be one of {REDUCE_RANGE_MODES}, got {reduce_range!r}")
    view = _ViewBuilder(model, as_input_tuple(example_inputs), reduce_range).build()
    return view.eval()
