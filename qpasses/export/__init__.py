"""Deployment formats for lowered models: TorchScript, and ONNX in QDQ form for ONNX Runtime.

``torchscript(qmodel, example_inputs)`` traces and freezes the lowered model (real fbgemm/qnnpack kernels).
``onnx(qmodel, example_inputs, path)`` writes the float QDQ view (:mod:`qpasses.export.qdq`): QuantizeLinear /
DequantizeLinear pairs with qpasses' own scales and zero points, per channel where the weights are.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from qpasses.errors import ExportError
from qpasses.export.onnx_fold import fold_constant_quantizers
from qpasses.export.qdq import REDUCE_RANGE_MODES, Grid, ReduceRange, is_lowered, lowered_backend, qdq_model
from qpasses.graph.trace import as_input_tuple
from qpasses.quant import lowering

__all__ = ["REDUCE_RANGE_MODES", "Grid", "ReduceRange", "is_lowered", "lowered_backend", "onnx", "qdq_model",
           "torchscript"]

OPSET = 17


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
    """Write ``qmodel`` (lowered by qpasses) to ``path`` as an ONNX QDQ model; returns the path.

    ``reduce_range``: how 7-bit activation ranges (fbgemm's reduce_range) are written: ``"keep"`` exactly
    (QuantizeLinear → Clip(0, 127) → DequantizeLinear, same results as qpasses), ``"widen"`` as the same real
    interval on 256 codes (finer steps; ONNX Runtime's kernels have no 7-bit limit). x86's ``headroom`` grids
    (7-bit steps, codes up to 255, no clamp) are plain 8-bit QDQ either way. Weights are stored as their
    int8 codes. Input shapes are fixed to ``example_inputs``' (TF 'SAME' padding depends on them). Needs the
    ``export`` extra (onnx).
    """
    try:
        import onnx as onnx_lib
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx package: pip install 'qpasses[export]'") from exc
    if opset < 13:
        raise ExportError(f"per-channel QDQ needs ONNX opset >= 13, got opset={opset}")
    inputs = as_input_tuple(example_inputs)
    view = qdq_model(qmodel, inputs, reduce_range)
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
        torch.onnx.export(view, inputs, str(path), dynamo=False, opset_version=opset,
                          input_names=[f"input_{i}" for i in range(len(inputs))], do_constant_folding=True)
    model = onnx_lib.load(str(path))
    fold_constant_quantizers(model)
    onnx_lib.checker.check_model(model)
    onnx_lib.save(model, str(path))
    return path
