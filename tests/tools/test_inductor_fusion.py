import pytest
import torch
from torch import nn

from tools.bench.inductor_fusion import kernel_table, onednn_primitive_runs


def test_kernel_table_sums_each_problem_per_runner_then_all_primitives_and_the_rest_of_the_call():
    runs = {"fx": [("convolution A", "brg", 1.0), ("convolution A", "brg", 0.5), ("convolution B", "jit", 0.25)],
            "ind": [("convolution A", "brg", 1.25), ("matmul M", "brg_matmul", 0.25)]}
    table = kernel_table("m", ["fx", "ind", "failed"], runs, {"fx": 2.0, "ind": 2.0})
    assert table == [
        ["m", "convolution A", "2× 1.500 (brg)", "1× 1.250 (brg)", ""],
        ["m", "convolution B", "1× 0.250 (jit)", "", ""],
        ["m", "matmul M", "", "1× 0.250 (brg_matmul)", ""],
        ["m", "**all oneDNN primitives**", "1.75", "1.50", ""],
        ["m", "**rest of the call** (call − primitives)", "0.25", "0.50", ""],
    ]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs torch built with oneDNN")
def test_onednn_primitive_runs_reads_each_runners_primitives_from_onednns_log():
    # float convs this wide run on oneDNN; the two runners differ in their output channels
    narrow, wide = nn.Conv2d(64, 8, 3, padding=1).eval(), nn.Conv2d(64, 16, 3, padding=1).eval()
    runs = onednn_primitive_runs({"narrow": narrow, "wide": wide}, torch.rand(1, 64, 56, 56), threads=1, calls=3)
    convs = {key: [problem for problem, _, _ in found if problem.startswith("convolution ")] for key, found in runs.items()}
    assert len(convs["narrow"]) == len(convs["wide"]) == 1
    assert "oc8_" in convs["narrow"][0] and "oc16_" in convs["wide"][0]
    assert all(ms > 0 for found in runs.values() for _, _, ms in found)
