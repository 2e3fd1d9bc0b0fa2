"""TargetPTQ: post-training quantization that searches for the cheapest pipeline meeting an accuracy target.

``PTQ(data, target_sqnr=30.0)`` or ``PTQ(data, evaluate=fn, max_drop=0.01)`` expands to this pass. It runs
candidate pipelines on copies of the graph, cheapest first, measures each, and keeps the first that meets
the target:

1. PTQ with the measured recipe of its setting (``qpasses.passes.recipes``; PTQ alone with ``recipe=False``);
2. + empirical BiasCorrection, where the recipe has none;
3. AdaRound (800 iterations per layer on 256 sampled output positions each, ``rows=256``, lr 1e-2: on
   pretrained Lite0 more fidelity in less CPU time than 200 iterations on whole batches; BENCHMARKS.md, AdaRound
   on sampled rows), unless ``adaround=False``;
4. higher bits: the best pipeline measured above (steps 1-3; but see below) with the fewest layers raised to 8 bits
   (weights and output; ``reduce_range`` only where the backend's kernel reading a value saturates, as
   annotation decides), when the run quantizes below 8 bits (``bits=4``, say). Raising a layer keeps it
   on the same int8 kernels, so it costs weight bytes, not float MACs; that is why it comes first. At 8-bit
   weights and activations there is no higher-bit kernel (torch.ao's run 8-bit containers only), and the
   step is skipped with a note that says so;
5. hybrid: the same pipeline, at the configured bits, with the fewest layers kept float. What that removes
   depends on the backend's kernels: a layer kept float keeps its weights float, and its input is rounded only
   where an int8 op writes it as codes. On ``inductor`` the int8 conv before it writes fp32 (its MACs stay int8,
   and count as int8), so the float layer drops that activation rounding too. The torch.ao engines' int8 convs
   always write codes, so there the candidates also include each layer together with the layer whose value it
   alone reads (``producer_pairs``; both counted float): on pretrained Lite0 (x86, BiasCorrection, 16 crops) the
   stem conv alone float gains 0.5 dB, the depthwise conv after it alone loses 0.1 dB, and both together, the
   stem's output unrounded, gain 1.7 dB (BENCHMARKS.md).

When AdaRound (step 3) is the best pipeline, steps 4 and 5 do not learn a rounding again for each model they
measure: step 3's AdaRound keeps the weights it chose per layer (``AdaRound.rounded``), and each layer-step
model on it reuses them (``ReuseRounding``): every layer still on the grid it was learned on takes its learned
rounding, a layer kept float its float weight, a layer raised to 8 bits its float weight rounded to nearest on
the 8-bit grid. So AdaRound runs once per search, and each such model costs what a PTQ model costs. But each
layer's rounding was learned against the error of the quantized layers before it, and partly cancels it: with
a layer before it kept float, that part adds error instead (pretrained Lite0, x86: 28.7 dB with AdaRound, 27.7
with the most sensitive layer kept float and the rounding reused; BENCHMARKS.md). So when AdaRound measured
best, each layer step first measures its longest prefix on AdaRound (rounding reused) and on the best pipeline
without AdaRound, and goes on with the one that measured higher there; the report says which.

Steps 4 and 5 share one ranking by ``Sensitivity`` (one shared calibration for every variant): the output
noise power keeping each layer float removes (for 4, that gain alone, the bound of what raising it can
remove; for 5, per multiply-accumulate it costs). Prefixes of a ranking are measured with the real
pipeline, doubling their length until the target is met (or, for 5, the next would keep more than
``max_float_share`` of the MACs float; one layer always stays at the configured grid), then bisecting
between the last miss and the first hit. The measured curve need not be monotone in the prefix length
(more layers protected can measure worse: the error moves to other grids); the search keeps the fewest
layers among the measured prefixes that meet the target, a measured hit whatever the curve, and the
report says where the curve fell. Because every measurement is deterministic (AdaRound's included: seeded),
the layer steps' pipeline is chosen from measurements any search reaching the layer steps has made (steps
1-3, the longest prefixes), and each bisection step only compares with the target, a higher target never
ends at an earlier step, nor with fewer layers within a step (``SearchStep.order``).

Every measurement is a real quantized model (the backend's int8 kernels), so the reported values are
measured, not predicted. The search is bounded (``max_measurements``). ``result`` (a ``SearchResult``)
holds the path: each step's pipeline, value, seconds, layers at higher bits and share of MACs kept float;
the report's notes list it too. No step meeting the target raises ``TargetNotMetError`` with the best
value reached.
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
from qpasses.passes.adaround import AdaRound, ReuseRounding
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.calibrate import batch_inputs, progress
from qpasses.passes.insert_observers import InsertObservers
from qpasses.passes.recipes import build_passes, find_recipe
from qpasses.quant.annotate import annotate
from qpasses.quant.backends import Backend, get_backend
from qpasses.quant.observers import CalibrationError
from qpasses.quant.ops import Role, role_of
from qpasses.quant.overrides import exact_pattern, with_node_overrides
from qpasses.quant.spec import QuantConfig, QuantPair


@dataclass(frozen=True)
class Target:
    """What to reach: ``sqnr_db`` (output SQNR on the calibration batches) or ``evaluate`` within ``max_drop``
    of its value on the float model."""

    sqnr_db: float | None = None
    evaluate: Callable[[nn.Module], float] | None = None
    max_drop: float | None = None


@dataclass
class SearchStep:
    """One measured candidate: its pipeline (``passes`` before PTQ, ``raised`` layers at 8 bits,
    ``keep_float`` layers), the metric, the seconds it took to build and measure, the share of the conv/linear
    MACs it keeps float, and ``rounded``: how many activation values its model rounds to an int8 grid (the
    annotation's observed values). A conv/linear that writes fp32 because only float layers read its value
    (``inductor``) runs int8 MACs: it counts in ``rounded``'s drop, not in ``float_share``."""

    label: str
    passes: tuple[str, ...]
    keep_float: tuple[str, ...]
    value: float
    seconds: float
    float_share: float
    met: bool
    raised: tuple[str, ...] = ()
    rounded: int = 0

    @property
    def order(self) -> tuple[int, int]:
        """Where the step sits in the search's escalation: (0 passes, 1 layers at higher bits, 2 layers
        float; the number of those layers). A higher target never gives a smaller order."""
        if self.keep_float:
            return 2, len(self.keep_float)
        return (1, len(self.raised)) if self.raised else (0, 0)

    def line(self, unit: str) -> str:
        where = f", layers at 8 bits: {len(self.raised)}" if self.raised else ""
        where += f", layers float: {len(self.keep_float)} ({self.float_share:.1%} of MACs)" if self.keep_float else ""
        where += f", {self.rounded} activation values rounded"
        return f"{self.label}: {self.value:.2f}{unit} in {self.seconds:.1f} s{where}{' — target met' if self.met else ''}"


@dataclass
class SearchResult:
    """The path of a target search: ``steps`` in the order they ran; ``chosen``: the step whose model was
    kept (None when none met ``target``); ``notes``: what the search skipped or found on the way (a step
    it could not take, a measured curve that is not monotone)."""

    metric: str
    target: float
    steps: list[SearchStep] = field(default_factory=list)
    chosen: SearchStep | None = None
    seconds: float = 0.0  # the whole search
    ranking: str | None = None  # how the layers were ranked for the layer steps, with its cost
    ranking_variants: int = 0  # models Sensitivity measured for the ranking (each an evaluate call)
    notes: list[str] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return " dB" if self.metric == OutputSQNR.name else ""

    def summary(self) -> str:
        lines = [f"target {self.metric} >= {self.target:.2f}:"]
        lines += [f"  {i + 1}. {s.line(self.unit)}" for i, s in enumerate(self.steps)]
        lines += [f"  {line}" for line in ([self.ranking] if self.ranking else []) + self.notes]
        return "\n".join(lines)


def prefix_search_bound(limit: int) -> int:
    """The most prefixes one layer step measures for prefixes of at most ``limit`` layers: doubling
    (1, 2, 4, …, ``limit``: at most ``bit_length(limit) + 1``) then bisection inside the last doubling
    (at most ``bit_length(limit) - 1``)."""
    return 2 * limit.bit_length()


def max_measurements(layers: int) -> int:
    """The most models ``TargetPTQ`` measures (builds and scores) on a graph of ``layers`` quantized
    layers: 3 pass steps and two layer steps of at most ``prefix_search_bound(layers - 1)`` prefixes each,
    plus, per layer step, the longest prefix on the second base when AdaRound measured best.
    With ``evaluate=``, ``evaluate`` is called once per measured model, once on the float model and once
    per Sensitivity variant of the ranking (``SearchResult.ranking_variants``: ``layers + 1``, and where the
    layers-float step runs on a backend whose int8 convs write codes, one per producer pair and the fully
    quantized model once more)."""
    return 3 + 2 * (prefix_search_bound(max(layers - 1, 0)) + 1)


def fewest_meeting(limit: int, measure: Callable[[int], tuple[bool, float]],
                   tick: Callable[[], None] = lambda: None) -> int | None:
    """The fewest ``k`` in ``[1, limit]`` for which ``measure(k)`` (``(met, value)``) met the target, among
    the ``k`` measured: doubling from 1 to the first hit, then bisecting between the last miss and it; None
    when ``limit`` itself misses. On a curve that is not monotone in ``k`` the result is still a measured
    hit and the fewest hit measured (every bisection hit is below the previous one, every doubling miss
    below the first hit), though an unmeasured smaller ``k`` may meet it too. Deterministic: given the
    same curve, a higher target (fewer hits) never gives a smaller ``k``."""
    low, k = 0, 1
    while True:  # doubling, ending with the longest prefix within the limit
        tick()
        if measure(k)[0]:
            break
        if k >= limit:
            return None
        low, k = k, min(2 * k, limit)
    high = k
    while high - low > 1:  # bisection: low a miss, high a hit
        tick()
        middle = (low + high) // 2
        low, high = (low, middle) if measure(middle)[0] else (middle, high)
    return high


def falls(curve: dict[int, float]) -> list[tuple[int, float, int, float]]:
    """Where a measured curve (prefix length → value) is not monotone: each ``(k, value, k2, value2)`` with
    ``k < k2`` adjacent in the measured lengths and ``value > value2``."""
    points = sorted(curve.items())
    return [(k, v, k2, v2) for (k, v), (k2, v2) in itertools.pairwise(points) if v > v2]


class TargetPTQ(Pass):
    """PTQ to a target (see the module docstring). Built by ``PTQ(target_sqnr=...)``; takes the resolved
    ``config``. Requires: ``functional_modules``. Provides what PTQ does: ``observed``, ``calibrated``,
    ``lowered`` (its output is the lowered int8 model of the step it chose), or ``reference`` for a backend
    without torch.ao kernels (``inductor``: the reference graph is what that runtime compiles and what each step
    measured)."""

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
        if get_backend(backend).engine is None:  # PTQ ends at the reference graph, what that runtime compiles
            self.provides = frozenset({"observed", "calibrated", "reference"})

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
        ctx.notes += ([result.ranking] if result.ranking is not None else []) + result.notes
        ctx.note(f"target {result.target:.2f}{result.unit} met by step {result.steps.index(result.chosen) + 1} "
                 f"({result.chosen.label}) after {result.seconds:.0f} s")
        ctx.stats["steps"] = len(search.result.steps)
        ctx.stats["float_layers"] = len(search.result.chosen.keep_float)
        ctx.stats["8bit_layers"] = len(search.result.chosen.raised)
        return PassResult(model, modified=True)


class _Search:
    """One run of the search: the candidates measured so far, in ``result``."""

    def __init__(self, owner: TargetPTQ, gm: fx.GraphModule, ctx: PassContext, batches: list, metric: Metric,
                 goal: float):
        self.owner, self.gm, self.ctx, self.batches, self.metric = owner, gm, ctx, batches, metric
        self.result = owner.result = SearchResult(metric.name, goal)
        self.started = time.perf_counter()
        self.sens: Sensitivity | None = None  # the layer steps' ranking, once made (``_rank``)
        self.gains: dict[str, float] = {}  # layer → output noise power keeping it float removes
        # Step 3's AdaRound, whose learned rounding (``AdaRound.rounded``) every later model with the AdaRound
        # step's passes reuses: AdaRound runs once per search.
        self.adaround: AdaRound | None = None

    def _quantize(self, passes: tuple[str, ...], config: QuantConfig) -> fx.GraphModule:
        from qpasses.passes.manager import PassManager  # the manager imports the passes
        from qpasses.passes.ptq import PTQ

        o = self.owner
        extra: list[Pass] = []
        for name in passes:  # AdaRound with its search settings, learned once
            extra += [self._rounding()] if name == "adaround" else build_passes((name,), self.batches, None)
        ptq = PTQ(self.batches, o.backend, config, progress=False, device=o.device, recipe=False)
        return PassManager([*extra, ptq]).run(self.gm, self.ctx.example_inputs)

    def _rounding(self) -> Pass:
        """The AdaRound of step 3 the first time, then ``ReuseRounding`` of the rounding it learned."""
        if self.adaround is not None:
            return ReuseRounding(self.adaround.rounded)
        self.adaround = AdaRound(self.batches, iterations=800, lr=1e-2, rows=256, progress=self.owner.progress)
        return self.adaround

    def measure(self, label: str, passes: tuple[str, ...], keep_float: tuple[str, ...] = (),
                float_share: float = 0.0, raised: dict[str, QuantPair] | None = None,
                raised_layers: tuple[str, ...] = ()) -> tuple[SearchStep, fx.GraphModule]:
        """``passes`` + PTQ with the layers ``keep_float`` float and the pairs ``raised`` (of the layers
        ``raised_layers``) overriding the configuration, built and measured."""
        start = time.perf_counter()
        config = self.owner.config
        if raised:
            config = with_node_overrides(config, raised)
        if keep_float:
            config = dataclasses.replace(config, keep_float=set(config.keep_float) | {exact_pattern(n) for n in keep_float})
        model = self._quantize(passes, config)
        with eval_mode(model):
            value = self.metric(model)
        rounded = len(annotate(self.gm, get_backend(self.owner.backend), config).observe)
        step = SearchStep(label, passes, keep_float, value, time.perf_counter() - start, float_share,
                          value >= self.result.target, raised_layers, rounded)
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
        measured: list[SearchStep] = []
        for label, passes in progress(candidates, len(candidates), "target search: passes", o.progress, "step"):
            step, model = self.measure(label, passes)
            if step.met:
                return self.done(step, model)
            measured.append(step)
        best = max(measured, key=lambda s: s.value)  # on a tie, the cheaper pipeline
        cheap = max((s for s in measured if "adaround" not in s.passes), key=lambda s: s.value)
        bases = [best] if best is cheap else [best, cheap]
        self._rank(cheap)
        for layer_step in (self._higher_bits, self._hybrid):
            found = layer_step(bases)
            if found is not None:
                return self.done(*found)
        best = max(self.result.steps, key=lambda s: s.value)
        raise TargetNotMetError(
            f"target {self.result.metric} >= {self.result.target:.2f} not met in {len(self.result.steps)} steps "
            f"({time.perf_counter() - self.started:.0f} s): best {best.value:.2f} by '{best.label}'; lower the "
            f"target, raise max_float_share (now {o.max_float_share:.0%} of MACs), or give more calibration data")

    def _rank(self, base: SearchStep) -> None:
        """Rank the layers by the output noise power keeping each float removes (``Sensitivity``, on the graph
        after ``base``'s float passes): ``self.gains``, and ``self.sens`` for the layers' pairs and MACs."""
        o = self.owner
        float_passes = [p for p in build_passes(base.passes, self.batches, None) if p.stage is Stage.FLOAT]
        graph = self.gm
        if float_passes:  # rank the layers of the graph the pipeline quantizes (after CLE, say)
            from qpasses.passes.manager import PassManager

            graph = PassManager(float_passes).run(self.gm, self.ctx.example_inputs)
        self.sens = Sensitivity(graph, self.batches, self.ctx.example_inputs, backend=o.backend, config=o.config,
                                eval_fn=o.target.evaluate, float_passes=(), progress=o.progress)
        start = time.perf_counter()
        table = self.sens.run(alone=False)  # the gain of keeping each layer float is all the ranking reads
        self.result.ranking_variants = len(table.rows) + 1
        self.result.ranking = (f"layers ranked by Sensitivity ({self.result.ranking_variants} variants, "
                               f"{self.sens.calibration_passes} calibration passes) in "
                               f"{time.perf_counter() - start:.1f} s")
        full_loss = self.sens.metric.loss(table.full)
        self.gains = {r.layer.name: full_loss - self.sens.metric.loss(r.all_but) for r in table.rows}

    def _prefix_step(self, what: str, bases: list[SearchStep], limit: int,
                     measure: Callable[[SearchStep, int], tuple[SearchStep, fx.GraphModule]],
                     ) -> tuple[SearchStep, fx.GraphModule] | None:
        """The fewest layers (a prefix of at most ``limit``) for which ``measure`` (on a base pipeline, with
        ``k`` layers) meets the target (``fewest_meeting``), or None; a note where the measured curve falls.
        With two ``bases`` (AdaRound, its rounding reused, and the best pipeline without it), the prefix of
        ``limit`` layers is measured on both first, and the step goes on with the base that measured higher
        there (on a tie, the first), with a note."""
        if limit == 0:
            return None
        measured: dict[int, tuple[SearchStep, fx.GraphModule]] = {}
        base, at_limit = bases[0], None
        if len(bases) > 1:
            tried = [measure(b, limit) for b in bases]
            chosen = max(range(len(bases)), key=lambda i: (tried[i][0].value, -i))
            base, at_limit = bases[chosen], tried[chosen]
            values = ", ".join(f"'{b.label}' {step.value:.2f}{self.result.unit}"
                               for b, (step, _) in zip(bases, tried, strict=True))
            reused = ", reusing its learned rounding (AdaRound ran once)" if "adaround" in base.passes else ""
            self.result.notes.append(f"layers {what}: with {limit} layers {values}; the step builds on "
                                     f"'{base.label}'{reused}")

        def measure_k(k: int) -> tuple[bool, float]:
            step, model = at_limit if k == limit and at_limit is not None else measure(base, k)
            measured[k] = (step, model if step.met else None)  # keep only the hits' models
            return step.met, step.value

        bar = progress(range(prefix_search_bound(limit)), None, f"target search: layers {what}", self.owner.progress,
                       "step")
        ticks = iter(bar)
        try:
            k = fewest_meeting(limit, measure_k, lambda: next(ticks, None))
        finally:
            if hasattr(bar, "close"):
                bar.close()
        fallen = falls({k: step.value for k, (step, _) in measured.items()})
        if fallen:
            # a prefix of k candidates may hold more than k layers (a layer with its producer, ``_float_units``)
            size = {k: len(step.keep_float) + len(step.raised) for k, (step, _) in measured.items()}
            where = "; ".join(f"{size[k]} layers {v:.2f} > {size[k2]} layers {v2:.2f}" for k, v, k2, v2 in fallen)
            self.result.notes.append(
                f"layers {what}: the measured values are not monotone in the number of layers ({where}); the search "
                f"keeps the fewest layers among the measured prefixes that meet the target "
                f"({', '.join(str(size[k]) for k in sorted(measured))} measured)")
        return None if k is None else measured[k]

    def _higher_bits(self, bases: list[SearchStep]) -> tuple[SearchStep, fx.GraphModule] | None:
        """The fewest layers raised to 8 bits (on top of a base's passes, ``_prefix_step``) that meet the
        target, or None (with a note when the step cannot run at all)."""
        config, backend = self.owner.config, get_backend(self.owner.backend)
        if config.weight.bits >= 8 and config.activation.bits >= 8:
            reduced = " (its 7-bit steps, reduce_range, stay where a kernel reading them saturates: "
            reduced = f"{reduced}{backend.reduce_range_reason()})" if config.activation.reduce_range else ""
            self.result.notes.append(
                f"no layers at higher bits: weights and activations are already 8-bit, the widest grid the "
                f"{backend.name} int8 kernels run{reduced}; the search goes from the passes to layers kept float")
            return None
        # The 8-bit grids of this configuration; reduce_range as the backend's 8-bit preset asks for, which
        # annotation keeps only on the values a saturating kernel reads.
        preset = backend.default_config(per_channel=config.weight.per_channel)
        pair = QuantPair(config.weight.replace(bits=8),
                         config.activation.replace(bits=8, reduce_range=preset.activation.reduce_range))
        names = sorted((n for n, gain in self.gains.items() if gain > 0), key=lambda n: -self.gains[n])
        limit = min(len(names), len(self.sens.layers) - 1)  # one layer keeps the asked bits: else it is 8-bit PTQ

        def measure(base: SearchStep, k: int) -> tuple[SearchStep, fx.GraphModule]:
            return self.measure(f"{base.label}, {k} most sensitive layers at 8 bits", base.passes,
                                raised=self.sens.layer_pairs(names[:k], pair), raised_layers=tuple(names[:k]))

        return self._prefix_step("at 8 bits", bases, limit, measure)

    def _float_units(self, backend: Backend) -> dict[tuple[str, ...], float]:
        """What the layers-float step may keep float, each with the output noise power keeping it float removes
        (Sensitivity's gains): every layer alone, and, where ``backend``'s int8 convs write codes, every layer
        together with the layer whose value it alone reads (``producer_pairs``): only both float leave that value
        unrounded there. The pairs' variants are measured here, on the ranking's shared calibration."""
        units = {(name,): gain for name, gain in self.gains.items()}
        if _convs_write_float(backend):
            return units  # a layer kept float already reads an int8 conv's fp32 output
        pairs = [(producer, layer) for layer, producer in producer_pairs(self.sens.prepared, self.gains).items()]
        configs = [self.sens.keep_float_config(pair) for pair in pairs]
        self.sens.prefetch(configs)
        full_loss = self.sens.metric.loss(self.sens.measure(self.owner.config))
        for pair, config in zip(pairs, configs, strict=True):
            units[pair] = full_loss - self.sens.metric.loss(self.sens.measure(config))
        self.result.ranking_variants += len(pairs) + 1
        self.result.notes.append(f"layers float: {len(pairs)} layers that alone read another layer's value were "
                                 "also ranked kept float with it (their value unrounded), measured on the ranking's "
                                 f"shared calibration ({len(pairs) + 1} variants more)")
        return units

    def _hybrid(self, bases: list[SearchStep]) -> tuple[SearchStep, fx.GraphModule] | None:
        """The fewest layers kept float (on top of a base's passes, ``_prefix_step``, at the configured bits)
        that meet the target, or None. The candidates are ``_float_units`` ranked by the noise each removes per
        MAC it keeps float; a prefix of ``k`` of them keeps their layers float (a unit adding no layer is
        skipped)."""
        macs = {layer.name: layer.macs for layer in self.sens.layers}
        total = sum(macs.values()) or 1
        units = self._float_units(get_backend(self.owner.backend))
        ranked = sorted((u for u, gain in units.items() if gain > 0),
                        key=lambda u: -units[u] / max(sum(macs[n] for n in u), 1))
        prefixes: list[tuple[str, ...]] = []  # the layers of each prefix of the ranked units, in ranked order
        for unit in ranked:
            kept = prefixes[-1] if prefixes else ()
            if not set(unit) <= set(kept):
                prefixes.append(kept + tuple(n for n in unit if n not in kept))
        shares = [sum(macs[n] for n in layers) / total for layers in prefixes]
        # The longest prefix within the budget, leaving a layer quantized (an all-float model is no PTQ).
        limit = sum(1 for layers, share in zip(prefixes, shares, strict=True)
                    if share <= self.owner.max_float_share and len(layers) < len(self.sens.layers))

        def measure(base: SearchStep, k: int) -> tuple[SearchStep, fx.GraphModule]:
            layers = prefixes[k - 1]
            return self.measure(f"{base.label}, {len(layers)} most sensitive layers float", base.passes, layers,
                                shares[k - 1])

        if limit:
            self.result.notes.append(_float_layer_note(get_backend(self.owner.backend)))
        return self._prefix_step("float", bases, limit, measure)


def producer_pairs(gm: fx.GraphModule, layers: Iterable[str]) -> dict[str, str]:
    """Each of ``layers`` (conv/linear module names of ``gm``, a graph with its shapes propagated, as Sensitivity's
    is) whose input is the value of another of them that
    nothing else reads, through clamp-like activations and qparams-preserving ops (padding) nothing else reads
    either: layer → that producer. On a backend whose int8 convs write codes, the value between them is
    unrounded only when both are float."""
    names = set(layers)

    def is_layer(node: fx.Node) -> bool:
        return node.op == "call_module" and node.target in names

    pairs = {}
    for node in gm.graph.nodes:
        if not is_layer(node) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        value = node.args[0]
        while (not is_layer(value) and len(value.users) == 1 and len(value.all_input_nodes) == 1
               and role_of(gm, value) in (Role.PRESERVING, Role.FUSED_ACT)):
            value = value.all_input_nodes[0]
        if is_layer(value) and len(value.users) == 1:
            pairs[node.target] = value.target
    return pairs


def _convs_write_float(backend: Backend) -> bool:
    """Whether ``backend``'s int8 conv kernels can write fp32 (inductor's qconv_pointwise), so that a conv whose
    value only float layers read is not rounded for them (``annotate``'s float-output rule)."""
    return backend.writes_float_output(nn.Conv2d(1, 1, 1))


def _float_layer_note(backend: Backend) -> str:
    """What keeping a layer float removes on ``backend``: its weight rounding, and its input's rounding only where
    the int8 conv producing that input can write fp32."""
    if _convs_write_float(backend):
        return (f"layers float: a layer kept float also reads its input unrounded where an int8 conv/linear that only "
                f"float layers read produces it ({backend.runtime or backend.name}'s int8 convs write fp32; their MACs "
                "stay int8 and are not counted as float), so it drops an activation rounding with its weight rounding")
    return (f"layers float: the {backend.engine or backend.name} int8 convs write int8 codes, so a layer kept float "
            "still reads a rounded input where an int8 conv produces it: it removes its weight rounding and the "
            "roundings between float layers only (the inductor preset's convs write fp32 and drop its input's too)")
