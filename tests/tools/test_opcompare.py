import pytest
import torch
import torch.fx as fx
from torch import nn

from tools.bench.opcompare import count_table, interleaved_latency, node_counts, profile_table, profiled_ops


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Costs(nn.Module):
    """Advances the fake clock by ``seconds`` per call, and records the calls' order."""

    def __init__(self, clock, seconds, name, calls):
        super().__init__()
        self.clock, self.seconds, self.name, self.calls = clock, seconds, name, calls

    def forward(self, x):
        self.clock.now += self.seconds
        self.calls.append(self.name)
        return x


def test_interleaved_latency_alternates_the_models_and_reports_medians_in_ms():
    clock, calls = FakeClock(), []
    models = {"a": Costs(clock, 0.002, "a", calls), "b": Costs(clock, 0.005, "b", calls)}
    medians = interleaved_latency(models, torch.zeros(1), reps=4, clock=clock)
    assert medians == pytest.approx({"a": 2.0, "b": 5.0})
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a", "b"] * 4  # warm-up, then one call of each in turn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        return torch.clamp(self.conv(x), 0, 1).flatten(1).sum(1)


def test_node_counts_and_tables_label_modules_functions_and_methods():
    gm = fx.symbolic_trace(Net())
    counts = node_counts(gm)
    assert counts == {"placeholder": 1, "module Conv2d": 1, "function clamp": 1, "method flatten": 1,
                      "method sum": 1, "output": 1}
    table = count_table({"left": gm, "right": gm})
    assert "| function clamp | 1 | 1 |" in table and "| **all nodes** | 6 | 6 |" in table
    profiles = {"left": {"aten::conv": (2.0, 1.0), "aten::clamp": (0.5, 1.0)}, "right": {"aten::conv": (1.0, 1.0)}}
    rows = profile_table(profiles).splitlines()
    assert rows[2] == "| aten::conv | 2.000 | 1.000 | 1 | 1 |"  # the costliest op first, absent ops as 0
    assert rows[3] == "| aten::clamp | 0.500 | 0.000 | 1 | 0 |"
    assert rows[-1] == "| **all ops** | 2.500 | 1.000 | 2 | 1 |"


def test_profiled_ops_counts_calls_per_forward():
    ops = profiled_ops(fx.symbolic_trace(Net()).eval(), torch.randn(1, 1, 4, 4), iters=3)
    assert ops["aten::clamp"][1] == 1
    assert ops["aten::clamp"][0] >= 0
