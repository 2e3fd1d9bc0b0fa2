"""What the visualiser shows about one fx node: its kind, output, quantization state and qparams.

Everything here reads metadata that the passes write (see ``qpasses.viz`` for the conventions); nothing
runs the model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from qpasses.graph.nx import node_kind
from qpasses.quant.state import QPARAMS_KEY, QSTATE_KEY

QSTATES = ("float", "observed", "fake_quant", "int8", "int8_float_output")

_QUANTIZED_MODULE_PREFIXES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")


@dataclass
class NodeView:
    """One node as the renderer draws it."""

    name: str
    op: str
    kind: str
    target: str
    module_path: str
    output: str | None
    qstate: str
    qparams: str | None
    sqnr_db: float | None
    details: list[tuple[str, str]] = field(default_factory=list)


def _module_class_names(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    if node.op != "call_module":
        return []
    return [cls.__name__ for cls in type(gm.get_submodule(node.target)).__mro__]


def _tensor_metas(node: fx.Node) -> list[Any]:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return []
    if hasattr(meta, "shape"):
        return [meta]
    if isinstance(meta, list | tuple):
        return [m for m in meta if hasattr(m, "shape")]
    return []


def qstate_of(gm: fx.GraphModule, node: fx.Node) -> str:
    """The node's quantization state: ``node.meta['qstate']`` when set, else inferred from its module/output."""
    explicit = node.meta.get(QSTATE_KEY)
    if explicit is not None:
        if explicit not in QSTATES:
            raise ValueError(f"node {node.name!r}: meta['qstate'] is {explicit!r}, expected one of {QSTATES}")
        return explicit
    classes = _module_class_names(gm, node)
    if classes:
        if any(name.endswith("FakeQuantize") or name == "FakeQuantizeBase" for name in classes):
            return "fake_quant"
        if classes[0].endswith("Observer"):
            return "observed"
        if type(gm.get_submodule(node.target)).__module__.startswith(_QUANTIZED_MODULE_PREFIXES):
            return "int8"
    if any(getattr(m, "is_quantized", False) for m in _tensor_metas(node)):
        return "int8"
    return "float"


def _short_dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def format_output(node: fx.Node) -> str | None:
    """``1×64×56×56 float32`` for each tensor the node produces, or None when no shape is recorded."""
    metas = _tensor_metas(node)
    if not metas:
        return None
    return ", ".join(f"{'×'.join(str(d) for d in m.shape) or 'scalar'} {_short_dtype(m.dtype)}" for m in metas)


def _as_floats(value: Any) -> list[float]:
    if isinstance(value, torch.Tensor):
        return [float(v) for v in value.detach().flatten().tolist()]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [float(v) for v in value]
    return [float(value)]


def _num(value: float) -> str:
    if value == 0 or (math.isfinite(value) and value == int(value) and abs(value) < 1e6):
        return str(int(value))
    return f"{value:.3g}"


def _qparams_dict(node: fx.Node) -> dict[str, Any] | None:
    qparams = node.meta.get(QPARAMS_KEY)
    if qparams:
        return dict(qparams)
    for meta in _tensor_metas(node):
        if getattr(meta, "is_quantized", False) and meta.qparams:
            return dict(meta.qparams)
    return None


def format_qparams(qparams: dict[str, Any]) -> str:
    """One line: ``qint8 8b · scale 0.0123 · zp 0``; per-channel scales as count and min/median/max."""
    parts = []
    dtype = qparams.get("dtype")
    bits = qparams.get("bits")
    head = " ".join(text for text in (_short_dtype(dtype) if dtype is not None else "",
                                      f"{bits}b" if bits is not None else "") if text)
    if head:
        parts.append(head)
    scales = _as_floats(qparams["scale"]) if "scale" in qparams else []
    zero_points = _as_floats(qparams["zero_point"]) if "zero_point" in qparams else []
    per_channel = len(scales) > 1 or len(zero_points) > 1
    if per_channel:
        axis = qparams.get("axis")
        parts.append(f"{max(len(scales), len(zero_points))} ch" + (f" (axis {axis})" if axis is not None else ""))
    if len(scales) == 1:
        parts.append(f"scale {_num(scales[0])}")
    elif scales:
        parts.append(f"scale {_num(min(scales))} / {_num(statistics.median(scales))} / {_num(max(scales))}"
                     " (min/med/max)")
    if zero_points:
        low, high = min(zero_points), max(zero_points)
        parts.append(f"zp {_num(low)}" if low == high else f"zp {_num(low)}…{_num(high)}")
    return " · ".join(parts)


def module_path_of(node: fx.Node) -> str:
    """The qualified name of the submodule whose forward the node belongs to ("" for the top level).

    For a module call that is the callee's parent; for anything else, the innermost module that tracing
    recorded in ``nn_module_stack`` (nodes that passes create without one sit at the top level).
    """
    if node.op in ("call_module", "get_attr"):
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _cls = list(stack.values())[-1]
        return str(path)
    return ""


def _target_text(node: fx.Node) -> str:
    target = node.target
    if callable(target):
        module = getattr(target, "__module__", None)
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
        if name:
            return f"{module}.{name}" if module else name
    return str(target)


def describe(gm: fx.GraphModule, node: fx.Node) -> NodeView:
    """Everything the renderer shows about ``node`` of ``gm``."""
    qparams = _qparams_dict(node)
    sqnr = node.meta.get("sqnr_db")
    view = NodeView(
        name=node.name,
        op=node.op,
        kind=node_kind(gm, node),
        target=_target_text(node),
        module_path=module_path_of(node),
        output=format_output(node),
        qstate=qstate_of(gm, node),
        qparams=format_qparams(qparams) if qparams else None,
        sqnr_db=float(sqnr) if sqnr is not None else None,
    )
    view.details = [("op", view.op), ("target", view.target), ("module path", view.module_path or "(top level)"),
                    ("output", view.output or "—"), ("qstate", view.qstate)]
    if qparams:
        view.details.append(("qparams", view.qparams or ""))
        view.details.extend((f"qparams.{key}", _detail_value(value)) for key, value in qparams.items())
    if view.sqnr_db is not None:
        view.details.append(("SQNR", f"{view.sqnr_db:.2f} dB"))
    view.details.append(("args", str(fx.node.map_arg(node.args, lambda n: n.name))))
    if node.kwargs:
        view.details.append(("kwargs", str(fx.node.map_arg(node.kwargs, lambda n: n.name))))
    return view


def _detail_value(value: Any) -> str:
    """Full values for the details panel, cut so a 2048-channel scale vector does not flood the page."""
    if isinstance(value, torch.Tensor):
        value = value.detach().flatten().tolist()
    if isinstance(value, list | tuple) and value and all(isinstance(v, int | float) for v in value):
        text = "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= 400 else text[:400] + " …"
