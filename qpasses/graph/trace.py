"""Capture any model into a ``torch.fx.GraphModule`` with shape metadata on every node.

The capture ladder: symbolic tracing with known leaf modules (and the canonical decompositions of
``qpasses.graph.canonical``) → on failure, a precise error naming the submodule and the user's line →
with ``auto_leaf=True``, retry with the failing submodule kept opaque, so the rest is still transformed.
"""

from __future__ import annotations

import inspect
import linecache
import os
import traceback
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from qpasses.errors import InputError, TraceError
from qpasses.graph import canonical
from qpasses.validation import as_input_tuple, check_model

__all__ = ["LeafSpec", "as_input_tuple", "propagate_shapes", "trace"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_QPASSES_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LeafSpec = str | type


class _Tracer(fx.Tracer):
    """A tracer that knows qpasses' leaves and remembers which submodule it was inside when it failed."""

    def __init__(self, leaf_names: set[str] | None = None, leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.leaf_names = leaf_names or set()
        self.leaf_types = leaf_types
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        if canonical.decomposition_for(m) is not None or type(m).__module__.startswith("qpasses."):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise


def _user_frame(exc: BaseException) -> tuple[str | None, str | None]:
    """The deepest frame of the traceback outside torch and qpasses: where the user's code failed."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = os.path.abspath(frame.filename)
        if path.startswith(_TORCH_DIR) or path.startswith(_QPASSES_DIR):
            continue
        found = frame
    if found is None:
        return None, None
    text = (found.line or linecache.getline(found.filename, found.lineno)).strip()
    return f"{found.filename}:{found.lineno}", text


def _trace_error(model: nn.Module, module: str | None, exc: BaseException) -> TraceError:
    source, text = _user_frame(exc)
    where = f" at {source}: `{text}`" if source else ""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if module:
        mod_type = type(model.get_submodule(module)).__name__
        message = (
            f"cannot trace submodule '{module}' ({mod_type}){where}\n"
            f"  torch.fx says: {reason}\n"
            f"  fix: keep it opaque with trace(..., leaf_modules=['{module}']) or leaf_modules=[{mod_type}],"
            f" or pass auto_leaf=True to do that automatically and transform the rest of the model"
        )
    else:
        message = (
            f"cannot trace the top-level forward of {type(model).__name__}{where}\n"
            f"  torch.fx says: {reason}\n"
            f"  fix: the data-dependent code is in the model's own forward, which cannot be kept opaque;"
            f" move it into a submodule (then mark that submodule a leaf) or make it independent of tensor values"
        )
    return TraceError(message, module=module, source=source)


def _defaults_to_capture(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """The forward's parameters the example inputs do not fill, at their defaults (captured as constants).

    ``forward(x, *, mask=None)`` traced with a proxy for ``mask`` takes the ``mask is not None`` branch and
    then fails without one; traced with ``mask=None`` it computes what the model computes when called with ``x``.
    """
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a C-implemented forward): trace as before
        return {}
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if n_inputs > len(positional) and not any(p.kind is p.VAR_POSITIONAL for p in parameters):
        raise InputError(f"{type(model).__name__}.forward takes {len(positional)} positional input(s) "
                         f"({', '.join(p.name for p in positional)}); example_inputs has {n_inputs}")
    rest = positional[n_inputs:] + [p for p in parameters if p.kind is p.KEYWORD_ONLY]
    missing = [p.name for p in rest if p.default is p.empty]
    if missing:
        raise InputError(f"{type(model).__name__}.forward needs {', '.join(map(repr, missing))} without a default, "
                         f"and example_inputs fill only the first {n_inputs} positional input(s): pass them in "
                         f"example_inputs, or wrap the model in a module that supplies them")
    return {p.name: p.default for p in rest}


def _drop_captured(gm: fx.GraphModule, n_inputs: int, n_captured: int) -> None:
    """Remove the placeholders of captured defaults (fx keeps them, in signature order after the inputs) and the
    value checks fx generates for them (their only users), so the graph's inputs are the example inputs alone
    (calibration counts placeholders to read batches)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][n_inputs:n_inputs + n_captured]
    doomed: dict[fx.Node, None] = {}
    stack = list(placeholders)
    while stack:
        node = stack.pop()
        if node not in doomed:
            doomed[node] = None
            stack.extend(node.users)
    for node in reversed(gm.graph.nodes):  # users before the values they read
        if node in doomed:
            gm.graph.erase_node(node)
    gm.recompile()


def _symbolic_trace(model: nn.Module, leaf_names: set[str], leaf_types: tuple[type, ...], n_inputs: int,
                    defaults: dict[str, Any]) -> fx.GraphModule:
    tracer = _Tracer(leaf_names, leaf_types)
    try:
        graph = tracer.trace(model, concrete_args=defaults or None)
    except Exception as exc:
        raise _trace_error(model, tracer.failed_module, exc) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if defaults:
        _drop_captured(gm, n_inputs, len(defaults))
    return gm


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def _describe_module(module: nn.Module, target: str) -> str:
    """``Conv2d 'enc1.0', weight (8, 3, 3, 3) float32``: what the failing layer expects, when it has a weight."""
    weight = getattr(module, "weight", None)
    held = f", weight {_describe(weight)}" if isinstance(weight, torch.Tensor) else ""
    return f"{type(module).__name__} '{target}'{held}"


class _ShapeRecorder(fx.Interpreter):
    """fx's ShapeProp without its printed traceback: a failing node becomes one line naming it."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # else fx appends the node's format and stack trace to the message

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            inputs = ", ".join(_describe(v) for v in self.example_inputs)
            module = f" ({_describe_module(self.module.get_submodule(n.target), n.target)})" \
                if n.op == "call_module" else ""
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"node '{n.name}'{module} fails on inputs [{inputs}]: {reason}") from exc
        has_tensor = False

        def tensor_meta(value: Any) -> Any:
            nonlocal has_tensor
            if isinstance(value, torch.Tensor):
                has_tensor = True
                return _extract_tensor_metadata(value)
            return value

        meta = map_aggregate(result, tensor_meta)
        if has_tensor:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.example_inputs = args
        return super().run(*args, **kwargs)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    """Run ``gm`` once on ``example_inputs``, record ``tensor_meta`` on every node, return the output.

    A node that fails raises :class:`InputError` naming it, its module and the inputs' shapes, on one line.
    """
    with torch.no_grad():
        return _ShapeRecorder(gm).run(*example_inputs)


def trace(
    model: nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable[LeafSpec] = (),
    auto_leaf: bool = False,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule with ``node.meta['tensor_meta']`` on every tensor-valued node.

    ``leaf_modules`` are kept opaque (called, not traced through): qualified names such as
    ``"blocks.3"`` or module classes. With ``auto_leaf=True`` a submodule that cannot be traced is made
    a leaf and tracing retried; the names left opaque are in ``gm.meta['opaque_modules']``.
    The model itself is not modified: the graph module shares its parameters.
    Forward parameters the example inputs do not fill (``forward(x, *, mask=None)``) are captured at their
    defaults, so the graph takes the example inputs alone. Bad input (not a float32 ``nn.Module``, inputs it
    cannot run on) is an :class:`InputError` naming the parameter or the failing node.
    """
    check_model(model, "trace()")
    inputs = as_input_tuple(example_inputs)
    defaults = _defaults_to_capture(model, len(inputs))
    leaf_names = {leaf for leaf in leaf_modules if isinstance(leaf, str)}
    leaf_types = tuple(leaf for leaf in leaf_modules if isinstance(leaf, type))
    unknown = [name for name in leaf_names if name not in dict(model.named_modules())]
    if unknown:
        raise TraceError(f"leaf_modules names no submodule of {type(model).__name__}: {sorted(unknown)}")

    opaque: list[str] = []
    while True:
        try:
            gm = _symbolic_trace(model, leaf_names, leaf_types, len(inputs), defaults)
            break
        except TraceError as err:
            if not auto_leaf or not err.module or err.module in leaf_names:
                raise
            leaf_names.add(err.module)
            opaque.append(err.module)
    if opaque:
        warnings.warn(
            f"auto_leaf: kept {len(opaque)} submodule(s) opaque, they stay float and untransformed: {opaque}",
            stacklevel=2,
        )
    canonical.decompose(gm)
    gm.meta["opaque_modules"] = opaque
    try:
        propagate_shapes(gm, inputs)
    except InputError as exc:
        raise InputError(f"{type(model).__name__} cannot run on the example inputs: {exc}") from exc
    return gm
