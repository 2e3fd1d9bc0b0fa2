"""Canonical decompositions applied right after tracing.

Some library modules fuse several ops or compute shapes at run time (timm's ``BatchNormAct2d`` holds
BN + drop + activation; ``Conv2dSame`` pads from the input size, which symbolic tracing cannot follow).
They are traced as leaves, then replaced by a chain of plain modules that the passes understand:
``BatchNormAct2d`` → ``BatchNorm2d`` → act, ``Conv2dSame`` → ``SamePad2d`` → ``Conv2d``.
At stride 1 'SAME' padding does not depend on the input size; where it is also symmetric, ``Conv2dSame``
becomes a plain ``Conv2d`` with that padding, because int8 kernels care: fbgemm's fast depthwise path
needs symmetric padding (a 5×5 depthwise conv with padding 0 ran about 300× slower).
Parameters and buffers are shared, not copied, and keep their ``state_dict`` keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx
from torch import nn

from qpasses.graph.modules import set_module, unique_name
from qpasses.nn import SamePad2d

# A decomposition maps a module to the chain that replaces it, in execution order:
# (suffix, module); suffix "" takes the original name (and so its state_dict keys).
Decomposition = Callable[[nn.Module], list[tuple[str, nn.Module]]]

_REGISTRY: dict[str, Decomposition] = {}


def register_decomposition(class_name: str, fn: Decomposition) -> None:
    """Register ``fn`` for modules whose class is named ``class_name`` (``'pkg.module.Class'`` or ``'Class'``)."""
    _REGISTRY[class_name] = fn


def decomposition_for(module: nn.Module) -> Decomposition | None:
    cls = type(module)
    return _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}") or (
        _REGISTRY.get(cls.__qualname__) if cls.__module__.startswith("timm.") else None
    )


def _batchnorm_act(m: nn.Module) -> list[tuple[str, nn.Module]]:
    bn = nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)
    if m.affine:
        bn.weight, bn.bias = m.weight, m.bias
    if m.track_running_stats:
        bn.running_mean, bn.running_var = m.running_mean, m.running_var
        bn.num_batches_tracked = m.num_batches_tracked
    bn.train(m.training)
    pieces: list[tuple[str, nn.Module]] = [("", bn)]
    for suffix in ("drop", "act"):
        sub = getattr(m, suffix, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            pieces.append((suffix, sub))
    return pieces


def _conv2d_same(m: nn.Conv2d) -> list[tuple[str, nn.Module]]:
    # 'SAME' pads (k - 1) * d in total at stride 1, split low = total // 2, high = the rest
    totals = [(k - 1) * d for k, d in zip(m.kernel_size, m.dilation, strict=True)]
    static = all(s == 1 for s in m.stride) and all(t % 2 == 0 for t in totals)
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                     tuple(t // 2 for t in totals) if static else 0, m.dilation, m.groups,
                     bias=m.bias is not None, padding_mode=m.padding_mode)
    conv.weight = m.weight
    if m.bias is not None:
        conv.bias = m.bias
    conv.train(m.training)
    if static:
        return [("", conv)]
    return [("pad", SamePad2d(m.kernel_size, m.stride, m.dilation)), ("", conv)]


def _maxpool2d_same(m: nn.MaxPool2d) -> list[tuple[str, nn.Module]]:
    pool = nn.MaxPool2d(m.kernel_size, m.stride, 0, m.dilation, ceil_mode=m.ceil_mode)
    return [("pad", SamePad2d(m.kernel_size, m.stride, m.dilation, value=float("-inf"))), ("", pool)]


register_decomposition("BatchNormAct2d", _batchnorm_act)
register_decomposition("Conv2dSame", _conv2d_same)
register_decomposition("MaxPool2dSame", _maxpool2d_same)


def decompose(gm: fx.GraphModule) -> int:
    """Replace every decomposable ``call_module`` node by its chain; returns how many were replaced."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        fn = decomposition_for(gm.get_submodule(node.target))
        if fn is None:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        pieces = fn(gm.get_submodule(node.target))
        value = node.args[0]
        with gm.graph.inserting_before(node):
            for suffix, module in pieces:
                name = node.target if not suffix else unique_name(gm, f"{node.target}_{suffix}")
                set_module(gm, name, module)
                value = gm.graph.call_module(name, (value,))
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
