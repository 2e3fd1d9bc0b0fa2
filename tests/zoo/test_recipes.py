"""The recipes: every ``--quick`` run end to end, the checkpoint cache, the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from qpasses_zoo.recipes import main
from qpasses_zoo.recipes.common import RecipeError, Settings, TrainConfig, checkpoint_path, train

ROOT = Path(__file__).resolve().parents[2]


def run_quick(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / name
    status = main([name, "--quick", "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-progress",
                   "--threads", "1", *extra])
    assert status == 0
    for suffix in ("md", "json", "png"):
        assert (out / f"{name}.{suffix}").stat().st_size > 0
    document = json.loads((out / f"{name}.json").read_text())
    assert document["quick"] is True
    failed = [(r["variant"], r["error"]) for r in document["rows"] if "error" in r]
    assert not failed
    table = (out / f"{name}.md").read_text()
    assert all(r["variant"] in table for r in document["rows"])
    return document


def by_variant(rows: list[dict], **match) -> dict[str, dict]:
    return {r["variant"]: r for r in rows if all(r.get(k) == v for k, v in match.items())}


def test_resnet_quick(tmp_path):
    rows = by_variant(run_quick("resnet", tmp_path)["rows"], model="cifar_resnet18")
    float_row, ptq, qat = rows["float"], rows["static int8 PTQ (x86)"], rows["QAT int8 (x86)"]
    eager = ("float", "dynamic fp16", "dynamic int8", "static int8 PTQ (x86)", "QAT int8 (x86)")
    assert set(rows) == {*eager, *(f"{v} (TorchScript)" for v in eager)}
    for int8 in (ptq, qat):
        assert int8["size_mb"] < float_row["size_mb"] / 3  # int8 weights: a quarter of float32, plus qparams
    for row in rows.values():
        assert 0 <= row["top1"] <= row["top5"] <= 100
        assert row["latency_ms"] > 0 and row["peak_mb"] > 0
    # TorchScript runs the same computation: same predictions as the eager module.
    assert rows["float (TorchScript)"]["top1"] == float_row["top1"]
    assert rows["static int8 PTQ (x86) (TorchScript)"]["top1"] == ptq["top1"]
    assert rows["QAT int8 (x86) (TorchScript)"]["top1"] == qat["top1"]


def test_bits_quick_sizes_shrink_with_bits(tmp_path):
    rows = by_variant(run_quick("bits", tmp_path)["rows"])
    methods = ("PTQ", "PTQ+BiasCorrection", "PTQ+AdaRound", "QAT")
    assert set(rows) == {"float", *(f"{m} {b}-bit" for m in methods for b in (8, 7, 6, 5, 4))}
    for method in methods:
        sizes = [rows[f"{method} {b}-bit"]["size_mb"] for b in (8, 7, 6, 5, 4)]
        assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 0.6 * sizes[0]
        assert rows["float"]["size_mb"] > 3 * sizes[0]
    for row in rows.values():
        assert 0 <= row["top1"] <= row["top5"] <= 100 and math.isfinite(row["latency_ms"])
    # AdaRound keeps every weight on its n-bit grid: the packed size is plain PTQ's.
    for b in (8, 4):
        assert rows[f"PTQ+AdaRound {b}-bit"]["size_mb"] == rows[f"PTQ {b}-bit"]["size_mb"]


def test_calibration_quick(tmp_path):
    rows = by_variant(run_quick("calibration", tmp_path)["rows"])
    hybrids = {f"hybrid PTQ, {k} most sensitive layers float": k for k in (1, 3)}
    assert set(rows) == {"float", *(f"PTQ, {m} calibration" for m in ("max", "percentile", "entropy", "MSE")),
                         "PTQ, MSE calibration + AdaRound", *hybrids}
    adaround = rows["PTQ, MSE calibration + AdaRound"]
    assert math.isfinite(adaround["sqnr_db"]) and 0 <= adaround["top1"] <= adaround["top5"] <= 100
    for label, k in hybrids.items():
        assert len(rows[label]["float_layers"].split(", ")) == k
    assert rows["float"]["top1"] == 100.0  # agreement of the float model with itself
    assert rows["PTQ, max calibration"]["top5"] > 50  # the pretrained model survives int8


def test_depth_quick(tmp_path):
    document = run_quick("depth", tmp_path)
    rows = document["rows"]
    # Original, FuseBN, FuseBN+CLE; then {PTQ, QAT, PTQ+QAT} × {-, FuseBN, FuseBN+CLE} and
    # FuseBN+CLE+PTQ+BiasCorrection, for x86 per-channel and qnnpack per-tensor (--quick; the full run has
    # both granularities for both backends)
    assert len(rows) == 3 + 10 * 2
    assert {(r.get("backend"), r.get("weights")) for r in rows[3:]} == {("x86", "per-channel"),
                                                                        ("qnnpack", "per-tensor")}
    original = rows[0]
    for row in rows[1:3]:
        assert row["mse"] == pytest.approx(original["mse"], rel=1e-3)  # float rewrites preserve the function
    labels = {r["variant"] for r in rows}
    assert {"FuseBN+CLE", "FuseBN+CLE+PTQ+QAT", "PTQ+QAT", "QAT", "FuseBN+CLE+PTQ+BiasCorrection"} <= labels
    # CLE really runs: the notes list the links it equalized (the encoder's SiLU blocks leave it a few).
    assert int(document["meta"]["CLE"].split(" ")[0]) >= 1
    for backend in ("x86", "qnnpack"):
        corrected = by_variant(rows, backend=backend)["FuseBN+CLE+PTQ+BiasCorrection"]
        assert math.isfinite(corrected["mse"]) and math.isfinite(corrected["ssim"])
    for row in rows:
        assert row["ssim"] <= 1.0 and row["mse"] >= 0
        if "backend" in row:
            assert row["size_mb"] < original["size_mb"]


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x)


def _tiny_training(tmp_path: Path, epochs: int = 3):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 4, generator=g), torch.randn(24, 2, generator=g))
    settings = Settings("test", cache=tmp_path, show_progress=False)
    return data, settings, TrainConfig(epochs=epochs, lr=1e-2, batch_size=8)


def test_training_resumes_from_the_last_epoch_and_matches_an_uninterrupted_run(tmp_path):
    data, settings, config = _tiny_training(tmp_path / "a")
    torch.manual_seed(0)
    straight = Counting()
    train(straight, "tiny", data, nn.functional.mse_loss, config, "random", settings)

    calls = {"n": 0}

    def interrupted_loss(out, target):
        calls["n"] += 1
        if calls["n"] > 3 + 1:  # 3 batches an epoch: dies during epoch 2
            raise KeyboardInterrupt
        return nn.functional.mse_loss(out, target)

    resumed_settings = Settings("test", cache=tmp_path / "b", show_progress=False)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train(Counting(), "tiny", data, interrupted_loss, config, "random", resumed_settings)
    key = {"model": "tiny", "data": "random", **config.__dict__}
    assert checkpoint_path(tmp_path / "b", "tiny", key, 1).is_file()

    torch.manual_seed(0)
    resumed = Counting()
    record = train(resumed, "tiny", data, nn.functional.mse_loss, config, "random", resumed_settings)
    assert record["resumed_from"] == 1 and len(record["losses"]) == 3
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict())
    # One file per configuration is kept: the last epoch's.
    assert [p.name for p in (tmp_path / "b").iterdir()] == [checkpoint_path(tmp_path / "b", "tiny", key, 3).name]


def test_finished_checkpoint_is_reused_and_other_configs_get_their_own(tmp_path):
    data, settings, config = _tiny_training(tmp_path, epochs=1)
    first = Counting()
    train(first, "tiny", data, nn.functional.mse_loss, config, "random", settings)
    again = Counting()
    record = train(again, "tiny", data, nn.functional.mse_loss, config, "random", settings)
    assert record["resumed_from"] == 1
    torch.testing.assert_close(again.state_dict(), first.state_dict())
    train(Counting(), "tiny", data, nn.functional.mse_loss, TrainConfig(epochs=1, lr=1e-3, batch_size=8),
          "random", settings)
    assert len(list(tmp_path.iterdir())) == 2


def test_unreadable_checkpoint_says_to_delete_it(tmp_path):
    data, settings, config = _tiny_training(tmp_path, epochs=1)
    key = {"model": "tiny", "data": "random", **config.__dict__}
    checkpoint_path(tmp_path, "tiny", key, 1).write_bytes(b"not a checkpoint")
    with pytest.raises(RecipeError, match="delete it to retrain"):
        train(Counting(), "tiny", data, nn.functional.mse_loss, config, "random", settings)


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["bits", "--quick", "--model", "resnet18", "--out", str(tmp_path)]) == 2
    assert "studies cifar_resnet18, cifar_resnet50; not resnet18" in capsys.readouterr().out


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--epochs", "0", "--epochs must be at least 1"),
    ("--adaround-iterations", "0", "--adaround-iterations must be at least 1"),
    ("--bits", "9", "--bits must be between 2 and 8, got 9"),
])
def test_bad_arguments_exit_with_usage(capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["resnet", option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_lists_the_recipes():
    result = subprocess.run([sys.executable, "-m", "qpasses_zoo.recipes", "--help"], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    for name in ("resnet", "bits", "calibration", "depth"):
        assert name in result.stdout
