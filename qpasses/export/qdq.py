"""The float QDQ view of a quantized model: its reference quantized graph, what ONNX calls quantize-dequantize format.

A lowered model keeps the reference graph of its own grid decisions (``QuantState.reference``, written by
``Lower``): float ops between ``quantized_decomposed`` quantize/dequantize ops carrying the scale, zero point
and code range of every int8 value, weights as int8 codes with their per-channel or per-tensor scales. It
runs in torch as the simulation of the int8 codes, and ``qpasses.lower.onnx`` writes it op for op as
QuantizeLinear/DequantizeLinear pairs, which ONNX Runtime, OpenVINO and TensorRT fuse into int8 kernels.

Narrow code ranges (sub-8-bit, reduce_range's ``[0, 127]``) stay exact: a Clip of the codes between
QuantizeLinear and DequantizeLinear (``reduce_range="keep"``). ``reduce_range="widen"`` instead spreads each
128-code range over the 256 codes of its container, the same real interval at half the step:
``s' = 127 s / 255``, ``z' = round(z · 255 / 127)``. The 7-bit limit comes from fbgemm's saturating
``vpmaddubsw``; runtimes whose kernels do not need it (ONNX Runtime on AVX-512 VNNI) gain the finer steps.
x86's ``headroom`` grids (7-bit steps, codes running on to 255, no clamp) are 8-bit grids either way.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from qpasses.errors import ExportError
from qpasses.passes.reference import DEQUANTIZE, QUANTIZE, is_reference
from qpasses.quant.backends import Backend, get_backend
from qpasses.quant.state import existing_state

ReduceRange = Literal["keep", "widen"]
REDUCE_RANGE_MODES = ("keep", "widen")


def lowered_backend(model: nn.Module) -> Backend | None:
    """The backend ``Lower`` lowered ``model`` for (``QuantState.backend``), None for any other model."""
    state = existing_state(model)
    return get_backend(state.backend) if state is not None and state.backend is not None else None


def is_lowered(model: nn.Module) -> bool:
    return lowered_backend(model) is not None


def widened(scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype) -> tuple[float, int, int, int]:
    """The same real interval as the 128-code grid ``[qmin, qmax]`` over the full 8-bit container of ``dtype``:
    (scale, zero point, qmin, qmax)."""
    info = torch.iinfo(dtype)
    zero_point = info.min + round((zero_point - qmin) * 255 / 127)
    return scale * 127 / 255, min(max(zero_point, info.min), info.max), info.min, info.max


def _widen(reference: fx.GraphModule) -> None:
    """Give every quantize/dequantize of a 128-code activation grid the widened grid (``widened``), in place."""
    for node in reference.graph.nodes:
        if node.op == "call_function" and node.target in (QUANTIZE, DEQUANTIZE):
            source, scale, zero_point, qmin, qmax, dtype = node.args
            if qmax - qmin == 127 and dtype in (torch.uint8, torch.int8):
                node.args = (source, *widened(scale, zero_point, qmin, qmax, dtype), dtype)
    reference.recompile()


def qdq_model(model: nn.Module, example_inputs: Any = None, reduce_range: ReduceRange = "keep") -> fx.GraphModule:
    """The float QDQ view of ``model`` (see the module docstring): a copy of the reference graph a lowered
    model keeps (or of ``model`` itself, a reference graph), its 7-bit grids widened where asked; ``model``
    is not modified. ``example_inputs`` is not needed (the grids are stored, not measured) and is accepted so
    that calls written for earlier versions, which ran the model on it, keep working."""
    if reduce_range not in REDUCE_RANGE_MODES:
        raise ExportError(f"reduce_range must be one of {REDUCE_RANGE_MODES}, got {reduce_range!r}")
    if is_reference(model):
        reference = model
    else:
        state = existing_state(model)
        if state is None or state.backend is None:
            raise ExportError("the QDQ view needs a model lowered by qpasses (the result of "
                              f"PassManager([..., PTQ(...)]).run) or its reference graph; got a "
                              f"{type(model).__name__} without int8 kernels")
        if state.reference is None:
            raise ExportError("this lowered model keeps no reference quantized graph (it was lowered by an "
                              "earlier qpasses); quantize it again to export it")
        reference = state.reference
    view = copy.deepcopy(reference)
    if reduce_range == "widen":
        _widen(view)
    return view.eval()
