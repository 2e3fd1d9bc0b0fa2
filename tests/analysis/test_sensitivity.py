import json
from collections import Counter

import pytest
import torch
from torch import nn

from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.analysis.sensitivity import Sensitivity, main
from qpasses.errors import QPassesError
from qpasses.passes import PTQ, FuseBN, InsertObservers
from qpasses.quant.backends import get_backend
from tests.nets import RandomNet, randomize_bn


class ThreeConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def sensitive_net() -> nn.Module:
    """conv2 carries huge weights on an input channel that is always zero: the float function does not
    see them, but every output channel's weight range does, so 8-bit weights round the rest to zero."""
    torch.manual_seed(0)
    model = ThreeConvs().eval()
    with torch.no_grad():
        model.conv1.weight[0] = 0.0
        model.conv1.bias[0] = -1.0  # relu(−1) = 0: channel 0 is dead
        model.conv2.weight[:, 0] = 1000.0
    return model


def x86_config(observer="minmax"):
    """x86's defaults with another activation observer: the logic under test does not depend on it, and
    the MSE observer's range searches would dominate these tests' time."""
    config = get_backend("x86").default_config()
    config.activation = config.activation.replace(observer=observer)
    return config


def batches(n=3, shape=(4, 3, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def analysed():
    model = sensitive_net()
    sens = Sensitivity(model, batches(), config=x86_config(), progress=False)
    return model, sens, sens.run()


def ptq(model, data, config, backend="x86"):
    return PassManager([FuseBN(), PTQ(data, backend=backend, config=config, progress=False, recipe=False)]).run(model, data[0])


def test_deliberately_sensitive_layer_is_ranked_first(analysed):
    _, _, table = analysed
    assert [r.layer.name for r in table.rows] == ["conv1", "conv2", "conv3", "fc"]
    assert table.ranked()[0].layer.name == "conv2"
    by_name = {r.layer.name: r for r in table.rows}
    assert by_name["conv2"].alone == min(r.alone for r in table.rows)  # both rankings agree
    assert by_name["conv2"].alone < 30 < min(r.alone for r in table.rows if r.layer.name != "conv2")


def test_a_layer_quantized_alone_keeps_its_folded_activation(analysed):
    _, sens, _ = analysed
    alone = sens.quantize(sens.only("conv1"))
    relus = [n.name for n in alone.graph.nodes if n.target is torch.relu]
    assert relus == ["relu_1", "relu_2"]  # conv1's ReLU became the clamp of its int8 output range


def test_hybrid_keeps_the_sensitive_layer_float_and_improves(analysed):
    model, sens, table = analysed
    hybrid = sens.keep_float(table, 1)
    assert hybrid.keep_float == ["conv2"]
    assert hybrid.metric > table.full + 15
    # the config is an ordinary QuantConfig: PTQ with it reproduces the measurement exactly
    data = batches()
    qmodel = ptq(model, data, hybrid.config)
    with torch.no_grad():
        measured = sqnr(torch.cat([model(b) for b in data]), torch.cat([qmodel(b) for b in data]))
    assert measured == pytest.approx(hybrid.metric, abs=1e-9)
    assert type(qmodel.get_submodule("conv2")) is nn.Conv2d


def test_smallest_float_set_meets_its_target(analysed):
    _, sens, table = analysed
    target = table.full + 15
    result = sens.smallest_float_set(table, target)
    assert result.met and result.metric >= target
    assert result.keep_float == ["conv2"]
    assert result.trials[0] == (0, table.full) and table.full < target
    unreachable = sens.smallest_float_set(table, 1e6, max_float=2)
    assert unreachable.met is False and len(unreachable.trials) == 3


def test_shared_calibration_is_bit_identical_to_calibrating_each_variant():
    torch.manual_seed(0)
    model = randomize_bn(RandomNet([("conv", "relu", 8), ("cat", "relu", 8), ("residual", "relu", 16)])).eval()
    data = batches(3, (2, 3, 16, 16))
    config = x86_config("percentile")  # histogram observers: their buffers depend on all they saw, in order
    observed = PassManager([FuseBN(), InsertObservers(config=config)]).run(model, data[0])
    calls = Counter(n.target for n in observed.graph.nodes if n.op == "call_module" and n.target.endswith("_obs"))
    assert max(calls.values()) == 2  # the cat shares its observer with the conv output only it reads
    sens = Sensitivity(model, data, config=config, progress=False)
    assert [layer.name for layer in sens.layers] == ["layers.0.0", "layers.1.0", "layers.2.0", "head"]
    configs = [sens.config, sens.keep_float_config(["layers.1.0"]), sens.only("layers.2.0"),
               sens.weight_bits_config({"layers.0.0": 4})]
    sens.prefetch(configs)
    assert sens.calibration_passes == 1
    x = batches(1, (2, 3, 16, 16), seed=7)[0]
    for config in configs:
        shared = sens.quantize(config)
        alone = ptq(model, data, config)
        assert torch.equal(shared(x), alone(x))
    assert sens.calibration_passes == 1


def test_a_user_eval_fn_is_used():
    model = sensitive_net()
    probe = batches(1, seed=3)[0]
    calls = []

    def agreement(qmodel):
        calls.append(qmodel)
        return float((qmodel(probe).argmax(1) == model(probe).argmax(1)).double().mean() - (qmodel(probe) - model(probe)).abs().mean())

    sens = Sensitivity(model, batches(), config=x86_config(), eval_fn=agreement, progress=False)
    table = sens.run()
    assert table.metric == "agreement"
    assert len(calls) == 1 + 2 * len(sens.layers)
    assert table.ranked()[0].layer.name == "conv2"


def test_table_json_and_plot(analysed, tmp_path):
    _, _, table = analysed
    markdown = table.to_markdown(top=2)
    assert markdown.count("\n| ") == 3 and "| 1 | conv2 | Conv2d |" in markdown
    assert table.to_text().splitlines()[3].split()[1] == "conv2"
    data = json.loads(json.dumps(table.to_dict()))
    assert data["layers"][0]["name"] == "conv2" and data["backend"] == "x86"
    pytest.importorskip("matplotlib")
    path = table.plot(tmp_path / "sens.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_specific():
    model = sensitive_net()
    with pytest.raises(QPassesError, match="no batches"):
        Sensitivity(model, [], progress=False)
    sens = Sensitivity(model, batches(1), progress=False)
    with pytest.raises(QPassesError, match="'conv9' is not a quantized layer"):
        sens.only("conv9")
    with pytest.raises(QPassesError, match="below .* every layer at 4 bits"):
        sens.choose_weight_bits(100, bits=(4, 8))


def test_cli_main(tmp_path, capsys):
    out = tmp_path / "table.md"
    argv = ["tests.analysis.test_sensitivity:sensitive_net", "--calib", "random", "--input-size", "16",
            "--num-batches", "2", "--batch-size", "2", "--top", "2", "--out", str(out), "--json", "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layers"][0]["name"] == "conv2" and len(printed["layers"]) == 2
    assert "| 1 | conv2 |" in out.read_text()
    assert main(["no_such_model", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qpasses sensitivity: error:") and "no_such_model" in err and "\n" not in err


def test_cli_refuses_an_unwritable_out_before_building_the_model(tmp_path, capsys, monkeypatch):
    import qpasses.analysis.sensitivity as module

    monkeypatch.setattr(module, "_load_model", lambda *args: pytest.fail("the model was built before --out was checked"))
    for flag, path, why in (("--out", tmp_path, "is a folder"), ("--plot", tmp_path / "no" / "p.png", "does not exist")):
        assert main(["tests.analysis.test_sensitivity:sensitive_net", flag, str(path), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"qpasses sensitivity: error: {flag} {path}: ") and why in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []
