"""Which ops have int8 kernels, and how each treats quantization parameters.

Every node gets a role; observer insertion and lowering both read this one table, so the decision
"what runs int8" is made in one place.
"""

from __future__ import annotations

import enum
import operator
from typing import TypeVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from qpasses.nn import ChannelClamp, SamePad2d

T = TypeVar("T")


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


COMPUTE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d)
REQUANT_MODULES = (nn.Hardswish, nn.LeakyReLU, nn.ELU)
# The functional form of each: lowering builds the module from the call's own arguments.
REQUANT_FUNCTION_MODULES: dict[object, type[nn.Module]] = {
    F.hardswish: nn.Hardswish, F.leaky_relu: nn.LeakyReLU, F.elu: nn.ELU,
}
REQUANT_FUNCTIONS = tuple(REQUANT_FUNCTION_MODULES)
FIXED_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh)
FIXED_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.tanh, F.tanh)
FIXED_METHODS = ("sigmoid", "tanh")
PRESERVING_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.Flatten, nn.Dropout, nn.Identity, nn.Upsample, SamePad2d,
)
PRESERVING_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, F.dropout,
    F.interpolate, torch.mean, torch.chunk, torch.split, operator.getitem,
)
PRESERVING_METHODS = (
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "mean",
    "chunk", "split", "expand", "expand_as", "repeat",
)
# Clamp-like activations: folded into the producer's output range when they alone read it, otherwise
# they keep their input's qparams (the quantized kernels clamp in place).
# A ChannelClamp with unequal bounds is folded for its range and still clamps the codes per channel.
FUSABLE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, ChannelClamp)
FUSABLE_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.hardtanh, torch.clamp)
FUSABLE_METHODS = ("relu", "clamp")
FUNCTIONAL_METHODS = ("add", "add_relu", "mul", "cat")
DERIVED_METHODS = ("add_scalar", "mul_scalar")
# The float ops each FloatFunctional method computes, in order: the first takes the method's arguments, each
# later one the previous result (the reference graph's form of the method).
FLOAT_FUNCTIONAL_OPS: dict[str, tuple[object, ...]] = {
    "add": (torch.add,), "add_relu": (torch.add, torch.relu), "mul": (torch.mul,), "cat": (torch.cat,),
    "add_scalar": (torch.add,), "mul_scalar": (torch.mul,),
}


def entry_for(module: nn.Module, table: dict[type, T]) -> T | None:
    """``table``'s entry for ``module``'s class, or for the class it subclasses without changing ``forward``
    (torchvision's ``Conv3DSimple`` is an ``nn.Conv3d`` with its own ``__init__``): it computes what that
    class computes. A subclass with its own forward has no entry."""
    for base in type(module).__mro__:
        if base in table:
            return table[base] if type(module).forward is base.forward else None
    return None


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
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, COMPUTE_MODULES):
            return Role.COMPUTE
        if isinstance(module, REQUANT_MODULES):
            return Role.REQUANT
        if isinstance(module, FIXED_MODULES):
            return Role.FIXED
        if isinstance(module, PRESERVING_MODULES):
            return Role.PRESERVING
        if isinstance(module, FUSABLE_MODULES):
            return Role.FUSED_ACT
        return Role.FLOAT
    if node.op == "call_method" and functional_module(gm, node) is not None:
        if node.target in FUNCTIONAL_METHODS:
            return Role.FUNCTIONAL
        return Role.DERIVED if node.target in DERIVED_METHODS else Role.FLOAT
    if node.op == "call_function":
        if node.target in REQUANT_FUNCTIONS:
            return Role.REQUANT
        if node.target in FIXED_FUNCTIONS:
            return Role.FIXED
        if node.target in PRESERVING_FUNCTIONS:
            return Role.PRESERVING
        if node.target in FUSABLE_FUNCTIONS:
            return Role.FUSED_ACT
    if node.op == "call_method":
        if node.target in FIXED_METHODS:
            return Role.FIXED
        if node.target in PRESERVING_METHODS:
            return Role.PRESERVING
        if node.target in FUSABLE_METHODS:
            return Role.FUSED_ACT
    return Role.FLOAT


def returns_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An ``nn.Identity`` or ``nn.Dropout`` call: quantized graphs only run inference, where both return their
    input."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity | nn.Dropout)


def clamp_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float | None, float | None]:
    """The (min, max) a clamp-like activation node enforces."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.ReLU):
            return 0.0, None
        if isinstance(module, ChannelClamp):
            return float(module.lower.min()), float(module.upper.max())
        return float(module.min_val), float(module.max_val)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("relu", "relu_"):
        return 0.0, None
    if name == "relu6":
        return 0.0, 6.0
    if name == "hardtanh":
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return float(lo), float(hi)
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    return lo, hi


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
