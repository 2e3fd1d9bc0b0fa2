"""Bad input to the Python API: one InputError line naming the culprit, raised before any work or writing."""

import pytest
import torch
import torch.fx as fx
from torch import nn

import qpasses
from qpasses import InputError, PassManager, trace
from qpasses.analysis.metrics import sqnr
from qpasses.analysis.sensitivity import Sensitivity
from qpasses.passes import CLE, PTQ, AdaRound, BiasCorrection, Calibrate, FuseBN, MixedPrecision
from tests.nets import TinyUNet, randomize_bn

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
DATA = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) for _ in range(2)]


def one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def unet():
    torch.manual_seed(0)
    return randomize_bn(TinyUNet()).eval()


@pytest.mark.parametrize("model, fragments", [
    (None, ["PassManager.run needs a torch.nn.Module", "got None"]),
    (lambda x: x * 2, ["got the function", "wrap a function in an nn.Module"]),
])
def test_run_refuses_what_is_not_a_module(model, fragments):
    with pytest.raises(InputError) as excinfo:
        PassManager([FuseBN()]).run(model, X)
    one_line(excinfo, *fragments)
    with pytest.raises(InputError, match="trace\\(\\) needs a torch.nn.Module"):
        trace(model, X)


@pytest.mark.parametrize("example, fragments", [
    (torch.randn(1, 4, 16, 16), ["node 'enc1_0'", "Conv2d 'enc1.0', weight (8, 3, 3, 3) float32",
                                 "inputs [(1, 4, 16, 16) float32]", "to have 3 channels"]),
    (torch.ones(1, 3, 16, 16, dtype=torch.int64), ["node 'enc1_0'", "weight (8, 3, 3, 3) float32",
                                                   "inputs [(1, 3, 16, 16) int64]"]),
])
def test_example_inputs_the_model_refuses_name_the_node_and_write_nothing(tmp_path, capfd, example, fragments):
    dumps = tmp_path / "dumps"
    with pytest.raises(InputError) as excinfo:
        PassManager([FuseBN()], dump_dir=dumps, reproducer_dir=tmp_path / "repro").run(unet(), example)
    one_line(excinfo, "TinyUNet cannot run on the example inputs", *fragments)
    assert list(tmp_path.iterdir()) == []
    assert "Traceback" not in capfd.readouterr().err  # fx's ShapeProp printed one before raising
    gm = trace(unet(), X)  # a GraphModule given to run is checked the same way
    with pytest.raises(InputError) as excinfo:
        PassManager([FuseBN()]).run(gm, example)
    one_line(excinfo, "cannot run on the example inputs", "node 'enc1_0'")


def test_example_inputs_of_the_wrong_type_or_precision():
    with pytest.raises(InputError) as excinfo:
        PassManager([FuseBN()]).run(unet(), "x")
    one_line(excinfo, "example_inputs must be a tensor or a tuple of tensors", "str 'x'")
    with pytest.raises(InputError) as excinfo:
        PassManager([FuseBN()]).run(unet(), X.half())
    one_line(excinfo, "example input 0 is torch.float16", "x.float()")


def test_meta_and_half_models_are_refused_up_front():
    with pytest.raises(InputError) as excinfo:
        PassManager([FuseBN(), PTQ(DATA, progress=False)]).run(TinyUNet().to("meta"), X)
    one_line(excinfo, "parameter 'enc1.0.weight' is on the meta device", "to_empty")
    half = unet().half()
    for inputs in (X, X.half()):
        with pytest.raises(InputError) as excinfo:
            PassManager([FuseBN(), PTQ(DATA, progress=False)]).run(half, inputs)
        one_line(excinfo, "parameter 'enc1.0.weight' is torch.float16", "model.float()")
    assert half.enc1[0].weight.dtype == torch.float16  # refused, not converted behind the user's back


def data_passes(data):
    """Every pass or analysis that needs calibration data, built with ``data``."""
    return {
        "PTQ": lambda: PTQ(data, progress=False),
        "Calibrate": lambda: Calibrate(data, progress=False),
        "AdaRound": lambda: AdaRound(data, progress=False),
        "Sensitivity": lambda: Sensitivity(unet(), data, X, progress=False),
    }


@pytest.mark.parametrize("name", ["PTQ", "Calibrate", "AdaRound", "Sensitivity"])
@pytest.mark.parametrize("data", [None, 5, "images/"])
def test_missing_or_non_iterable_data_is_refused_when_the_pass_is_built(name, data):
    with pytest.raises(InputError) as excinfo:
        data_passes(data)[name]()
    one_line(excinfo, f"{name} needs calibration data as an iterable of batches", repr(data))


def test_optional_data_must_still_be_data():
    BiasCorrection(None)  # analytical: no data is a valid choice
    MixedPrecision(0.5, data=None)
    for build in (lambda: BiasCorrection(5), lambda: MixedPrecision(0.5, data=3.0)):
        with pytest.raises(InputError, match="needs calibration data as an iterable of batches"):
            build()


COUNT_TAKERS = {
    "PTQ.num_batches": lambda n: PTQ(DATA, progress=False, num_batches=n),
    "Calibrate.num_batches": lambda n: Calibrate(DATA, progress=False, num_batches=n),
    "BiasCorrection.num_batches": lambda n: BiasCorrection(DATA, num_batches=n),
    "AdaRound.num_batches": lambda n: AdaRound(DATA, progress=False, num_batches=n),
    "MixedPrecision.num_batches": lambda n: MixedPrecision(0.5, num_batches=n),
    "Sensitivity.num_batches": lambda n: Sensitivity(unet(), DATA, X, progress=False, num_batches=n),
    "AdaRound.iterations": lambda n: AdaRound(DATA, iterations=n),
    "AdaRound.checkpoints": lambda n: AdaRound(DATA, checkpoints=n),
    "CLE.max_iterations": lambda n: CLE(max_iterations=n),
}


@pytest.mark.parametrize("count", ["2", 1.5, 0, -1, True])
@pytest.mark.parametrize("taker", sorted(COUNT_TAKERS))
def test_counts_must_be_positive_ints(taker, count):
    name = taker.split(".")[1]
    with pytest.raises(InputError) as excinfo:
        COUNT_TAKERS[taker](count)
    one_line(excinfo, f"{name} must be a positive int", f"got {count!r}")
    COUNT_TAKERS[taker](2)  # an int is fine


class Masked(nn.Module):
    """A forward with a keyword-only ``mask=None``: capturing it as a proxy took the masked branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, *, mask=None):
        y = self.conv(x)
        if mask is not None:
            y = y * mask
        return torch.relu(y)


def test_keyword_only_argument_with_a_default_is_captured_at_its_default():
    torch.manual_seed(0)
    model = Masked().eval()
    gm = trace(model, X)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert torch.equal(gm(X), model(X))
    # (inputs, labels) batches: the labels must not be read as a mask
    batches = [(b, torch.zeros(2, dtype=torch.long)) for b in DATA]
    qmodel = PassManager([PTQ(batches, progress=False)]).run(model, X)
    assert sqnr(model(X), qmodel(X)) > 25


def test_forward_arguments_without_default_or_too_many_inputs():
    class NeedsMask(nn.Module):
        def forward(self, x, *, mask):
            return x * mask

    with pytest.raises(InputError) as excinfo:
        trace(NeedsMask(), X)
    one_line(excinfo, "NeedsMask.forward needs 'mask' without a default", "pass them in example_inputs")
    with pytest.raises(InputError) as excinfo:
        PassManager([FuseBN()]).run(unet(), (X, X))
    one_line(excinfo, "TinyUNet.forward takes 1 positional input(s) (x); example_inputs has 2")


def test_load_reads_a_saved_quantized_model(tmp_path):
    model = unet()
    qmodel = PassManager([FuseBN(), PTQ(DATA, backend="qnnpack", progress=False)]).run(model, X)
    path = tmp_path / "unet_int8.pt"
    torch.save(qmodel, path)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path)  # torch's default refuses a pickled module: why qpasses.load exists
    loaded = qpasses.load(path)
    assert isinstance(loaded, fx.GraphModule)
    assert torch.equal(loaded(X), qmodel(X))
    with pytest.raises(InputError) as excinfo:
        qpasses.load(tmp_path / "missing.pt")
    one_line(excinfo, "missing.pt", "no such file")
    torch.save({"weights": torch.ones(2)}, tmp_path / "state.pt")
    with pytest.raises(InputError) as excinfo:
        qpasses.load(tmp_path / "state.pt")
    one_line(excinfo, "holds a dict, not a model")


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_a_pipeline_on_an_already_lowered_model_is_refused_naming_the_int8_module(backend):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    lowered = PassManager([PTQ(DATA, backend=backend, recipe=False, progress=False)]).run(model, X)
    with pytest.raises(InputError) as excinfo:
        PassManager([PTQ(DATA, backend=backend, progress=False)]).run(lowered, X)
    one_line(excinfo, "PassManager.run", "is already quantized", "run the pipeline on the float model")
