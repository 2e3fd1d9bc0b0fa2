"""ReplaceFunctional: tensor arithmetic → ``FloatFunctional`` modules, so every op has a module to quantize."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from qpasses.graph.match import any_of, is_function, is_method, is_module
from qpasses.graph.modules import unique_name
from qpasses.passes.base import Pass, PassContext, PassResult, Stage

_ADD = any_of(is_function(operator.add, operator.iadd, torch.add), is_method("add", "add_"))
_MUL = any_of(is_function(operator.mul, operator.imul, torch.mul), is_method("mul", "mul_"))
_CAT = is_function(torch.cat, torch.concat, torch.concatenate)
_RELU = any_of(is_module(nn.ReLU), is_function(F.relu, torch.relu, torch.relu_), is_method("relu", "relu_"))
_IN_PLACE = {operator.iadd, operator.imul, "add_", "mul_"}


def _is_float_tensor(value) -> bool:
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _is_scalar(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _owner_path(node: fx.Node) -> str:
    """The qualified name of the innermost module whose forward created ``node`` ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


class ReplaceFunctional(Pass):
    """Rewrite ``+``/``torch.add``/in-place add, ``*``/``torch.mul``, ``torch.cat`` and add → ReLU into
    ``torch.ao.nn.quantized.FloatFunctional`` calls (``add``, ``add_scalar``, ``mul``, ``mul_scalar``,
    ``cat``, and the fused ``add_relu``).

    Math: none; each FloatFunctional method computes exactly the op it replaces, so outputs are
    bit-identical. The graph then has a module per arithmetic op, which observer insertion can give
    its own output range and eager-mode quantization can convert.
    Requires: float tensor operands (arithmetic on sizes and ints is left alone). An in-place op is
    rewritten only when no later node reads the tensor it mutates; ``torch.add`` with ``alpha`` is left alone.
    Preserves: the function, bit for bit.
    """

    stage = Stage.FLOAT
    provides = frozenset({"functional_modules"})
    preserves_function = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        modified = False
        orphaned: set[str] = set()
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph:  # erased as the ReLU of a fused add_relu
                continue
            rewrite = self._plan_rewrite(gm, node, order, ctx)
            if rewrite is None:
                continue
            method, args, kwargs, replaced = rewrite
            owner = _owner_path(node)
            base = f"{owner}.{node.name}_ff" if owner else f"{node.name}_ff"
            qualname = unique_name(gm, base.replace("-", "_"))
            gm.add_submodule(qualname, FloatFunctional())
            with gm.graph.inserting_before(node):
                module = gm.graph.get_attr(qualname)
                new = gm.graph.call_method(method, (module, *args), kwargs)
            new.meta = dict(replaced.meta)
            if replaced.op == "call_module":
                orphaned.add(replaced.target)
            replaced.replace_all_uses_with(new)
            for old in (replaced, node) if replaced is not node else (node,):
                gm.graph.erase_node(old)
            ctx.stats[method] += 1
            modified = True
        still_called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for target in orphaned - still_called:
            gm.delete_submodule(target)
        if modified:
            gm.recompile()
        return PassResult(gm, modified=modified)

    def _plan_rewrite(self, gm: fx.GraphModule, node: fx.Node, order: dict, ctx: PassContext):
        """(method, args, kwargs, node whose value it replaces) or None."""
        if _CAT(gm, node):
            tensors = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(tensors, list | tuple) or not all(_is_float_tensor(t) for t in tensors):
                return None
            return "cat", (list(tensors),), {"dim": dim}, node
        is_add, is_mul = _ADD(gm, node), _MUL(gm, node)
        if not (is_add or is_mul) or len(node.args) != 2 or (set(node.kwargs) - {"other", "input"}):
            if is_add or is_mul:
                ctx.note(f"left '{node.name}' alone: arguments {list(node.kwargs)} have no FloatFunctional form")
            return None
        left, right = node.args
        if not _is_float_tensor(left):
            left, right = right, left
        if not _is_float_tensor(left) or not (_is_float_tensor(right) or _is_scalar(right)):
            return None
        if node.target in _IN_PLACE and self._mutation_read_later(node, order):
            ctx.note(f"left in-place '{node.name}' alone: a later node reads the tensor it mutates")
            return None
        scalar = _is_scalar(right)
        if is_mul:
            return ("mul_scalar" if scalar else "mul"), (left, right), {}, node
        if not scalar and len(node.users) == 1:
            (user,) = node.users
            if _RELU(gm, user) and user.args[0] is node and len(user.all_input_nodes) == 1:
                return "add_relu", (left, right), {}, user
        return ("add_scalar" if scalar else "add"), (left, right), {}, node

    @staticmethod
    def _mutation_read_later(node: fx.Node, order: dict) -> bool:
        mutated = node.args[0]
        return isinstance(mutated, fx.Node) and any(
            order[user] > order[node] for user in mutated.users if user is not node
        )
