"""PTQ: post-training static quantization as one pipeline entry."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from qpasses.errors import InputError, PlanError
from qpasses.passes.base import CompositePass, Pass, Stage
from qpasses.passes.calibrate import Calibrate
from qpasses.passes.insert_observers import InsertObservers
from qpasses.passes.lower import Lower
from qpasses.passes.manager import TRAINABLE
from qpasses.passes.recipes import ACCURACY_PASSES, build_passes, find_recipe, is_one_shot
from qpasses.passes.reference import Reference
from qpasses.quant.spec import QuantConfig
from qpasses.validation import check_count, check_data

if TYPE_CHECKING:
    from qpasses.passes.target import SearchResult


class PTQ(CompositePass):
    """InsertObservers → Calibrate → Lower, so ``PassManager([FuseBN(), PTQ(data)])`` is the whole flow.

    ``lower``: True (default): the result runs on the backend's torch.ao int8 kernels; False, or a backend
    without them (``Backend.engine`` None): PTQ ends at the reference quantized graph (``Reference``: float ops
    between ``quantized_decomposed`` quantize/dequantize ops), which the deployment targets of ``qpasses.lower``
    take.

    ``backend``: ``"x86"``, ``"fbgemm"`` or ``"qnnpack"``; ``config``: a :class:`QuantConfig` (default: the
    backend's preset); ``bits``: shorthand for ``bits``-bit weights and activations (2–8);
    ``per_channel``: per-channel weights (default: the backend's preset); ``num_batches``: at most this many
    calibration batches; ``quantize_output``: round the model's output (logits) to 8 bits (default: the
    config's, False: a linear writing it computes int8 and writes float where the engine has such a kernel);
    ``device``: where calibration runs (default: where the model is; see ``Calibrate``, also for
    torch.distributed); lowering then moves the model to the CPU, where the int8 kernels run. The
    manager expands it into its parts, each verified and reported.

    ``recipe``: add the measured best cheap accuracy passes for this setting (``qpasses.passes.recipes``:
    e.g. empirical BiasCorrection on per-channel grids, CLE + HighBiasAbsorption + BiasCorrection on
    per-tensor ones), each named in the plan's notes with the measurement it comes from. Nothing is added
    when the pipeline names an accuracy pass itself (CLE, HighBiasAbsorption, BiasCorrection, AdaRound,
    MixedPrecision), when ``data`` is a one-shot iterator, or with ``recipe=False``.

    A target instead of a fixed pipeline (``qpasses.passes.target.TargetPTQ`` does the search):
    ``target_sqnr``: the output SQNR (dB) against the float model, on the calibration batches, to reach;
    or ``evaluate(model) -> float`` (higher is better, called on the float and on quantized models) with
    ``max_drop``: the largest acceptable drop of it. The search escalates (recipe → BiasCorrection →
    AdaRound unless ``adaround=False`` → below 8 bits, the fewest most sensitive layers raised to 8 bits →
    the fewest most sensitive layers kept float, at most ``max_float_share`` of the MACs; the layer steps on
    the best pass step, AdaRound's rounding learned once and reused, unless the best pipeline without it
    measures higher with the most layers), keeps the first model that meets the target, reports each step,
    and raises ``TargetNotMetError`` when none does.
    """

    stage = Stage.QUANTIZE
    provides = frozenset({"observed", "calibrated", "lowered"})

    def __init__(self, data: Iterable, backend: str = "x86", config: QuantConfig | None = None,
                 bits: int | None = None, per_channel: bool | None = None, num_batches: int | None = None,
                 progress: bool = True, device: str | torch.device | None = None,
                 quantize_output: bool | None = None, recipe: bool = True,
                 target_sqnr: float | None = None, evaluate: Callable[[nn.Module], float] | None = None,
                 max_drop: float | None = None, adaround: bool = True, max_float_share: float = 0.2,
                 lower: bool = True):
        # Checked here too, so the error names the PTQ the user wrote rather than its Calibrate part.
        self.data = check_data(data, self.name)
        self.num_batches = check_count(num_batches, "num_batches", self.name)
        self.progress = progress
        self.recipe = _check_flag(recipe, "recipe")
        self.device = device
        observers = InsertObservers(backend, config, bits, per_channel, quantize_output)
        self.backend, self.config = observers.backend.name, observers.config
        _check_flag(adaround, "adaround")
        self.target_kind = _check_target(target_sqnr, evaluate, max_drop, max_float_share)
        asked_lower = _check_flag(lower, "lower")
        lower = asked_lower and observers.backend.engine is not None
        if not lower:
            if self.target_kind is not None and not asked_lower:
                raise InputError("PTQ: a target search (target_sqnr=, evaluate=) measures and returns the deployed "
                                 "model (lowered, or the reference graph of a runtime without torch.ao kernels); "
                                 "drop lower=False or the target")
            self.provides = frozenset({"observed", "calibrated", "reference"})
        if self.target_kind is not None:
            from qpasses.passes.target import Target, TargetPTQ  # it builds PTQs itself

            self.parts: list[Pass] = [TargetPTQ(self.data, self.backend, self.config, num_batches, progress, device,
                                                self.recipe, Target(target_sqnr, evaluate, max_drop),
                                                adaround, max_float_share)]
        else:
            self.parts = [observers, Calibrate(data, num_batches, progress, device),
                          Lower(backend) if lower else Reference(backend)]

    @property
    def search(self) -> SearchResult | None:
        """The target search's result (``SearchResult``) after the pipeline ran, else None."""
        return getattr(self.parts[0], "result", None)

    def expand_in(self, pipeline: Sequence[Pass]) -> tuple[list[Pass], list[str]]:
        named = [p.name for p in pipeline if p.name in ACCURACY_PASSES]
        if self.target_kind is not None:
            chosen = [n for n in named if n in ("BiasCorrection", "AdaRound")]
            if chosen:
                raise PlanError(f"PTQ with a target chooses {chosen[0]} itself; drop {chosen[0]}() from the "
                                "pipeline or the target")
            self.parts[0].recipe = self.recipe and not named  # set per plan: the same PTQ may go in another
            why = [f"PTQ's target search adds no recipe: the pipeline names {named[0]}"] if named else []
            return self.expand(), why
        if not self.recipe:
            return self.expand(), []
        recipe = find_recipe(self.backend, self.config)
        if recipe is None or not recipe.passes:
            return self.expand(), []
        if any(TRAINABLE in part.provides for p in pipeline for part in p.expand()):
            return self.expand(), ["PTQ added no recipe passes: it starts QAT, whose training corrects the weights"]
        if named:
            return self.expand(), [f"PTQ added no recipe passes: the pipeline names {named[0]}, so its accuracy "
                                   "passes are the user's"]
        if is_one_shot(self.data):
            return self.expand(), [f"PTQ added no recipe passes ({', '.join(recipe.passes)}): the calibration data "
                                   "is a one-shot iterator; pass a list or a DataLoader to get them"]
        extra = build_passes(recipe.passes, self.data, self.num_batches)
        before = [p for p in extra if p.stage is Stage.FLOAT]
        inside = [p for p in extra if p.stage is not Stage.FLOAT]
        observe, calibrate, lower = self.parts
        names = " + ".join(p.name for p in extra)
        return [*before, observe, calibrate, *inside, lower], [f"PTQ added {names}: {recipe.describe()}; "
                                                               "PTQ(..., recipe=False) leaves them out"]


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"PTQ: {name} must be True or False, got {value!r}")
    return value


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_target(target_sqnr: object, evaluate: object, max_drop: object, max_float_share: object) -> str | None:
    """Which target is asked for (``"sqnr"``, ``"metric"`` or None); bad combinations are one-line errors."""
    if target_sqnr is not None and (evaluate is not None or max_drop is not None):
        raise InputError("PTQ: give target_sqnr=... or evaluate=... with max_drop=..., not both")
    if not _real(max_float_share) or not 0.0 <= max_float_share <= 1.0:
        raise InputError(f"PTQ: max_float_share must be a fraction of the MACs in [0, 1], got {max_float_share!r}")
    if target_sqnr is not None:
        if not _real(target_sqnr) or target_sqnr <= 0:
            raise InputError(f"PTQ: target_sqnr must be a positive number of dB (e.g. 30.0), got {target_sqnr!r}")
        return "sqnr"
    if evaluate is not None or max_drop is not None:
        if evaluate is None or not callable(evaluate):
            raise InputError(f"PTQ: max_drop needs evaluate=fn, a callable fn(model) -> float (higher is better); "
                             f"got evaluate={evaluate!r}")
        if max_drop is None or not _real(max_drop) or max_drop < 0:
            raise InputError(f"PTQ: evaluate=... needs max_drop, the largest acceptable drop of its value "
                             f"(a number >= 0), got {max_drop!r}")
        return "metric"
    return None
