import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools.bench.compare import PerSample, main, time_round_robin


def test_per_sample_runs_one_sample_at_a_time_under_inference_mode():
    seen = []

    def fn(x):
        seen.append((tuple(x.shape), torch.is_inference_mode_enabled()))
        return x * 2

    x = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(PerSample(fn)(x), x * 2)
    assert seen == [((1, 4), True)] * 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_growth_counts_memory_allocated_since_the_reset():
    # In a fresh interpreter: in this one, memory freed by earlier tests is reused without raising the peak.
    script = (
        "import torch\n"
        "from tools.bench.compare import peak_growth_mb, reset_peak\n"
        "resident = reset_peak()\n"
        "block = torch.ones(64 * 2**20 // 4)\n"  # 64 MiB, touched
        "float(block.sum())\n"
        "del block\n"
        "print(peak_growth_mb(resident), peak_growth_mb(reset_peak()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    grown, after_reset = (float(v) for v in out[-2:])
    assert grown >= 48
    assert after_reset < 16


def test_unknown_models_and_methods_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        main(["--models", "resnet19"])
    assert "unknown model 'resnet19'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--methods", "float,tensorrt"])
    assert "unknown method 'tensorrt'" in capsys.readouterr().err


def test_rows_are_timed_in_turns_so_drift_reaches_every_row():
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    medians = time_round_robin({"a": Recorder("a"), "b": Recorder("b")}, torch.zeros(1), iters=6, rounds=3)
    assert set(medians) == {"a", "b"} and all(ms >= 0 for ms in medians.values())
    assert calls.count("a") == calls.count("b") == 3 * (2 + 2)  # per round: 2 warm-up and 2 timed calls
    assert calls.index("b") < len(calls) - 1 - calls[::-1].index("a")  # b ran before a's last call
