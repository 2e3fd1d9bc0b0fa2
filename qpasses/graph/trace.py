"""Capture any model into a ``torch.fx.GraphModule`` with shape metadata on every node.

The capture ladder, each rung checked against the eager model:
1. symbolic tracing with known leaf modules (and the canonical decompositions of ``qpasses.graph.canonical``);
2. ``torch.export`` (non-strict training IR) normalised into the same canonical form
   (``qpasses.graph.export_capture``), where symbolic tracing fails (a Parameter used directly, shape
   arithmetic) or keeps a ``torch.nn`` composite whole (``nn.MultiheadAttention``, ``nn.TransformerEncoder``);
3. with ``auto_leaf=True``, symbolic tracing again with each failing submodule kept opaque.
Where all fail, a precise error names the submodule, the user's line and the fix. Which rung captured the
graph, and what stayed opaque, is ``state_of(gm).capture`` (a ``CaptureInfo``).

Symbolic tracing comes first because its graph is shape-generic (timm's 'SAME' padding is computed at run
time; export specialises it to the example input's size) and records the user's own modules; export is the
rung that captures what it cannot.
"""

from __future__ import annotations

import inspect
import linecache
import os
import re
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.overrides import TorchFunctionMode

from qpasses.analysis.metrics import sqnr
from qpasses.errors import GraphRunError, InputError, QPassesError, TraceError
from qpasses.graph import canonical
from qpasses.graph.export_capture import export_graph
from qpasses.graph.modules import buffers_restored, eval_mode
from qpasses.quant.state import state_of
from qpasses.validation import as_input_tuple, check_model

__all__ = ["CaptureInfo", "LeafSpec", "as_input_tuple", "propagate_shapes", "trace", "verify_capture"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_QPASSES_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LeafSpec = str | type
# A capture must reproduce the eager model as closely as the function-preserving passes must reproduce it
# (the PassManager's default threshold): float reassociation stays far above it, a lost operation far below.
CAPTURE_SQNR_DB = 60.0
SYMBOLIC_TRACE, EXPORT, AUTO_LEAF = "symbolic_trace", "export", "auto_leaf"


@dataclass
class CaptureInfo:
    """How a graph was captured, in ``state_of(gm).capture`` (:mod:`qpasses.quant.state`).

    ``method``: the rung that captured it (``'symbolic_trace'``, ``'export'`` or ``'auto_leaf'``).
    ``opaque_modules``: submodules called whole, untransformed (auto_leaf's, and ``torch.nn`` composites such
    as ``MultiheadAttention`` that symbolic tracing keeps whole when export could not capture them).
    ``aten_ops``: with export, ATen ops with no canonical form, left as they are (they run float), by count.
    ``tried``: the rungs tried before, each with why it was not used.
    ``fixed_shapes``: with export, the graph holds every size of the example inputs (the model fixed the
    batch size too); otherwise only their sizes past the first are fixed (export specialises them), and
    symbolic tracing fixes none.
    """

    method: str
    opaque_modules: list[str] = field(default_factory=list)
    aten_ops: dict[str, int] = field(default_factory=dict)
    tried: list[str] = field(default_factory=list)
    fixed_shapes: bool = False

    def __str__(self) -> str:
        lines = [f"capture: {self.method}" + (f" (after {'; '.join(self.tried)})" if self.tried else "")]
        if self.method == EXPORT:
            lines.append("export fixed the example inputs' sizes" + ("" if self.fixed_shapes else
                         " past the batch dimension") + "; inputs of other sizes need a new capture")
        if self.opaque_modules:
            lines.append(f"left opaque (untraced, float): {', '.join(self.opaque_modules)}")
        if self.aten_ops:
            lines.append("ATen ops kept as they are (float): "
                         + ", ".join(f"{name} ×{count}" for name, count in self.aten_ops.items()))
        return "\n".join(lines)


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
        return super().is_leaf_module(m, module_qualified_name) or _runs_torch_nn_forward(m)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise


def _runs_torch_nn_forward(m: nn.Module) -> bool:
    """A layer without submodules whose class keeps a ``torch.nn`` forward (torchvision's ``Conv3DSimple``
    is an ``nn.Conv3d`` that only changes ``__init__``): a leaf like the ``torch.nn`` class, not traced into a
    functional call the passes cannot fold or quantize."""
    forward = type(m).forward
    return not any(True for _ in m.children()) and any(
        cls.__dict__.get("forward") is forward for cls in type(m).__mro__ if cls.__module__.startswith("torch.nn."))


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
    # Under `from __future__ import annotations` a forward's annotations are strings, which fx copies as the
    # placeholders' and output's types; torch < 2.14 then cannot pickle the GraphModule (torch.save fails
    # with "'str' object has no attribute '__name__'"). They only annotate the generated code.
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None
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
    """fx's ShapeProp, except that a node that fails raises one ``GraphRunError`` line naming the node, its
    module and the inputs' shapes, with the kernel's own message. ShapeProp prints a traceback and formats the
    node's metadata, which fails on quantized dtypes (``KeyError: torch.quint8``) and hides the real error."""

    def __init__(self, gm: fx.GraphModule, outputs: dict[str, torch.Tensor] | None = None):
        super().__init__(gm)
        self.extra_traceback = False  # else fx appends the node's format and the whole graph to the message
        self.outputs = outputs

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except QPassesError:
            raise
        except Exception as exc:
            inputs = ", ".join(_describe(v) for v in self.example_inputs)
            if n.op == "call_module":
                what = _describe_module(self.module.get_submodule(n.target), n.target)
            else:
                what = n.target if isinstance(n.target, str) else (
                    getattr(n.target, "_qualified_op_name", None) or getattr(n.target, "__name__", str(n.target)))
            reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise GraphRunError(f"node '{n.name}' ({what}) fails on inputs [{inputs}]: {reason}",
                                node=n.name) from exc
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
        if self.outputs is not None and isinstance(result, torch.Tensor) and result.is_floating_point():
            self.outputs[n.name] = result
        n.meta["type"] = type(result)
        return result

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.example_inputs = args
        return super().run(*args, **kwargs)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any],
                     outputs: dict[str, torch.Tensor] | None = None) -> Any:
    """Run ``gm`` once on ``example_inputs``, record ``tensor_meta`` on every node, return the output.

    With ``outputs`` (a dict), each node's floating-point tensor output is also kept there under the node's name.
    A node that fails raises :class:`GraphRunError` naming it, its module and the inputs' shapes, on one line.
    """
    with torch.no_grad():
        return _ShapeRecorder(gm, outputs).run(*example_inputs)


def trace(
    model: nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable[LeafSpec] = (),
    auto_leaf: bool = False,
    verify: bool = True,
) -> fx.GraphModule:
    """Capture ``model`` into a GraphModule with ``node.meta['tensor_meta']`` on every tensor-valued node.

    The capture ladder (see the module docstring): symbolic tracing, then ``torch.export`` normalised into the
    same canonical form where symbolic tracing fails or keeps a ``torch.nn`` composite (``MultiheadAttention``)
    whole, then ``auto_leaf``. ``state_of(gm).capture`` is a :class:`CaptureInfo` saying which rung captured it
    and what stayed opaque.
    ``leaf_modules`` are kept opaque (called, not traced through): qualified names such as
    ``"blocks.3"`` or module classes; export cannot keep a module opaque, so naming leaves skips that rung.
    With ``auto_leaf=True`` a submodule that cannot be traced is made a leaf and tracing retried.
    ``verify``: compare the graph with the eager model on ``example_inputs`` (see ``verify_capture``); a
    symbolic trace that computes something else (an in-place ``+=`` on an aliased value) goes on to export,
    and where export fails too raises ``TraceError``. An export capture is accepted only if it passes that
    check, whatever ``verify`` says (it is a choice between rungs).
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
    may_export = not leaf_names and not leaf_types

    try:
        gm = _symbolic_trace(model, leaf_names, leaf_types, len(inputs), defaults)
    except TraceError as err:
        failure = err
        gm = None
    if gm is not None:
        canonical.decompose(gm)
        info = CaptureInfo(SYMBOLIC_TRACE)
        composites = _torch_nn_composites(gm)
        functional = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in _FUNCTIONAL_LAYERS]
        shortfalls = ([f"symbolic_trace kept {_some(composites)} whole"] if composites else []) + (
            [f"symbolic_trace left {_some(functional)} functional (float)"] if functional else [])
        if shortfalls and may_export:
            exported, why = _export_rung(model, inputs)
            if exported is not None:
                state_of(exported).capture.tried += shortfalls
                return _finish(model, exported, inputs, verify=False)
            info.tried.append(why)
        info.opaque_modules = composites
        state_of(gm).capture = info
        try:
            return _finish(model, gm, inputs, verify)
        except TraceError as err:  # the graph computes something else (fx records ``a += b`` out of place)
            if not may_export:
                raise
            exported, why = _export_rung(model, inputs)
            if exported is None:
                raise TraceError(f"{err}; {why}", module=err.module, source=err.source) from err
            state_of(exported).capture.tried.append(str(err).split("; ")[0].replace("the traced graph", "symbolic_trace's graph", 1))
            return _finish(model, exported, inputs, verify=False)

    tried = [f"symbolic_trace failed: {str(failure).splitlines()[0]}"]
    if may_export:
        exported, why = _export_rung(model, inputs)
        if exported is not None:
            state_of(exported).capture.tried += tried
            return _finish(model, exported, inputs, verify=False)
        tried.append(why)
    if not auto_leaf or not failure.module or failure.module in leaf_names:
        if may_export:
            raise TraceError(f"{failure}\n  {why}", module=failure.module, source=failure.source) from failure
        raise failure
    opaque: list[str] = []
    while True:
        try:
            gm = _symbolic_trace(model, leaf_names, leaf_types, len(inputs), defaults)
            break
        except TraceError as err:
            if not err.module or err.module in leaf_names:
                raise
            leaf_names.add(err.module)
            opaque.append(err.module)
    warnings.warn(
        f"auto_leaf: kept {len(opaque)} submodule(s) opaque, they stay float and untransformed: {opaque}",
        stacklevel=2,
    )
    canonical.decompose(gm)
    state_of(gm).capture = CaptureInfo(AUTO_LEAF, opaque_modules=opaque, tried=tried)
    return _finish(model, gm, inputs, verify)


# Weighted layers called as functions (``F.conv2d(x, self.weight)``): the op table quantizes modules only, and
# export's normaliser builds a module around a Parameter weight.
_FUNCTIONAL_LAYERS = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
                      torch.nn.functional.linear)


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names) if len(names) <= shown else f"{', '.join(names[:shown])}, … ({len(names)} in all)"


def _torch_nn_composites(gm: fx.GraphModule) -> list[str]:
    """``torch.nn`` modules with submodules that the graph calls whole (fx never traces into ``torch.nn``):
    ``MultiheadAttention``, ``TransformerEncoderLayer``; their linears would stay float."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if type(module).__module__.startswith("torch.nn.") and any(True for _ in module.children()):
                found.append(node.target)
    return found


def _export_rung(model: nn.Module, inputs: tuple) -> tuple[fx.GraphModule | None, str]:
    """The export capture, verified against the eager model, or None and why it was not used."""
    try:
        exported = export_graph(model, inputs)
        gm = exported.graph_module
        with buffers_restored(model), buffers_restored(gm):
            propagate_shapes(gm, inputs)
        verify_capture(model, gm, inputs)
    except Exception as exc:  # any failure of export or of its graph: the next rung decides
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return None, f"torch.export failed: {type(exc).__name__}: {reason}"
    state_of(gm).capture = CaptureInfo(EXPORT, aten_ops=exported.aten_ops, fixed_shapes=not exported.batch_generic)
    return gm, ""


def _finish(model: nn.Module, gm: fx.GraphModule, inputs: tuple, verify: bool) -> fx.GraphModule:
    try:
        with buffers_restored(model), buffers_restored(gm):  # a model in training mode keeps its BN statistics
            propagate_shapes(gm, inputs)
    except GraphRunError as exc:
        raise InputError(f"{type(model).__name__} cannot run on the example inputs: {exc}") from exc
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
