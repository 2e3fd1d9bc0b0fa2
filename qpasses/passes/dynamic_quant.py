"""DynamicQuant: weights quantized ahead of time, activations at run time (Linear, LSTM, GRU)."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from qpasses.errors import QPassesError
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.quant import lowering
from qpasses.quant.backends import get_backend

_DYNAMIC_TYPES = (nn.Linear, nn.LSTM, nn.GRU)


class DynamicQuant(Pass):
    """Replace Linear/LSTM/GRU by their dynamically quantized versions (``torch.ao.nn.quantized.dynamic``).

    Math: weights are stored as ``dtype`` (int8 per-tensor affine, or float16); for int8, each call picks
    the activation scale from the batch's own min/max, runs the int8 GEMM and returns float.
    Weights are packed for ``backend``'s engine, which the model selects when it runs (as ``Lower`` does).
    Requires nothing (no calibration). Provides: ``lowered``.
    """

    stage = Stage.LOWER
    provides = frozenset({"lowered"})

    def __init__(self, dtype: torch.dtype = torch.qint8, types: tuple[type[nn.Module], ...] = _DYNAMIC_TYPES,
                 backend: str = "x86"):
        if dtype not in (torch.qint8, torch.float16):
            raise QPassesError(f"DynamicQuant supports dtype torch.qint8 or torch.float16, got {dtype}")
        self.backend = get_backend(backend)
        if self.backend.engine is None:
            raise QPassesError(f"DynamicQuant: backend '{backend}' has no torch.ao int8 kernels; use x86 or qnnpack")
        if dtype == torch.float16 and self.backend.engine == "qnnpack":
            raise QPassesError("DynamicQuant: qnnpack has no float16 kernels; use dtype=torch.qint8 or backend='x86'")
        self.dtype = dtype
        self.types = types

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        count = sum(1 for m in gm.modules() if type(m) in self.types)
        if count == 0:
            raise QPassesError(f"nothing to quantize dynamically: the model has no {[t.__name__ for t in self.types]}")
        with lowering.quantized_engine(self.backend.engine):
            torch.ao.quantization.quantize_dynamic(gm, set(self.types), dtype=self.dtype, inplace=True)
        lowering.select_engine_first(gm, self.backend.engine)
        gm.recompile()
        ctx.stats[f"dynamic_{str(self.dtype).removeprefix('torch.')}"] = count
        return PassResult(gm, modified=True)
