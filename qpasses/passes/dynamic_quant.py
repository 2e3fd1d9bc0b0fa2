"""DynamicQuant: weights quantized ahead of time, activations at run time (Linear, LSTM, GRU)."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from qpasses.errors import QPassesError
from qpasses.passes.base import Pass, PassContext, PassResult, Stage

_DYNAMIC_TYPES = (nn.Linear, nn.LSTM, nn.GRU)


class DynamicQuant(Pass):
    """Replace Linear/LSTM/GRU by their dynamically quantized versions (``torch.ao.nn.quantized.dynamic``).

    Math: weights are stored as ``dtype`` (int8 per-tensor affine, or float16); for int8, each call picks
    the activation scale from the batch's own min/max, runs the int8 GEMM and returns float.
    Requires nothing (no calibration). Provides: ``lowered``.
    """

    stage = Stage.LOWER
    provides = frozenset({"lowered"})

    def __init__(self, dtype: torch.dtype = torch.qint8, types: tuple[type[nn.Module], ...] = _DYNAMIC_TYPES):
        if dtype not in (torch.qint8, torch.float16):
            raise QPassesError(f"DynamicQuant supports dtype torch.qint8 or torch.float16, got {dtype}")
        self.dtype = dtype
        self.types = types

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        count = sum(1 for m in gm.modules() if type(m) in self.types)
        if count == 0:
            raise QPassesError(f"nothing to quantize dynamically: the model has no {[t.__name__ for t in self.types]}")
        torch.ao.quantization.quantize_dynamic(gm, set(self.types), dtype=self.dtype, inplace=True)
        ctx.stats[f"dynamic_{str(self.dtype).removeprefix('torch.')}"] = count
        return PassResult(gm, modified=True)
