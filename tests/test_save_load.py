"""A model saved and reloaded (or deep-copied) exports, reports, visualises and converts like the original.

torch.fx rebuilds a loaded GraphModule by tracing its code again, dropping ``gm.meta`` and ``node.meta`` and
renaming nodes; qpasses' state lives in ``qpasses.quant.state.QuantState`` on the module instead.
"""

import copy
import dataclasses
import importlib.util
import io

import pytest
import torch
import torch.fx as fx

import qpasses
from qpasses import InputError, PassManager
from qpasses.export import is_lowered, lowered_backend, qdq_model, torchscript
from qpasses.export import onnx as export_onnx
from qpasses.graph import propagate_shapes
from qpasses.passes import CLE, PTQ, QAT, FuseBN
from qpasses.quant.backends import get_backend
from qpasses.quant.lowering import quantized_engine
from qpasses.quant.state import existing_state, properties_of
from qpasses.viz.describe import describe
from tests.nets import RandomNet, randomize_bn
from tests.passes.test_qat import Net, train_steps

# A conv chain, a residual add (FloatFunctional add_relu), a cat, a gate (mul) and a scale (mul/add scalars).
BLOCKS = [("conv", "relu", 8), ("residual_relu", "relu", 8), ("cat", "hardswish", 8), ("gate", "identity", 8),
          ("scale", "identity", 8)]
X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def data(n=3, shape=(2, 3, 16, 16)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def lowered(backend):
    torch.manual_seed(0)
    model = randomize_bn(RandomNet(BLOCKS)).eval()
    config = get_backend(backend).default_config()
    config = dataclasses.replace(config, activation=config.activation.replace(observer="minmax"))
    return PassManager([FuseBN(), PTQ(data(), backend=backend, config=config, progress=False)]).run(model, X[:1])


def save_load(model, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return qpasses.load(path)


def raw_torch_load(model, _tmp_path):
    """torch.load without qpasses.load: the first qpasses read restores the state."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def deepcopy(model, _tmp_path):
    return copy.deepcopy(model)


def deepcopy_then_save_load(model, tmp_path):
    return save_load(copy.deepcopy(model), tmp_path)


COPIES = [save_load, raw_torch_load, deepcopy, deepcopy_then_save_load]


def node_names(gm):
    return [n.name for n in gm.graph.nodes]


def views(gm):
    """Every node as the visualiser describes it, with shapes propagated on ``X`` (a loaded graph has none)."""
    gm = copy.deepcopy(gm)
    propagate_shapes(gm, (X,))
    return [describe(gm, n) for n in gm.graph.nodes]


@pytest.mark.parametrize("backend", ["x86", "fbgemm", "qnnpack"])
@pytest.mark.parametrize("copy_with", COPIES)
def test_a_copied_lowered_model_exports_reports_and_visualises_like_the_original(backend, copy_with, tmp_path):
    original = lowered(backend)
    copied = copy_with(original, tmp_path)
    assert is_lowered(copied) and lowered_backend(copied) == lowered_backend(original) == get_backend(backend)
    assert node_names(copied) == node_names(original)
    assert properties_of(copied) == properties_of(original) and "lowered" in properties_of(copied)
    assert existing_state(copied).capture == existing_state(original).capture
    with quantized_engine(get_backend(backend).engine):
        assert torch.equal(copied(X), original(X))
        assert torch.equal(torchscript(copied, X)(X), torchscript(original, X)(X))
    for reduce_range in ("keep", "widen"):  # "widen" reads the spec's bits from the node metadata
        assert torch.equal(qdq_model(copied, X, reduce_range)(X), qdq_model(original, X, reduce_range)(X))
    if backend == "fbgemm":  # 7-bit activations, clamped codes: widening changes the view
        assert not torch.equal(qdq_model(copied, X, "widen")(X), qdq_model(copied, X, "keep")(X))
    assert views(copied) == views(original)
    assert any(v.qstate == "int8" and v.qparams for v in views(copied))
    # A second pipeline plans and reports on the copy as on the original (CLE needs bn_folded: no FuseBN added).
    assert PassManager([CLE()]).explain(copied) == PassManager([CLE()]).explain(original) == "plan: CLE\n  1. CLE  [float]"
    # Running it is refused alike: both already run int8 kernels.
    refusals = []
    for model in (original, copied):
        with pytest.raises(InputError, match="is already quantized") as refused:
            PassManager([CLE()]).run(model, X)
        refusals.append(str(refused.value))
    assert refusals[0] == refusals[1]
    assert str(existing_state(copied).capture) == "capture: symbolic_trace"


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
                    reason="needs onnx and onnxruntime (the export extra)")
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_a_loaded_lowered_model_writes_the_same_onnx_model(backend, tmp_path):
    import onnx
    import onnxruntime as ort

    original = lowered(backend)
    loaded = save_load(original, tmp_path)
    outputs = []
    for name, model in (("original", original), ("loaded", loaded)):
        path = export_onnx(model, X, tmp_path / f"{name}.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"input_0": X.numpy()})[0])
        assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node) > 0
    assert (outputs[0] == outputs[1]).all()


@pytest.mark.parametrize("copy_with", COPIES)
def test_a_qat_model_saved_before_convert_converts_like_the_original_after_loading(copy_with, tmp_path):
    torch.manual_seed(0)
    trained = train_steps(PassManager([QAT(backend="qnnpack")]).run(randomize_bn(Net()), torch.randn(8, 3, 8, 8)))
    trained.eval()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    copied = copy_with(trained, tmp_path)
    assert node_names(copied) == node_names(trained)  # the averaging pool's to_steps/from_steps calls included
    assert torch.equal(copied(x), trained(x))
    converted, original = qpasses.convert(copied), qpasses.convert(trained)
    assert "lowered" in properties_of(converted) and "fake_quantized" not in properties_of(converted)
    assert node_names(converted) == node_names(original)
    assert torch.equal(converted(x), original(x))
    with quantized_engine("qnnpack"):
        assert torch.equal(torchscript(converted, x)(x), torchscript(original, x)(x))


def test_a_loaded_model_qpasses_did_not_produce_is_left_without_state(tmp_path):
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
    loaded = save_load(gm, tmp_path)
    assert existing_state(loaded) is None and properties_of(loaded) == frozenset() and not is_lowered(loaded)
    assert node_names(loaded) == node_names(gm)
