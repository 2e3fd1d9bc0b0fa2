"""Lower's patterns over the reference graph: decisions read from the reference graph's grids."""

import pytest
import torch
from torch import nn

from qpasses import PassManager
from qpasses.passes import Calibrate, InsertObservers, Lower
from qpasses.quant.observers import Observer
from qpasses.quant.state import existing_state


def _calibrated(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    data = [torch.randn(2, 3, 10, 10) for _ in range(2)]
    return PassManager([InsertObservers(backend), Calibrate(data, progress=False)]).run(model, data[0]), data[0]


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_a_folded_activation_goes_where_its_grid_clips_at_its_bounds(backend):
    gm, x = _calibrated(backend)
    lowered = PassManager([Lower()]).run(gm, x)
    assert not any(n.op == "call_module" and isinstance(lowered.get_submodule(n.target), nn.ReLU)
                   for n in lowered.graph.nodes)
    reference = existing_state(lowered).reference
    torch.testing.assert_close(lowered(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_a_folded_activation_stays_on_the_codes_where_its_grid_does_not_clip_at_its_bounds(backend):
    gm, x = _calibrated(backend)
    # The ReLU's grid made to span negatives (as a QAT-trained range can): writing the conv at that grid does not
    # apply the ReLU, so the int8 graph must still run it, as the reference graph does before its quantize.
    (relu_observer,) = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"
                        and isinstance(gm.get_submodule(n.target), Observer) and n.args[0].target == "1"]
    relu_observer.min_val.fill_(-1.0)
    lowered = PassManager([Lower()]).run(gm, x)
    kept = [n for n in lowered.graph.nodes if n.op == "call_module" and isinstance(lowered.get_submodule(n.target), nn.ReLU)]
    assert len(kept) == 1 and kept[0].args[0].target == "0"  # on the int8 conv's codes
    reference = existing_state(lowered).reference
    torch.testing.assert_close(lowered(x), reference(x), rtol=0, atol=0)


class _UnreadConvCall(nn.Module):
    """Calls ``conv`` a second time and drops the result (the fuzz found this: a call nothing reads)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 3)

    def forward(self, x):
        y = self.conv(x)
        self.conv(x)
        return self.head(y)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_a_conv_call_nothing_reads_is_dropped(backend):
    from qpasses.passes import PTQ

    torch.manual_seed(0)
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    lowered = PassManager([PTQ(data, backend=backend, progress=False)]).run(_UnreadConvCall().eval(), data[0])
    convs = [n for n in lowered.graph.nodes if n.op == "call_module" and "conv" in type(lowered.get_submodule(n.target)).__name__.lower()]
    assert len(convs) == 2  # the read call of conv and the head; the unread call runs no kernel
    reference = existing_state(lowered).reference
    torch.testing.assert_close(lowered(data[1]), reference(data[1]), rtol=0, atol=0)
