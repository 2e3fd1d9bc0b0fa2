import subprocess
import sys

import numpy as np
import pytest
import torch

from qpasses.cpu import cpu_int8_features
from qpasses.errors import ExportError
from qpasses.lower import deploy
from qpasses.lower.onnx import export, optimized_node_types
from qpasses.passes.reference import DEQUANTIZE, QUANTIZE
from tests.lower.conftest import (
    SamePadded,
    assert_full_range_u8_exact,
    batches,
    output_step,
    reference_graph,
    within_one_step,
)

onnx = pytest.importorskip("onnx", reason="the onnx target needs onnx (pip install 'qpasses[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the onnx target runs on ONNX Runtime (pip install 'qpasses[onnx]')")

SMALL, STEM = (1, 3, 32, 32), (1, 3, 64, 64)


@pytest.fixture(scope="module")
def small_reference(small_net):
    return reference_graph(small_net, "onnx", SMALL)


@pytest.fixture(scope="module")
def stem_reference(lite0_stem):
    return reference_graph(lite0_stem, "onnx", STEM)


def check_deployment(reference, shape, tmp_path):
    x = batches(shape, n=1, seed=7)[0]
    deployed = deploy(reference, "onnx", x, tmp_path / "model.onnx")
    got, expected = deployed(x), reference(x)
    assert within_one_step(got, expected, output_step(reference)) >= 0.99
    return deployed, x, got


def test_small_net_runs_on_int8_kernels_and_matches_the_reference(small_reference, tmp_path):
    deployed, _, _ = check_deployment(small_reference, SMALL, tmp_path)
    # every conv (stem, body, depthwise side) in QLinearConv, the add, cat, pool and linear in int8 nodes
    assert deployed.int8_kernels["QLinearConv"] == 3
    assert deployed.int8_kernels["QLinearAdd"] == 1
    assert deployed.int8_kernels["QLinearConcat"] == 1
    assert deployed.int8_kernels["QLinearGlobalAveragePool"] == 1
    assert deployed.int8_kernels["QGemm"] == 1
    # weights are int8 initializers (no float copy), biases int32
    model = onnx.load(str(deployed.artifact))
    weights = [t.data_type for t in model.graph.initializer if len(t.dims) >= 2]
    assert weights == [onnx.TensorProto.INT8] * 4
    biases = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    int32 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32 and len(t.dims) == 1}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert all(dequantized.get(n.input[2]) in int32 for n in biases)


def test_lite0_stem_runs_on_int8_kernels_and_matches_the_reference(stem_reference, tmp_path):
    deployed, _, _ = check_deployment(stem_reference, STEM, tmp_path)
    assert deployed.int8_kernels["QLinearConv"] == 3  # stem, depthwise, pointwise
    census, _ = optimized_node_types(onnx.load(str(deployed.artifact)).SerializeToString())
    assert census["Pad"] == 0  # the stem's TF 'SAME' pad is folded into its conv


def test_tf_same_pads_fold_into_the_convs_and_run_in_qlinearconv(tmp_path):
    torch.manual_seed(0)
    reference = reference_graph(SamePadded().eval(), "onnx", SMALL)
    assert sum(n.op == "call_module" and "pad" in n.target for n in reference.graph.nodes) == 2
    deployed, _, _ = check_deployment(reference, SMALL, tmp_path)  # within one output step on >= 99%
    model = onnx.load(str(deployed.artifact))
    assert not any(n.op_type == "Pad" for n in model.graph.node)
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(producer[n.input[0]] == "DequantizeLinear" for n in convs)
    # ONNX pads: (top, left, bottom, right); SAME pads (0, 1) on 32 rows for 3x3/2, (1, 2) on 16 for 5x5/2
    pads = sorted(tuple(a.ints) for n in convs for a in n.attribute if a.name == "pads")
    assert pads == [(0, 0, 0, 0), (0, 0, 1, 1), (1, 1, 2, 2)]
    census, left_float = optimized_node_types(model.SerializeToString())
    assert census["QLinearConv"] == 3 and census["Pad"] == 0 and not left_float


def test_the_qdq_model_carries_the_reference_grids(small_reference):
    model = export(small_reference, batches(SMALL, n=1)[0])
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    written = {(float(values[n.input[1]]), int(values[n.input[2]])) for n in model.graph.node
               if n.op_type == "QuantizeLinear"}
    expected = {(np.float32(n.args[1]).item(), n.args[2]) for n in small_reference.graph.nodes if n.target is QUANTIZE}
    assert written == expected


def test_the_artifact_loads_and_runs_in_a_fresh_process(small_reference, tmp_path):
    _, x, got = check_deployment(small_reference, SMALL, tmp_path)
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "np.save(sys.argv[3], s.run(None, {s.get_inputs()[0].name: np.load(sys.argv[2])})[0])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.onnx"), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, cwd=tmp_path)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "y.npy")), got)


def test_sub_8_bit_grids_are_kept_exactly_as_clips_of_the_codes(small_net, tmp_path):
    reference = reference_graph(small_net, "onnx", SMALL, bits=4)
    deployed, _, _ = check_deployment(reference, SMALL, tmp_path)
    assert deployed.int8_kernels["QLinearConv"] == 3
    model = onnx.load(str(deployed.artifact))
    quantize = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert any(n.op_type == "Clip" and n.input[0] in quantize for n in model.graph.node)


def test_a_conv_onnx_runtime_leaves_float_is_named(small_net):
    reference = reference_graph(small_net, "onnx", SMALL)
    conv, quantize = next((n, next(iter(n.users))) for n in reference.graph.nodes
                          if n.target is torch.nn.functional.conv2d and next(iter(n.users)).target is QUANTIZE)
    for dequantize in list(quantize.users):  # the conv now writes float: no int8 kernel can run it
        assert dequantize.target is DEQUANTIZE
        dequantize.replace_all_uses_with(conv)
        reference.graph.erase_node(dequantize)
    reference.graph.erase_node(quantize)
    reference.recompile()
    census, left_float = optimized_node_types(export(reference, batches(SMALL, n=1)[0]).SerializeToString())
    assert left_float and census["QLinearConv"] == 2
    with pytest.raises(ExportError, match=r"ONNX Runtime runs \w+ '[^']+' in float \(1 such node"):
        deploy(reference, "onnx", batches(SMALL, n=1)[0])


def test_a_float_model_is_refused_in_one_line(small_net):
    with pytest.raises(ExportError, match="needs a reference quantized graph"):
        deploy(small_net, "onnx", batches(SMALL, n=1)[0])


@pytest.mark.skipif(not cpu_int8_features().avx512_vnni,
                    reason="full-range u8 activations are exact only where the kernels accumulate in int32 (AVX-512 VNNI)")
def test_full_range_u8_activations_are_exact_on_this_avx512_vnni_cpu():
    assert_full_range_u8_exact("onnx")


def test_a_convert_pt2e_graph_deploys_too():
    pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e", reason="needs torchao")
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    x = batches(SMALL, n=1)[0]
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = pt2e.prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    for batch in batches(SMALL):
        prepared(batch)
    converted = pt2e.convert_pt2e(prepared)
    deployed = deploy(converted, "onnx", x)
    assert deployed.int8_kernels["QLinearConv"] == 1
    torch.testing.assert_close(deployed(x), converted(x), rtol=0, atol=1e-4)
