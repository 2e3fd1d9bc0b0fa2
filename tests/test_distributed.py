"""Distributed calibration (torchrun, 2 CPU processes, gloo) against one process on the union of the shards:
every observer buffer and qparam, AdaRound's rounded weights, BiasCorrection's biases and the sensitivity
table must be bit-identical on both ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import distributed_worker

ROOT = Path(__file__).resolve().parents[1]


def assert_identical(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "tests.distributed_worker", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    threads = torch.get_num_threads()
    try:
        distributed_worker.main(str(out))
    finally:
        torch.set_num_threads(threads)
    return [torch.load(out / name, weights_only=False) for name in ("single.pt", "0.pt", "1.pt")]


@pytest.mark.parametrize("part", ["batches", "observers", "weight_observer", "ptq_percentile", "ptq_entropy",
                                  "ptq_mse", "adaround", "adaround_rows", "bias_correction", "sensitivity"])
def test_two_ranks_match_one_process_bit_for_bit(runs, part):
    single, rank0, rank1 = runs
    assert_identical(single[part], rank0[part], f"rank 0 {part}")
    assert_identical(single[part], rank1[part], f"rank 1 {part}")


def test_the_comparison_covers_every_observer_kind_and_real_work(runs):
    single = runs[0]
    assert single["batches"] == 5  # num_batches counts the batches of all ranks
    states = single["observers"]
    for kind in distributed_worker.KINDS:
        assert f"watch.{kind}.min_val" in states and int(states[f"watch.{kind}.batches_seen"]) == 5
    assert int(states["shared.batches_seen"]) == 10
    assert states["watch.percentile.histogram"].sum() == 5 * 2 * 4 * 6 * 6
    assert any(key.endswith(".histogram") for key in single["ptq_entropy"])
    assert len(single["sensitivity"]) == 1 + 3


def test_a_failing_batch_stops_every_rank_with_one_line(runs):
    single, rank0, rank1 = (run["failure"] for run in runs)
    assert single.startswith("batch 3: ") and "NaN" in single
    assert rank1 == single  # the rank that ran batch 3 raises its own error
    assert rank0.startswith("calibrating failed on rank 1: batch 3: ")
