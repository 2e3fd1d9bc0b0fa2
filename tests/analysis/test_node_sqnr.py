"""Per-node SQNR of a quantized graph against the float graph it came from."""

import copy
import math

import pytest
import torch

from qpasses import PassManager, trace
from qpasses.analysis.node_sqnr import match_nodes, node_sqnr, worst_nodes
from qpasses.passes import PTQ, FuseBN
from tests.nets import TinyUNet, randomize_bn


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 16, 16, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return randomize_bn(TinyUNet()).eval()


@pytest.fixture(scope="module")
def at_8_bits(float_model):
    return quantized(float_model)


def quantized(model, bits=None):
    data = batches()
    pm = PassManager([FuseBN(), PTQ(data, bits=bits, progress=False)], snapshots=True)
    qm = pm.run(model, data[0][:1])
    return pm.snapshots[0][1], qm


def test_identical_graphs_are_infinite_and_a_perturbed_layer_shows_where_it_starts(float_model):
    gm = trace(float_model, batches()[0])
    same = node_sqnr(gm, copy.deepcopy(gm), batches(seed=1)[0])
    computing = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert list(same) == computing and all(v == math.inf for v in same.values())

    changed = copy.deepcopy(gm)
    with torch.no_grad():
        weight = changed.get_submodule("mid.0").weight
        weight.add_(0.05 * torch.randn_like(weight))
    result = node_sqnr(gm, changed, batches(seed=1)[0])
    order = list(result)
    before, after = order[: order.index("mid_0")], order[order.index("mid_0"):]
    assert all(result[name] == math.inf for name in before)
    assert all(math.isfinite(result[name]) for name in after)
    assert {n.name: n.meta["sqnr_db"] for n in changed.graph.nodes if "sqnr_db" in n.meta} == result
    assert worst_nodes(result, k=1)[0][0] in after


def test_lowered_nodes_are_paired_with_the_float_values_they_compute(at_8_bits):
    reference, qm = at_8_bits
    pairs = match_nodes(reference, qm)
    # Fused conv → (folded BN) → ReLU: the int8 conv writes the ReLU's output.
    assert pairs["enc1_0"] == "enc1_2" and pairs["dec1_0"] == "dec1_2"
    # `+` and `torch.cat` became quantized op calls with new names, paired by their inputs.
    adds = [n.name for n in qm.graph.nodes if n.target is torch.ops.quantized.add]
    cats = [n.name for n in qm.graph.nodes if n.target is torch.ops.quantized.cat]
    assert [pairs[a] for a in adds] == ["add"] and [pairs[c] for c in cats] == ["cat"]
    assert pairs["x_quant"] == "x" and pairs["dequantize"] == "head"

    result = node_sqnr(reference, qm, batches(seed=2)[0])
    int8 = [n.name for n in qm.graph.nodes if n.meta.get("qstate") == "int8"]
    assert int8 and set(int8) <= set(result)
    assert all(20 < result[name] < 60 for name in int8)


def test_fewer_bits_lower_every_nodes_sqnr(float_model, at_8_bits):
    x = batches(seed=2)[0]
    reference, q8 = at_8_bits
    _, q4 = quantized(float_model, bits=4)
    at8, at4 = node_sqnr(reference, q8, x), node_sqnr(reference, q4, x)
    common = [name for name in at8 if name in at4 and name != "x_quant"]
    assert len(common) > 5
    assert all(at4[name] < at8[name] - 6 for name in common)


def test_observers_do_not_count_the_comparison_inputs(float_model):
    data = batches()
    pm = PassManager([FuseBN(), PTQ(data, progress=False)], snapshots=True)
    pm.run(float_model, data[0][:1])
    reference, observed = pm.snapshots[0][1], dict(pm.snapshots)["Calibrate"]
    state = {k: v.clone() for k, v in observed.state_dict().items()}
    result = node_sqnr(reference, observed, 100 * batches(seed=3)[0])
    assert result and all(db > 60 for db in result.values())  # observers pass values through; BN folding rounds
    assert all(torch.equal(state[k], v) for k, v in observed.state_dict().items())
