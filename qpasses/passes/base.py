"""What a pass is: a small class with declared contracts and one ``run(graph_module, ctx)`` method.

Contracts are properties of the graph, named by strings (``"bn_folded"``, ``"observed"``, ...):
``requires`` must have been provided by an earlier pass (the manager inserts the provider when there is
exactly one correct choice, else refuses the plan); ``after`` orders this pass after any provider that is
present, without requiring one; ``provides`` and ``invalidates`` update the set once the pass ran.
The ``stage`` gives the coarse order every pipeline obeys: float rewrites, then quantization, then lowering.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch.fx as fx


class Stage(enum.IntEnum):
    FLOAT = 0  # float → float rewrites: FuseBN, ReplaceFunctional, CLE, bias absorption
    QUANTIZE = 1  # observer / fake-quant insertion, calibration, bias correction, AdaRound
    LOWER = 2  # conversion to real quantized kernels; nothing float-level may follow


class PassResult(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool | None = None  # None: the manager compares graph and parameters with those before


@dataclass
class PassContext:
    """What a running pass may read and write besides the graph.

    ``example_inputs`` are the inputs the pipeline runs on; ``pipeline`` the planned passes in order;
    ``stats`` a counter for the running pass (e.g. ``ctx.stats['folded'] += 1``), shown in the report.
    """

    example_inputs: tuple
    pipeline: tuple[Pass, ...] = ()
    position: int = -1
    stats: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def find(self, pass_type: type[Pass]) -> Pass | None:
        """The first pass of ``pass_type`` in this pipeline (e.g. bias correction reading PTQ's config)."""
        return next((p for p in self.pipeline if isinstance(p, pass_type)), None)

    def note(self, message: str) -> None:
        """A line for the report, e.g. why a candidate was skipped."""
        self.notes.append(message)


class Pass:
    """Base class of all passes. Subclasses set the contract attributes and implement ``run``."""

    stage: ClassVar[Stage] = Stage.FLOAT
    requires: ClassVar[frozenset[str]] = frozenset()
    after: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    preserves_function: ClassVar[bool] = False  # if True, verified numerically after it runs

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"{self.name} does not implement run()")

    def expand(self) -> list[Pass]:
        """The passes this one stands for; a composite such as PTQ returns its parts, the plan shows them."""
        return [self]

    def expand_in(self, pipeline: Sequence[Pass]) -> tuple[list[Pass], list[str]]:
        """The passes this one stands for in ``pipeline`` (the user's entries), with a plan note for each
        choice made from it; by default ``expand()``. PTQ adds its measured recipe here, unless the
        pipeline names accuracy passes itself."""
        return self.expand(), []

    def conflict_with(self, other: Pass) -> str | None:
        """Why this pass and ``other`` cannot be in one pipeline, or None if they can."""
        return None

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        return self.run(gm, ctx if ctx is not None else PassContext(example_inputs=()))

    def __repr__(self) -> str:
        return f"{self.name}()"


class CompositePass(Pass):
    """A pipeline entry that stands for several passes (``self.parts``): the manager expands it, so each
    part is planned, verified and reported on its own; called directly, it runs the parts in order."""

    parts: list[Pass]

    def expand(self) -> list[Pass]:
        return list(self.parts)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        for part in self.parts:
            gm = part.run(gm, ctx).graph_module
        return PassResult(gm, modified=True)


def describe(passes: Any) -> str:
    return " → ".join(p.name for p in passes) if passes else "(none)"
