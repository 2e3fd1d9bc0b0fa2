"""The measured default accuracy passes ``PTQ`` adds: one typed table, written by a benchmark.

Each ``Recipe`` row says which cheap passes (no weight training) gave the best output SQNR on pretrained
EfficientNet-Lite0 for one setting (backend, weight granularity, weight bits), and what was measured. The
rows live in ``qpasses/passes/recipe_table.py``, which ``python -m tools.bench.auto --write-table`` writes
from its measurements; nothing here is a guess. ``PTQ(data)`` adds the passes of the row for its setting
(see ``PTQ.expand_in``), unless the user's pipeline names an accuracy pass itself or ``recipe=False``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from qpasses.passes.base import Pass
from qpasses.quant.spec import QuantConfig

# Passes whose presence in a pipeline means the user chose the accuracy passes: the recipe adds nothing then.
ACCURACY_PASSES = ("CLE", "HighBiasAbsorption", "BiasCorrection", "AdaRound", "MixedPrecision")


@dataclass(frozen=True)
class Recipe:
    """One measured setting: ``passes`` (registry names, e.g. ``("cle", "hba", "biascorrection")``) gave
    ``sqnr_db`` (logits against the float model, held-out crops) against ``ptq_sqnr_db`` for PTQ alone, in
    ``seconds`` of preparation; ``source`` says which measurement (command, crops, commit)."""

    backend: str
    per_channel: bool
    weight_bits: int
    passes: tuple[str, ...]
    sqnr_db: float
    ptq_sqnr_db: float
    seconds: float
    source: str

    @property
    def setting(self) -> str:
        return f"{'per-channel' if self.per_channel else 'per-tensor'} W{self.weight_bits} {self.backend}"

    def describe(self) -> str:
        return (f"measured best cheap pipeline for {self.setting}: {self.sqnr_db:.1f} dB against "
                f"{self.ptq_sqnr_db:.1f} dB for PTQ alone (recipe table: {self.source})")


def find_recipe(backend: str, config: QuantConfig, table: Iterable[Recipe] | None = None) -> Recipe | None:
    """The row for ``backend`` at ``config``'s weight granularity and bits; else a row of another backend
    with the same granularity and bits (the grids are the same kind); else None."""
    if table is None:
        from qpasses.passes.recipe_table import MEASURED

        table = MEASURED
    rows = [r for r in table if r.per_channel == config.weight.per_channel and r.weight_bits == config.weight.bits]
    return next((r for r in rows if r.backend == backend), rows[0] if rows else None)


def build_passes(names: Iterable[str], data: Iterable, num_batches: int | None) -> list[Pass]:
    """Fresh instances of the registry passes ``names`` (a recipe's), data-driven ones on ``data``."""
    from qpasses.passes.registry import (  # the registry imports PTQ, which imports this
        PassOptions,
        build_pipeline,
    )

    names = list(names)
    return build_pipeline(names, PassOptions(num_batches=num_batches, calibration=lambda: data)) if names else []


def is_one_shot(data: Iterable) -> bool:
    """An iterator (a generator) yields its batches once: calibration would consume them before a
    data-driven recipe pass could read them again."""
    return isinstance(data, Iterator)
