"""Graphs that once quantized silently wrong or crashed with a misleading message (issue 20): each one is
quantized and compared with the float eager model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.passes import PTQ

BACKENDS = ["x86", "qnnpack"]
SHAPE = (2, 3, 8, 8)


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*SHAPE, generator=g) for _ in range(n)]


def quantized_sqnr(model, backend, passes=()):
    """SQNR (dB) of ``model`` quantized by PTQ on ``backend`` against the float eager model, on unseen data."""
    data = batches()
    qm = PassManager([*passes, PTQ(data, backend=backend, progress=False)]).run(model, data[0])
    x = batches(seed=5)[0]
    with torch.no_grad():
        return sqnr(model(x), qm(x))


class CatOfActivatedConv(nn.Module):
    """``cat([act(conv_a(x)), conv_b(x)])``: the activation's grid cannot be the cat's (which spans negatives)."""

    def __init__(self, act):
        super().__init__()
        self.a, self.b, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), act

    def forward(self, x):
        return torch.cat([self.act(self.a(x)), self.b(x)], 1)


class CatOfReluOfCat(nn.Module):
    def forward(self, x):
        return torch.cat([F.relu(torch.cat([x, x], 1)), x], 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", [CatOfActivatedConv(nn.ReLU()), CatOfActivatedConv(nn.ReLU6()), CatOfReluOfCat()],
                         ids=["relu", "relu6", "relu_of_cat"])
def test_a_folded_activation_under_cat_keeps_its_bounds(backend, model):
    torch.manual_seed(0)
    model.eval()
    assert quantized_sqnr(model, backend) > 25  # was 4.9 dB: the ReLU was dropped on the cat's grid


class CatOfReluConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)


def test_activations_with_the_same_bounds_still_share_the_cat_observer():
    torch.manual_seed(0)
    data = batches()
    pm = PassManager([PTQ(data, backend="x86", progress=False)])
    pm.run(CatOfReluConvs().eval(), data[0])
    observed = next(r for r in pm.report.records if r.name == "InsertObservers")
    assert observed.stats["observers"] == 2  # the input's and the cat's: both ReLU outputs write at the cat's grid


class NestedCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return torch.cat([torch.cat([x, self.conv(x)], 1), x], 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cat_feeding_a_cat_joins_one_sharing_group(backend):
    torch.manual_seed(0)
    assert quantized_sqnr(NestedCat().eval(), backend) > 25  # was "InsertObservers: internal error KeyError"
