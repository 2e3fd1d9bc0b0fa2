import itertools
import random

import pytest
import torch
from torch import nn

from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.analysis.sensitivity import Sensitivity, _solve_knapsack
from qpasses.errors import PassError
from qpasses.passes import PTQ, FuseBN, MixedPrecision
from qpasses.quant.backends import get_backend


class Widening(nn.Module):
    """Layers of very different sizes, so that where the bits go matters."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 32, 3, padding=1)
        self.wide = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.body(x))
        x = torch.relu(self.wide(x))
        return self.fc(x.mean((2, 3)))


def batches(n=3, shape=(4, 3, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def config():
    config = get_backend("x86").default_config()
    config.activation = config.activation.replace(observer="minmax")  # fast; the choice logic is the same
    return config


def weight_code_bits(qmodel):
    """Per lowered conv/linear: its weight element count and the signed bits its integer codes use."""
    found = {}
    for name, module in qmodel.named_modules():
        if callable(getattr(module, "weight", None)):  # quantized conv/linear unpack their weight
            codes = module.weight().int_repr()
            bits = max(int(codes.max()).bit_length(), int(-codes.min() - 1).bit_length()) + 1
            found[name] = (codes.numel(), bits)
    return found


def test_mixed_precision_pass_meets_the_budget_and_beats_uniform_4_bit():
    torch.manual_seed(0)
    model = Widening().eval()
    data = batches()
    mixed = MixedPrecision(0.6, bits=(4, 8), progress=False)
    pm = PassManager([FuseBN(), mixed, PTQ(data, config=config(), progress=False)])
    qmodel = pm.run(model, data[0])
    plan = mixed.plan
    eight_bit = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert plan.eight_bit_bytes == eight_bit and plan.budget_bytes == int(0.6 * eight_bit)
    assert plan.weight_bytes <= plan.budget_bytes
    assert set(plan.bits.values()) == {4, 8}  # the budget is above uniform 4-bit: some layers keep 8
    lowered = weight_code_bits(qmodel)  # the lowered codes really are that narrow
    assert all(lowered[name][1] <= bits for name, bits in plan.bits.items())
    assert sum(-(-numel * bits // 8) for numel, bits in lowered.values()) <= plan.budget_bytes
    with torch.no_grad():
        measured = sqnr(torch.cat([model(b) for b in data]), torch.cat([qmodel(b) for b in data]))
    assert measured == pytest.approx(plan.metric, abs=1e-9)  # PTQ applied exactly the measured choice
    assert plan.metric > plan.uniform_metric + 1.0
    record = next(r for r in pm.report.records if r.name == "MixedPrecision")
    assert record.stats["layers_4bit"] + record.stats["layers_8bit"] == 4
    assert any("uniform 4-bit" in note for note in record.notes)


def test_mixed_precision_is_ordered_before_observer_insertion():
    data = batches(1)
    pm = PassManager([FuseBN(), PTQ(data, progress=False), MixedPrecision(0.6)])
    names = [p.name for p in pm.plan().passes]
    assert names.index("MixedPrecision") < names.index("InsertObservers")


def test_mixed_precision_without_ptq_is_refused():
    with pytest.raises(PassError, match="add PTQ"):
        PassManager([FuseBN(), MixedPrecision(0.6, data=batches(1))]).run(Widening().eval(), batches(1)[0])


def test_a_byte_budget_and_three_widths():
    torch.manual_seed(1)
    model = Widening().eval()
    sens = Sensitivity(model, batches(2), config=config(), progress=False)
    budget = sum(layer.weight_bytes(6) for layer in sens.layers)
    plan = sens.choose_weight_bits(budget, bits=(4, 6, 8))
    assert plan.weight_bytes <= budget and plan.budget_bytes == budget
    assert {k for k in plan.losses} == {(layer.name, b) for layer in sens.layers for b in (4, 6)}


def test_knapsack_finds_the_optimum():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 5)
        sizes = [sorted(rng.sample(range(1, 60), 3)) for _ in range(n)]
        costs = [sorted((rng.random() for _ in range(3)), reverse=True) for _ in range(n)]
        capacity = rng.randint(sum(s[0] for s in sizes), sum(s[-1] for s in sizes))
        feasible = [c for c in itertools.product(range(3), repeat=n)
                    if sum(sizes[i][o] for i, o in enumerate(c)) <= capacity]
        best = min(sum(costs[i][o] for i, o in enumerate(c)) for c in feasible)
        choice = _solve_knapsack(sizes, costs, capacity)
        assert sum(sizes[i][o] for i, o in enumerate(choice)) <= capacity
        assert sum(costs[i][o] for i, o in enumerate(choice)) == pytest.approx(best)
