import json

import pytest

from qpasses.cpu import OVERRIDE_ENV
from tools.bench.dfq import Results, config_for, selection, setting_label

PARAMS = {"size": 32, "calib": 8, "eval": 8, "iterations": 2}


def setting(label):
    return lambda row: row["setting"] == label


@pytest.mark.parametrize(("backend", "bits", "label"), [
    ("qnnpack", 8, "W8A8 qnnpack (per-tensor)"),
    ("x86", 8, "W8A7 x86 (per-channel)"),  # reduce_range: 7-bit activations
    # 4-bit weights cannot overflow an int16 pair sum; below 8 bits x86 weights are affine
    ("x86", 4, "W4A8 x86 (per-channel, affine)"),
    ("onednn", 4, "W4A8 onednn (per-channel)"),
    ("onednn", 8, "W8A8 onednn (per-channel)"),  # decided for a CPU with VNNI: no kernel adds int16 pairs
])
def test_setting_labels_say_the_activation_bits_the_config_uses(monkeypatch, backend, bits, label):
    monkeypatch.setenv(OVERRIDE_ENV, "vnni")
    assert setting_label(backend, config_for(backend, bits)) == label


def test_rows_of_separate_runs_merge_in_one_file(tmp_path):
    path = tmp_path / "rows.json"
    qnnpack = Results(path, PARAMS, "run qnnpack", setting("W8A8 qnnpack (per-tensor)"), write=False)
    onednn = Results(path, PARAMS, "run onednn", setting("W8A8 onednn (per-channel)"), write=False)
    onednn.add("W8A8 onednn (per-channel)", "PTQ", 1.0, "", (17.0, 0.85))
    qnnpack.add("W8A8 qnnpack (per-tensor)", "PTQ", 1.0, "", (4.0, 0.5))
    qnnpack.add("W8A8 qnnpack (per-tensor)", "+ CLE", 1.0, "", (9.0, 0.6))
    qnnpack.add("W8A8 qnnpack (per-tensor)", "reference", 1.0, "", (0.0, 0.0), reference=True)
    saved = json.loads(path.read_text())
    assert [(r["setting"].split()[1], r["pipeline"]) for r in saved["rows"]] == [
        ("qnnpack", "PTQ"), ("qnnpack", "+ CLE"), ("qnnpack", "reference"), ("onednn", "PTQ")]
    table = qnnpack.table()
    assert "| W8A8 qnnpack (per-tensor) | **best: + CLE** | **9.0** | **60.0%** |" in table
    assert table.index("best: + CLE") < table.index("| reference |") < table.index("onednn")
    # A rerun of one setting replaces its rows and keeps the others.
    Results(path, PARAMS, "rerun", setting("W8A8 qnnpack (per-tensor)"), write=False).add(
        "W8A8 qnnpack (per-tensor)", "PTQ", 1.0, "", (5.0, 0.5))
    rows = json.loads(path.read_text())["rows"]
    assert [(r["pipeline"], r["db"]) for r in rows] == [("PTQ", 5.0), ("PTQ", 17.0)]
    # A run of one pipeline of a setting (--pipelines) replaces that row only.
    def onednn_cle(row):
        return row["setting"] == "W8A8 onednn (per-channel)" and selection(row) == "+ CLE"

    Results(path, PARAMS, "one row", onednn_cle, write=False).add("W8A8 onednn (per-channel)", "+ CLE", 1.0, "",
                                                                  (11.0, 0.7))
    rows = json.loads(path.read_text())["rows"]
    assert [(r["pipeline"], r["db"]) for r in rows] == [("PTQ", 5.0), ("PTQ", 17.0), ("+ CLE", 11.0)]


def test_a_settings_rows_are_tabled_in_pipeline_order_whichever_run_measured_them(tmp_path):
    label = "W4A8 x86 (per-channel, affine)"
    results = Results(tmp_path / "rows.json", PARAMS, "run", setting(label), write=False)
    for pipeline in ("+ AdaRound", "PTQ", "+ CLE"):
        results.add(label, pipeline, 1.0, "", (1.0, 0.5))
    table = results.table()
    assert table.index("| PTQ |") < table.index("| + CLE |") < table.index("| + AdaRound |")


def test_refuses_rows_measured_with_other_settings(tmp_path):
    path = tmp_path / "rows.json"
    Results(path, PARAMS, "run", setting("W8A8 qnnpack (per-tensor)"), write=False).add(
        "W8A8 qnnpack (per-tensor)", "PTQ", 1.0, "", (4.0, 0.5))
    with pytest.raises(SystemExit, match="give another --results file"):
        Results(path, {**PARAMS, "calib": 16}, "run", setting("W8A8 qnnpack (per-tensor)"), write=False)
