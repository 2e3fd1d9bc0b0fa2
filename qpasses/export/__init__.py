"""Deployment formats for lowered models: TorchScript, and ONNX in QDQ form for ONNX Runtime.

``torchscript(qmodel, example_inputs)`` traces and freezes the lowered model (real fbgemm/qnnpack kernels).
``onnx(qmodel, example_inputs, path)`` writes the float QDQ view (:mod:`qpasses.export.qdq`, the reference graph
the lowered model keeps) with ``qpasses.lower.onnx``: QuantizeLinear / DequantizeLinear pairs with qpasses' own
scales and zero points, int8 weights per channel where they are, int32 biases.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from qpasses.errors import ExportError
from qpasses.export.qdq import REDUCE_RANGE_MODES, ReduceRange, is_lowered, lowered_backend, qdq_model
from qpasses.graph.trace import as_input_tuple
from qpasses.lower.onnx import OPSET, export
from qpasses.quant import lowering

__all__ = ["REDUCE_RANGE_MODES", "ReduceRange", "is_lowered", "lowered_backend", "onnx", "qdq_model",
           "torchscript"]



def torchscript(qmodel: fx.GraphModule, example_inputs: Any) -> torch.jit.ScriptModule:
    """``qmodel`` traced on ``example_inputs`` and frozen (weights inlined, packed for its backend's engine).

    The result is checked to give the eager model's outputs on ``example_inputs``; it can be saved with
    ``torch.jit.save`` and loaded without qpasses. Frozen graphs keep the shapes' control flow of the trace:
    models whose padding depends on the input size (TF 'SAME') are specialized to that size. Unlike the eager
    model, the frozen module cannot select its quantized engine itself: run it with
    ``torch.backends.quantized.engine`` set to the backend's engine (``"x86"`` or ``"qnnpack"``).
    """
    if not is_lowered(qmodel):
        raise ExportError("torchscript needs a model lowered by qpasses (PassManager([..., PTQ(...)]).run); "
                          f"got a {type(qmodel).__name__} without int8 kernels")
    inputs = as_input_tuple(example_inputs)
    with lowering.quantized_engine(lowered_backend(qmodel).engine), torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            scripted = torch.jit.freeze(torch.jit.trace(qmodel, inputs).eval())
        expected, got = qmodel(*inputs), scripted(*inputs)
    for e, g in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got), strict=True):
        if isinstance(e, torch.Tensor) and not torch.equal(e, g):
            raise ExportError("the frozen TorchScript module differs from the eager model on the example inputs; "
                              "a value-dependent branch was traced: check the model for data-dependent control flow")
    return scripted


def onnx(qmodel: fx.GraphModule, example_inputs: Any, path: str | Path, reduce_range: ReduceRange = "keep",
         opset: int = OPSET) -> Path:
    """Write ``qmodel`` (lowered by qpasses, or a reference graph) to ``path`` as an ONNX QDQ model; returns the
    path.

    ``reduce_range``: how 7-bit activation ranges (fbgemm's reduce_range) are written: ``"keep"`` exactly
    (QuantizeLinear → Clip(0, 127) → DequantizeLinear, same results as qpasses), ``"widen"`` as the same real
    interval on 256 codes (finer steps; ONNX Runtime's kernels have no 7-bit limit on AVX-512 VNNI CPUs). x86's
    ``headroom`` grids (7-bit steps, codes up to 255, no clamp) are plain 8-bit QDQ either way. Weights are
    stored as their int8 codes, biases as int32 codes. Input shapes are fixed to ``example_inputs``' (TF 'SAME'
    padding depends on them). Needs the ``onnx`` extra. ``qpasses.lower.deploy(..., "onnx")`` also checks
    that ONNX Runtime runs every conv and matmul in int8.
    """
    path = Path(path)
    export(qdq_model(qmodel, example_inputs, reduce_range), example_inputs, path, opset)
    return path
