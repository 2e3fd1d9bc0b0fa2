import torch
from torch import nn

from qpasses.analysis.metrics import peak_memory


class Widen(nn.Module):
    """Allocates a ``(n, width)`` intermediate, then reduces it to one number per row."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.width).exp().sum(dim=1)


def test_peak_memory_counts_the_intermediates_of_the_call():
    x = torch.ones(64, 1)
    small, large = peak_memory(Widen(1_000), x), peak_memory(Widen(100_000), (x,))
    # The (64, width) float32 intermediate dominates: 256 kB and 25.6 MB.
    assert 64 * 1_000 * 4 <= small < 64 * 100_000 * 4
    assert 64 * 100_000 * 4 <= large < 2 * 64 * 100_000 * 4


def test_peak_memory_ignores_weights_allocated_before_the_call():
    big_weights = nn.Linear(2048, 2048)  # 16 MB of parameters
    assert peak_memory(big_weights, torch.ones(1, 2048)) < 2**20
