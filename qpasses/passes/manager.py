"""The PassManager: plans, runs, verifies and reports a pipeline of passes.

Planning (before anything runs): passes state contracts (``requires``/``after``/``provides``/``invalidates``
and a ``stage``); the manager builds the constraint graph with networkx and sorts it topologically,
keeping the user's order wherever nothing constrains it. A missing prerequisite is inserted when one
pass is the only correct provider (CLE needs BN folded → FuseBN), otherwise the plan is refused with a
one-line fix. Cycles, conflicts and invalidated prerequisites are refused too.

Running: the model is deep-copied (unless ``inplace=True``) and traced, and the capture is checked against
the eager model (``verify_capture``); after each pass the graph is linted, re-run on the example inputs
(which refreshes shape metadata), and compared with the eager model's output (the report's SQNR). Passes
that claim to preserve the function must keep SQNR ≥ ``sqnr_threshold_db`` against the output before them (after an approximating pass, that is the new one); if
not, the error names the pass and the first node whose output no longer matches any value of the graph
before the pass.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from qpasses.analysis.metrics import sqnr
from qpasses.errors import GraphRunError, InputError, PassError, PlanError, QPassesError, VerificationError
from qpasses.graph.modules import buffers_restored, eval_mode
from qpasses.graph.trace import CaptureInfo, LeafSpec, propagate_shapes, trace, verify_capture
from qpasses.passes.base import Pass, PassContext, Stage, describe
from qpasses.passes.calibrate import model_device, to_device
from qpasses.quant.state import properties_of, state_of
from qpasses.validation import as_input_tuple, check_float_model, check_model

# A pipeline that provides this yields a model to train (QAT); its lowering waits for qpasses.convert().
TRAINABLE = "fake_quantized"


# ----------------------------------------------------------------------------------------------- planning


def _all_pass_types() -> list[type[Pass]]:
    found, stack = [], list(Pass.__subclasses__())
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


def _providers_of(prop: str) -> list[str]:
    return sorted({cls.__name__ for cls in _all_pass_types() if prop in cls.provides})


def _default_providers() -> dict[str, type[Pass]]:
    """Properties whose provider can be inserted automatically, because it is the only correct choice."""
    from qpasses.passes.fuse_bn import FuseBN
    from qpasses.passes.replace_functional import ReplaceFunctional

    return {"bn_folded": FuseBN, "functional_modules": ReplaceFunctional}


@dataclass
class Plan:
    passes: tuple[Pass, ...]
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"plan: {describe(self.passes)}"]
        lines += [f"  {i + 1}. {p.name}  [{p.stage.name.lower()}]" for i, p in enumerate(self.passes)]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan_pipeline(passes: Sequence[Pass], established: Iterable[str] = ()) -> Plan:
    """Order ``passes`` by their contracts; raises ``PlanError`` before anything runs."""
    for p in passes:
        if not isinstance(p, Pass):
            raise PlanError(f"pipeline entry {p!r} is not a Pass instance (did you write FuseBN instead of FuseBN()?)")
    established = set(established)
    notes: list[str] = []
    expanded: list[Pass] = []
    for p in passes:
        parts, why = p.expand_in(passes)
        expanded += parts
        notes += why
    passes = expanded
    if any(TRAINABLE in p.provides for p in passes):
        deferred = [p for p in passes if p.stage is Stage.LOWER]
        passes = [p for p in passes if p.stage is not Stage.LOWER]
        notes += [f"deferred {p.name} to qpasses.convert(): the model is fake-quantized for training first"
                  for p in deferred]

    for i, a in enumerate(passes):
        for b in passes[i + 1 :]:
            why = a.conflict_with(b) or b.conflict_with(a)
            if why:
                raise PlanError(f"{a.name} and {b.name} cannot be in one pipeline: {why}")

    defaults = _default_providers()
    changed = True
    while changed:
        changed = False
        provided = established.union(*(p.provides for p in passes))
        for idx, p in enumerate(passes):
            for prop in sorted(p.requires - provided):
                if prop not in defaults:
                    hint = " or ".join(f"{name}()" for name in _providers_of(prop)) or "a pass that provides it"
                    raise PlanError(
                        f"{p.name} requires '{prop}', which no pass in the pipeline provides; add {hint} to it"
                    )
                provider = defaults[prop]()
                passes.insert(idx, provider)
                notes.append(
                    f"inserted {provider.name} before {p.name}: {p.name} requires '{prop}' "
                    f"and {provider.name} is the only pass that provides it"
                )
                changed = True
                break
            if changed:
                break

    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(passes)))
    for i, a in enumerate(passes):
        for j, b in enumerate(passes):
            if i == j:
                continue
            if a.stage < b.stage:
                graph.add_edge(i, j, why=f"{a.stage.name.lower()} passes run before {b.stage.name.lower()} passes")
            shared = a.provides & (b.requires | b.after)
            if shared:
                graph.add_edge(i, j, why=f"{b.name} needs '{sorted(shared)[0]}' from {a.name}")
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        reasons = "; ".join(f"{passes[u].name} before {passes[v].name} ({graph.edges[u, v]['why']})" for u, v in cycle)
        raise PlanError(f"contradictory pipeline, no order satisfies: {reasons}")

    order = list(nx.lexicographical_topological_sort(graph, key=lambda i: i))
    for u, v in graph.edges:
        if u > v:
            notes.append(f"moved {passes[u].name} before {passes[v].name}: {graph.edges[u, v]['why']}")
    ordered = tuple(passes[i] for i in order)

    props = set(established)
    last_provider: dict[str, str] = {}
    for p in ordered:
        missing = p.requires - props
        if missing:
            prop = sorted(missing)[0]
            killer = next(q.name for q in ordered if prop in q.invalidates)
            raise PlanError(
                f"{p.name} requires '{prop}', provided by {last_provider.get(prop, 'an earlier pass')}, "
                f"but {killer} invalidates it first; drop {killer} or run the provider again after it"
            )
        props = (props - p.invalidates) | p.provides
        last_provider.update({prop: p.name for prop in p.provides})
    return Plan(ordered, notes)


# ------------------------------------------------------------------------------------------------ report


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    added: int = 0
    removed: int = 0
    changed: int = 0
    modified: bool = True
    sqnr_db: float | None = None
    stats: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    plan: Plan
    records: list[PassRecord] = field(default_factory=list)
    capture: CaptureInfo | None = None  # None when the pipeline ran on a GraphModule captured elsewhere

    @property
    def opaque_modules(self) -> list[str]:
        return list(self.capture.opaque_modules) if self.capture is not None else []

    def table(self) -> str:
        header = ("pass", "time ms", "nodes", "+added", "-removed", "~changed", "SQNR dB", "stats")
        rows = []
        for r in self.records:
            sqnr_txt = "" if r.sqnr_db is None else ("inf" if r.sqnr_db == float("inf") else f"{r.sqnr_db:.1f}")
            stats = ", ".join(f"{k}={v}" for k, v in sorted(r.stats.items()))
            rows.append((r.name, f"{r.seconds * 1e3:.1f}", f"{r.nodes_before}→{r.nodes_after}", str(r.added),
                         str(r.removed), str(r.changed), sqnr_txt, stats if r.modified else (stats or "unchanged")))
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in rows]
        for r in self.records:
            lines += [f"{r.name}: {n}" for n in r.notes]
        lines += [f"plan: {n}" for n in self.plan.notes]
        if self.capture is not None:
            lines.append(str(self.capture))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------------------- instruments


class Instrument:
    """Hooks around each pass: timing, dumps, snapshots and progress are instruments, not flags."""

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        pass

    def after_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord) -> None:
        pass

    def after_pass_failed(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, error: Exception) -> None:
        pass


class DumpGraphs(Instrument):
    """Writes ``NN_<pass>.py`` (the generated code) and ``NN_<pass>.txt`` (the node table) after each pass."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.count = 0

    def dump(self, label: str, gm: fx.GraphModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = self.directory / f"{self.count:02d}_{label}"
        stem.with_suffix(".py").write_text(gm.code)
        stem.with_suffix(".txt").write_text(_node_table(gm))
        self.count += 1

    def after_pass(self, p, gm, ctx, record):
        self.dump(p.name, gm)


class KeepSnapshots(Instrument):
    """Keeps a deep copy of the graph module after each pass, as ``(label, gm)`` pairs, for the visualiser."""

    def __init__(self):
        self.snapshots: list[tuple[str, fx.GraphModule]] = []

    def after_pass(self, p, gm, ctx, record):
        self.snapshots.append((p.name, copy.deepcopy(gm)))


def _node_table(gm: fx.GraphModule) -> str:
    lines = []
    for n in gm.graph.nodes:
        meta = n.meta.get("tensor_meta")
        shape = tuple(meta.shape) if hasattr(meta, "shape") else ""
        lines.append(f"{n.name}\t{n.op}\t{n.target}\t{[str(a) for a in n.args]}\t{shape}")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- verification


def _run_verified_forward(gm: fx.GraphModule, inputs: tuple, outputs: dict[str, torch.Tensor] | None = None) -> Any:
    """Run ``gm`` as verification does (eval mode, buffers restored), refreshing its shape metadata; with
    ``outputs``, keep every node's float output there too."""
    # On the graph's device: a pass may move it (Calibrate(device=...) to a GPU, Lower back to the CPU).
    with eval_mode(gm), buffers_restored(gm):
        return propagate_shapes(gm, to_device(inputs, model_device(gm)), outputs)


def first_divergence(reference: dict[str, torch.Tensor], after: fx.GraphModule, inputs: tuple,
                     threshold_db: float) -> str | None:
    """The first node of ``after`` (in graph order) whose output matches none of ``reference`` (the node
    outputs of the graph before the pass, from ``_run_verified_forward``)."""
    by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for value in reference.values():
        by_shape[tuple(value.shape)].append(value)
    outputs: dict[str, torch.Tensor] = {}
    _run_verified_forward(after, inputs, outputs)
    for name, value in outputs.items():
        same_name = reference.get(name)
        candidates = ([same_name] if same_name is not None and same_name.shape == value.shape else [])
        candidates += by_shape.get(tuple(value.shape), [])
        if not any(sqnr(c, value) >= threshold_db for c in candidates):
            return name
    return None


def check_graph(gm: fx.GraphModule) -> None:
    """Structural invariants: every module or attribute a node names exists, and fx's lint passes."""
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            try:
                gm.get_submodule(n.target) if n.op == "call_module" else _get_attr(gm, n.target)
            except AttributeError as exc:
                raise VerificationError(f"node '{n.name}' refers to '{n.target}', which does not exist", node=n.name) from exc
    try:
        gm.graph.lint()
    except RuntimeError as exc:
        raise VerificationError(f"the graph is malformed: {exc}") from exc


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _state(gm: fx.GraphModule, copy_tensors: bool) -> tuple[str, dict[str, Any]]:
    """The graph's code and its parameters and buffers (copies if ``copy_tensors``), to compare with later."""
    state = gm.state_dict()
    if copy_tensors:
        state = {name: value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
                 for name, value in state.items()}
    return gm.code, state


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and torch.equal(a, b))
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def same_model(state: tuple[str, dict[str, Any]], gm: fx.GraphModule) -> bool:
    """Whether ``gm`` has the code and the parameter and buffer values of ``state`` (from ``_state``).

    An exact comparison (quantized tensors: codes and grid); a NaN never equals itself, so a model holding
    one counts as changed. Copying the state before a pass costs a memory copy, a tenth of hashing it."""
    code, before = state
    after = gm.state_dict()
    return code == gm.code and before.keys() == after.keys() and all(
        _same_value(before[name], after[name]) for name in before)


def _signatures(gm: fx.GraphModule) -> dict[str, tuple]:
    return {n.name: (n.op, str(n.target), repr(n.args), repr(n.kwargs)) for n in gm.graph.nodes}


# ------------------------------------------------------------------------------------------------ manager


class PassManager:
    """Runs a pipeline: ``PassManager([FuseBN(), ReplaceFunctional()]).run(model, example_inputs)``.

    ``verify``: check passes that preserve the function numerically (on by default).
    ``dump_dir``: write each graph after each pass. ``snapshots``: keep copies in ``pm.snapshots``.
    ``leaf_modules`` / ``auto_leaf``: passed to :func:`qpasses.graph.trace`.
    ``reproducer_dir``: on failure, save the graph from before the failing pass and the pipeline there.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        verify: bool = True,
        sqnr_threshold_db: float = 60.0,
        instruments: Sequence[Instrument] = (),
        dump_dir: str | Path | None = None,
        snapshots: bool = False,
        leaf_modules: Iterable[LeafSpec] = (),
        auto_leaf: bool = False,
        reproducer_dir: str | Path | None = None,
    ):
        self.passes = list(passes)
        self.verify = verify
        self.sqnr_threshold_db = sqnr_threshold_db
        self.instruments = list(instruments)
        self._dumper = DumpGraphs(dump_dir) if dump_dir is not None else None
        self._snapshots = KeepSnapshots() if snapshots else None
        self.instruments += [i for i in (self._dumper, self._snapshots) if i is not None]
        self.leaf_modules = tuple(leaf_modules)
        self.auto_leaf = auto_leaf
        self.reproducer_dir = Path(reproducer_dir) if reproducer_dir is not None else None
        self.report: Report | None = None

    @property
    def snapshots(self) -> list[tuple[str, fx.GraphModule]]:
        if self._snapshots is None:
            raise QPassesError("snapshots were not kept: create the PassManager with snapshots=True")
        return self._snapshots.snapshots

    def plan(self, model: nn.Module | None = None) -> Plan:
        """The order the passes will run in, with notes on insertions and moves. Raises ``PlanError``."""
        return plan_pipeline(self.passes, properties_of(model))

    def explain(self, model: nn.Module | None = None) -> str:
        return str(self.plan(model))

    def run(self, model: nn.Module, example_inputs: Any, inplace: bool = False) -> fx.GraphModule:
        """Plan, trace ``model`` on ``example_inputs``, run the passes; returns the rewritten graph module.

        Checked before any work (and before the deep copy): the plan (``PlanError``), the model and the
        inputs (``InputError``: not a float32 ``nn.Module``, or inputs it cannot run on, naming the node).
        """
        check_model(model, "PassManager.run")
        check_float_model(model, "PassManager.run")
        plan = self.plan(model)
        inputs = as_input_tuple(example_inputs)
        if not inplace:
            model = copy.deepcopy(model)
        start = time.perf_counter()
        captured = None  # the capture's SQNR against the eager model
        # Each node's output before a pass that must preserve the function: where it fails, they locate the
        # first node that departs. Kept from the forward that verifies the pass before (no copy of the model).
        node_outputs = self._record_for(plan, 0)
        if isinstance(model, fx.GraphModule):
            gm = model
            try:
                reference = _run_verified_forward(gm, inputs, node_outputs)
            except GraphRunError as exc:
                raise InputError(f"{type(gm).__name__} cannot run on the example inputs: {exc}") from exc
        else:
            with eval_mode(model):
                # trace verifies each rung it tries (a symbolic trace that differs goes on to export)
                gm = trace(model, inputs, leaf_modules=self.leaf_modules, auto_leaf=self.auto_leaf,
                           verify=self.verify)
            traced = _run_verified_forward(gm, inputs, node_outputs)
            if self.verify:  # every pass is then measured against the eager model, which is what the user has
                reference = verify_capture(model, gm, inputs, self.sqnr_threshold_db)
                captured = sqnr(reference, traced)
            else:
                reference = traced
        report = Report(plan, capture=state_of(gm).capture)
        n_nodes = len(gm.graph.nodes)
        report.records.append(PassRecord("trace", time.perf_counter() - start, n_nodes, n_nodes, sqnr_db=captured))
        if self._dumper is not None:
            self._dumper.dump("traced", gm)
        if self._snapshots is not None:
            self._snapshots.snapshots.append(("traced", copy.deepcopy(gm)))
        self.report = report

        baseline = reference  # what a function-preserving pass must reproduce: the output before it
        for position, p in enumerate(plan.passes):
            gm, output, node_outputs = self._run_one(p, position, plan, gm, inputs, reference, baseline, report,
                                                     node_outputs)
            if not p.preserves_function:
                baseline = output
            state = state_of(gm)
            state.properties = (state.properties - p.invalidates) | p.provides
        return gm

    def _record_for(self, plan: Plan, position: int) -> dict[str, torch.Tensor] | None:
        """A dict for node outputs if pass ``position`` of ``plan`` will be verified, else None."""
        verified = position < len(plan.passes) and self.verify and plan.passes[position].preserves_function
        return {} if verified else None

    def _fail(self, message: str, p: Pass, position: int, plan: Plan, node: str | None = None,
              error_type: type[PassError] = PassError) -> PassError:
        previous = tuple(q.name for q in plan.passes[:position])
        where = f"pass {position + 1} of {len(plan.passes)}, after {' → '.join(previous) if previous else 'tracing'}"
        return error_type(f"{p.name} ({where}): {message}", pass_name=p.name, position=position,
                          previous=previous, node=node)

    def _save_reproducer(self, gm_before: fx.GraphModule | None, p: Pass, plan: Plan) -> str:
        if self.reproducer_dir is None or gm_before is None:
            return ""
        self.reproducer_dir.mkdir(parents=True, exist_ok=True)
        path = self.reproducer_dir / f"before_{p.name}.pt"
        torch.save(gm_before, path)
        (self.reproducer_dir / "pipeline.txt").write_text(str(plan) + f"\nfailed at: {p.name}\n")
        return f"; reproducer written to {self.reproducer_dir}"

    def _run_one(self, p: Pass, position: int, plan: Plan, gm: fx.GraphModule, inputs: tuple, reference: Any,
                 baseline: Any, report: Report, outputs_before: dict[str, torch.Tensor] | None
                 ) -> tuple[fx.GraphModule, Any, dict[str, torch.Tensor] | None]:
        ctx = PassContext(example_inputs=inputs, pipeline=plan.passes, position=position)
        before = copy.deepcopy(gm) if self.reproducer_dir is not None else None
        signatures = _signatures(gm)
        # What a pass that does not say whether it changed the model is compared with afterwards.
        state = _state(before, copy_tensors=False) if before is not None else _state(gm, copy_tensors=True)
        outputs_after = self._record_for(plan, position + 1)
        nodes_before = len(gm.graph.nodes)
        for inst in self.instruments:
            inst.before_pass(p, gm, ctx)
        start = time.perf_counter()
        try:
            result = p.run(gm, ctx)
            gm = result.graph_module
            check_graph(gm)
            output = _run_verified_forward(gm, inputs, outputs_after)
        except QPassesError as exc:
            for inst in self.instruments:
                inst.after_pass_failed(p, gm, ctx, exc)
            hint = self._save_reproducer(before, p, plan)
            raise self._fail(f"{exc}{hint}", p, position, plan, node=getattr(exc, "node", None),
                             error_type=type(exc) if isinstance(exc, PassError) else PassError) from exc
        except Exception as exc:
            for inst in self.instruments:
                inst.after_pass_failed(p, gm, ctx, exc)
            hint = self._save_reproducer(before, p, plan)
            raise self._fail(f"internal error {type(exc).__name__}: {exc}{hint}", p, position, plan) from exc
        seconds = time.perf_counter() - start

        quality = sqnr(reference, output)
        kept = quality if baseline is reference else sqnr(baseline, output)
        if self.verify and p.preserves_function and kept < self.sqnr_threshold_db:
            node = first_divergence(outputs_before or {}, gm, inputs, self.sqnr_threshold_db)
            at = f"; first diverging node: '{node}'" if node else ""
            hint = self._save_reproducer(before, p, plan)
            raise self._fail(
                f"claims to preserve the model's function, but SQNR against the output before it is "
                f"{kept:.1f} dB < {self.sqnr_threshold_db:.0f} dB{at}{hint}",
                p, position, plan, node=node, error_type=VerificationError,
            )
        after = _signatures(gm)
        modified = result.modified if result.modified is not None else not same_model(state, gm)
        record = PassRecord(
            name=p.name, seconds=seconds, nodes_before=nodes_before, nodes_after=len(gm.graph.nodes),
            added=len(after.keys() - signatures.keys()), removed=len(signatures.keys() - after.keys()),
            changed=sum(1 for k in after.keys() & signatures.keys() if after[k] != signatures[k]),
            modified=modified, sqnr_db=quality, stats=dict(ctx.stats), notes=list(ctx.notes),
        )
        report.records.append(record)
        for inst in self.instruments:
            inst.after_pass(p, gm, ctx, record)
        return gm, output, outputs_after
