"""``qpasses.export.exported_program``: the reference graph saved with ``torch.export.save``, loaded without qpasses."""

import subprocess
import sys

import pytest
import torch

from qpasses.errors import ExportError
from qpasses.export import exported_program
from tests.lower.conftest import batches, output_step, reference_graph, within_one_step

SHAPES = {"small_net": (1, 3, 32, 32), "lite0_stem": (1, 3, 64, 64)}


@pytest.fixture(scope="module", params=list(SHAPES))
def reference(request) -> tuple[torch.fx.GraphModule, tuple[int, ...]]:
    shape = SHAPES[request.param]
    return reference_graph(request.getfixturevalue(request.param), "x86", shape), shape


def test_the_program_is_the_reference_simulation_in_convert_pt2e_dialect(reference):
    graph, shape = reference
    example, other = batches(shape, n=2, seed=3)
    program = exported_program(graph, example)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"quantized_decomposed.quantize_per_tensor.default",
            "quantized_decomposed.dequantize_per_channel.default"} <= ops
    decomposed = exported_program(graph, example, decompose=True)
    assert not any(str(n.target).startswith("quantized_decomposed") for n in decomposed.graph.nodes)
    with torch.no_grad():
        assert torch.equal(program.module()(other), graph(other))
        assert torch.equal(decomposed.module()(other), graph(other))


def test_the_saved_programs_load_and_run_in_a_fresh_process_without_qpasses(reference, tmp_path):
    graph, shape = reference
    example, x = batches(shape, n=2, seed=5)
    exported_program(graph, example, tmp_path / "qdq.pt2")
    exported_program(graph, example, tmp_path / "decomposed.pt2", decompose=True)
    torch.save(x, tmp_path / "x.in")
    # qpasses is importable from this venv: block it, so the programs provably load without it. The decomposed
    # program loads with torch alone; the other once torch's own quantize/dequantize ops are registered.
    script = ("import sys; sys.modules['qpasses'] = sys.modules['qpasses_zoo'] = None; import torch\n"
              "x = torch.load('x.in')\n"
              "torch.save(torch.export.load('decomposed.pt2').module()(x), 'decomposed.out')\n"
              "import torch.ao.quantization.fx._decomposed\n"
              "torch.save(torch.export.load('qdq.pt2').module()(x), 'qdq.out')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        expected = graph(x)
    for name in ("qdq", "decomposed"):
        assert within_one_step(torch.load(tmp_path / f"{name}.out"), expected, output_step(graph)) >= 0.99, name


def test_a_float_model_is_refused_in_one_line(small_net):
    with pytest.raises(ExportError, match="needs a model lowered by qpasses"):
        exported_program(small_net, batches(SHAPES["small_net"], n=1)[0])
