"""TargetPTQ: post-training quantization that searches for the cheapest pipeline meeting an accuracy target.

``PTQ(data, target_sqnr=30.0)`` or ``PTQ(data, evaluate=fn, max_drop=0.01)`` expands to this pass. It runs
candidate pipelines on copies of the graph, cheapest first, measures each, and keeps the first that meets
the target:

1. PTQ with the measured recipe of its setting (``qpasses.passes.recipes``; PTQ alone with ``recipe=False``);
2. + empirical BiasCorrection, where the recipe has none;
3. AdaRound (200 iterations per layer, lr 1e-2: the settings of BENCHMARKS.md's dfq rows), unless
   ``adaround=False``;
4. hybrid: the cheapest pipeline measured above (steps 1-2) with the fewest layers kept float. Layers are
   ranked by ``Sensitivity`` (one shared calibration for every variant) by the output noise power keeping
   each one float removes per multiply-accumulate it costs; prefixes of that ranking are measured with
   the real pipeline, doubling their length until the target is met (or the next would keep more than
   ``max_float_share`` of the MACs float), then bisecting between the last miss and the first hit.

Every measurement is a real quantized model (the backend's int8 kernels), so the reported values are
measured, not predicted. The search is bounded: at most 3 pass steps and ``2·log2(layers) + 2`` hybrid
steps. ``result`` (a ``SearchResult``) holds the path: each step's pipeline, value, seconds and share of
MACs kept float; the report's notes list it too. No step meeting the target raises ``TargetNotMetError``
with the best value reached.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from qpasses.analysis.sensitivity import Metric, OutputSQNR, Sensitivity, UserMetric
from qpasses.errors import TargetNotMetError
from qpasses.graph.modules import eval_mode
from qpasses.passes.adaround import AdaRound
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.calibrate import batch_inputs, progress
from qpasses.passes.insert_observers import InsertObservers
from qpasses.passes.recipes import build_passes, find_recipe
from qpasses.quant.observers import CalibrationError
from qpasses.quant.overrides import exact_pattern
from qpasses.quant.spec import QuantConfig


@dataclass(frozen=True)
class Target:
    """What to reach: ``sqnr_db`` (output SQNR on the calibration batches) or ``evaluate`` within ``max_drop``
    of its value on the float model."""

    sqnr_db: float | None = None
    evaluate: Callable[[nn.Module], float] | None = None
    max_drop: float | None = None


@dataclass
class SearchStep:
    """One measured candidate: its pipeline (``passes`` before PTQ, ``keep_float`` layers), the metric,
    the seconds it took to build and measure, and the share of the MACs it keeps float."""

    label: str
    passes: tuple[str, ...]
    keep_float: tuple[str, ...]
    value: float
    seconds: float
    float_share: float
    met: bool

    def line(self, unit: str) -> str:
        where = f", layers float: {len(self.keep_float)} ({self.float_share:.1%} of MACs)" if self.keep_float else ""
        return f"{self.label}: {self.value:.2f}{unit} in {self.seconds:.1f} s{where}{' — target met' if self.met else ''}"


@dataclass
class SearchResult:
    """The path of a target search: ``steps`` in the order they ran; ``chosen``: the step whose model was
    kept (None when none met ``target``)."""

    metric: str
    target: float
    steps: list[SearchStep] = field(default_factory=list)
    chosen: SearchStep | None = None
    seconds: float = 0.0  # the whole search
    ranking: str | None = None  # how the layers were ranked for the hybrid steps, with its cost

    @property
    def unit(self) -> str:
        return " dB" if self.metric == OutputSQNR.name else ""

    def summary(self) -> str:
        lines = [f"target {self.metric} >= {self.target:.2f}:"]
        lines += [f"  {i + 1}. {s.line(self.unit)}" for i, s in enumerate(self.steps)]
        lines += [f"  {self.ranking}"] if self.ranking else []
        return "\n".join(lines)


class TargetPTQ(Pass):
    """PTQ to a target (see the module docstring). Built by ``PTQ(target_sqnr=...)``; takes the resolved
    ``config``. Requires: ``functional_modules``. Provides what PTQ does: ``observed``, ``calibrated``,
    ``lowered`` (its output is the lowered int8 model of the step it chose)."""

    stage = Stage.QUANTIZE
    requires = InsertObservers.requires
    after = InsertObservers.after
    provides = frozenset({"observed", "calibrated", "lowered"})

    def __init__(self, data: Iterable, backend: str, config: QuantConfig, num_batches: int | None, progress: bool,
                 device: str | torch.device | None, recipe: bool, target: Target, adaround: bool,
                 max_float_share: float):
        self.data, self.backend, self.config, self.num_batches = data, backend, config, num_batches
        self.progress, self.device, self.recipe, self.target = progress, device, recipe, target
        self.adaround, self.max_float_share = adaround, max_float_share
        self.result: SearchResult | None = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        batches = list(itertools.islice(self.data, self.num_batches))  # every candidate reads them again
        if not batches:
            raise CalibrationError("the calibration data yielded no batches; give at least one")
        n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        with eval_mode(gm):
            if self.target.sqnr_db is not None:
                metric: Metric = OutputSQNR(gm, [batch_inputs(b, n_inputs) for b in batches])
                goal = self.target.sqnr_db
            else:
                metric = UserMetric(self.target.evaluate, "evaluate")
                float_value = metric(gm)
                goal = float_value - self.target.max_drop
                ctx.note(f"evaluate on the float model: {float_value:.4f}; target {goal:.4f} (max_drop "
                         f"{self.target.max_drop})")
        search = _Search(self, gm, ctx, batches, metric, goal)
        model = search.run()
        result = search.result
        ctx.notes += [f"step {i + 1}: {step.line(result.unit)}" for i, step in enumerate(result.steps)]
        if result.ranking is not None:
            ctx.note(result.ranking)
        ctx.note(f"target {result.target:.2f}{result.unit} met by step {result.steps.index(result.chosen) + 1} "
                 f"({result.chosen.label}) after {result.seconds:.0f} s")
        ctx.stats["steps"] = len(search.result.steps)
        ctx.stats["float_layers"] = len(search.result.chosen.keep_float)
        return PassResult(model, modified=True)


class _Search:
    """One run of the search: the candidates measured so far, in ``result``."""

    def __init__(self, owner: TargetPTQ, gm: fx.GraphModule, ctx: PassContext, batches: list, metric: Metric,
                 goal: float):
        self.owner, self.gm, self.ctx, self.batches, self.metric = owner, gm, ctx, batches, metric
        self.result = owner.result = SearchResult(metric.name, goal)
        self.started = time.perf_counter()
        self.layers: list = []  # Sensitivity's quantized layers, once ranked

    def _quantize(self, passes: tuple[str, ...], config: QuantConfig) -> fx.GraphModule:
        from qpasses.passes.manager import PassManager  # the manager imports the passes
        from qpasses.passes.ptq import PTQ

        o = self.owner
        extra: list[Pass] = (
            [AdaRound(self.batches, iterations=200, lr=1e-2, progress=o.progress)] if passes == ("adaround",)
            else build_passes(passes, self.batches, None))
        ptq = PTQ(self.batches, o.backend, config, progress=False, device=o.device, recipe=False)
        return PassManager([*extra, ptq]).run(self.gm, self.ctx.example_inputs)

    def measure(self, label: str, passes: tuple[str, ...], keep_float: tuple[str, ...] = (),
                float_share: float = 0.0) -> tuple[SearchStep, fx.GraphModule]:
        start = time.perf_counter()
        config = self.owner.config
        if keep_float:
            config = dataclasses.replace(config, keep_float=set(config.keep_float) | {exact_pattern(n) for n in keep_float})
        model = self._quantize(passes, config)
        with eval_mode(model):
            value = self.metric(model)
        step = SearchStep(label, passes, keep_float, value, time.perf_counter() - start, float_share,
                          value >= self.result.target)
        self.result.steps.append(step)
        return step, model

    def done(self, step: SearchStep, model: fx.GraphModule) -> fx.GraphModule:
        self.result.chosen = step
        self.result.seconds = time.perf_counter() - self.started
        return model

    def run(self) -> fx.GraphModule:
        o = self.owner
        recipe = find_recipe(o.backend, o.config) if o.recipe else None
        first = recipe.passes if recipe is not None else ()
        candidates = [("PTQ" + "".join(f" + {p}" for p in first), first)]
        if "biascorrection" not in first:
            candidates.append((f"{candidates[0][0]} + biascorrection", (*first, "biascorrection")))
        if o.adaround:
            candidates.append(("PTQ + adaround", ("adaround",)))
        cheap: list[SearchStep] = []
        for label, passes in progress(candidates, len(candidates), "target search: passes", o.progress, "step"):
            step, model = self.measure(label, passes)
            if step.met:
                return self.done(step, model)
            if passes != ("adaround",):
                cheap.append(step)
        found = self._hybrid(max(cheap, key=lambda s: s.value))
        if found is not None:
            return self.done(*found)
        best = max(self.result.steps, key=lambda s: s.value)
        raise TargetNotMetError(
            f"target {self.result.metric} >= {self.result.target:.2f} not met in {len(self.result.steps)} steps "
            f"({time.perf_counter() - self.started:.0f} s): best {best.value:.2f} by '{best.label}'; lower the "
            f"target, raise max_float_share (now {o.max_float_share:.0%} of MACs), or give more calibration data")

    def _ranking(self, base: SearchStep) -> tuple[list[str], list[float]]:
        """Layers by output noise power removed per MAC when kept float (``Sensitivity``, on the graph after
        ``base``'s float passes), with the cumulative share of the MACs of each prefix."""
        o = self.owner
        float_passes = [p for p in build_passes(base.passes, self.batches, None) if p.stage is Stage.FLOAT]
        graph = self.gm
        if float_passes:  # rank the layers of the graph the pipeline quantizes (after CLE, say)
            from qpasses.passes.manager import PassManager

            graph = PassManager(float_passes).run(self.gm, self.ctx.example_inputs)
        sens = Sensitivity(graph, self.batches, self.ctx.example_inputs, backend=o.backend, config=o.config,
                           eval_fn=o.target.evaluate, float_passes=(), progress=o.progress)
        start = time.perf_counter()
        table = sens.run(alone=False)  # the gain of keeping each layer float is all the ranking reads
        self.result.ranking = (f"layers ranked by Sensitivity ({len(table.rows) + 1} variants, "
                               f"{sens.calibration_passes} calibration passes) in {time.perf_counter() - start:.1f} s")
        total = sum(layer.macs for layer in sens.layers) or 1
        full_loss = sens.metric.loss(table.full)
        saved = {r.layer.name: full_loss - sens.metric.loss(r.all_but) for r in table.rows}
        ranking = sorted((r.layer for r in table.rows if saved[r.layer.name] > 0),
                         key=lambda layer: -saved[layer.name] / max(layer.macs, 1))
        self.layers = sens.layers
        return [layer.name for layer in ranking], list(itertools.accumulate(layer.macs / total for layer in ranking))

    def _hybrid(self, base: SearchStep) -> tuple[SearchStep, fx.GraphModule] | None:
        """The fewest layers kept float (on top of ``base``'s passes) that meet the target, or None."""
        names, shares = self._ranking(base)
        # The longest prefix within the budget, leaving a layer quantized (an all-float model is no PTQ).
        limit = min(sum(1 for s in shares if s <= self.owner.max_float_share), len(self.layers) - 1)
        if limit == 0:
            return None

        def measure(k: int) -> tuple[SearchStep, fx.GraphModule]:
            return self.measure(f"{base.label}, {k} most sensitive layers float", base.passes, tuple(names[:k]),
                                shares[k - 1])

        bar = progress(range(2 * limit.bit_length() + 2), None, "target search: layers kept float",
                       self.owner.progress, "step")
        ticks = iter(bar)
        try:
            low, k, found = 0, 1, None
            while found is None:  # doubling, ending with the longest prefix within the budget
                next(ticks, None)
                step, model = measure(k)
                if step.met:
                    found = (k, step, model)
                elif k == limit:
                    return None
                else:
                    low, k = k, min(2 * k, limit)
            high = found[0]
            while high - low > 1:  # bisection: the fewest layers that still meet the target
                next(ticks, None)
                middle = (low + high) // 2
                step, model = measure(middle)
                low, high, found = (low, middle, (middle, step, model)) if step.met else (middle, high, found)
            return found[1], found[2]
        finally:
            if hasattr(bar, "close"):
                bar.close()
