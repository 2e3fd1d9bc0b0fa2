"""The op table: one record per op that qpasses quantizes, read by every stage.

A record (:class:`Op`) says how the graph calls the op (module classes, functions, Tensor methods, or a
``FloatFunctional`` method), its role (which is its qparam rule: its own requantized output grid, the grid its
kernel derives or fixes, its input's grid, or folded into its producer's range), whether clamp-like activations
after it fold into its output range, what the reference quantized graph runs it as, and its torch.ao int8 form
(``lowering``), which ``Lower``'s pattern for its role builds. Annotation (``role_of``), the reference graph
(``qpasses.passes.reference``), the grids (``qpasses.quant.grids``) and the torch.ao lowering
(``qpasses.passes.lower``) all read these records, so adding an op touches this table and, for a new kind of
int8 form, ``qpasses.quant.lowering``. The other runtimes (``qpasses.lower``) lower the reference graph with
their own toolchains and need nothing from it.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from qpasses.nn import ChannelClamp, SamePad2d
from qpasses.quant import lowering, qat_modules


class Role(enum.Enum):
    COMPUTE = "compute"  # weighted op with an int8 kernel (conv, linear); output requantized
    FUNCTIONAL = "functional"  # FloatFunctional add / add_relu / mul / cat; output requantized
    REQUANT = "requant"  # unary op whose quantized module takes output qparams (hardswish, leaky relu, elu)
    FIXED = "fixed"  # unary op whose kernel fixes the output qparams (sigmoid, hardsigmoid, tanh)
    DERIVED = "derived"  # the kernel derives the output qparams (add_scalar, mul_scalar)
    PRESERVING = "preserving"  # keeps its input's qparams (pooling, reshapes, padding, relu, upsampling)
    FUSED_ACT = "fused_act"  # clamp-like activation folded into its producer's output range
    FLOAT = "float"  # no int8 kernel: runs float between dequantize and quantize
    NONE = "none"  # not a tensor computation (placeholders, output, sizes, attributes)


# Roles whose int8 op writes its output at a grid of its own: a clamp-like activation that alone reads its output
# folds into that range (``annotate``).
REQUANTIZING = (Role.COMPUTE, Role.FUNCTIONAL, Role.REQUANT)


@dataclass(frozen=True, eq=False)
class Op:
    """One op's record.

    ``name``: how counters and messages call it. ``role``: what it does with qparams (see :class:`Role`; clamp-like
    activations fold into the output range of the ``REQUANTIZING`` roles).
    How the graph calls it: ``modules`` (classes; a subclass counts, as ``isinstance``), ``functions``
    (``call_function`` targets), ``methods`` (Tensor methods), ``float_functional`` (the ``FloatFunctional``
    method). ``reference``: the float functions the reference graph runs it as, the first on the call's
    arguments, each later one on the previous result (a conv module: ``F.conv2d`` on its dequantized int8
    weight; ``FloatFunctional.add_relu``: ``torch.add`` then ``torch.relu``); empty: the call stays as it is.
    ``lowering``: its torch.ao int8 form, as the pattern of its role uses it: for ``COMPUTE`` the
    ``qpasses.quant.lowering`` module class packing the weight; for ``REQUANT`` a builder
    ``(float module, scale, zero_point) → int8 module``; for ``FUNCTIONAL``/``DERIVED`` the
    ``torch.ops.quantized`` op called on the int8 inputs (``FUNCTIONAL`` with the output scale and zero point);
    None: the op itself runs on the int8 codes (qparams-preserving, fixed-range and clamp-like ops).
    ``qat``: the module class QAT trains it as (weights fake-quantized, a following BatchNorm folded in;
    ``qpasses.quant.qat_modules``), None where QAT observes only its output. ``bounds``: for a clamp-like op,
    ``(gm, node) → (min, max)`` it clamps to (None: unbounded on that side). ``inference_identity``: a module
    that returns its input at inference (identity, dropout), dropped from quantized graphs.
    """

    name: str
    role: Role
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()
    float_functional: str | None = None
    reference: tuple[Callable[..., Any], ...] = ()
    lowering: Any = None
    qat: type[nn.Module] | None = None
    bounds: Callable[[fx.GraphModule, fx.Node], tuple[Any, Any]] | None = None
    inference_identity: bool = False

    def __deepcopy__(self, memo: dict) -> Op:  # a constant of the table, held in node metadata
        return self

    def __repr__(self) -> str:
        return f"Op({self.name!r}, {self.role})"


def _preserving(name: str, *modules: type[nn.Module], functions: tuple = (), methods: tuple = (),
                inference_identity: bool = False) -> Op:
    return Op(name, Role.PRESERVING, modules, functions, methods, inference_identity=inference_identity)


def _fixed(name: str, *modules: type[nn.Module], functions: tuple = (), methods: tuple = ()) -> Op:
    return Op(name, Role.FIXED, modules, functions, methods)


def _clamp_like(name: str, *modules: type[nn.Module], bounds: Callable[[fx.GraphModule, fx.Node], tuple[Any, Any]],
                functions: tuple = (), methods: tuple = ()) -> Op:
    return Op(name, Role.FUSED_ACT, modules, functions, methods, bounds=bounds)


def _argument(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _hardtanh_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return float(module.min_val), float(module.max_val)
    return float(_argument(node, 1, "min_val", -1.0)), float(_argument(node, 2, "max_val", 1.0))


def _channel_clamp_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float]:
    module = gm.get_submodule(node.target)  # its range: the widest of its channels' bounds
    return float(module.lower.min()), float(module.upper.max())


OPS: tuple[Op, ...] = (
    # Weighted ops: the reference graph calls the functional form on the dequantized int8 weight.
    Op("conv1d", Role.COMPUTE, (nn.Conv1d,), reference=(F.conv1d,), lowering=lowering.QuantizedConv1d,
       qat=qat_modules.QATConv1d),
    Op("conv2d", Role.COMPUTE, (nn.Conv2d,), reference=(F.conv2d,), lowering=lowering.QuantizedConv2d,
       qat=qat_modules.QATConv2d),
    Op("conv3d", Role.COMPUTE, (nn.Conv3d,), reference=(F.conv3d,), lowering=lowering.QuantizedConv3d,
       qat=qat_modules.QATConv3d),
    Op("conv_transpose1d", Role.COMPUTE, (nn.ConvTranspose1d,), reference=(F.conv_transpose1d,),
       lowering=lowering.QuantizedConvTranspose1d, qat=qat_modules.QATConvTranspose1d),
    Op("conv_transpose2d", Role.COMPUTE, (nn.ConvTranspose2d,), reference=(F.conv_transpose2d,),
       lowering=lowering.QuantizedConvTranspose2d, qat=qat_modules.QATConvTranspose2d),
    Op("linear", Role.COMPUTE, (nn.Linear,), reference=(F.linear,), lowering=lowering.QuantizedLinear,
       qat=qat_modules.QATLinear),
    # Unary ops whose int8 module takes output qparams; a functional call is lowered through its module class.
    Op("hardswish", Role.REQUANT, (nn.Hardswish,), (F.hardswish,), lowering=lowering.quantized_hardswish),
    Op("leaky_relu", Role.REQUANT, (nn.LeakyReLU,), (F.leaky_relu,), lowering=lowering.quantized_leaky_relu),
    Op("elu", Role.REQUANT, (nn.ELU,), (F.elu,), lowering=lowering.quantized_elu),
    # FloatFunctional arithmetic, lowered to direct calls of the quantized ops with constant qparams, as
    # torch.ao's FX convert emits them (a module per op costs a Python call and a read of tensor qparams).
    Op("add", Role.FUNCTIONAL, float_functional="add", reference=(torch.add,), lowering=torch.ops.quantized.add),
    Op("add_relu", Role.FUNCTIONAL, float_functional="add_relu", reference=(torch.add, torch.relu),
       lowering=torch.ops.quantized.add_relu),
    Op("mul", Role.FUNCTIONAL, float_functional="mul", reference=(torch.mul,), lowering=torch.ops.quantized.mul),
    Op("cat", Role.FUNCTIONAL, float_functional="cat", reference=(torch.cat,), lowering=torch.ops.quantized.cat),
    Op("add_scalar", Role.DERIVED, float_functional="add_scalar", reference=(torch.add,),
       lowering=torch.ops.quantized.add_scalar),
    Op("mul_scalar", Role.DERIVED, float_functional="mul_scalar", reference=(torch.mul,),
       lowering=torch.ops.quantized.mul_scalar),
    # Fixed-range ops: the quantized kernel writes on a grid of its own.
    _fixed("sigmoid", nn.Sigmoid, functions=(torch.sigmoid, F.sigmoid), methods=("sigmoid",)),
    _fixed("hardsigmoid", nn.Hardsigmoid, functions=(F.hardsigmoid,)),
    _fixed("tanh", nn.Tanh, functions=(torch.tanh, F.tanh), methods=("tanh",)),
    # Ops that keep their input's qparams: on int8 input they run on the codes.
    _preserving("max_pool", nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                functions=(F.max_pool1d, F.max_pool2d, F.max_pool3d)),
    _preserving("avg_pool", nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                functions=(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)),
    _preserving("adaptive_avg_pool", nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                functions=(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)),
    _preserving("mean", functions=(torch.mean,), methods=("mean",)),
    _preserving("flatten", nn.Flatten, functions=(torch.flatten,), methods=("flatten",)),
    _preserving("reshape", functions=(torch.reshape,), methods=("view", "reshape")),
    _preserving("transpose", functions=(torch.transpose,), methods=("transpose",)),
    _preserving("permute", functions=(torch.permute,), methods=("permute",)),
    _preserving("squeeze", functions=(torch.squeeze,), methods=("squeeze",)),
    _preserving("unsqueeze", functions=(torch.unsqueeze,), methods=("unsqueeze",)),
    _preserving("contiguous", methods=("contiguous",)),
    _preserving("expand", methods=("expand", "expand_as")),
    _preserving("repeat", methods=("repeat",)),
    _preserving("chunk", functions=(torch.chunk,), methods=("chunk",)),
    _preserving("split", functions=(torch.split,), methods=("split",)),
    _preserving("getitem", functions=(operator.getitem,)),
    _preserving("upsample", nn.Upsample, functions=(F.interpolate,)),
    _preserving("same_pad", SamePad2d),
    _preserving("dropout", nn.Dropout, functions=(F.dropout,), inference_identity=True),
    _preserving("identity", nn.Identity, inference_identity=True),
    # Clamp-like activations: folded into the producer's output range when they alone read a requantizing
    # op's output, otherwise they keep their input's qparams (the quantized kernels clamp in place). A
    # ChannelClamp with unequal bounds is folded for its widest range and still clamps the codes per channel.
    _clamp_like("relu", nn.ReLU, functions=(F.relu, torch.relu), methods=("relu",),
                bounds=lambda gm, node: (0.0, None)),
    _clamp_like("relu6", nn.ReLU6, functions=(F.relu6,), bounds=lambda gm, node: (0.0, 6.0)),
    _clamp_like("hardtanh", nn.Hardtanh, functions=(F.hardtanh,), bounds=_hardtanh_bounds),
    _clamp_like("clamp", functions=(torch.clamp,), methods=("clamp",),
                bounds=lambda gm, node: (_argument(node, 1, "min", None), _argument(node, 2, "max", None))),
    _clamp_like("channel_clamp", ChannelClamp, bounds=_channel_clamp_bounds),
)


def _index(keys: Callable[[Op], tuple]) -> dict:
    index: dict = {}
    for op in OPS:
        for key in keys(op):
            if key in index:
                raise AssertionError(f"op table: {key!r} is in both '{index[key].name}' and '{op.name}'")
            index[key] = op
    return index


# Lookups into OPS by how the graph calls an op (views of the table, not tables of their own).
_BY_MODULE: dict[type[nn.Module], Op] = _index(lambda op: op.modules)
_BY_FUNCTION: dict[Callable[..., Any], Op] = _index(lambda op: op.functions)
_BY_METHOD: dict[str, Op] = _index(lambda op: op.methods)
_BY_FLOAT_FUNCTIONAL: dict[str, Op] = _index(lambda op: (op.float_functional,) if op.float_functional else ())


def module_op(module: nn.Module) -> Op | None:
    """The record of ``module``'s class, or of the nearest class it subclasses."""
    return next((_BY_MODULE[base] for base in type(module).__mro__ if base in _BY_MODULE), None)


def op_of(gm: fx.GraphModule, node: fx.Node) -> Op | None:
    """The record of the op ``node`` calls, None for one the table does not know (it runs float)."""
    if node.op == "call_module":
        return module_op(gm.get_submodule(node.target))
    if node.op == "call_function":
        return _BY_FUNCTION.get(node.target)
    if node.op == "call_method":
        if functional_module(gm, node) is not None:
            return _BY_FLOAT_FUNCTIONAL.get(node.target)
        return _BY_METHOD.get(node.target)
    return None


def computing_op(module: nn.Module) -> Op | None:
    """The record of ``module``'s class, or of the class it subclasses without changing ``forward``
    (torchvision's ``Conv3DSimple`` is an ``nn.Conv3d`` with its own ``__init__``): it computes what that
    class computes. A subclass with its own forward has none."""
    for base in type(module).__mro__:
        if base in _BY_MODULE:
            return _BY_MODULE[base] if type(module).forward is base.forward else None
    return None


def kernel_output_grid(gm: fx.GraphModule, node: fx.Node, grid: tuple[float, int],
                       dtype: torch.dtype = torch.quint8) -> tuple[float, int]:
    """The (scale, zero point) the int8 kernel of ``node`` (a fixed-range or derived op: sigmoid, tanh,
    ``FloatFunctional.add_scalar``, ...) writes on an input at ``grid`` (codes of quantized ``dtype``), read from
    the kernel itself on a one-element probe: the kernel decides it, so no table of it can drift from it."""
    probe = torch.quantize_per_tensor(torch.zeros(1), grid[0], grid[1], dtype)
    op = op_of(gm, node)
    if op is not None and op.role is Role.DERIVED:  # the quantized op of a FloatFunctional scalar method
        out = op.lowering(probe, node.args[-1])
    elif node.op == "call_module":
        out = gm.get_submodule(node.target)(probe)
    elif node.op == "call_method":
        out = getattr(probe, node.target)()
    else:
        out = node.target(probe)
    return float(out.q_scale()), int(out.q_zero_point())


def is_tensor_node(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return hasattr(meta, "dtype") and meta.dtype.is_floating_point


def functional_module(gm: fx.GraphModule, node: fx.Node) -> FloatFunctional | None:
    """The FloatFunctional a ``call_method`` node calls through, if any."""
    if node.op != "call_method" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    owner = node.args[0]
    if owner.op != "get_attr":
        return None
    try:
        module = gm.get_submodule(owner.target)
    except AttributeError:  # a Parameter read directly (``self.cls_token.expand(...)``), not a module
        return None
    return module if isinstance(module, FloatFunctional) else None


def role_of(gm: fx.GraphModule, node: fx.Node) -> Role:
    """The role of ``node`` by itself (fusion of activations into producers is decided by the caller)."""
    if node.op in ("placeholder", "output", "get_attr") or not is_tensor_node(node):
        return Role.NONE
    op = op_of(gm, node)
    return op.role if op is not None else Role.FLOAT


def is_clamp_like(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` calls a clamp-like activation (ReLU, ReLU6, hardtanh, clamp, ChannelClamp)."""
    op = op_of(gm, node)
    return op is not None and op.role is Role.FUSED_ACT


def returns_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An ``nn.Identity`` or ``nn.Dropout`` call: quantized graphs only run inference, where both return their
    input."""
    if node.op != "call_module":
        return False
    op = module_op(gm.get_submodule(node.target))
    return op is not None and op.inference_identity


def clamp_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float | None, float | None]:
    """The (min, max) a clamp-like activation node enforces (its record's ``bounds``)."""
    return op_of(gm, node).bounds(gm, node)


def runs_clamp_kernel(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a clamp-like node, on int8 input, runs the quantized clamp kernel: ``relu6``, ``hardtanh`` and
    ``clamp`` (bounded above) do; ``relu`` has its own kernel and ``ChannelClamp`` clamps the integer codes."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ChannelClamp):
        return False
    return clamp_bounds(gm, node)[1] is not None


def describe_op(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} '{node.target}'"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} '{node.name}'"
