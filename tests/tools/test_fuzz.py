import json

import pytest

from tests.fuzz.random_graphs import INTERNAL, SKIPPED, Outcome
from tools.fuzz import Summary, main, signature


def test_signature_groups_errors_that_differ_only_in_names_numbers_and_positions():
    a = Outcome("ptq_qnnpack", INTERNAL, "PassError: Lower (pass 4 of 4, after FuseBN): internal error KeyError: "
                                         "'add_3' at 12; reproducer written to /tmp/x")
    b = Outcome("ptq_qnnpack", INTERNAL, "PassError: Lower (pass 3 of 3, after Calibrate): internal error KeyError: "
                                         "'add' at 7")
    assert signature(a) == signature(b) == "internal error: PassError: Lower : internal error KeyError: '…' at N"
    assert signature(Outcome("qat_x86", "quantized SQNR below floor", "3.0 dB")) == "quantized SQNR below floor"


def test_summary_keeps_the_smallest_reproducer_per_class():
    from tests.fuzz.random_graphs import Op, Spec

    conv = Op("conv", (0,), (("bias", True), ("cout", 4), ("groups", 1), ("k", 1), ("stride", 1)))
    big, small = Spec(3, 8, False, (conv, conv), (2,)), Spec(3, 8, False, (conv,), (1,))
    summary = Summary(seed=0)
    for graph, spec in enumerate((big, small, big)):
        summary.add(graph, spec, [Outcome("qat_x86", SKIPPED, "cat")])
    ((key, cls),) = summary.classes.items()
    assert key == ("qat_x86", "skipped (known open): cat") and cls.count == 3 and cls.graph == 1


def test_main_runs_and_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "fuzz.json"
    main(["--minutes", "0.001", "--seed", "3", "--pipelines", "fusebn", "--json", str(out)])
    table = capsys.readouterr().out
    assert "| fusebn |" in table and "| capture |" in table
    result = json.loads(out.read_text())
    assert result["graphs"] >= 1 and result["counts"]["fusebn"]


def test_main_refuses_an_unknown_pipeline():
    with pytest.raises(SystemExit):
        main(["--minutes", "0.001", "--pipelines", "ptq_arm"])
