"""A lowered model keeps running with its own quantized engine after torch.save/torch.load and deepcopy."""

import copy
import io

import pytest
import torch
from torch import nn

from qpasses import PassManager
from qpasses.passes import PTQ, FuseBN
from qpasses.quant.lowering import QuantizedEngine, quantized_engine
from tests.nets import randomize_bn

OTHER_ENGINE = {"x86": "qnnpack", "qnnpack": "x86"}


class ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.up(self.conv(x)), 1))


def lowered(backend):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(3)]
    model = randomize_bn(ConvLinear()).eval()
    return PassManager([FuseBN(), PTQ(data, backend=backend, progress=False)]).run(model, data[0][:1])


def save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
@pytest.mark.parametrize("copy_with", [save_load, copy.deepcopy], ids=["save_load", "deepcopy"])
def test_copies_run_with_the_engine_they_were_lowered_for(backend, copy_with):
    qm = lowered(backend)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = qm(x)
    engines = [n for n in qm.graph.nodes if n.op == "call_module" and isinstance(qm.get_submodule(n.target), QuantizedEngine)]
    assert len(engines) == 1 and engines[0].prev.op == "placeholder"

    # Copy and run while the other engine is selected: both must follow the model, not the process state.
    with quantized_engine(OTHER_ENGINE[backend]):
        clone = copy_with(qm)
        assert torch.backends.quantized.engine == OTHER_ENGINE[backend]
        out = clone(x)
        assert torch.backends.quantized.engine == backend
    assert torch.equal(out, expected)
    assert clone.fc.packed_for == backend and clone.up.packed_for == backend
