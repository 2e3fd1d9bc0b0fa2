"""The ``xnnpack`` target: an ExecuTorch program (``.pte``) whose quantized ops run in XNNPACK's int8 kernels.

``deploy`` exports the reference graph (``torch.export``), lowers it with ExecuTorch's
``to_edge_transform_and_lower`` and the ``XnnpackPartitioner`` (XNNPACK fuses each dequantize → op → quantize
of the reference graph into one int8 node; ``partitioner()`` also gives it constant pads in int8, TF 'SAME'
padding), serializes the program and loads it in ExecuTorch's Python runtime.

It then checks that the int8 kernels really run, reading what XNNPACK will execute rather than trusting the
partitioner: every quantized op of the reference graph (one reading a ``dequantize``) must sit inside an
XNNPACK delegate, and inside it, the XNNPACK node built from it (matched by debug handle) must compute on
``qint8`` values. The XNNPACK graph is read from the delegate's serialized flatbuffer, decoded with
ExecuTorch's own schema and ``flatc``. Anything else, a quantized op left to ExecuTorch's portable float
kernels or run by XNNPACK in fp32 on dequantized values, is an ``ExportError`` naming the reference graph's node.
"""

from __future__ import annotations

import json
import operator
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from qpasses.errors import ExportError, InputError
from qpasses.lower import Deployed
from qpasses.validation import as_input_tuple

BACKEND_ID = "XnnpackBackend"
# XNNPACK datatypes of quantized activations (per tensor); qcint8/qcint4 are per-channel weights
QUANTIZED_DATATYPES = frozenset({"xnn_datatype_qint8", "xnn_datatype_quint8"})
# XNNPACK nodes that convert between float and int8 at a partition's edges: not kernels of the model's ops
_CONVERT = "XNNConvert"
_NO_VALUE = 2**32 - 1  # the schema's "no input" id (unused inputs of XNNConcatenate)


def deploy(reference: nn.Module, example_inputs: Any, out: Path | None = None) -> Deployed:
    """Lower ``reference`` (a reference quantized graph: float ops between ``quantized_decomposed`` Q/DQ ops)
    to an ExecuTorch program with the XNNPACK delegate, written to ``out`` (None: kept in memory), and load it
    in ExecuTorch's runtime.

    The program is specialised to the shapes of ``example_inputs``. ``Deployed.int8_kernels`` counts the
    XNNPACK nodes that compute on int8 values, by XNNPACK node type (``Conv2d``, ``FullyConnected``, ``Add``,
    ``Concatenate2``, ...). Raises ``ExportError`` naming the first quantized op that would run in float."""
    try:
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime
    except ImportError as exc:
        raise ExportError(f"xnnpack: ExecuTorch is not installed ({exc}); pip install 'qpasses[executorch]'") from None

    if not isinstance(reference, nn.Module):
        raise InputError(f"xnnpack: expected a reference graph (an nn.Module), got {type(reference).__name__}")
    inputs = as_input_tuple(example_inputs)
    try:
        exported = torch.export.export(reference, inputs)
    except Exception as exc:
        raise ExportError(f"xnnpack: torch.export of the reference graph failed: {_first_line(exc)}") from exc
    origin = reference.graph if isinstance(reference, fx.GraphModule) else None
    unlifted = exported.module()
    check_symmetric_weights(unlifted, origin)
    check_cat_grids(unlifted, origin)
    lowered = to_edge_transform_and_lower(exported, partitioner=[partitioner()])
    int8_kernels = check_int8_delegation(lowered.exported_program().graph_module, origin)
    buffer = lowered.to_executorch().buffer
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(buffer)
    run = _Runner(Runtime.get().load_program(out if out is not None else buffer), buffer)
    return Deployed(target="xnnpack", run=run, artifact=out, int8_kernels=int8_kernels)


def partitioner() -> Any:
    """ExecuTorch's ``XnnpackPartitioner``, except that it also takes a constant pad between dequantize and
    quantize ops as XNNPACK's int8 pad.

    ExecuTorch's ``ConstantPadConfig`` (1.5) offers the pad at fp32 only, so the dequantize → pad → quantize of
    a TF 'SAME' padding (Lite0: the pads before its stride-2 depthwise convs) runs as a float pad between two
    conversions, and qpasses refuses it. XNNPACK's static constant pad takes int8 values (it writes the pad
    value's code), and ExecuTorch's serializer reads the pad's grids from the Q/DQ ops around it, as for every
    other int8 op. It copies codes, so it takes only a pad whose quantize is on its dequantize's grid (what
    qpasses' reference graphs write); XNNPACK refuses any other when the program loads (measured on Lite0
    through ExecuTorch's XNNPACKQuantizer: ``Failed to create StaticConstantPad node``), so such a pad stays at
    fp32, where ``check_int8_delegation`` names it."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import ConstantPadConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class Int8ConstantPadConfig(ConstantPadConfig):
        def supported_precision_types(self) -> list[ConfigPrecisionType]:
            return [ConfigPrecisionType.FP32, ConfigPrecisionType.STATIC_QUANT]

        def get_node_and_deps(self, node: fx.Node, ep: Any) -> list[fx.Node]:
            source, users = node.args[0], list(node.users)
            if not (len(users) == 1 and _is_dequantize(source) and _op_name(users[0]).startswith(
                    "quantized_decomposed.quantize_per_tensor") and source.args[1:6] == users[0].args[1:6]):
                return [node]  # at fp32
            return super().get_node_and_deps(node, ep)

    return XnnpackPartitioner(configs=[Int8ConstantPadConfig if c is ConstantPadConfig else c
                                       for c in ALL_PARTITIONER_CONFIGS])


class _Runner:
    """Calls the program's ``forward`` in ExecuTorch's runtime. It holds the program (and the bytes it was
    loaded from) as well as the method: the method runs in the program's memory, and once the program is freed
    ExecuTorch reads freed memory (measured: a segfault)."""

    def __init__(self, program: Any, buffer: bytes):
        self.program, self.buffer = program, buffer
        try:
            self.method = program.load_method("forward")
        except RuntimeError as exc:  # XNNPACK builds its operators here, and refuses parameters it cannot run
            raise ExportError(f"xnnpack: XNNPACK refused the program when loading it ({_first_line(exc)}); "
                              "ExecuTorch's log above names the XNNPACK node") from None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self.method.execute([x.contiguous() for x in inputs])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def check_symmetric_weights(module: fx.GraphModule, origin: fx.Graph | None = None) -> None:
    """Raise ``ExportError`` where a conv or linear of ``module`` (an exported reference graph) reads weights
    dequantized with a non-zero zero point, naming the node of ``origin`` it came from where known.

    XNNPACK's int8 conv/linear kernels take symmetric weights (zero point 0) only, and ExecuTorch lowers
    asymmetric ones without a word: measured, weight zero points of 60 moved the outputs by 9 output steps."""
    for node in module.graph.nodes:
        if node.op != "call_function" or not re.search(r"conv|linear", _op_name(node)) or len(node.args) < 2:
            continue
        weight = node.args[1]
        if not _is_dequantize(weight):
            continue
        zero_point = weight.args[2]
        if isinstance(zero_point, fx.Node) and zero_point.op == "get_attr":
            zero_point = _attr(module, zero_point.target)
        if torch.as_tensor(zero_point).ne(0).any():
            raise ExportError(
                f"xnnpack: {_origin(node, origin)} ({_op_name(node)}) reads weights with non-zero zero points "
                f"({_origin(weight, origin)}); XNNPACK's int8 kernels take symmetric weights only: quantize for "
                "backend='xnnpack' (symmetric per-channel weights)"
            )


def check_cat_grids(module: fx.GraphModule, origin: fx.Graph | None = None) -> None:
    """Raise ``ExportError`` where a cat's int8 inputs are on grids other than its output's (nodes named as in
    ``check_symmetric_weights``).

    XNNPACK's int8 concatenate copies codes: it refuses inputs whose scale or zero point differ from the output's
    (measured: ``Failed to create cat2 node ... xnn_status_invalid_parameter`` when ExecuTorch loads the program,
    which the partitioner lets through)."""
    for node in module.graph.nodes:
        if node.op != "call_function" or _op_name(node) != "aten.cat.default":
            continue
        outputs = [u for u in node.users if _op_name(u).startswith("quantized_decomposed.quantize_per_tensor")]
        inputs = [x for x in node.args[0] if _is_dequantize(x)]
        if not outputs or not inputs:
            continue
        grid = tuple(outputs[0].args[1:3])
        for x in inputs:
            if tuple(x.args[1:3]) != grid:
                raise ExportError(
                    f"xnnpack: {_origin(node, origin)} (cat) joins {_origin(x.args[0], origin)} on grid "
                    f"(scale, zero point) {tuple(x.args[1:3])} into {grid}; XNNPACK's int8 concatenate needs every input on its "
                    "output's grid: share the cat's grid with its inputs"
                )


def check_int8_delegation(graph_module: fx.GraphModule, origin: fx.Graph | None = None) -> dict[str, int]:
    """The int8 XNNPACK nodes of a lowered edge program, counted by type; raise ``ExportError`` where a
    quantized op runs in float: left outside every XNNPACK delegate, or inside one on fp32 values. Errors name
    the node of ``origin`` (the reference graph) the op was made from, where known."""
    delegates, left = [], []
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.executorch_call_delegate:
            delegates.append(getattr(graph_module, node.args[0].target))
        elif node.target is not operator.getitem and _is_quantized_op(node):
            left.append(node)
    if left:
        # name the op that lost its kernel rather than the Q/DQ ops left around it
        node = next((n for n in left if not _is_qdq(n)), left[0])
        raise ExportError(
            f"xnnpack: {_origin(node, origin)} ({_op_name(node)}) fell back to ExecuTorch's portable float kernels: "
            "XNNPACK's partitioner did not take it; its grids or arguments are outside what XNNPACK's int8 "
            "kernels run (int8 per-tensor activations, symmetric int8 weights: quantize for backend='xnnpack')"
        )
    kernels: Counter[str] = Counter()
    for delegate in delegates:
        if delegate.backend_id != BACKEND_ID:
            continue
        xnn_graph = decode_xnnpack_graph(delegate.processed_bytes)
        datatypes = {value_id: datatype for value_id, datatype in _value_datatypes(xnn_graph)}
        by_handle: dict[int, list[dict]] = {}
        for xnode in xnn_graph["xnodes"]:
            by_handle.setdefault(xnode.get("debug_handle"), []).append(xnode)
        for node in delegate.original_module.graph.nodes:
            if node.op != "call_function" or not _is_quantized_op(node) or _is_qdq(node):
                continue
            xnodes = [x for x in by_handle.get(node.meta.get("debug_handle"), []) if x["xnode_union_type"] != _CONVERT]
            float_nodes = [x for x in xnodes if not _computes_int8(x, datatypes)]
            if float_nodes:
                raise ExportError(
                    f"xnnpack: {_origin(node, origin)} ({_op_name(node)}) runs in XNNPACK's float kernels "
                    f"({float_nodes[0]['xnode_union_type']} on fp32 values), not int8: XNNPACK did not fuse its "
                    "dequantize/quantize ops; its grids are outside what XNNPACK's int8 kernels run"
                )
        for xnode in xnn_graph["xnodes"]:
            if xnode["xnode_union_type"] != _CONVERT and _computes_int8(xnode, datatypes):
                kernels[xnode["xnode_union_type"].removeprefix("XNN")] += 1
    if not kernels:
        raise ExportError("xnnpack: no op runs in XNNPACK's int8 kernels; pass a reference quantized graph "
                          "(PTQ(data, backend='xnnpack', lower=False) or torchao's convert_pt2e)")
    return dict(kernels)


def decode_xnnpack_graph(processed: bytes) -> dict:
    """An XNNPACK delegate's serialized graph (its ``processed_bytes``) as a dict with ``xnodes`` and ``xvalues``,
    decoded from its flatbuffer with ExecuTorch's XNNPACK schema."""
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    header = XNNHeader.from_bytes(processed[: XNNHeader.EXPECTED_LENGTH])
    flatbuffer = processed[header.flatbuffer_offset : header.flatbuffer_offset + header.flatbuffer_size]
    schema = resources.files("executorch.backends.xnnpack.serialization").joinpath("schema.fbs").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "schema.fbs").write_bytes(schema)
        (folder / "graph.bin").write_bytes(flatbuffer)
        _flatc_decompile(tmp, str(folder / "schema.fbs"), str(folder / "graph.bin"))
        text = (folder / "graph.json").read_text()
    # flatc writes infinite clamp bounds as bare inf, which JSON spells Infinity
    return json.loads(re.sub(r"(:\s*-?)inf\b", r"\1Infinity", text))


def _value_datatypes(xnn_graph: dict) -> Iterator[tuple[int, str]]:
    for value in xnn_graph["xvalues"]:
        tensor = value["xvalue_union"]
        tensor = tensor.get("tensor_value", tensor)  # quantized values wrap a tensor value
        yield tensor["id_out"], tensor["datatype"]


def _computes_int8(xnode: dict, datatypes: dict[int, str]) -> bool:
    """Whether an XNNPACK node reads or writes per-tensor int8 activations (weights, ``filter_id``, are per
    channel and not what tells an int8 kernel from a float one)."""
    fields = xnode["xnode_union"]
    ids = [v for k, v in fields.items() if k.endswith("_id") and k not in ("filter_id", "bias_id") and v != _NO_VALUE]
    return any(datatypes.get(i) in QUANTIZED_DATATYPES for i in ids)


def _is_qdq(node: fx.Node) -> bool:
    return _op_name(node).startswith("quantized_decomposed.")


def _is_dequantize(node: Any) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and _op_name(node).startswith("quantized_decomposed.dequantize"))


def _is_quantized_op(node: fx.Node) -> bool:
    """A Q/DQ op, or an op reading a dequantized value: what the int8 kernels should run."""
    if _is_qdq(node):
        return True
    flat, _ = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
    return any(_is_dequantize(a) for a in flat)


def _attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _op_name(node: fx.Node) -> str:
    """``aten.convolution.default``, ``quantized_decomposed.dequantize_per_tensor.default``: the op's name, for
    edge-dialect ops too (they wrap the ATen op)."""
    target = node.target
    return str(target if isinstance(target, torch._ops.OpOverload) else getattr(target, "_op", target))


def _origin(node: fx.Node, origin: fx.Graph | None) -> str:
    """The node of the graph ``origin`` that the edge-dialect ``node`` was made from, followed back through
    ``meta['from_node']`` (the chain's root where ``origin`` is None or not on it)."""
    source = (node.meta.get("from_node") or [None])[-1]
    name = node.name
    while source is not None:
        name = source.name
        if origin is not None and source.graph_id == id(origin):
            break
        source = source.from_node[-1] if source.from_node else None
    return f"node {name!r}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
