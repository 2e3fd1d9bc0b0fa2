"""The inductor target: a reference quantized graph compiled to oneDNN's int8 kernels (torch.compile with freezing,
and an AOTInductor package loaded in a fresh process without qpasses).

Inductor compiles slowly on 2 cores, so every artifact is built once per module and shared by the asserts.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpasses_zoo as zoo
from qpasses.errors import DeployError, InputError
from qpasses.lower import TARGETS, Deployed, deploy
from qpasses.lower.inductor import missing_runtime
from qpasses.passes import PTQ, FuseBN
from qpasses.passes.manager import PassManager

pytestmark = pytest.mark.skipif(missing_runtime() is not None, reason=str(missing_runtime()))


class SmallNet(nn.Module):
    """conv → relu, conv + residual add, cat, 1×1 conv, max pool, average pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.conv3, self.pool, self.fc = nn.Conv2d(32, 32, 1), nn.MaxPool2d(2), nn.Linear(32, 24)

    def forward(self, x):
        a = F.relu(self.conv1(x))
        b = self.conv2(a) + a
        c = self.pool(self.conv3(torch.cat([a, b], dim=1)))
        return self.fc(F.adaptive_avg_pool2d(c, 1).flatten(1))


def lite0_stem() -> nn.Module:
    """Pretrained EfficientNet-Lite0's stem (TF 'same' padding, BN, ReLU6) and first block (depthwise, 1×1)."""
    model = zoo.get("tf_efficientnet_lite0", pretrained=True)
    return nn.Sequential(model.conv_stem, model.bn1, model.blocks[0]).eval()


def qpasses_reference(model: nn.Module, calibration: list[torch.Tensor]) -> torch.fx.GraphModule:
    """qpasses' reference quantized graph for the inductor preset."""
    ptq = PTQ(calibration, backend="inductor", progress=False, lower=False)
    return PassManager([FuseBN(), ptq]).run(model, calibration[0])


def pt2e_reference(model: nn.Module, calibration: list[torch.Tensor]) -> torch.fx.GraphModule:
    """torchao's reference quantized graph (X86InductorQuantizer's grids, convert_pt2e)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(model, (calibration[0],)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    return convert_pt2e(prepared)


def batches(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def within_one_step(output: torch.Tensor, graph: torch.fx.GraphModule, x: torch.Tensor) -> float:
    """The fraction of ``output``'s values within one output step of the reference graph's on ``x``: the scale of
    the graph's last dequantize, or where it writes float (convert_pt2e's linear), one step of an 8-bit grid
    spanning the reference output."""
    with torch.no_grad():
        reference = graph(x)
    returned = graph.graph.output_node().args[0]
    last = returned[0] if isinstance(returned, (tuple, list)) else returned
    if last.target == torch.ops.quantized_decomposed.dequantize_per_tensor.default:
        step = last.args[1]
    else:
        step = (reference.max() - reference.min()).item() / 255
    return ((output - reference).abs() <= step).float().mean().item()


NETS = {"small": (SmallNet, (1, 3, 16, 16)), "lite0_stem": (lite0_stem, (1, 3, 32, 32))}


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> dict[str, tuple[torch.fx.GraphModule, torch.Tensor, Deployed]]:
    """Each net's reference graph, an input, and its AOTInductor package deployed from it (built once)."""
    folder, built = tmp_path_factory.mktemp("packages"), {}
    for name, (build, shape) in NETS.items():
        torch.manual_seed(0)
        graph, x = qpasses_reference(build().eval(), batches(4, shape, seed=0)), batches(1, shape, seed=1)[0]
        built[name] = graph, x, deploy(graph, "inductor", (x,), folder / f"{name}.pt2")
    return built


def test_target_registered():
    assert TARGETS["inductor"].module == "qpasses.lower.inductor" and TARGETS["inductor"].backend == "inductor"


@pytest.mark.parametrize("name", list(NETS))
def test_package_runs_int8_kernels_and_matches_the_reference(packaged, name):
    graph, x, package = packaged[name]
    convs_and_linears = {"small": 4, "lite0_stem": 3}[name]
    assert sum(package.int8_kernels.values()) == convs_and_linears, package.int8_kernels
    # the residual add runs in its conv's kernel (qconv2d_pointwise.binary), as in PT2E's graphs
    assert set(package.int8_kernels) == {
        "small": {"onednn.qconv_pointwise", "onednn.qconv2d_pointwise.binary", "onednn.qlinear_pointwise"},
        "lite0_stem": {"onednn.qconv_pointwise"}}[name]
    assert within_one_step(package(x), graph, x) >= 0.99


def test_packages_load_in_a_fresh_process_without_qpasses(packaged, tmp_path):
    for name, (_, x, package) in packaged.items():
        torch.save({"x": x, "package": str(package.artifact)}, tmp_path / f"{name}.in")
    # qpasses is importable from this venv: block it, so the packages provably load with torch alone. One
    # process loads them all (starting torch costs more than loading a package).
    script = ("import sys; sys.modules['qpasses'] = sys.modules['qpasses_zoo'] = None; import torch\n"
              f"for name in {list(packaged)!r}:\n"
              "    given = torch.load(name + '.in')\n"
              "    torch.save(torch._inductor.aoti_load_package(given['package'])(given['x']), name + '.out')")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for name, (graph, x, _) in packaged.items():
        assert within_one_step(torch.load(tmp_path / f"{name}.out"), graph, x) >= 0.99, name


def test_torch_compile_of_a_convert_pt2e_graph_runs_int8_kernels_and_matches_it():
    """Interop: torchao's own reference graph deploys too; torch.compile fuses its residual add into the conv."""
    torch.manual_seed(0)
    shape = NETS["small"][1]
    graph, x = pt2e_reference(SmallNet().eval(), batches(4, shape, seed=0)), batches(1, shape, seed=1)[0]
    compiled = deploy(graph, "inductor", x)
    assert compiled.artifact is None
    assert compiled.int8_kernels == {"onednn.qconv_pointwise": 2, "onednn.qconv2d_pointwise.binary": 1,
                                     "onednn.qlinear_pointwise": 1}
    assert not torch._inductor.config.freezing  # scoped to the compilation
    assert within_one_step(compiled(x), graph, x) >= 0.99


class ResidualBlock(nn.Module):
    """ResNet's basic block (conv → bn → relu → conv → bn → add → relu) after a stem conv, then MobileNetV2's
    residual form (the conv is the add's second input, no activation after it)."""

    def __init__(self):
        super().__init__()
        self.stem, self.relu = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)
        return y + self.conv3(y)


def test_residual_adds_run_in_their_convs_int8_kernel():
    """The inductor preset leaves a conv read only by an add unrounded, so inductor computes conv + add (+ ReLU)
    as one qconv2d_pointwise.binary (no separate dequantize/add/quantize loop), still matching the reference."""
    torch.manual_seed(0)
    model = ResidualBlock().eval()
    with torch.no_grad():  # BN statistics away from identity, so folding them matters
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    shape = (1, 3, 16, 16)
    graph, x = qpasses_reference(model, batches(4, shape, seed=0)), batches(1, shape, seed=1)[0]
    compiled = deploy(graph, "inductor", x)
    assert compiled.int8_kernels == {"onednn.qconv_pointwise": 2, "onednn.qconv2d_pointwise.binary": 2}
    assert within_one_step(compiled(x), graph, x) >= 0.99


def test_float_fallback_is_an_error_naming_it():
    class TinyHead(nn.Module):  # inductor computes a batch-1 linear of <= 16 features as a float loop
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(x)

    graph = qpasses_reference(TinyHead().eval(), batches(2, (1, 8), seed=0))
    with pytest.raises(DeployError, match=r"0 of the 1 quantized convs/linears \(linear\).*cpp_fused_addmm"):
        deploy(graph, "inductor", torch.randn(1, 8))


def test_bad_input_is_refused_before_compiling(tmp_path):
    with pytest.raises(InputError, match="no conv or linear reading dequantized"):
        deploy(torch.fx.symbolic_trace(SmallNet()), "inductor", torch.randn(1, 3, 16, 16))
    with pytest.raises(InputError, match="needs a reference quantized graph"):
        deploy(SmallNet(), "inductor", torch.randn(1, 3, 16, 16))
    graph = qpasses_reference(SmallNet().eval(), batches(1, (1, 3, 16, 16), seed=0))
    with pytest.raises(InputError, match=r"\.pt2 file"):
        deploy(graph, "inductor", torch.randn(1, 3, 16, 16), tmp_path / "model.pt")
