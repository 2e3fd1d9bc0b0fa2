"""PTQ's measured default recipe and PTQ to a target (target_sqnr, evaluate + max_drop)."""

import dataclasses

import pytest
import torch
from torch import nn

from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.errors import InputError, PlanError, TargetNotMetError
from qpasses.passes import CLE, PTQ, QAT, AdaRound, BiasCorrection, FuseBN, recipe_table, target
from qpasses.passes.adaround import ReuseRounding
from qpasses.passes.recipes import Recipe, find_recipe
from qpasses.passes.registry import PASSES, PassOptions, build_pipeline
from qpasses.passes.target import _Search, fewest_meeting, max_measurements, prefix_search_bound
from qpasses.quant.backends import get_backend
from qpasses.quant.overrides import exact_pattern
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


def pass_steps(result):
    return [s for s in result.steps if s.order == (0, 0)]


def weight_code_span(qm, name):
    """The largest |code| of a lowered layer's weights: at most 8 on a 4-bit grid ([-8, 7]), up to 128 on 8 bits."""
    return int(qm.get_submodule(name).weight().int_repr().abs().max())


def test_target_escalates_to_the_fewest_layers_kept_float():
    data = calibration()
    model = small_net()
    passes_only = PTQ(data, target_sqnr=100.0, adaround=False, max_float_share=0.0, progress=False)
    with pytest.raises(TargetNotMetError):
        PassManager([FuseBN(), passes_only]).run(model, data[0])
    # beyond PTQ and BiasCorrection, and beyond one or two layers kept float (x86's cubed-error ranges: +2.1, +2.5 dB)
    goal = max(s.value for s in passes_only.search.steps) + 3.0
    ptq = PTQ(data, target_sqnr=goal, adaround=False, max_float_share=1.0, progress=False)
    pm = PassManager([FuseBN(), ptq])
    qm = pm.run(model, data[0])
    result = ptq.search
    assert [s.met for s in result.steps[:2]] == [False, False] and result.chosen.met and result.chosen.keep_float
    with torch.no_grad():  # the search measures every calibration batch
        measured = sqnr(torch.cat([model(x) for x in data]), torch.cat([qm(x) for x in data]))
    assert measured == pytest.approx(result.chosen.value, abs=0.01)
    shorter = [s for s in result.steps if s.keep_float and len(s.keep_float) < len(result.chosen.keep_float)]
    assert all(not s.met for s in shorter) and result.ranking.startswith("layers ranked by Sensitivity")
    assert 0 < result.chosen.float_share < 1 and len(result.chosen.keep_float) < 4  # one layer stays int8
    # 8-bit weights and activations: no higher-bit kernel, so that step is skipped, and the report says why.
    assert not any(s.raised for s in result.steps)
    skipped = "no layers at higher bits: weights and activations are already 8-bit"
    assert any(n.startswith(skipped) for n in result.notes)
    assert any(n.startswith(skipped) for n in next(r for r in pm.report.records if r.name == "TargetPTQ").notes)


def test_a_4bit_target_raises_the_fewest_layers_to_8_bits_before_keeping_any_float():
    data = calibration()
    model = small_net()
    passes_only = PTQ(data, bits=4, target_sqnr=100.0, adaround=False, max_float_share=0.0, progress=False)
    with pytest.raises(TargetNotMetError):
        PassManager([FuseBN(), passes_only]).run(model, data[0])
    goal = max(s.value for s in pass_steps(passes_only.search)) + 2.0
    ptq = PTQ(data, bits=4, target_sqnr=goal, adaround=False, max_float_share=1.0, progress=False)
    pm = PassManager([FuseBN(), ptq])
    qm = pm.run(model, data[0])
    result = ptq.search
    chosen = result.chosen
    assert chosen.raised and not chosen.keep_float and chosen.float_share == 0 and chosen.order[0] == 1
    assert not any(s.keep_float for s in result.steps)  # met before the float step
    assert all(not s.met for s in result.steps if len(s.raised) < len(chosen.raised))
    spans = {name: weight_code_span(qm, name) for name in ["0.0", "1.0", "2.0", "3"]}
    assert all(spans[name] > 8 for name in chosen.raised)  # the raised layers run 8-bit weight codes
    assert all(span <= 8 for name, span in spans.items() if name not in chosen.raised)  # the rest stay 4-bit
    with torch.no_grad():
        measured = sqnr(torch.cat([model(x) for x in data]), torch.cat([qm(x) for x in data]))
    assert measured == pytest.approx(chosen.value, abs=0.01) and measured >= goal
    record = next(r for r in pm.report.records if r.name == "TargetPTQ")
    assert record.stats["8bit_layers"] == len(chosen.raised) and record.stats["float_layers"] == 0
    assert any("layers at 8 bits: " in n for n in record.notes)


def test_a_higher_target_never_ends_earlier_or_with_fewer_layers():
    """Monotone in the target on the real search: each step kind (passes, layers at 8 bits, layers float)
    and, within a kind, the number of layers never goes down as the target goes up. The targets are the
    values an unreachable search measured at every step, so each is met exactly somewhere."""
    data = calibration(2)
    model = small_net()
    every = PTQ(data, bits=4, target_sqnr=100.0, adaround=False, max_float_share=1.0, progress=False)
    with pytest.raises(TargetNotMetError):
        PassManager([FuseBN(), every]).run(model, data[0])
    goals = sorted({s.value for s in every.search.steps})
    assert {s.order[0] for s in every.search.steps} == {0, 1, 2} and len(goals) >= 6
    orders = []
    for goal in goals:
        ptq = PTQ(data, bits=4, target_sqnr=goal, adaround=False, max_float_share=1.0, progress=False)
        PassManager([FuseBN(), ptq]).run(model, data[0])
        orders.append(ptq.search.chosen.order)
    assert orders == sorted(orders)
    assert {kind for kind, _ in orders} >= {0, 1}  # the goals reach the passes and the layers at 8 bits


def test_the_prefix_search_is_monotone_and_keeps_the_fewest_measured_hit_on_any_curve():
    """``fewest_meeting`` on random curves, most of them not monotone: it returns a measured hit, the
    fewest hit it measured, never more than the bound, and never fewer layers for a higher target."""
    g = torch.Generator().manual_seed(0)
    for limit in [1, 2, 3, 5, 8, 13]:
        for _ in range(40):
            curve = torch.rand(limit + 1, generator=g).tolist()
            previous = 0
            for goal in sorted(curve) + [2.0]:
                measured = []

                def measure(k, goal=goal, measured=measured, curve=curve):
                    measured.append(k)
                    return curve[k] >= goal, curve[k]

                k = fewest_meeting(limit, measure)
                assert len(measured) <= prefix_search_bound(limit)
                hits = [m for m in measured if curve[m] >= goal]
                if k is None:
                    assert not hits and limit in measured
                    previous = limit + 1
                    continue
                assert k == min(hits) and 1 <= k <= limit
                assert k >= previous
                previous = k


def test_a_curve_that_falls_is_reported_and_the_fewest_measured_hit_kept(monkeypatch):
    """A measured curve that is not monotone (forced: 2 layers float measures 10 dB worse than it is) makes
    the search note where it fell, and it still keeps a measured hit, the fewest measured."""
    data = calibration()
    measure = _Search.measure

    def falling(self, label, passes, keep_float=(), *args, **kwargs):
        step, model = measure(self, label, passes, keep_float, *args, **kwargs)
        if len(keep_float) == 2:
            step.value -= 10.0
            step.met = step.value >= self.result.target
        return step, model

    monkeypatch.setattr(_Search, "measure", falling)
    monkeypatch.setattr(target, "producer_pairs", lambda gm, layers: {})  # one layer per candidate: 1, 2, 3 layers
    every = PTQ(data, target_sqnr=100.0, adaround=False, max_float_share=1.0, progress=False)
    with pytest.raises(TargetNotMetError):  # measures 1, 2 and 3 layers float (the doubling up to the limit)
        PassManager([FuseBN(), every]).run(small_net(), data[0])
    curve = {len(s.keep_float): s.value for s in every.search.steps if s.keep_float}
    assert sorted(curve) == [1, 2, 3] and curve[1] < curve[3]
    goal = (curve[1] + curve[3]) / 2  # missed by 1 and (forced) by 2, met by 3
    ptq = PTQ(data, target_sqnr=goal, adaround=False, max_float_share=1.0, progress=False)
    PassManager([FuseBN(), ptq]).run(small_net(), data[0])
    result = ptq.search
    floats = {len(s.keep_float): s for s in result.steps if s.keep_float}
    assert 2 in floats and floats[2].value < floats[1].value  # the curve fell, as forced
    note = next(n for n in result.notes if n.startswith("layers float: the measured values are not monotone"))
    assert "1 layers" in note and "2 layers" in note and "fewest layers among the measured prefixes" in note
    assert result.chosen is floats[3] and result.chosen.met and not floats[1].met and not floats[2].met


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


def test_evaluate_is_called_a_bounded_number_of_times_through_every_step():
    """An unreachable drop at 4 bits runs every step (passes, AdaRound, the ranking, layers at 8 bits,
    layers float); evaluate is called once per measured model plus once on the float model, within
    ``max_measurements``, however many layers the net has."""
    data = calibration(2)
    model = small_net()
    calls = []

    def evaluate(m):
        calls.append(1)
        with torch.no_grad():
            return -float(((m(data[0]) - model(data[0])) ** 2).mean())

    ptq = PTQ(data, bits=4, evaluate=evaluate, max_drop=1e-12, max_float_share=1.0, progress=False)
    with pytest.raises(TargetNotMetError):
        PassManager([FuseBN(), ptq]).run(model, data[0])
    result, layers = ptq.search, 4
    # x86's int8 convs write codes: the 3 layers reading another's value alone are ranked float with it too, on
    # the fully quantized model measured once more
    assert result.ranking_variants == layers + 1 + 3 + 1
    assert {s.order[0] for s in result.steps} == {0, 1, 2} and "PTQ + adaround" in [s.label for s in result.steps]
    assert len(calls) == 1 + len(result.steps) + result.ranking_variants
    assert len(result.steps) <= max_measurements(layers)
    assert max_measurements(layers) == 3 + 2 * (2 * (layers - 1).bit_length() + 1)


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
    ({"target_sqnr": 30.0, "lower": False}, "measures and returns the deployed model"),
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


def force(monkeypatch, penalised):
    """Measured values 20 dB lower than they are for the steps ``penalised(step)`` picks (the models stay);
    returns every measured step with its model."""
    measure, built_models = _Search.measure, []

    def forced(self, label, passes, *args, **kwargs):
        step, built = measure(self, label, passes, *args, **kwargs)
        built_models.append((step, built))
        if penalised(step):
            step.value -= 20.0
            step.met = step.value >= self.result.target
        return step, built

    monkeypatch.setattr(_Search, "measure", forced)
    return built_models


def count_adaround_runs(monkeypatch):
    run, rounders = AdaRound.run, []

    def counted(self, gm, ctx):
        rounders.append(self)
        return run(self, gm, ctx)

    monkeypatch.setattr(AdaRound, "run", counted)
    return rounders


def test_layer_steps_reuse_adarounds_rounding_when_it_measured_best(monkeypatch):
    """When AdaRound is the best pass step and measures best with the most layers protected (forced here:
    every step without AdaRound measured 20 dB worse than it is), the layer steps build on it: AdaRound runs
    once, and every layer-step model gives each layer left on the configured grid the weights AdaRound learned
    for it (a layer raised to 8 bits rounds to nearest there)."""
    data = calibration(2)
    model = small_net()
    built_models = force(monkeypatch, lambda step: "adaround" not in step.passes)
    rounders = count_adaround_runs(monkeypatch)
    every = PTQ(data, bits=4, target_sqnr=100.0, max_float_share=1.0, progress=False)
    with pytest.raises(TargetNotMetError):
        PassManager([FuseBN(), every]).run(model, data[0])
    adaround, *layer_steps = [s for s in every.search.steps if s.passes == ("adaround",)]
    assert len(rounders) == 1 and adaround.order == (0, 0) and adaround is max(pass_steps(every.search),
                                                                                key=lambda s: s.value)
    assert {s.order[0] for s in layer_steps} == {1, 2} and len(layer_steps) >= 4
    # Each layer step measured its longest prefix on the best pipeline without AdaRound too, and that only.
    others = [s for s in every.search.steps if s.order != (0, 0) and s.passes != ("adaround",)]
    assert [(s.order[0], len(s.raised) + len(s.keep_float)) for s in others] == [(1, 3), (2, 3)]
    built_on = [n for n in every.search.notes if "the step builds on 'PTQ + adaround', reusing its learned" in n]
    assert len(built_on) == 2 and built_on[0].startswith("layers at 8 bits: with 3 layers 'PTQ + adaround'")

    raised, qm = next((s, m) for s, m in built_models if s in layer_steps and s.raised and len(s.raised) < 3)
    rounded = rounders[0].rounded
    plain = PassManager([FuseBN(), PTQ(data, bits=4, recipe=False, progress=False)]).run(model, data[0])
    learned_differs = False
    for name in ["0.0", "1.0", "2.0", "3"]:
        weight = qm.get_submodule(name).weight().dequantize()
        if name in raised.raised:  # 8-bit codes, rounded to nearest
            assert weight_code_span(qm, name) > 8
            continue
        assert torch.allclose(weight, rounded[name].weight, rtol=1e-5, atol=1e-7)
        learned_differs |= not torch.equal(weight, plain.get_submodule(name).weight().dequantize())
    assert learned_differs  # the learned rounding is not round-to-nearest on some layer: the check can fail


def test_layer_steps_go_on_without_adaround_where_that_measures_higher_with_the_most_layers(monkeypatch):
    """AdaRound the best pass step, but its reused rounding measuring worse with the most layers protected
    (forced: BiasCorrection's pass step and every layer step on AdaRound 20 dB worse): each layer step goes
    on with the best pipeline without AdaRound after that one measurement, and AdaRound ran once."""
    data = calibration(2)
    force(monkeypatch, lambda step: step.passes == ("biascorrection",) or (
        "adaround" in step.passes and step.order != (0, 0)))
    rounders = count_adaround_runs(monkeypatch)
    every = PTQ(data, bits=4, target_sqnr=100.0, max_float_share=1.0, progress=False)
    with pytest.raises(TargetNotMetError):
        PassManager([FuseBN(), every]).run(small_net(), data[0])
    steps = every.search.steps
    assert max(pass_steps(every.search), key=lambda s: s.value).passes == ("adaround",) and len(rounders) == 1
    on_adaround = [s for s in steps if s.order != (0, 0) and s.passes == ("adaround",)]
    assert [(s.order[0], len(s.raised) + len(s.keep_float)) for s in on_adaround] == [(1, 3), (2, 3)]
    assert sum(s.order != (0, 0) and s.passes == () for s in steps) >= 4
    assert sum("the step builds on 'PTQ'" in n for n in every.search.notes) == 2


def test_reused_rounding_leaves_a_layer_kept_float_at_its_float_weight():
    data = calibration(2)
    model = small_net()
    adaround = AdaRound(data, iterations=20, lr=1e-2, progress=False)
    rounded_model = PassManager([FuseBN(), adaround, PTQ(data, bits=4, recipe=False, progress=False)]).run(
        model, data[0])
    keep = PTQ(data, bits=4, recipe=False, progress=False).config  # the resolved 4-bit x86 config
    config = dataclasses.replace(keep, keep_float={exact_pattern("1.0")})
    pm = PassManager([FuseBN(), ReuseRounding(adaround.rounded), PTQ(data, config=config, recipe=False,
                                                                     progress=False)])
    qm = pm.run(model, data[0])
    fused = PassManager([FuseBN()]).run(model, data[0])
    assert torch.equal(qm.get_submodule("1.0").weight, fused.get_submodule("1.0").weight)
    for name in ["0.0", "2.0", "3"]:
        assert torch.equal(qm.get_submodule(name).weight().int_repr(), rounded_model.get_submodule(name).weight().int_repr())
    record = next(r for r in pm.report.records if r.name == "ReuseRounding")
    assert record.stats["reused"] == 3 and record.stats["other_grid"] == 0


@pytest.mark.parametrize("backend", ["inductor", "x86"])
def test_a_layer_kept_float_reads_its_input_unrounded_only_where_the_int8_conv_before_it_writes_fp32(
        monkeypatch, backend):
    """Every layer-step model, as deployed (x86: lowered to torch.ao's kernels, checked on the reference graph it
    was lowered from; inductor: the reference graph inductor compiles): on inductor, whose int8 convs write fp32,
    a layer kept float reads the int8 conv before it unrounded, so each float layer drops one activation rounding;
    on x86 the int8 conv before it writes codes, and only a value between float layers, the model's input or the
    output of a last layer kept float is left unrounded. Either way the MACs counted float are the float layers' own."""
    from qpasses.analysis.sensitivity import Sensitivity
    from qpasses.passes.reference import DEQUANTIZE
    from qpasses.quant.lowering import QuantizedConv2d
    from qpasses.quant.state import state_of

    data = calibration(2)
    model = small_net()
    built = force(monkeypatch, lambda step: False)  # every measured step with its model
    ptq = PTQ(data, backend=backend, target_sqnr=100.0, adaround=False, max_float_share=1.0, progress=False)
    with pytest.raises(TargetNotMetError):
        PassManager([FuseBN(), ptq]).run(model, data[0])
    macs = {layer.name: layer.macs for layer in Sensitivity(model, data, progress=False).layers}
    order = list(macs)  # graph order: "0.0", "1.0", "2.0", "3"
    base = ptq.search.steps[0]
    layer_steps = [(s, m) for s, m in built if s.keep_float]
    assert layer_steps and any(set(s.keep_float) - {"0.0"} for s, _ in layer_steps)
    for step, qm in layer_steps:
        reference = state_of(qm).reference if backend == "x86" else qm
        if backend == "x86":
            assert any(isinstance(m, QuantizedConv2d) for m in qm.modules())  # lowered to the engine's kernels
        calls = {n.target: n for n in reference.graph.nodes if n.op == "call_module"}
        unrounded_inputs = 0
        for layer in step.keep_float:
            before = order[order.index(layer) - 1] if layer != order[0] else None
            reads_codes = calls[layer].args[0].target is DEQUANTIZE
            int8_before = before is not None and before not in step.keep_float
            assert reads_codes == (int8_before and backend == "x86"), (layer, step.keep_float)
            unrounded_inputs += not reads_codes
            # x86's int8 conv writing the model's output rounds it (no conv kernel writes fp32); kept float, it does not
            unrounded_inputs += layer == order[-1] and backend == "x86"
        assert base.rounded - step.rounded == unrounded_inputs
        assert step.float_share == pytest.approx(sum(macs[n] for n in step.keep_float) / sum(macs.values()))
    note = next(n for n in ptq.search.notes if n.startswith("layers float: ") and "int8 convs write" in n)
    assert ("also reads its input unrounded" in note) == (backend == "inductor")
    pairs = [n for n in ptq.search.notes if "also ranked kept float with it" in n]
    assert len(pairs) == (backend == "x86")  # inductor's float layers already read their input unrounded


def test_producer_pairs_are_layers_reading_a_value_only_they_read():
    from qpasses.graph.trace import propagate_shapes

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
            self.pool = nn.MaxPool2d(3, stride=1, padding=1)  # keeps its input's grid
            self.dw = nn.Conv2d(4, 4, 3, groups=4)

        def forward(self, x):
            y = torch.relu(self.stem(x))
            return self.dw(self.pool(torch.nn.functional.relu6(self.head(self.conv(y) + y))))

    gm = torch.fx.symbolic_trace(Residual())
    propagate_shapes(gm, (torch.randn(1, 3, 8, 8),))
    # the stem's value is read by conv and the add (no pair); head reads the add (not a layer); dw reads head's
    # value through ReLU6 and max pooling, which nothing else reads
    assert target.producer_pairs(gm, ["stem", "conv", "head", "dw"]) == {"dw": "head"}
    assert target.producer_pairs(gm, ["stem", "conv", "dw"]) == {}  # head is not among the layers
