"""Deployment formats for lowered models: TorchScript, ONNX in QDQ form for ONNX Runtime, and torch.export.

``torchscript(qmodel, example_inputs)`` traces and freezes the lowered model (real fbgemm/qnnpack kernels).
``onnx(qmodel, example_inputs, path)`` writes the float QDQ view (:mod:`qpasses.export.qdq`, the reference graph
the lowered model keeps) with ``qpasses.lower.onnx``: QuantizeLinear / DequantizeLinear pairs with qpasses' own
scales and zero points, int8 weights per channel where they are, int32 biases.
``exported_program(model, example_inputs, path)`` writes that reference graph as a ``torch.export`` program
(``torch.export.save``), which loads with ``torch.export.load`` without qpasses.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qpasses.errors import ExportError
from qpasses.export.qdq import REDUCE_RANGE_MODES, ReduceRange, is_lowered, lowered_backend, qdq_model
from qpasses.graph.trace import as_input_tuple
from qpasses.lower.onnx import OPSET, export, is_reference_graph
from qpasses.quant import lowering

__all__ = ["REDUCE_RANGE_MODES", "ReduceRange", "exported_program", "is_lowered", "lowered_backend", "onnx",
           "qdq_model", "torchscript"]



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
    if not _same_outputs(expected, got):
        raise ExportError("the frozen TorchScript module differs from the eager model on the example inputs; "
                          "a value-dependent branch was traced: check the model for data-dependent control flow")
    return scripted


def _same_outputs(expected: Any, got: Any) -> bool:
    leaves = zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got), strict=True)
    return all(torch.equal(e, g) for e, g in leaves if isinstance(e, torch.Tensor))


def _qdq_decompositions(program: torch.export.ExportedProgram) -> dict:
    """The ``quantized_decomposed`` ops of ``program``, each mapped to torch's Python implementation of it
    (``quantize_per_tensor.tensor`` → ``quantize_per_tensor_tensor``), which traces into aten arithmetic."""
    import torch.ao.quantization.fx._decomposed as implementations

    table = {}
    for node in program.graph.nodes:
        op = node.target
        if node.op != "call_function" or not str(op).startswith("quantized_decomposed."):
            continue
        name = op._opname + ("" if op._overloadname == "default" else f"_{op._overloadname}")
        if not hasattr(implementations, name):
            raise ExportError(f"node '{node.name}' ({op}) has no aten decomposition; export with decompose=False")
        table[op] = getattr(implementations, name)
    return table


def exported_program(model: nn.Module, example_inputs: Any, path: str | Path | None = None,
                     decompose: bool = False) -> torch.export.ExportedProgram:
    """The reference quantized graph of ``model`` (a reference graph, qpasses' or torchao ``convert_pt2e``'s,
    or a model lowered by qpasses, which keeps its own) as a ``torch.export.ExportedProgram``, also saved with
    ``torch.export.save`` to ``path`` where given (a ``.pt2`` file). ``model`` is not modified.

    The program is the reference simulation: float ops between ``quantized_decomposed`` quantize/dequantize ops
    (``convert_pt2e``'s dialect, which ExecuTorch's and inductor's int8 lowerings read), int8 weight codes as
    buffers, shapes fixed to ``example_inputs``'. It is checked to give the reference graph's outputs on
    ``example_inputs`` bit for bit. It loads without qpasses: ``torch.export.load(path).module()``, once
    ``import torch.ao.quantization.fx._decomposed`` (part of torch) has registered those ops. With
    ``decompose=True`` each quantize/dequantize is written as the aten arithmetic it computes (mul, round,
    clamp, casts: the same values) and the program loads with torch alone, but a runtime can no longer read
    its grids from it."""
    reference = model if is_reference_graph(model) else qdq_model(model)
    inputs = as_input_tuple(example_inputs)
    try:
        program = torch.export.export(reference, inputs)
    except Exception as exc:
        raise ExportError(f"torch.export of the reference graph failed: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    if decompose:
        program = program.run_decompositions(_qdq_decompositions(program))
    with torch.no_grad():
        if not _same_outputs(reference(*inputs), program.module()(*inputs)):
            raise ExportError("the exported program differs from the reference graph on the example inputs; "
                              "check the model for data-dependent control flow")
    if path is not None:
        torch.export.save(program, str(path))
    return program


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
