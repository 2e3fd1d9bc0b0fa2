"""The qpasses command line, called as ``main(argv)`` (and once as a real process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

import qpasses
import qpasses.cli.quantize
import qpasses.cli.viz
from qpasses.analysis.metrics import sqnr
from qpasses.cli import main
from qpasses.passes.registry import PASSES
from qpasses.quant.lowering import quantized_engine
from tests.cli.models import tiny_unet

ROOT = Path(__file__).resolve().parents[2]
TINY = "tests.cli.models:tiny_unet"
SMALL = ["--input-size", "16", "--num-batches", "2", "--batch-size", "2"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_of_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("quantize", "viz", "list", "recipe", "sensitivity", "bench"):
        assert command in out
    code, out, _ = run(capsys, "quantize", "--help")
    assert code == 0 and "module:factory" in out and all(name in out for name in PASSES)
    code, out, _ = run(capsys, "viz", "--help")
    assert code == 0 and "--diff PASS" in out and "--heat" in out


def test_list_sections_and_json(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for line in ("models:", "  resnet18", "passes:", "  fusebn", "backends:", "  qnnpack", "benchmarks:", "  ptq"):
        assert line in out
    code, out, _ = run(capsys, "list", "passes", "--json")
    assert code == 0 and set(json.loads(out)["passes"]) == set(PASSES)


@pytest.fixture(scope="module")
def saved_qnnpack(tmp_path_factory):
    """``qpasses quantize`` of the tiny U-Net for qnnpack, as JSON, saved to a file."""
    out_path = tmp_path_factory.mktemp("cli") / "tiny_int8.pt"
    code = main(["quantize", TINY, "--passes", "fusebn,ptq", "--backend", "qnnpack", *SMALL,
                 "--out", str(out_path), "--json"])
    return code, out_path


def test_quantize_json_and_the_saved_model_runs(saved_qnnpack, capsys):
    code, out_path = saved_qnnpack
    assert code == 0
    model = qpasses.load(out_path)
    assert isinstance(model, fx.GraphModule)
    float_model = tiny_unet()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with quantized_engine("x86"):  # the saved model must select qnnpack itself
        assert sqnr(float_model(x), model(x)) > 15
        assert torch.backends.quantized.engine == "qnnpack"


def test_quantize_json_summary(tmp_path, capsys):
    code, out, err = run(capsys, "quantize", TINY, "--bits", "6", *SMALL, "--eval", "1", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["plan"] == ["FuseBN", "ReplaceFunctional", "InsertObservers", "Calibrate", "Lower"]
    assert summary["bits"] == 6 and summary["input_shape"] == [1, 3, 16, 16] and summary["out"] is None
    assert [p["name"] for p in summary["passes"]] == ["trace", *summary["plan"]]
    assert summary["passes"][-1]["stats"]["int8_conv2d"] == 5
    assert isinstance(summary["sqnr_db_on_example"], float) and summary["sqnr_db_on_example"] > 10
    assert "[1/5]" not in err  # no progress lines with --json
    held_out = summary["eval"]
    assert held_out["images"] == 2 and held_out["top1_agreement"] is None  # a U-Net: no classes
    assert 5 < held_out["sqnr_db"] < 60


@pytest.mark.parametrize("flag", [[], ["--quantize-output"]])
def test_quantize_output_flag_rounds_the_logits(capsys, flag):
    code, out, _ = run(capsys, "quantize", "tests.cli.models:tiny_classifier", *SMALL, *flag, "--json")
    assert code == 0
    stats = json.loads(out)["passes"][-1]["stats"]
    assert (stats.get("int8_linear", 0), stats.get("float_output_linear", 0)) == ((1, 0) if flag else (0, 1))


def test_quantize_calibrates_on_an_image_folder(tmp_path, capsys):
    from tests.zoo.test_zoo_data_folder import write_images

    write_images(tmp_path)
    code, out, _ = run(capsys, "quantize", TINY, "--calib", str(tmp_path), "--input-size", "16",
                       "--batch-size", "2", "--json")
    assert code == 0
    calibrate = next(p for p in json.loads(out)["passes"] if p["name"] == "Calibrate")
    assert calibrate["stats"]["batches"] == 2  # three images in batches of two


def test_quantize_prints_plan_progress_and_report(capsys):
    code, out, err = run(capsys, "quantize", TINY, "--passes", "fusebn", "--input-size", "16", "--eval", "1")
    assert code == 0
    assert "held-out (8 photo crops never calibrated on): SQNR " in out
    assert out.startswith("plan: FuseBN") and "FuseBN" in out.splitlines()[-1] + out and "SQNR dB" in out
    assert "[1/1] FuseBN ..." in err and "[1/1] FuseBN done" in err


def test_viz_pipeline_with_diff_and_heat(tmp_path, capsys):
    out_path = tmp_path / "tiny.html"
    code, out, _ = run(capsys, "viz", TINY, "--passes", "fusebn,ptq", *SMALL, "--diff", "fusebn", "--heat",
                       "--out", str(out_path), "--json")
    assert code == 0
    summary = json.loads(out)
    graphs = summary["graphs"]  # PTQ's measured recipe for its setting may add passes between these
    assert graphs[:5] == ["traced", "FuseBN", "ReplaceFunctional", "InsertObservers", "Calibrate"]
    assert graphs[-1] == "Lower"
    assert summary["diff"] == "FuseBN"
    page = out_path.read_text()
    assert "SQNR" in page and "enc1_0" in page


def test_viz_of_a_saved_model(saved_qnnpack, tmp_path, capsys):
    _, saved = saved_qnnpack
    code, out, _ = run(capsys, "viz", str(saved), "--input-size", "16", "--out", str(tmp_path / "g.dot"))
    assert code == 0, out
    dot = (tmp_path / "g.dot").read_text()
    assert "quantized_engine" in dot and "1×1×16×16" in dot
    code, _, err = run(capsys, "viz", str(saved), "--heat", "--out", str(tmp_path / "h.html"))
    assert_one_line_error(code, err, "--heat", "give the MODEL")


@pytest.mark.parametrize("argv, fragments", [
    (["quantize", "no_such_model"], ["unknown model 'no_such_model'", "resnet18"]),
    (["quantize", TINY, "--passes", "fusebn,bogus"], ["unknown pass 'bogus'", "fusebn"]),
    (["quantize", TINY, "--calib", "/no/such/folder"], ["--calib /no/such/folder", "no such folder"]),
    (["quantize", TINY, "--bits", "9"], ["--bits", "invalid choice"]),
    (["quantize", TINY, "--backend", "tpu"], ["--backend", "invalid choice"]),
    (["quantize", TINY, "--passes", "dynamic", "--bits", "4"], ["'dynamic' quantizes to 8 bits only"]),
    (["quantize", "no_such_module:make"], ["cannot import 'no_such_module'"]),
    (["quantize", "tests.cli.models:nothing_here"], ["has no callable 'nothing_here'"]),
    (["quantize", TINY, "--out", "/no/such/dir/m.pt"], ["folder '/no/such/dir' does not exist"]),
    (["viz", TINY, "--passes", "fusebn", "--diff", "lower", "--out", "g.html", "--input-size", "16"],
     ["--diff lower", "choose one of: FuseBN"]),
    (["viz", TINY, "--out", "graph.png"], ["--out graph.png", "end it in .html, .svg or .dot"]),
    (["viz", TINY, "--diff", "fusebn", "--out", "g.html"], ["--diff PASS needs --passes"]),
    (["quantize", "tests.cli.models:linear", *SMALL], ["fails on a 1×3×16×16 image batch", "--input-size"]),
    (["viz", "tests.cli.models:linear", "--out", "g.html"], ["fails on a 1×3×224×224 image batch"]),
    (["quantize", "tests.cli.models:half_unet", *SMALL], ["model 'tests.cli.models:half_unet'", "torch.float16",
                                                          "model.float()"]),
    (["bench", "nonexistent"], ["unknown benchmark 'nonexistent'", "ptq"]),
])
def test_bad_input_is_one_line_and_non_zero(capsys, tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, *fragments)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write to: chmod 555, or for root (whom modes do not stop) a read-only mount."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if not os.access(folder, os.W_OK):
            yield folder
        elif os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
            yield Path("/proc/sys")
        else:
            pytest.skip("no folder this process cannot write to")
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("command", ["quantize", "viz"])
@pytest.mark.parametrize("where", ["folder", "read_only"])
def test_unwritable_out_fails_in_one_line_before_the_model_loads(capsys, monkeypatch, tmp_path, read_only_dir,
                                                                   command, where):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(qpasses.cli.quantize, "load_model", never)
    monkeypatch.setattr(qpasses.cli.viz, "load_model", never)
    name = "g.html" if command == "viz" else "m.pt"
    if where == "folder":
        out = tmp_path / name
        out.mkdir()
    else:
        out = read_only_dir / name
    before = sorted(tmp_path.rglob("*"))
    code, _, err = run(capsys, command, TINY, *SMALL, "--out", str(out))
    assert_one_line_error(code, err, f"--out {out}", "is a folder" if where == "folder" else "read-only")
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_viz_of_a_file_that_holds_no_model(capsys, tmp_path):
    torch.save({"weight": torch.ones(2)}, tmp_path / "state.pt")
    code, _, err = run(capsys, "viz", str(tmp_path / "state.pt"), "--out", str(tmp_path / "g.html"))
    assert_one_line_error(code, err, "state.pt holds a dict, not a model")


def test_forwarded_commands(capsys, monkeypatch):
    code, out, _ = run(capsys, "bench", "ptq", "--help")
    assert code == 0 and "PTQ benchmark" in out and "--quick" in out
    code, out, _ = run(capsys, "bench")
    assert code == 0 and "ptq" in out
    import qpasses.cli.recipe

    monkeypatch.setattr(qpasses.cli.recipe, "MODULE", "qpasses_zoo.no_such_recipes")
    code, _, err = run(capsys, "recipe", "lite0")
    assert_one_line_error(code, err, "'qpasses recipe' needs qpasses_zoo.no_such_recipes")


@pytest.mark.parametrize("argv", [["bench"], ["bench", "ptq", "--quick"]])
def test_bench_without_tools_points_at_a_source_checkout(capsys, monkeypatch, argv):
    import qpasses.cli.bench

    monkeypatch.setattr(qpasses.cli.bench, "PACKAGE", "tools.no_such_bench")  # as in an installed wheel
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "source checkout", "python -m tools.bench.NAME")


def test_a_real_process():
    def qpasses(*argv):
        env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, "-m", "qpasses", *argv], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=300)

    done = qpasses("quantize", "no_such_model")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("qpasses: error: unknown model")
    done = qpasses("list", "backends")
    assert done.returncode == 0 and "x86" in done.stdout


def test_quantize_to_a_target_sqnr(capsys):
    code, out, _ = run(capsys, "quantize", TINY, *SMALL, "--target-sqnr", "5", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["plan"] == ["FuseBN", "ReplaceFunctional", "TargetPTQ"]
    search = summary["passes"][-1]
    assert search["notes"][0].startswith("step 1: PTQ") and "met by step" in search["notes"][-1]
