"""MixedPrecision: per-layer weight bit-widths chosen to meet a size budget with the least loss."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import torch.fx as fx
from torch import nn

from qpasses.analysis.sensitivity import Sensitivity
from qpasses.errors import QPassesError
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.calibrate import Calibrate
from qpasses.passes.insert_observers import InsertObservers
from qpasses.quant.overrides import add_overrides
from qpasses.validation import check_count, check_data


class MixedPrecision(Pass):
    """Choose each conv/linear layer's weight bits from ``bits`` so that the packed weights,
    ``Σ ceil(numel · bits / 8)``, fit ``budget`` (a float in (0, 1]: a fraction of their 8-bit size;
    an int: bytes) with the least loss, and hand the choice to the PTQ that follows.

    Math: for each layer ``l`` and width ``b``, the loss ``Δ(l, b)`` of quantizing only ``l``'s weights at
    ``b`` bits (everything else as configured) is measured on the real int8 model, as the increase in
    relative output noise power ``10^(−SQNR/10)`` (or ``−eval_fn``); losses are taken to add up, and
    ``min Σ Δ(l, b_l)`` subject to ``Σ size(l, b_l) ≤ budget`` (a multiple-choice knapsack) is solved
    exactly by dynamic programming (see ``Sensitivity.choose_weight_bits``). The chosen model and the
    uniform ``min(bits)`` model are both measured and reported.

    Backend: sub-8-bit weights stay in the int8 container with a narrower integer range (the backend
    table accepts any width from 2 to 8), so they run on the same kernels, exactly.
    Requires: ``functional_modules``; runs after BN folding and other float rewrites and before
    observer insertion, whose backend and configuration it reads from the pipeline's ``InsertObservers``
    (``PTQ`` contains one). Calibration data: ``data`` or the pipeline's ``Calibrate`` data.
    Provides: ``config_overrides`` (per-layer weight specs in ``state_of(gm).overrides``, applied by ``InsertObservers``).
    Preserves: the float function (the graph is untouched).
    """

    stage = Stage.QUANTIZE
    requires = frozenset({"functional_modules"})
    after = frozenset({"bn_folded", "equalized", "bias_absorbed"})
    provides = frozenset({"config_overrides"})
    preserves_function = True

    def __init__(self, budget: float | int, bits: Sequence[int] = (4, 6, 8), data: Iterable | None = None,
                 num_batches: int | None = None, eval_fn: Callable[[nn.Module], float] | None = None,
                 progress: bool = True):
        self.budget = budget
        self.bits = tuple(bits)
        self.data = check_data(data, self.name, optional=True)
        self.num_batches = check_count(num_batches, "num_batches", self.name)
        self.eval_fn = eval_fn
        self.progress = progress
        self.plan = None  # the last BitsPlan, for inspection

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        observers = ctx.find(InsertObservers)
        if observers is None:
            raise QPassesError("MixedPrecision chooses weight bits for a PTQ that follows; add PTQ(...) "
                               "(or InsertObservers) to the pipeline")
        calibrate = ctx.find(Calibrate)
        data = self.data if self.data is not None else getattr(calibrate, "data", None)
        if data is None:
            raise QPassesError("MixedPrecision needs calibration data: pass data=... or put PTQ(data) in the pipeline")
        num_batches = self.num_batches if self.num_batches is not None else getattr(calibrate, "num_batches", None)
        sens = Sensitivity(gm, data, ctx.example_inputs, backend=observers.backend.name, config=observers.config,
                           num_batches=num_batches, eval_fn=self.eval_fn, float_passes=(), progress=self.progress)
        self.plan = sens.choose_weight_bits(self.budget, self.bits)
        add_overrides(gm, self.plan.pairs)
        for b, n in sorted(Counter(self.plan.bits.values()).items()):
            ctx.stats[f"layers_{b}bit"] = n
        ctx.stats["weight_bytes"] = self.plan.weight_bytes
        ctx.note(self.plan.summary(sens.metric.name))
        return PassResult(gm, modified=True)

