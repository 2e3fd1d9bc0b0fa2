"""PTQ's measured default recipe and PTQ to a target (target_sqnr, evaluate + max_drop)."""

import pytest
import torch
from torch import nn

from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.errors import InputError, PlanError, TargetNotMetError
from qpasses.passes import CLE, PTQ, QAT, AdaRound, BiasCorrection, FuseBN, recipe_table
from qpasses.passes.recipes import Recipe, find_recipe
from qpasses.passes.registry import PASSES, PassOptions, build_pipeline
from qpasses.quant.backends import get_backend
from tests.nets import conv_bn_act, randomize_bn

SOURCE = "test table"
TABLE = (
    Recipe("x86", True, 8, ("biascorrection",), 20.0, 15.0, 50, SOURCE),
    Recipe("qnnpack", False, 8, ("cle", "hba", "biascorrection"), 16.0, 4.0, 60, SOURCE),
)


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(recipe_table, "MEASURED", TABLE)


def small_net():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(conv_bn_act(3, 8), conv_bn_act(8, 16, stride=2), conv_bn_act(16, 16),
                                      nn.Conv2d(16, 4, 1))).eval()


def calibration(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


def names(plan):
    return [p.name for p in plan.passes]


def test_recipe_is_added_inside_the_quantize_stage_and_explained(table):
    data = calibration()
    pm = PassManager([FuseBN(), PTQ(data, progress=False)])
    plan = pm.plan()
    assert names(plan) == ["FuseBN", "ReplaceFunctional", "InsertObservers", "Calibrate", "BiasCorrection", "Lower"]
    note = next(n for n in plan.notes if n.startswith("PTQ added"))
    assert "BiasCorrection" in note and "per-channel W8 x86" in note and SOURCE in note and "recipe=False" in note
    assert "PTQ added BiasCorrection" in pm.explain()
    model = small_net()
    qm = pm.run(model, data[0])
    corrected = next(r for r in pm.report.records if r.name == "BiasCorrection")
    assert corrected.stats["corrected"] == 4
    x = calibration(seed=5)[0]
    assert sqnr(model(x), qm(x)) > 20


def test_per_tensor_recipe_puts_float_passes_before_observers(table):
    data = calibration()
    pm = PassManager([PTQ(data, backend="qnnpack", progress=False)])
    assert names(pm.plan()) == ["FuseBN", "CLE", "HighBiasAbsorption", "ReplaceFunctional", "InsertObservers",
                                "Calibrate", "BiasCorrection", "Lower"]
    model = small_net()
    qm = pm.run(model, data[0])
    assert sqnr(model(data[0]), qm(data[0])) > 15


@pytest.mark.parametrize("user_pass", [CLE, BiasCorrection])
def test_an_explicit_pipeline_is_never_changed(table, user_pass):
    data = calibration()
    chosen = user_pass() if user_pass is CLE else user_pass(data)
    plan = PassManager([FuseBN(), chosen, PTQ(data, progress=False)]).plan()
    assert names(plan).count("BiasCorrection") == (user_pass is BiasCorrection)
    assert "CLE" not in names(plan) or user_pass is CLE
    assert any(f"the pipeline names {user_pass.__name__}" in n for n in plan.notes)


def test_recipe_false_and_one_shot_data_add_nothing(table):
    data = calibration()
    plan = PassManager([PTQ(data, recipe=False)]).plan()
    assert names(plan) == ["ReplaceFunctional", "InsertObservers", "Calibrate", "Lower"] and not plan.notes[1:]
    plan = PassManager([PTQ(iter(data))]).plan()
    assert "BiasCorrection" not in names(plan)
    assert any("one-shot iterator" in n for n in plan.notes)


def test_ptq_starting_qat_adds_no_recipe(table):
    plan = PassManager([PTQ(calibration(), progress=False), QAT()]).plan()
    assert "BiasCorrection" not in names(plan) and any("it starts QAT" in n for n in plan.notes)


def test_lookup_falls_back_to_the_same_grid_on_another_backend():
    onednn = get_backend("onednn").default_config()
    assert find_recipe("onednn", onednn, TABLE) is TABLE[0]  # per-channel W8: the x86 row
    assert find_recipe("x86", get_backend("x86").default_config().with_weight_bits(4), TABLE) is None


def test_the_committed_table_names_registered_passes():
    assert recipe_table.MEASURED
    for row in recipe_table.MEASURED:
        assert set(row.passes) <= set(PASSES) and row.source


def test_target_met_by_the_first_step_reports_its_path():
    data = calibration()
    ptq = PTQ(data, target_sqnr=10.0, adaround=False, progress=False)
    pm = PassManager([FuseBN(), ptq])
    model = small_net()
    qm = pm.run(model, data[0])
    result = ptq.search
    assert result.chosen is result.steps[0] and len(result.steps) == 1 and result.chosen.value >= 10.0
    notes = next(r for r in pm.report.records if r.name == "TargetPTQ").notes
    assert notes[0].startswith("step 1: PTQ") and "met by step 1" in notes[-1]
    assert sqnr(model(data[0]), qm(data[0])) == pytest.approx(result.chosen.value, abs=0.5)


def test_target_escalates_to_the_fewest_layers_kept_float():
    data = calibration()
    model = small_net()
    passes_only = PTQ(data, bits=4, target_sqnr=100.0, adaround=False, max_float_share=0.0, progress=False)
    with pytest.raises(TargetNotMetError):
        PassManager([FuseBN(), passes_only]).run(model, data[0])
    goal = max(s.value for s in passes_only.search.steps) + 2.0  # beyond PTQ and BiasCorrection
    ptq = PTQ(data, bits=4, target_sqnr=goal, adaround=False, max_float_share=1.0, progress=False)
    qm = PassManager([FuseBN(), ptq]).run(model, data[0])
    result = ptq.search
    assert [s.met for s in result.steps[:2]] == [False, False] and result.chosen.met and result.chosen.keep_float
    with torch.no_grad():  # the search measures every calibration batch
        measured = sqnr(torch.cat([model(x) for x in data]), torch.cat([qm(x) for x in data]))
    assert measured == pytest.approx(result.chosen.value, abs=0.01)
    shorter = [s for s in result.steps if s.keep_float and len(s.keep_float) < len(result.chosen.keep_float)]
    assert all(not s.met for s in shorter) and result.ranking.startswith("layers ranked by Sensitivity")
    assert 0 < result.chosen.float_share < 1 and len(result.chosen.keep_float) < 4  # one layer stays int8


def test_unreachable_target_raises_one_clear_line():
    data = calibration()
    ptq = PTQ(data, target_sqnr=200.0, adaround=False, max_float_share=0.0, progress=False)
    with pytest.raises(TargetNotMetError, match=r"target SQNR dB >= 200.00 not met in \d steps .*best .*lower the target"):
        PassManager([FuseBN(), ptq]).run(small_net(), data[0])
    steps = ptq.search.steps
    assert steps and steps[-1].passes[-1] == "biascorrection" and not any(s.keep_float for s in steps)


def test_evaluate_with_max_drop():
    data = calibration()
    model = small_net()
    with torch.no_grad():
        reference = model(data[0])
    calls = []

    def evaluate(m):  # higher is better: minus the mean squared error against the float model
        calls.append(type(m).__name__)
        with torch.no_grad():
            return -float(((m(data[0]) - reference) ** 2).mean())

    ptq = PTQ(data, evaluate=evaluate, max_drop=1.0, adaround=False, progress=False)
    pm = PassManager([FuseBN(), ptq])
    pm.run(model, data[0])
    assert ptq.search.metric == "evaluate" and ptq.search.target == pytest.approx(-1.0, abs=1e-6)
    assert ptq.search.chosen.value >= -1.0 and len(calls) == 1 + len(ptq.search.steps)
    assert any(n.startswith("evaluate on the float model") for n in pm.report.records[-1].notes)


@pytest.mark.parametrize("kwargs, message", [
    ({"target_sqnr": -3.0}, "target_sqnr must be a positive number"),
    ({"target_sqnr": "30"}, "target_sqnr must be a positive number"),
    ({"target_sqnr": 30.0, "evaluate": len, "max_drop": 0.1}, "not both"),
    ({"max_drop": 0.01}, "max_drop needs evaluate=fn"),
    ({"evaluate": len}, "needs max_drop"),
    ({"evaluate": len, "max_drop": -1}, "needs max_drop"),
    ({"evaluate": 3, "max_drop": 0.1}, "max_drop needs evaluate=fn"),
    ({"target_sqnr": 30.0, "max_float_share": 2}, "max_float_share"),
    ({"recipe": None}, "recipe must be True or False"),
    ({"target_sqnr": 30.0, "adaround": "no"}, "adaround must be True or False"),
])
def test_arguments_are_checked_before_any_work(kwargs, message):
    with pytest.raises(InputError, match=message):
        PTQ(calibration(1), **kwargs)


def test_target_refuses_quantize_stage_accuracy_passes_in_the_pipeline():
    data = calibration()
    with pytest.raises(PlanError, match="chooses AdaRound itself"):
        PassManager([AdaRound(data), PTQ(data, target_sqnr=30.0)]).plan()


def test_registry_builds_ptq_with_a_target():
    data = calibration()
    (ptq,) = build_pipeline("ptq", PassOptions(calibration=lambda: data, target_sqnr=25.0, progress=False))
    assert [p.name for p in ptq.parts] == ["TargetPTQ"] and ptq.parts[0].target.sqnr_db == 25.0


def test_sensitivity_gains_without_the_alone_variants():
    from qpasses.analysis.sensitivity import Sensitivity

    data = calibration(2)
    sens = Sensitivity(small_net(), data, progress=False)
    full, gains_only = sens.run(), sens.run(alone=False)
    assert [r.all_but for r in gains_only.rows] == [r.all_but for r in full.rows]
    assert all(r.alone != r.alone for r in gains_only.rows)  # NaN: not measured
    assert [layer.macs for layer in sens.layers][:2] == [16 * 16 * 8 * (3 * 9), 8 * 8 * 16 * (8 * 9)]  # outputs × fan-in
