"""The torchrun recipe: ``resnet_ddp --quick`` on 2 CPU processes (gloo), and the replica fingerprint it
compares between them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from qpasses import PassManager
from qpasses.passes import PTQ, FuseBN
from qpasses_zoo.recipes.resnet import COLUMNS
from qpasses_zoo.recipes.resnet_ddp import fingerprint
from tests.nets import conv_bn_act, randomize_bn

ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_write_one_table_from_identical_replicas(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "qpasses_zoo.recipes", "resnet_ddp", "--quick", "--out", str(out),
               "--cache", str(tmp_path / "cache"), "--no-progress", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone writes
    document = json.loads((out / "resnet_ddp.json").read_text())
    rows = {r["variant"]: r for r in document["rows"]}
    assert set(rows) == {"float", "static int8 PTQ (x86)", "QAT int8 (x86)"}
    assert not [r for r in rows.values() if "error" in r]
    for row in rows.values():
        assert 0 <= row["top1"] <= row["top5"] <= 100 and row["latency_ms"] > 0
    # The resnet recipe's table.
    assert "| " + " | ".join(c.header for c in COLUMNS) + " |" in (out / "resnet_ddp.md").read_text()
    # Both processes ended with the same float, PTQ and QAT models (int8 codes, scales, zero points).
    first, second = document["meta"]["replica_fingerprints"]
    assert first == second and set(first) == set(rows)
    assert first["QAT int8 (x86)"]["entries"] > 20 and first["static int8 PTQ (x86)"]["entries"] > 20
    # The float model trained once, as a 2-process run (its own cache entry), and so did the QAT model.
    assert len(list((tmp_path / "cache").glob("cifar_resnet18-*-epoch001.pt"))) == 1
    assert len(list((tmp_path / "cache").glob("qat-*-epoch001.pt"))) == 1


def test_fingerprint_sees_one_int8_code_and_one_statistic():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(conv_bn_act(3, 8), nn.Conv2d(8, 4, 1))).eval()
    x = torch.randn(2, 3, 8, 8)
    quantized = PassManager([FuseBN(), PTQ([x])]).run(model, x)
    assert fingerprint(quantized) == fingerprint(PassManager([FuseBN(), PTQ([x])]).run(model, x))
    conv = next(m for m in quantized.modules() if hasattr(m, "weight") and callable(m.weight))
    weight = conv.weight()
    codes = weight.int_repr().clone()
    codes.view(-1)[0] += 1 if codes.view(-1)[0] < 127 else -1
    changed = torch._make_per_channel_quantized_tensor(codes, weight.q_per_channel_scales(),
                                                       weight.q_per_channel_zero_points(), weight.q_per_channel_axis())
    before = fingerprint(quantized)
    conv.set_weight_bias(changed, conv.bias())
    assert fingerprint(quantized) != before
    float_before = fingerprint(model)
    model[0][1].running_mean[0] += 1e-6
    assert fingerprint(model) != float_before
