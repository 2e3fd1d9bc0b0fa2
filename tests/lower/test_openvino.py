import subprocess
import sys

import numpy as np
import pytest
import torch

from qpasses.cpu import cpu_int8_features
from qpasses.errors import ExportError
from qpasses.lower import deploy
from qpasses.lower.openvino import INT8_PRECISIONS, executed_layers
from qpasses.passes.reference import DEQUANTIZE, QUANTIZE
from qpasses.quant.backends import get_backend
from tests.lower.conftest import (
    assert_full_range_u8_exact,
    batches,
    output_step,
    reference_graph,
    within_one_step,
)

pytest.importorskip("onnx", reason="the openvino target exports QDQ ONNX (pip install 'qpasses[openvino]')")
ov = pytest.importorskip("openvino", reason="the openvino target needs OpenVINO (pip install 'qpasses[openvino]')")

SMALL, STEM = (1, 3, 32, 32), (1, 3, 64, 64)


@pytest.fixture(scope="module")
def small_reference(small_net):
    return reference_graph(small_net, "openvino", SMALL)


def check_deployment(reference, shape, out):
    x = batches(shape, n=1, seed=7)[0]
    deployed = deploy(reference, "openvino", x, out)
    got, expected = deployed(x), reference(x)
    assert within_one_step(got, expected, output_step(reference)) >= 0.99
    return deployed, x, got


def test_small_net_runs_on_int8_layers_and_matches_the_reference(small_reference, tmp_path):
    deployed, _, _ = check_deployment(small_reference, SMALL, tmp_path / "model.onnx")
    assert deployed.int8_kernels == {"Convolution": 3, "FullyConnected": 1}
    assert get_backend("openvino").weight.symmetric
    weights = [n for n in small_reference.graph.nodes if n.op == "get_attr" and n.target.endswith("weight_zero_point")]
    assert weights and all(not getattr(small_reference, n.target).any() for n in weights)


def test_lite0_stem_runs_on_int8_layers_and_matches_the_reference(lite0_stem, tmp_path):
    reference = reference_graph(lite0_stem, "openvino", STEM)
    deployed, _, _ = check_deployment(reference, STEM, tmp_path / "stem.onnx")
    assert deployed.int8_kernels == {"Convolution": 3}


def test_the_ir_loads_and_runs_in_a_fresh_process(small_reference, tmp_path):
    _, x, got = check_deployment(small_reference, SMALL, tmp_path / "model.xml")
    assert (tmp_path / "model.bin").exists()
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys, numpy as np, openvino as ov\n"
        "core = ov.Core()\n"
        "compiled = core.compile_model(core.read_model(sys.argv[1]), 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})\n"
        "np.save(sys.argv[3], compiled([np.load(sys.argv[2])])[compiled.output(0)])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.xml"), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, cwd=tmp_path)
    fresh = torch.from_numpy(np.load(tmp_path / "y.npy"))
    assert within_one_step(fresh, got, 1e-6) == 1.0  # the same kernels, to float rounding
    compiled = ov.Core().compile_model(str(tmp_path / "model.xml"), "CPU")
    assert any(kind == "Convolution" and precision in INT8_PRECISIONS for kind, precision, _ in executed_layers(compiled))


def test_a_conv_left_float_is_named(small_net):
    reference = reference_graph(small_net, "openvino", SMALL)
    # OpenVINO runs a conv with int8 input and float output in int8; one reading a float input runs in f32
    conv = next(n for n in reference.graph.nodes if n.target is torch.nn.functional.conv2d)
    dequantize = conv.args[0]
    assert dequantize.target is DEQUANTIZE and dequantize.args[0].target is QUANTIZE
    conv.replace_input_with(dequantize, dequantize.args[0].args[0])
    reference.graph.eliminate_dead_code()
    reference.recompile()
    with pytest.raises(ExportError, match=r"OpenVINO runs Convolution '[^']+' in f32 \(1 such layer"):
        deploy(reference, "openvino", batches(SMALL, n=1)[0])


@pytest.mark.skipif(not cpu_int8_features().avx512_vnni,
                    reason="full-range u8 activations are exact only where the kernels accumulate in int32 (AVX-512 VNNI)")
def test_full_range_u8_activations_are_exact_on_this_avx512_vnni_cpu():
    assert_full_range_u8_exact("openvino")
