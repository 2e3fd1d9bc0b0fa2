"""Capture any model into a ``torch.fx.GraphModule`` with shape metadata on every node.

The capture ladder: symbolic tracing with known leaf modules (and the canonical decompositions of
``qpasses.graph.canonical``) → on failure, a precise error naming the submodule and the user's line →
with ``auto_leaf=True``, retry with the failing submodule kept opaque, so the rest is still transformed.
"""

from __future__ import annotations

import linecache
import os
import re
import traceback
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.overrides import TorchFunctionMode

from qpasses.analysis.metrics import sqnr
from qpasses.errors import GraphRunError, QPassesError, TraceError
from qpasses.graph import canonical
from qpasses.graph.modules import buffers_restored, eval_mode

_TORCH_DIR = os.path.dirname(torch.__file__)
_QPASSES_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LeafSpec = str | type
# A capture must reproduce the eager model as closely as the function-preserving passes must reproduce it
# (the PassManager's default threshold): float reassociation stays far above it, a lost operation far below.
CAPTURE_SQNR_DB = 60.0


class _Tracer(fx.Tracer):
    """A tracer that knows qpasses' leaves and remembers which submodule it was inside when it failed."""

    def __init__(self, leaf_names: set[str] | None = None, leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.record_stack_traces = True  # a capture that differs from the eager model names the user's line
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
    found = _user_frame_of(traceback.extract_tb(exc.__traceback__))
    if found is None:
        return None, None
    filename, lineno, text = found
    return f"{filename}:{lineno}", text


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
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


class _ShapeRecorder(fx.Interpreter):
    """torch.fx's ShapeProp, except that a node that fails raises ``GraphRunError`` naming the node and the
    kernel's own message: ShapeProp prints a traceback and formats the node's metadata, which fails on
    quantized dtypes (``KeyError: torch.quint8``) and hides the real error. fx's own error decoration
    (``extra_traceback``) prints the whole graph module, which fails the same way, so it is off."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except QPassesError:
            raise
        except Exception as exc:
            reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            target = n.target if isinstance(n.target, str) else (
                getattr(n.target, "_qualified_op_name", None) or getattr(n.target, "__name__", str(n.target)))
            raise GraphRunError(f"running node '{n.name}' ({n.op} {target}) failed: {reason}", node=n.name) from exc
        found_tensor = False

        def tensor_meta(value: Any) -> Any:
            nonlocal found_tensor
            if isinstance(value, torch.Tensor):
                found_tensor = True
                return _extract_tensor_metadata(value)
            return value

        meta = map_aggregate(result, tensor_meta)
        if found_tensor:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    """Run ``gm`` once on ``example_inputs``, record ``tensor_meta`` on every node, return the output.
    Raises ``GraphRunError`` naming the node that failed."""
    with torch.no_grad():
        return _ShapeRecorder(gm).run(*example_inputs)


def trace(
    model: nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable[LeafSpec] = (),
    auto_leaf: bool = False,
    verify: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule with ``node.meta['tensor_meta']`` on every tensor-valued node.

    ``leaf_modules`` are kept opaque (called, not traced through): qualified names such as
    ``"blocks.3"`` or module classes. With ``auto_leaf=True`` a submodule that cannot be traced is made
    a leaf and tracing retried; the names left opaque are in ``gm.meta['opaque_modules']``.
    ``verify``: compare the graph with the eager model on ``example_inputs`` (see ``verify_capture``);
    a capture that computes something else raises ``TraceError``.
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
    with buffers_restored(model), buffers_restored(gm):  # a model in training mode keeps its BN statistics
        propagate_shapes(gm, inputs)
    if verify:
        verify_capture(model, gm, inputs)
    return gm


# Augmented assignments: torch.fx records ``a += b`` as ``a = a + b`` (its proxies have no in-place operators),
# which differs from the eager model when ``a`` aliases another live tensor.
_AUGMENTED_ASSIGNMENT = re.compile(r"(?<![=!<>+\-*/%&|^@])(\+|-|\*\*|\*|//|/|%|&|\||\^|@|<<|>>)=(?!=)")


def verify_capture(model: nn.Module, gm: fx.GraphModule, example_inputs: Any,
                   threshold_db: float = CAPTURE_SQNR_DB) -> Any:
    """Check that ``gm`` computes what the eager ``model`` computes on ``example_inputs``; return the eager
    output.

    Both run once, in eval mode (deterministic: no dropout sampling, no BN statistics updates), on their own
    copies of the inputs, and leave every buffer as it was. An output SQNR below ``threshold_db`` raises
    ``TraceError`` naming the graph node and the user's line where the capture departs from the model (an
    in-place ``+=`` on an aliased value, which fx records out of place), and how to fix it.
    """
    inputs = as_input_tuple(example_inputs)
    with eval_mode(model), eval_mode(gm), buffers_restored(model), buffers_restored(gm), torch.no_grad():
        expected = model(*_copies(inputs))
        got = gm(*_copies(inputs))
        quality = sqnr(expected, got)
        if quality >= threshold_db:
            return expected
        recorder = _InPlaceSites()
        with recorder:
            model(*_copies(inputs))
    raise TraceError(_divergence_message(model, gm, quality, threshold_db, recorder.sites))


def _copies(inputs: tuple) -> tuple:
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


class _InPlaceSites(TorchFunctionMode):
    """Records where the eager model runs an augmented assignment (``a += b``) on a tensor."""

    def __init__(self):
        super().__init__()
        self.sites: list[tuple[str, int, str, str]] = []  # (file, line, code, op: "add" for ``+=``)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):  # in-place: ``a += b`` runs ``add_``
            frame = _user_frame_of(traceback.extract_stack())
            code = frame[2].split("#")[0].strip() if frame is not None else ""
            site = (*frame[:2], code, name[:-1]) if frame is not None else None
            if site is not None and _AUGMENTED_ASSIGNMENT.search(code) and site not in self.sites:
                self.sites.append(site)
        return func(*args, **(kwargs or {}))


def _user_frame_of(frames: Iterable[traceback.FrameSummary]) -> tuple[str, int, str] | None:
    """The deepest frame outside torch and qpasses: (file, line, code)."""
    found = None
    for frame in frames:
        path = os.path.abspath(frame.filename)
        if not (path.startswith(_TORCH_DIR) or path.startswith(_QPASSES_DIR)):
            found = frame
    if found is None:
        return None
    text = (found.line or linecache.getline(found.filename, found.lineno)).strip()
    return found.filename, found.lineno, text


_STACK_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


def _node_at(gm: fx.GraphModule, file: str, line: int, op: str) -> fx.Node | None:
    """The graph node traced from ``file:line`` (its recorded stack's user frame), preferring one that calls
    ``op``."""
    found = []
    for node in gm.graph.nodes:
        frames = [(m["file"], int(m["line"])) for m in _STACK_FRAME.finditer(node.meta.get("stack_trace") or "")]
        user = [f for f in frames if not os.path.abspath(f[0]).startswith((_TORCH_DIR, _QPASSES_DIR))]
        if user and user[-1] == (file, line):
            found.append(node)
    calls_op = [n for n in found if getattr(n.target, "__name__", n.target) == op]
    return (calls_op or found or [None])[0]


def _divergence_message(model: nn.Module, gm: fx.GraphModule, quality: float, threshold_db: float,
                        sites: list[tuple[str, int, str]]) -> str:
    what = (f"the traced graph of {type(model).__name__} differs from the eager model on the example inputs "
            f"(SQNR {quality:.1f} dB < {threshold_db:.0f} dB)")
    if not sites:
        return (f"{what}; its forward depends on something torch.fx does not record (in-place updates of "
                f"aliased tensors, Python state); mark the submodule that does it as a leaf (leaf_modules=[...])")
    file, line, code, op = sites[0]
    node = _node_at(gm, file, line, op)
    at = f" (node '{node.name}')" if node is not None else ""
    enclosing = list((node.meta.get("nn_module_stack") or {}).values()) if node is not None else []
    leaf = f", or mark module '{enclosing[-1][0]}' as a leaf (leaf_modules=['{enclosing[-1][0]}'])" if enclosing else ""
    return (f"{what}: torch.fx records the in-place `{code}` at {file}:{line}{at} out of place, which changes "
            f"the result when its target aliases another tensor (e.g. the input an eval-mode Dropout/Identity "
            f"returns, or a slice); replace it with an out-of-place operation (`a = a + b`){leaf}")
