"""Target ``onnx``: the reference quantized graph as a QDQ ONNX model, run by ONNX Runtime's int8 kernels.

``export`` writes the graph op for op: each ``quantized_decomposed`` quantize/dequantize becomes
QuantizeLinear/DequantizeLinear with the same scale and zero point, the int8 weight codes the reference
dequantizes become int8 initializers read by a DequantizeLinear (per channel along the weight's axis), and
every float op is written by ``torch.onnx``. That is the form ONNX Runtime's QDQ optimizer rewrites into int8
nodes (QLinearConv, QGemm, QLinearMatMul, QLinearAdd, ...): DequantizeLinear → op → QuantizeLinear, weights as
int8 initializers, biases as int32 initializers on the grid ``s_in·s_w`` (its Gemm → QGemm fusion takes no
float bias; ``quantize_static`` writes them so too). Measured on ResNet-18 and MobileNetV2 (ONNX Runtime
1.32): every conv fuses into QLinearConv and every add into QLinearAdd; the classifier runs as QGemm only with
the int32 bias (a float Gemm on a per-call DequantizeLinear of its weight otherwise).

TF 'SAME' padding (``SamePad2d``, whose pads depend on the input's shape) is written as a constant Pad at the
example's shape and folded into the following Conv's ``pads`` (``fold_pads_into_convs``): ONNX Runtime fuses
no Pad into QLinearConv, and left in, it runs in float between two QDQ pairs (pretrained Lite0: 5 of them).

Code ranges narrower than the 8-bit container (sub-8-bit, 7-bit ``reduce_range``) are kept exactly: a Clip of
the codes between QuantizeLinear and DequantizeLinear, which ONNX Runtime runs on the uint8 codes between its
int8 nodes (it still fuses them). Presets for this target avoid them where the kernels do not need them.

``deploy`` writes the model (in memory where ``out`` is None), opens an ONNX Runtime CPU session on it and
reads the graph ONNX Runtime optimized from it: ``Deployed.int8_kernels`` counts its int8 nodes, and a conv,
transposed conv, Gemm or MatMul that ONNX Runtime left float is an error naming it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qpasses.errors import ExportError
from qpasses.graph.trace import as_input_tuple, propagate_shapes
from qpasses.lower import Deployed
from qpasses.nn import SamePad2d
from qpasses.quant.grids import Grid

OPSET = 17

# Node types of ONNX Runtime's optimized graph that run int8 arithmetic.
ORT_INT8_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearConvTranspose",
    "QLinearReduceMean", "QLinearWhere",
})
# Float node types of the heavy ops: one left in the optimized graph ran its arithmetic in float.
ORT_FLOAT_GEMMS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
                             "NchwcConv"})

_ONNX_DTYPE = {torch.uint8: 2, torch.int8: 3}  # TensorProto.UINT8, INT8


def is_reference_graph(model: nn.Module) -> bool:
    """Whether ``model`` is a graph in the reference dialect (``quantized_decomposed`` quantize/dequantize ops):
    qpasses' ``Reference`` or torchao's ``convert_pt2e``."""
    return isinstance(model, fx.GraphModule) and any(
        n.op == "call_function" and str(n.target).startswith("quantized_decomposed.") for n in model.graph.nodes)


def _check_reference(model: nn.Module) -> None:
    if not is_reference_graph(model):
        raise ExportError(f"the onnx target needs a reference quantized graph (PTQ(data, backend='onnx', "
                          f"lower=False), or torchao's convert_pt2e); got a {type(model).__name__} without "
                          "quantized_decomposed quantize/dequantize ops")


# -- torch.onnx symbolics of the quantized_decomposed ops (registered only while ``export`` runs)


def _const(value: Any, kind: str) -> Any:
    from torch.onnx import symbolic_helper

    return symbolic_helper._get_const(value, kind, "quantized_decomposed argument")


def _scalar(g: Any, value: Any, dtype: torch.dtype) -> Any:
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _code_dtype(dtype: Any) -> torch.dtype:
    from torch.onnx._internal.torchscript_exporter import _type_utils

    code_dtype = _type_utils.JitScalarType(_const(dtype, "i")).dtype()
    if code_dtype not in _ONNX_DTYPE:
        raise ExportError(f"QDQ ONNX takes uint8 and int8 codes only; the reference graph quantizes to {code_dtype}")
    return code_dtype


def _quantize(g: Any, x: Any, scale: Any, zero_point: Any, qmin: Any, qmax: Any, dtype: Any) -> Any:
    code_dtype = _code_dtype(dtype)
    grid = Grid(_const(scale, "f"), _const(zero_point, "i"), _const(qmin, "i"), _const(qmax, "i"), code_dtype)
    codes = g.op("QuantizeLinear", x, _scalar(g, grid.scale, torch.float32), _scalar(g, grid.zero_point, code_dtype))
    if not grid.narrowed:
        return codes
    return g.op("Clip", codes, _scalar(g, grid.qmin, code_dtype), _scalar(g, grid.qmax, code_dtype))


def _dequantize(g: Any, codes: Any, scale: Any, zero_point: Any, qmin: Any, qmax: Any, dtype: Any,
                *out_dtype: Any) -> Any:
    code_dtype = _code_dtype(dtype)
    return g.op("DequantizeLinear", codes, _scalar(g, _const(scale, "f"), torch.float32),
                _scalar(g, _const(zero_point, "i"), code_dtype))


def _dequantize_per_channel(g: Any, codes: Any, scales: Any, zero_points: Any, axis: Any, qmin: Any, qmax: Any,
                            dtype: Any, *out_dtype: Any) -> Any:
    code_dtype = _code_dtype(dtype)
    return g.op("DequantizeLinear", codes, g.op("Cast", scales, to_i=1),
                g.op("Cast", zero_points, to_i=_ONNX_DTYPE[code_dtype]), axis_i=_const(axis, "i"))


_SYMBOLICS = {"quantize_per_tensor": _quantize, "dequantize_per_tensor": _dequantize,
              "dequantize_per_channel": _dequantize_per_channel}


@contextlib.contextmanager
def _qdq_symbolics(opset: int) -> Iterator[None]:
    """torch.onnx's symbolics for the reference dialect, registered for the duration of one export."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    for name, symbolic in _SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(f"quantized_decomposed::{name}", symbolic, opset)
    try:
        yield
    finally:
        for name in _SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(f"quantized_decomposed::{name}", opset)


# -- the model


def export(reference: nn.Module, example_inputs: Any, path: str | Path | None = None, opset: int = OPSET) -> Any:
    """``reference`` (a reference quantized graph, not modified) as a QDQ ``onnx.ModelProto`` (see the module
    docstring), also written to ``path`` where given. Input shapes are fixed to ``example_inputs``' (TF 'SAME'
    padding depends on them). Needs the ``onnx`` extra."""
    try:
        import onnx
    except ImportError as exc:
        raise ExportError("the onnx target needs the onnx package: pip install 'qpasses[onnx]'") from exc
    _check_reference(reference)
    if opset < 13:
        raise ExportError(f"per-channel QDQ needs ONNX opset >= 13, got opset={opset}")
    inputs = as_input_tuple(example_inputs)
    # A plain GraphModule over a copy of the graph and the same tensors: convert_pt2e's graphs refuse the
    # train(False) that torch.onnx.export calls.
    plain = fx.GraphModule(reference, copy.deepcopy(reference.graph), class_name=type(reference).__name__)
    constant_same_pads(plain, inputs)
    buffer = io.BytesIO()
    with _qdq_symbolics(opset), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
        torch.onnx.export(plain, inputs, buffer, dynamo=False, opset_version=opset,
                          input_names=[f"input_{i}" for i in range(len(inputs))], do_constant_folding=True)
    model = onnx.load_model_from_string(buffer.getvalue())
    fold_pads_into_convs(model)
    quantize_biases(model)
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, str(path))
    return model


def constant_same_pads(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> int:
    """Replace every ``SamePad2d`` call of ``gm`` by ``F.pad`` with the constant pads it applies at ``inputs``'
    shapes, in place; returns how many.

    ``SamePad2d`` (TF 'SAME' padding) computes its pads from the input's shape, which torch.onnx writes as a
    subgraph (Shape, Gather, Div, ..., Concat, Slice, Transpose, Cast) feeding the Pad. The exported model is
    fixed to ``inputs``' shapes anyway; constant pads let ``fold_pads_into_convs`` fold them into the convs."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), SamePad2d)]
    if not calls:
        return 0
    propagate_shapes(gm, inputs)
    for node in calls:
        module, source = gm.get_submodule(node.target), node.args[0]
        (top, bottom), (left, right) = module.pads(torch.empty(source.meta["tensor_meta"].shape, device="meta"))
        with gm.graph.inserting_before(node):
            padded = gm.graph.call_function(F.pad, (source, [left, right, top, bottom]), {"value": module.value})
        node.replace_all_uses_with(padded)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return len(calls)


def _constant_reader(graph: Any) -> Callable[[str], Any]:
    """``value(name)``: the array of ``name`` in ``graph`` (an ``onnx.GraphProto``) where it is constant (an
    initializer, a Constant node, or computed from constants only, evaluated by onnx's reference evaluator when
    asked for: torch.onnx's constant folding leaves some, such as a Pad's amounts), None where it is not."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    values: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    constant = set(values)
    for node in graph.node:  # in topological order, as ONNX requires
        if all(not name or name in constant for name in node.input):
            constant.update(node.output)

    def value(name: str) -> Any:
        if name not in constant:
            return None
        if name not in values:
            node = producer[name]
            if node.op_type == "Constant" and node.attribute[0].name == "value":
                values[name] = numpy_helper.to_array(node.attribute[0].t)
            else:
                feeds = {i: value(i) for i in node.input if i}
                values.update(zip(node.output, ReferenceEvaluator(node).run(None, feeds), strict=True))
        return values[name]

    return value


def fold_pads_into_convs(model: Any) -> int:
    """Fold every zero constant Pad that only feeds Convs into their ``pads`` (ONNX Conv pads each side on its
    own, so TF 'SAME''s uneven pads fit), in place; returns how many Pads were folded.

    In a QDQ graph a reference graph's Pad is requantized before its Conv: Pad → QuantizeLinear →
    DequantizeLinear → Conv. Zero padding commutes with that pair (zero is the code of the zero point, which
    dequantizes to zero), so the QuantizeLinear moves before the Pad and the Pad into the Conv. Where the Pad
    reads a DequantizeLinear on the grid it is requantized to, that pair returns its input unchanged and the
    Conv reads the first DequantizeLinear directly. Either way ONNX Runtime fuses DequantizeLinear → Conv →
    QuantizeLinear into one QLinearConv; left in, the Pad runs in float between two QDQ pairs (measured on
    pretrained Lite0: 5 float Pads, each with its own QuantizeLinear and DequantizeLinear). A Pad read by
    anything else, or by a QuantizeLinear whose codes are clipped to a narrower range, stays."""
    from onnx import helper

    graph = model.graph
    constant = _constant_reader(graph)
    producer = {out: n for n in graph.node for out in n.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def readers_of(name: str) -> list[Any] | None:
        return None if name in outputs else readers.get(name, [])

    def grid(node: Any) -> tuple | None:
        """(scale, zero point) of a per-tensor QuantizeLinear/DequantizeLinear with constant ones."""
        if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            return None
        scale, zero_point = constant(node.input[1]), constant(node.input[2])
        if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
            return None
        return scale.item(), zero_point.dtype, zero_point.item()

    def is_conv_input(node: Any, name: str) -> bool:
        return node.op_type == "Conv" and node.input[0] == name and list(node.input).count(name) == 1 and not any(
            a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in node.attribute)

    def plan(pad: Any) -> tuple[list[Any], list[Any], list[Any]] | None:
        """(Convs reading the Pad, QuantizeLinears to move before it, Convs to read its input instead of a
        DequantizeLinear on its input's grid), None where the Pad cannot be folded."""
        convs, moved, bypassed = [], [], []
        for reader in readers_of(pad.output[0]) or [None]:
            if reader is not None and is_conv_input(reader, pad.output[0]):
                convs.append(reader)
                continue
            if reader is None or reader.op_type != "QuantizeLinear" or reader.input[0] != pad.output[0]:
                return None
            dequantizes = readers_of(reader.output[0])
            if not dequantizes or any(d.op_type != "DequantizeLinear" or grid(d) != grid(reader) for d in dequantizes):
                return None  # a Clip of the codes: the pad's zero point may lie outside its range
            after = [(d, readers_of(d.output[0])) for d in dequantizes]
            if any(not convs_ or not all(is_conv_input(c, d.output[0]) for c in convs_) for d, convs_ in after):
                return None
            if grid(reader) is not None and grid(reader) == grid(producer.get(pad.input[0])):
                bypassed += [c for _, convs_ in after for c in convs_]
            else:
                moved.append(reader)
                convs += [c for _, convs_ in after for c in convs_]
        return convs, moved, bypassed

    folded = 0
    for pad in list(graph.node):
        if pad.op_type != "Pad" or len(pad.input) > 3 or any(
                a.name == "mode" and a.s not in (b"", b"constant") for a in pad.attribute):
            continue
        amounts = constant(pad.input[1])
        value = constant(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0
        if amounts is None or value is None or (amounts < 0).any() or (value != 0).any():
            continue
        rank = amounts.size // 2
        if rank < 3 or amounts[:2].any() or amounts[rank:rank + 2].any():
            continue  # it pads the batch or channel dimension
        found = plan(pad)
        if found is None:
            continue
        convs, moved, bypassed = found
        spatial = [int(p) for p in (*amounts[2:rank], *amounts[rank + 2:])]
        for conv in convs + bypassed:
            attribute = next((a for a in conv.attribute if a.name == "pads"), None)
            before = list(attribute.ints) if attribute is not None else [0] * len(spatial)
            if attribute is not None:
                conv.attribute.remove(attribute)
            conv.attribute.append(helper.make_attribute("pads", [a + b for a, b in zip(before, spatial, strict=True)]))
        for node in [*moved, *(c for c in convs if c.input[0] == pad.output[0]), *bypassed]:
            node.input[0] = pad.input[0]
        folded += 1
    if folded:
        _prune(graph)
    return folded


def _prune(graph: Any) -> None:
    """Remove the nodes and initializers of ``graph`` nothing reads any more."""
    while True:
        read = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(out in read for out in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for n in graph.node for name in n.input}
    for tensor in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(tensor)


def quantize_biases(model: Any) -> int:
    """Store the float bias of every Conv/ConvTranspose/Gemm whose input and weight are dequantized as int32
    codes on the grid ``s_in·s_w`` (per output channel), read by a DequantizeLinear, as ONNX Runtime's QDQ
    fusions expect (``quantize_static`` writes them so). ``model`` (an ``onnx.ModelProto``) is edited in place;
    returns how many biases were quantized. The rounding moves a bias by at most half an accumulator step
    (``s_in·s_w / 2``), far below the output's step."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    readers = Counter(name for n in graph.node for name in n.input)
    constant = _constant_reader(graph)

    def dequantize_scale(name: str) -> np.ndarray | None:
        node = producer.get(name)
        return None if node is None or node.op_type != "DequantizeLinear" else constant(node.input[1])

    count = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        bias_name = node.input[2]
        bias, input_scale, weight_scale = constant(bias_name), *map(dequantize_scale, node.input[:2])
        if bias is None or input_scale is None or weight_scale is None or input_scale.size != 1:
            continue
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i == 0 for a in node.attribute):
            continue  # its weight's channels are its columns
        step = (input_scale.astype(np.float64) * weight_scale.astype(np.float64)).reshape(-1)
        if node.op_type == "ConvTranspose" and step.size > 1:
            continue  # a per-channel transposed conv weight is split along axis 1; keep its float bias
        step = np.broadcast_to(step, bias.shape)
        codes = np.clip(np.rint(bias / step), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        name = f"{bias_name}_int32_{count}"
        graph.initializer.extend([
            numpy_helper.from_array(codes, name),
            numpy_helper.from_array(step.astype(np.float32), f"{name}_scale"),
            numpy_helper.from_array(np.zeros(step.shape, np.int32), f"{name}_zero_point"),
        ])
        dequantize = helper.make_node("DequantizeLinear", [name, f"{name}_scale", f"{name}_zero_point"],
                                      [f"{name}_dequantized"], name=f"{name}_DequantizeLinear", axis=0)
        graph.node.insert(list(graph.node).index(node), dequantize)
        node.input[2] = dequantize.output[0]
        readers[bias_name] -= 1
        if readers[bias_name] == 0 and bias_name in values:
            graph.initializer.remove(values.pop(bias_name))
        count += 1
    return count


# -- ONNX Runtime


def _session(model_bytes: bytes, optimized_path: Path | None = None, threads: int | None = None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("the onnx target runs on ONNX Runtime: pip install 'qpasses[onnx]'") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the optimizer's notes on hardware-specific dumps are noise here
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def optimized_node_types(model_bytes: bytes) -> tuple[Counter[str], list[tuple[str, str]]]:
    """The node types of the graph ONNX Runtime optimizes ``model_bytes`` into (CPU provider, all
    optimizations), and the (type, name) of each conv/Gemm/MatMul in it that runs in float."""
    import onnx

    with tempfile.TemporaryDirectory() as workdir:
        optimized = Path(workdir) / "optimized.onnx"
        _session(model_bytes, optimized)
        graph = onnx.load(str(optimized)).graph
    census = Counter(n.op_type for n in graph.node)
    left_float = [(n.op_type, n.name) for n in graph.node if n.op_type in ORT_FLOAT_GEMMS]
    return census, left_float


def _runner(session: Any) -> Any:
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: Any) -> Any:
        feed = {name: torch.as_tensor(x).detach().cpu().numpy() for name, x in zip(names, inputs, strict=True)}
        outputs = [torch.from_numpy(o) for o in session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run


def deploy(reference: nn.Module, example_inputs: Any, out: Path | None = None,
           threads: int | None = None) -> Deployed:
    """Export ``reference`` (to ``out`` where given, else in memory), check that ONNX Runtime runs every conv
    and matmul in int8 (``ExportError`` naming the first it left float) and return the running session."""
    model = export(reference, example_inputs, out)
    model_bytes = model.SerializeToString()
    census, left_float = optimized_node_types(model_bytes)
    if left_float:
        op_type, name = left_float[0]
        raise ExportError(
            f"ONNX Runtime runs {op_type} '{name}' in float ({len(left_float)} such node(s)): its QDQ fusion "
            "needs DequantizeLinear on the input and the int8 weight and QuantizeLinear on the output; quantize "
            "that op's output, or keep it float with a QuantConfig override")
    int8_kernels = {op: n for op, n in sorted(census.items()) if op in ORT_INT8_KERNELS}
    return Deployed("onnx", _runner(_session(model_bytes, threads=threads)), out, int8_kernels)
