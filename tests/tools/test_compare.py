import sys

import pytest
import torch

from tools.bench.compare import PerSample, inference_peak_mb, main


def test_per_sample_runs_one_sample_at_a_time_under_inference_mode():
    seen = []

    def fn(x):
        seen.append((tuple(x.shape), torch.is_inference_mode_enabled()))
        return x * 2

    x = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(PerSample(fn)(x), x * 2)
    assert seen == [((1, 4), True)] * 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_inference_peak_counts_memory_allocated_while_running():
    def allocate():
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return float(block.sum())

    peak = inference_peak_mb(allocate)
    assert peak is not None and peak >= 48
    assert inference_peak_mb(lambda: None) < 16


def test_unknown_models_and_methods_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        main(["--models", "resnet19"])
    assert "unknown model 'resnet19'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--methods", "float,tensorrt"])
    assert "unknown method 'tensorrt'" in capsys.readouterr().err
