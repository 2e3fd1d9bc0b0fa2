"""Target ``openvino``: the reference quantized graph compiled by OpenVINO's CPU plugin.

OpenVINO reads the same QDQ ONNX model as the ``onnx`` target (``qpasses.lower.onnx.export``): its low-precision
transformations turn DequantizeLinear → conv/matmul → QuantizeLinear into int8 oneDNN primitives. ``deploy``
compiles it for the CPU (float ops in f32, not bf16) and reads the executed graph (``compiled.get_runtime_model()``): every Convolution,
Deconvolution, FullyConnected and MatMul layer must run at runtime precision u8 or i8, else an error names the
first that runs in float. ``Deployed.int8_kernels`` counts the int8 layers by type. ``out`` ending in ``.xml``
is written as OpenVINO IR (``.xml`` + ``.bin``, weights kept int8), any other name as the ONNX model. Compile
either with ``{"INFERENCE_PRECISION_HINT": "f32"}``: on CPUs with bf16, OpenVINO 2026.4 otherwise runs the ops
the reference keeps float in bf16 (a hint stored in the IR's rt_info is not honoured, measured).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpasses.errors import ExportError
from qpasses.lower import Deployed
from qpasses.lower.onnx import export

# Executed layer types of OpenVINO's CPU plugin that carry a model's multiply-adds.
OPENVINO_GEMM_LAYERS = frozenset({"Convolution", "Deconvolution", "FullyConnected", "MatMul"})
INT8_PRECISIONS = frozenset({"u8", "i8"})


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ExportError("the openvino target needs OpenVINO: pip install 'qpasses[openvino]'") from exc
    return openvino


def executed_layers(compiled: Any) -> list[tuple[str, str, str]]:
    """(layer type, runtime precision, name) of each layer OpenVINO's compiled model executes."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layers.append((info["layerType"].astype(str), info["runtimePrecision"].astype(str), op.get_friendly_name()))
    return layers


def _runner(compiled: Any) -> Any:
    def run(*inputs: Any) -> Any:
        results = compiled([torch.as_tensor(x).detach().cpu().numpy() for x in inputs])
        outputs = [torch.from_numpy(results[output].copy()) for output in compiled.outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run


def deploy(reference: nn.Module, example_inputs: Any, out: Path | None = None,
           threads: int | None = None) -> Deployed:
    """Export ``reference`` as QDQ ONNX, compile it with OpenVINO for the CPU, check that every conv and matmul
    runs in int8 (``ExportError`` naming the first that does not) and return the compiled model."""
    ov = _openvino()
    ir = out is not None and out.suffix == ".xml"
    model = export(reference, example_inputs, None if ir else out)
    core = ov.Core()
    network = core.read_model(model.SerializeToString(), b"")
    if ir:
        ov.save_model(network, str(out), compress_to_fp16=False)
    # f32, not the bf16 OpenVINO picks on CPUs that have it: the ops the reference runs in float stay exact
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(network, "CPU", config)
    layers = executed_layers(compiled)
    left_float = [(kind, precision, name) for kind, precision, name in layers
                  if kind in OPENVINO_GEMM_LAYERS and precision not in INT8_PRECISIONS]
    if left_float:
        kind, precision, name = left_float[0]
        raise ExportError(
            f"OpenVINO runs {kind} '{name}' in {precision} ({len(left_float)} such layer(s)): its int8 "
            "transformations need a DequantizeLinear of int8 codes on the input and on the weight; quantize "
            "that op's input, or keep it float with a QuantConfig override")
    int8 = Counter(kind for kind, precision, _ in layers
                   if kind in OPENVINO_GEMM_LAYERS and precision in INT8_PRECISIONS)
    return Deployed("openvino", _runner(compiled), out, dict(sorted(int8.items())))
