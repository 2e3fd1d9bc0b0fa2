"""Capture any model into a ``torch.fx.GraphModule`` with shape metadata on every node.

The capture ladder: symbolic tracing with known leaf modules (and the canonical decompositions of
``qpasses.graph.canonical``) → on failure, a precise error naming the submodule and the user's line →
with ``auto_leaf=True``, retry with the failing submodule kept opaque, so the rest is still transformed.
"""

from __future__ import annotations

import linecache
import os
import traceback
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from qpasses.errors import TraceError
from qpasses.graph import canonical

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


def as_input_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


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


def _symbolic_trace(model: nn.Module, leaf_names: set[str], leaf_types: tuple[type, ...]) -> fx.GraphModule:
    tracer = _Tracer(leaf_names, leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise _trace_error(model, tracer.failed_module, exc) from exc
    # Under `from __future__ import annotations` a forward's annotations are strings, which fx copies as the
    # placeholders' and output's types; torch < 2.14 then cannot pickle the GraphModule (torch.save fails
    # with "'str' object has no attribute '__name__'"). They only annotate the generated code.
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    """Run ``gm`` once on ``example_inputs``, record ``tensor_meta`` on every node, return the output."""
    with torch.no_grad():
        return ShapeProp(gm).propagate(*example_inputs)


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
    """
    inputs = as_input_tuple(example_inputs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() needs an nn.Module, got {type(model).__name__}")
    leaf_names = {leaf for leaf in leaf_modules if isinstance(leaf, str)}
    leaf_types = tuple(leaf for leaf in leaf_modules if isinstance(leaf, type))
    unknown = [name for name in leaf_names if name not in dict(model.named_modules())]
    if unknown:
        raise TraceError(f"leaf_modules names no submodule of {type(model).__name__}: {sorted(unknown)}")

    opaque: list[str] = []
    while True:
        try:
            gm = _symbolic_trace(model, leaf_names, leaf_types)
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
    propagate_shapes(gm, inputs)
    return gm
