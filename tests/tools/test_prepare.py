import pytest

from tools.bench.prepare import main, table


def test_table_gives_medians_the_ratio_to_fx_and_whether_it_meets_the_target():
    results = {
        ("resnet18", "qpasses"): ([3.0, 9.0, 2.9], ""),  # median 3.0: one disturbed round does not count
        ("resnet18", "fx"): ([2.0, 1.9, 2.1], ""),
        ("resnet18", "pt2e"): ([0.5], "ValueError: Input partition has more than one output node"),
        ("tf_efficientnet_lite0", "qpasses"): ([4.0], ""),
        ("tf_efficientnet_lite0", "fx"): ([2.0], ""),
        ("tf_efficientnet_lite0", "pt2e"): ([5.0], ""),
    }
    lines = table(["resnet18", "tf_efficientnet_lite0"], ["qpasses", "fx", "pt2e"], results).splitlines()
    assert lines[0] == "| model | qpasses PTQ s | torch.ao FX s | torchao PT2E s | qpasses / FX | within 1.5× |"
    assert lines[2] == "| resnet18 | 3.00 | 2.00 | fails: ValueError: Input partition has more than one output node " \
                       "| 1.50 | yes |"
    assert lines[3] == "| tf_efficientnet_lite0 | 4.00 | 2.00 (efficientnet_lite0) | 5.00 | 2.00 | no |"


def test_table_leaves_the_ratio_empty_when_a_side_failed():
    results = {("resnet18", "qpasses"): ([3.0], ""), ("resnet18", "fx"): ([1.0], "RuntimeError: boom")}
    assert table(["resnet18"], ["qpasses", "fx"], results).splitlines()[2] == \
        "| resnet18 | 3.00 | fails: RuntimeError: boom |  |  |"


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet19"], "unknown model 'resnet19'"),
    (["--tools", "onnx"], "unknown tool 'onnx'"),
    (["--batches", "0"], "at least 1"),
])
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


