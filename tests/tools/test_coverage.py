import copy
import json
import math

import pytest
import torch
from torch import nn

import tools.bench.common as common
from qpasses.cpu import cpu_int8_features
from tools.bench.common import PerSample, torchao_pt2e_ptq
from tools.bench.coverage import (
    MODELS,
    TOOLS,
    Params,
    Results,
    Row,
    float_weighted_layers,
    make_inputs,
    measure,
    pt2e_float_weights,
    pt2e_quantized_layers,
    qpasses_layers_using,
    reestimate_batchnorm,
    report,
    run_model,
    run_worker,
    sweep,
)

TINY = Params(size=32, calib=8, eval=8, norm=8)  # one batch of 8 crops each


@pytest.fixture(scope="module")
def tiny_rows() -> list[Row]:
    """Every tool on the LSTM and on resnet18 at 32×32, measured in this process."""
    rows = []
    for name in ("lstm", "resnet18"):
        case = MODELS[name]
        torch.manual_seed(0)
        model = case.build(case.size(TINY.size) or 0).eval()
        inputs = make_inputs(case, TINY.size, TINY.calib, TINY.eval, TINY.norm)
        reestimate_batchnorm(model, inputs.norm)
        with torch.no_grad():
            reference = [model(b) for b in inputs.evals]
        rows += [measure(case, tool, model, inputs, reference, float_weighted_layers(model)) for tool in TOOLS.values()]
    return rows


def test_rows_of_every_tool_on_two_models(tiny_rows):
    assert [(r.model, r.tool) for r in tiny_rows] == [(m, t) for m in ("lstm", "resnet18") for t in TOOLS]
    totals = {r.model: r.total for r in tiny_rows}
    assert totals == {"lstm": 2, "resnet18": 21}  # LSTM + head; 20 convs + fc
    for row in tiny_rows:
        if row.ok:
            assert 0 <= row.quantized <= row.total
            assert math.isfinite(row.sqnr) and 0 <= row.top1 <= 1
            assert row.error == ""
        else:
            assert row.error and "\n" not in row.error and row.sqnr is None
        # qpasses x86: 7 where a kernel needs it; its inductor preset, like PT2E: 8 on CPUs that add int8 products
        # in int32 (AVX-512 VNNI)
        reference_bits = 8 if cpu_int8_features().u8s8_accumulates_in_int32 else 7
        assert row.activation_bits == {"pt2e": 8, "qpasses-ref": reference_bits,
                                       "qpasses-ref-pt2e-layers": reference_bits}.get(row.tool, 7)
    by_key = {(r.model, r.tool): r for r in tiny_rows}
    for model in ("lstm", "resnet18"):  # qpasses takes both; the LSTM itself stays float (no static LSTM kernel)
        assert by_key[model, "qpasses-ptq"].ok and by_key[model, "qpasses-qat"].ok
    assert by_key["resnet18", "qpasses-ptq"].quantized == 21
    assert by_key["resnet18", "qpasses-ref"].ok and by_key["resnet18", "qpasses-ref"].quantized == 21
    assert by_key["lstm", "pt2e"].ok and by_key["lstm", "pt2e"].quantized == 1
    # PT2E leaves no conv/linear of the LSTM model float: the reference at its layers is the reference
    assert by_key["lstm", "qpasses-ref-pt2e-layers"].ok and by_key["lstm", "qpasses-ref-pt2e-layers"].quantized == 1


def test_batchnorm_statistics_become_those_of_the_batches_given():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    batches = [torch.randn(4, 3, 8, 8) * 5 + 2 for _ in range(3)]
    reestimate_batchnorm(model, batches)
    with torch.no_grad():
        features = [model[0](b) for b in batches]
    assert not model[1].training
    # the cumulative average over equal batches: of their means, and of their (unbiased) variances
    torch.testing.assert_close(model[1].running_mean, torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0))
    torch.testing.assert_close(model[1].running_var, torch.stack([f.var((0, 2, 3)) for f in features]).mean(0))


def test_pt2e_count_takes_weights_not_activation_matmuls():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(self.conv(x).mean((2, 3)))
            return h @ h.t()  # two activations: no weight to count

    model = Net().eval()
    converted = torchao_pt2e_ptq(model, [torch.randn(2, 3, 8, 8)])
    assert float_weighted_layers(model) == 2 and pt2e_quantized_layers(converted) == 2


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_the_reference_at_pt2e_layers_keeps_float_the_layers_pt2e_leaves_float():
    torch.manual_seed(0)
    model, calib = _Attention().eval(), [torch.randn(4, 5, 8)]
    pt2e = torchao_pt2e_ptq(model, calib)
    # PT2E quantizes the head only: the attention's projections are F.linear calls on the block's own parameters
    assert pt2e_float_weights(pt2e) == {"attn.in_proj_weight", "attn.out_proj.weight"}
    assert pt2e_quantized_layers(pt2e) == 1
    assert pt2e_quantized_layers(TOOLS["qpasses-ref"].quantize(copy.deepcopy(model), calib)) == 3
    matched = TOOLS["qpasses-ref-pt2e-layers"].quantize(copy.deepcopy(model), calib)
    assert pt2e_quantized_layers(matched) == 1


def test_a_layer_calling_a_function_on_its_parameter_is_named_by_its_node():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.fc = nn.Parameter(torch.randn(4, 4)), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(nn.functional.linear(x, self.weight))

    names = qpasses_layers_using(Functional().eval(), {"weight", "fc.weight"}, torch.randn(1, 4))
    assert names == {"linear", "fc"}


def test_a_parameter_no_layer_of_qpasses_graph_uses_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(ValueError, match="no layer of qpasses' graph uses 1.weight"):
        qpasses_layers_using(model, {"0.weight", "1.weight"}, torch.randn(1, 4))


def test_per_sample_joins_structured_outputs_leaf_by_leaf():
    x = torch.arange(6.0).reshape(3, 2)
    out = PerSample(lambda sample: {"out": sample * 2, "aux": [sample.sum(1)]})(x)
    assert torch.equal(out["out"], x * 2) and torch.equal(out["aux"][0], x.sum(1))


def test_sweep_resumes_from_its_results_file(tmp_path, monkeypatch):
    path = tmp_path / "coverage.json"
    sweep(["lstm"], ["fx"], Results(path, TINY), timeout=300)  # one worker subprocess
    saved = json.loads(path.read_text())
    assert saved["params"] == {"size": 32, "calib": 8, "eval": 8, "norm": 8}
    assert [(r["model"], r["tool"], r["ok"]) for r in saved["rows"]] == [("lstm", "fx", True)]

    def must_not_run(*args, **kwargs):
        raise AssertionError("a measured model×tool ran again")

    monkeypatch.setattr("tools.bench.coverage.run_model", must_not_run)
    resumed = Results(path, TINY)
    sweep(["lstm"], ["fx"], resumed, timeout=300)
    assert resumed.get("lstm", "fx").ok
    with pytest.raises(SystemExit, match="--size"):
        Results(path, Params(size=64, calib=8, eval=8, norm=8))
    # a file from before --norm (statistics of the calibration samples) is not resumed with separate ones
    path.write_text(json.dumps({"params": {"size": 32, "calib": 8, "eval": 8}, "rows": saved["rows"]}))
    with pytest.raises(SystemExit, match="--norm"):
        Results(path, TINY)


@pytest.mark.parametrize("name", ["resnet18", "r3d_18", "lstm"])
def test_batchnorm_statistics_come_from_samples_neither_calibrated_on_nor_evaluated(name):
    """Statistics of the calibration samples themselves would normalise exactly them: every calibration-fitted
    range or correction would fit samples the model treats unlike any other."""
    case = MODELS[name]
    inputs = make_inputs(case, TINY.size, TINY.calib, TINY.eval, n_norm=8)
    samples = {kind: torch.cat(batches) for kind, batches in
               (("calib", inputs.calib), ("evals", inputs.evals), ("norm", inputs.norm))}
    assert len(samples["norm"]) == len(samples["calib"])  # 8 crops, or 2 clips of 4 crops
    for kind in ("calib", "evals"):
        assert not any(torch.equal(a, b) for a in samples["norm"] for b in samples[kind]), kind


def test_a_tool_past_its_time_limit_is_a_failed_row_and_the_next_gets_a_fresh_worker():
    rows = run_model("lstm", ["fx", "pt2e"], TINY, timeout=0.5)  # importing torch alone takes longer
    assert [(r.tool, r.ok) for r in rows] == [("fx", False), ("pt2e", False)]
    assert all(r.error.startswith("timed out") for r in rows)


def test_report_is_written_between_the_coverage_markers(tiny_rows, tmp_path, monkeypatch):
    results = Results(None, TINY)
    for row in tiny_rows:
        results.add(row)
    results.add(Row("squeezenet1_1", MODELS["squeezenet1_1"].family, "fx", ok=False, total=26, seconds=0.5,
                    error="RuntimeError: boom at /opt/py/lib/python3.11/site-packages/torch/a.py:1"))
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\nkept\n")
    monkeypatch.setattr(common, "BENCHMARKS", target)
    models = ["lstm", "resnet18", "squeezenet1_1"]
    common.write_section("coverage", report(results, models, list(TOOLS)))
    common.write_section("coverage", report(results, models, list(TOOLS)))  # replaces, does not append
    text = target.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    assert text.count("<!-- coverage start -->") == 1 and text.count("<!-- coverage end -->") == 1
    assert f"Machine: {cpu_int8_features()}, torch " in text and "torchao " in text
    assert "**resnet18** (torchvision classification)" in text
    assert "| torch.ao FX | fails |  |  | –/26 | 0.5 | RuntimeError: boom at torch/a.py:1 |" in text  # no local paths
    assert ("Not measured yet (model (tools)): squeezenet1_1 (qpasses-ptq, qpasses-qat, qpasses-ref, "
            "qpasses-ref-pt2e-layers, pt2e).") in text
    ok = sum(r.ok for r in tiny_rows if r.tool == "qpasses-ptq")
    assert f"| qpasses PTQ | 7 | {ok}/2 |" in text


def test_every_timing_line_names_the_cpu_and_its_int8_features():
    line = common.describe_machine(1)
    assert line.startswith(f"{cpu_int8_features()}, torch {torch.__version__}, 1 thread")
    assert not line.endswith("threads") and common.describe_machine(2).endswith(", 2 threads")


def test_the_seed_draws_other_weights_and_is_kept_in_the_row(tmp_path):
    rows = {}
    for seed in (0, 1):
        run_worker("lstm", ["fx"], TINY, tmp_path / f"{seed}.jsonl", seed=seed)
        rows[seed] = Row(**json.loads((tmp_path / f"{seed}.jsonl").read_text()))
    assert rows[0].seed == 0 and rows[1].seed == 1 and rows[0].ok and rows[1].ok
    assert rows[0].sqnr != rows[1].sqnr  # same inputs, other weights


def test_report_over_seeds_gives_mean_standard_error_and_the_paired_difference():
    results = Results(None, TINY)
    family = MODELS["lstm"].family
    for seed, ours, theirs in ((0, 10.0, 11.0), (1, 12.0, 11.5), (2, 14.0, 13.0)):
        results.add(Row("lstm", family, "qpasses-ref", ok=True, sqnr=ours, quantized=1, total=2, seconds=1.0,
                        seed=seed))
        results.add(Row("lstm", family, "pt2e", ok=True, sqnr=theirs, quantized=1, total=2, seconds=1.0, seed=seed))
    text = report(results, ["lstm"], ["qpasses-ref", "pt2e"], seeds=(0, 1, 2))
    assert "### Over seeds 0, 1, 2 (mean ± standard error)" in text
    # ours 10, 12, 14: mean 12, sd 2, se 2/√3; PT2E 11, 11.5, 13: mean 11.833; differences −1, 0.5, 1
    assert "| lstm | 12.000 ± 1.155 | 11.833 ± 0.601 | +0.167 ± 0.601 (2/3 seeds ≥) |" in text
    for seed, ours in ((0, 11.0), (1, 12.0), (2, 13.5)):  # the reference at PT2E's layers: a column of its own
        results.add(Row("lstm", family, "qpasses-ref-pt2e-layers", ok=True, sqnr=ours, quantized=1, total=2,
                        seconds=1.0, seed=seed))
    results.add(Row("lstm", family, "fx", ok=True, sqnr=9.0, quantized=1, total=2, seconds=1.0, seed=0))
    text = report(results, ["lstm"], ["qpasses-ref", "qpasses-ref-pt2e-layers", "fx", "pt2e"], seeds=(0, 1, 2))
    assert "qpasses PTQ → reference − PT2E dB | qpasses reference at PT2E's layers − PT2E dB |" in text
    assert "| 9.0 |" in text and "torch.ao FX SQNR dB" not in text  # measured on the first seed only
    assert "| +0.167 ± 0.601 (2/3 seeds ≥) | +0.333 ± 0.167 (3/3 seeds ≥) |" in text
    assert "| lstm | sequence | no: SQNR 10.0 < 11.0 | yes |" in text
    family = MODELS["resnet18"].family  # where PT2E fails, there are no layers of its to match
    results.add(Row("resnet18", family, "qpasses-ref", ok=True, sqnr=20.0, quantized=21, total=21, seconds=1.0))
    results.add(Row("resnet18", family, "pt2e", ok=False, error="ValueError: boom", total=21, seconds=1.0))
    results.add(Row("resnet18", family, "qpasses-ref-pt2e-layers", ok=False, total=21, seconds=1.0,
                    error="RuntimeError: PT2E fails, so its float layers are unknown (ValueError: boom)"))
    assert "| resnet18 | torchvision classification | yes (PT2E fails) | – (PT2E fails) |" in report(
        results, ["resnet18"], ["qpasses-ref", "qpasses-ref-pt2e-layers", "pt2e"])
    for tool in ("qpasses-ref", "pt2e"):  # outputs equal to the float model's on both sides: no difference
        results.add(Row("vit_b_16", MODELS["vit_b_16"].family, tool, ok=True, sqnr=math.inf, quantized=26, total=50,
                        seconds=1.0, seed=1))
    assert "| vit_b_16 | inf ± nan (1 of 2) | inf ± nan (1 of 2) | both exact |" in report(
        results, ["vit_b_16"], ["qpasses-ref", "pt2e"], seeds=(0, 1))
    assert "no: SQNR 10.0 < 11.0" in text  # the per-model tables are the first seed's
    assert "### Over seeds" not in report(results, ["lstm"], ["qpasses-ref", "pt2e"], seeds=(0,))
