"""Per-layer quantization sensitivity, hybrid quantization (the most sensitive layers kept float) and
per-layer weight bit-widths chosen for a size budget.

    sens = Sensitivity(model, calibration_batches, backend="x86")
    table = sens.run()                           # quantize each layer alone, and all but each layer
    print(table.to_markdown(top=10))
    hybrid = sens.keep_float(table, k=3)         # measured; hybrid.config goes to PTQ(config=...)
    smallest = sens.smallest_float_set(table, target=25.0)
    plan = sens.choose_weight_bits(budget=0.6, bits=(4, 8))

Every variant is the real pipeline (InsertObservers → Lower, the backend's int8 kernels) with a
different ``QuantConfig``; only calibration is shared. Calibration runs ONCE for all variants that
``run`` measures (plus once more for any observer a later configuration needs that no earlier one had):
observers record the float model's values, whatever else is quantized, so an observer that watches
the same values (same nodes, same order) with the same kind of statistics ends with the same buffers
in every variant. Each group of values one observer watches (a value alone, or a ``cat`` with the
inputs that share its observer) is calibrated once, and every variant's observers load those buffers:
the result is bit-identical to calibrating that variant on its own (tested), for a fraction of the cost.

Under torch.distributed, calibration is sharded over the ranks and merged (``qpasses.distributed``), and
each rank measures its share of the variants; every rank gets the same table as one process would. An
``eval_fn`` then runs on one rank per variant, so it must not use collectives itself.

Metric: by default the SQNR (dB) of the model's outputs against the float model on the evaluation
batches (the calibration batches unless ``eval_data`` is given); or ``eval_fn(model) -> float``,
higher is better. ``main(argv)`` is the ``qpasses sensitivity`` command.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import itertools
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from qpasses import distributed
from qpasses.analysis.metrics import sqnr
from qpasses.errors import QPassesError
from qpasses.graph.channels import out_channels
from qpasses.graph.modules import set_module, unique_name
from qpasses.graph.trace import as_input_tuple, propagate_shapes
from qpasses.passes.base import Pass, PassContext
from qpasses.passes.calibrate import batch_inputs, model_device, progress, run_batches, to_device
from qpasses.passes.fuse_bn import FuseBN
from qpasses.passes.insert_observers import InsertObservers, resolve_config
from qpasses.passes.lower import Lower
from qpasses.passes.manager import PassManager
from qpasses.passes.reference import Reference
from qpasses.passes.replace_functional import ReplaceFunctional
from qpasses.quant.annotate import Annotation, annotate, qualified_name
from qpasses.quant.backends import get_backend
from qpasses.quant.lowering import weight_qparams, weight_spec
from qpasses.quant.observers import MinMaxObserver, MovingAverageMinMaxObserver, Observer, make_observer
from qpasses.quant.ops import Role
from qpasses.quant.overrides import exact_pattern, with_node_overrides
from qpasses.quant.spec import QuantConfig, QuantPair, QuantSpec
from qpasses.quant.state import WEIGHT_QPARAMS_KEY, state_of
from qpasses.validation import check_count, check_data, check_model, check_out_path

# ------------------------------------------------------------------------------------------------ metrics


class Metric:
    """A measurement of a quantized model, higher is better, and ``loss``: an error that adds up
    (approximately) over independent per-layer perturbations, used to combine per-layer measurements."""

    name = "metric"

    def __call__(self, model: nn.Module) -> float:
        raise NotImplementedError

    def loss(self, value: float) -> float:
        return -value


class OutputSQNR(Metric):
    """SQNR (dB) of the model's outputs against ``reference`` on ``batches`` (every batch, every output).

    Its loss is the relative noise power ``10^(−SQNR/10)``: independent noise sources add in power.
    """

    name = "SQNR dB"

    def __init__(self, reference: nn.Module, batches: Sequence[tuple]):
        self.batches = list(batches)
        self.reference = self._outputs(reference)

    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        """Every output on every batch, on the CPU (the float model may run on a GPU, the int8 one on the CPU)."""
        device = model_device(model)
        with torch.no_grad():
            per_batch = [[leaf.cpu() for leaf in tree_flatten(model(*to_device(inputs, device)))[0]]
                         for inputs in self.batches]
        return [torch.cat([leaves[i] for leaves in per_batch]) for i in range(len(per_batch[0]))]

    def __call__(self, model: nn.Module) -> float:
        return sqnr(self.reference, self._outputs(model))

    def loss(self, value: float) -> float:
        return 10.0 ** (-value / 10.0)


class UserMetric(Metric):
    """The user's ``eval_fn(model) -> float`` (higher is better, e.g. accuracy); its loss is ``−value``."""

    def __init__(self, eval_fn: Callable[[nn.Module], float], name: str | None = None):
        self.eval_fn = eval_fn
        self.name = name or getattr(eval_fn, "__name__", "eval_fn")

    def __call__(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(self.eval_fn(model))


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Layer:
    """A quantizable layer: its module's qualified name (what ``QuantConfig`` patterns match), class,
    number of weight elements, and multiply-accumulates per sample on the example inputs (output elements
    × weights per output channel)."""

    name: str
    kind: str
    weights: int
    macs: int = 0

    def weight_bytes(self, bits: int) -> int:
        """Its weights packed at ``bits`` bits: ``ceil(weights · bits / 8)``."""
        return -(-self.weights * bits // 8)


@dataclass(frozen=True)
class LayerSensitivity:
    """``alone``: the metric with only this layer quantized (everything else float);
    ``all_but``: with every layer but this one quantized; ``gain``: ``all_but`` minus the metric of the
    fully quantized model (what keeping it float buys)."""

    layer: Layer
    alone: float
    all_but: float
    gain: float


@dataclass
class SensitivityTable:
    """Per-layer sensitivities; ``full``: the metric of the fully quantized model. ``ranked()`` orders
    layers most sensitive first: by ``gain`` (largest first), then by ``alone`` (lowest first)."""

    metric: str
    backend: str
    full: float
    rows: list[LayerSensitivity]

    def ranked(self) -> list[LayerSensitivity]:
        return sorted(self.rows, key=lambda r: (-_finite(r.gain), _finite(r.alone)))

    def most_sensitive(self, k: int) -> list[str]:
        return [r.layer.name for r in self.ranked()[:k]]

    def _rows(self, top: int | None) -> tuple[list[str], list[list[str]]]:
        header = ["rank", "layer", "type", "weights", f"{self.metric}, only it quantized",
                  f"{self.metric}, all but it", "gain if float"]
        rows = [[str(i + 1), r.layer.name, r.layer.kind, str(r.layer.weights), _fmt(r.alone), _fmt(r.all_but),
                 _fmt(r.gain, signed=True)] for i, r in enumerate(self.ranked()[:top])]
        return header, rows

    def _caption(self) -> str:
        return f"{self.backend}: fully quantized {self.metric} = {_fmt(self.full)}; most sensitive first"

    def to_markdown(self, top: int | None = None) -> str:
        header, rows = self._rows(top)
        lines = [self._caption(), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)

    def to_text(self, top: int | None = None) -> str:
        header, rows = self._rows(top)
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join([self._caption(), fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                          *(fmt.format(*row) for row in rows)])

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        return {"metric": self.metric, "backend": self.backend, "full": _json_number(self.full),
                "layers": [{"name": r.layer.name, "type": r.layer.kind, "weights": r.layer.weights,
                            "alone": _json_number(r.alone), "all_but": _json_number(r.all_but),
                            "gain": _json_number(r.gain)} for r in self.ranked()[:top]]}

    def plot(self, path: str | Path, top: int | None = 20) -> Path:
        """A bar chart of the ``top`` most sensitive layers (needs matplotlib: ``pip install qpasses[plot]``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise QPassesError("plotting needs matplotlib: pip install 'qpasses[plot]'") from None
        rows = self.ranked()[:top][::-1]
        names = [r.layer.name for r in rows]
        fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(11, 0.32 * len(rows) + 1.6))
        left.barh(names, [_finite(r.gain) for r in rows], color="tab:red")
        left.set_xlabel(f"{self.metric} gained keeping it float (all others quantized)")
        right.barh(names, [_finite(r.alone) for r in rows], color="tab:blue")
        right.set_xlabel(f"{self.metric} with only it quantized")
        fig.suptitle(self._caption())
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


@dataclass
class HybridResult:
    """A measured hybrid configuration: ``keep_float`` layers stay float; ``metric`` is measured with
    ``config``; ``trials`` are every ``(number of float layers, metric)`` measured on the way."""

    keep_float: list[str]
    config: QuantConfig
    metric: float
    target: float | None = None
    trials: list[tuple[int, float]] = field(default_factory=list)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.metric >= self.target


@dataclass
class BitsPlan:
    """Weight bits per layer chosen for a size budget, with the measured result and the uniform
    alternative that also fits: ``uniform_bits`` for every layer, measured as ``uniform_metric``."""

    bits: dict[str, int]
    pairs: dict[str, QuantPair]
    weight_bytes: int
    budget_bytes: int
    eight_bit_bytes: int
    predicted_loss: float
    metric: float
    uniform_bits: int
    uniform_metric: float
    losses: dict[tuple[str, int], float]

    def summary(self, metric_name: str) -> str:
        counts = ", ".join(f"{b}-bit: {n}" for b, n in sorted(Counter(self.bits.values()).items()))
        return (f"weights {self.weight_bytes} B of {self.budget_bytes} B budget "
                f"({self.weight_bytes / self.eight_bit_bytes:.0%} of 8-bit); layers {counts}; "
                f"{metric_name} {_fmt(self.metric)} vs {_fmt(self.uniform_metric)} for uniform {self.uniform_bits}-bit")


# ---------------------------------------------------------------------------------------- shared calibration

# What an observer's buffers depend on besides its input: its class, the per-channel axis, and the
# averaging constant of the moving-average kind. Bits, signedness, symmetry, reduce_range and the
# percentile only shape the qparams computed from those buffers.
_StateKey = tuple[str, int | None, float | None]
_GroupKey = tuple[tuple[str, ...], _StateKey]


def _state_key(spec: QuantSpec) -> _StateKey:
    cls = type(make_observer(spec))
    return (cls.__name__, spec.axis, spec.averaging_constant if issubclass(cls, MovingAverageMinMaxObserver) else None)


def _annotation_groups(gm: fx.GraphModule, ann: Annotation) -> dict[_GroupKey, QuantSpec]:
    """The observer groups ``InsertObservers`` will create for ``ann``: values sharing one observer
    (in graph order, the order the observer sees them) and the spec it is made from."""
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    members: dict[str, list[str]] = {}
    for value in ann.observe:
        members.setdefault(ann.shared.get(value, value), []).append(value)
    return {(tuple(sorted(values, key=order.__getitem__)), _state_key(ann.observe[owner])): ann.observe[owner]
            for owner, values in members.items()}


def _observer_groups(gm: fx.GraphModule) -> dict[str, _GroupKey]:
    """Each observer module of an observed graph → the values it watches (graph order) and state key."""
    observers = {name: m for name, m in gm.named_modules() if isinstance(m, Observer)}
    watched: dict[str, list[str]] = {name: [] for name in observers}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in observers:
            watched[node.target].append(node.args[0].name)
    return {name: (tuple(watched[name]), _state_key(observers[name].spec)) for name in observers}


def _fixed_range_observer(spec: QuantSpec, name: str, value_range: tuple[torch.Tensor, torch.Tensor]) -> Observer:
    """An observer whose range is ``value_range``: its qparams, ``compute_qparams(*range, spec)``, are
    those of the observer whose selected range that is."""
    observer = MinMaxObserver(spec, name)
    lo, hi = value_range
    observer.min_val.resize_(lo.shape).copy_(lo)
    observer.max_val.resize_(hi.shape).copy_(hi)
    observer.batches_seen.fill_(1)
    return observer


class Sensitivity:
    """Quantized variants of one model that share one calibration, and the analyses built on them.

    ``model``: the float model (not modified); ``data``: calibration batches (tensors or tuples whose
    first items are the inputs), of which the first ``num_batches`` are kept in memory and reused;
    ``example_inputs``: for tracing (default: the first batch); ``backend``/``config``: as for ``PTQ``;
    ``eval_fn``: ``eval_fn(model) -> float``, higher is better (default: output SQNR against the float
    model on ``eval_data``, default the calibration batches); ``float_passes``: float rewrites applied
    first (default ``FuseBN``, ``ReplaceFunctional``; ``()`` when ``model`` is already such a graph).
    """

    def __init__(self, model: nn.Module, data: Iterable, example_inputs: Any = None, backend: str = "x86",
                 config: QuantConfig | None = None, num_batches: int | None = None,
                 eval_fn: Callable[[nn.Module], float] | None = None, eval_data: Iterable | None = None,
                 float_passes: Sequence[Pass] | None = None, progress: bool = True):
        check_model(model, "Sensitivity")
        num_batches = check_count(num_batches, "num_batches", "Sensitivity")
        self.calibration = list(itertools.islice(check_data(data, "Sensitivity"), num_batches))
        if not self.calibration:
            raise QPassesError("sensitivity: the calibration data yielded no batches; give at least one")
        inputs = as_input_tuple(example_inputs) if example_inputs is not None else batch_inputs(self.calibration[0], 1)
        self.backend = get_backend(backend).name
        self.config = resolve_config(self.backend, config, None, None)
        self.progress = progress
        self.prepared = self._prepare(model, inputs, float_passes)
        self.example_inputs = inputs
        n_inputs = sum(1 for n in self.prepared.graph.nodes if n.op == "placeholder")
        if eval_fn is not None:
            self.metric: Metric = UserMetric(eval_fn)
        else:
            batches = self.calibration if eval_data is None else list(eval_data)
            self.metric = OutputSQNR(self.prepared, [batch_inputs(b, n_inputs) for b in batches])
        ann = annotate(self.prepared, get_backend(self.backend), self.config)
        modules = dict(self.prepared.named_modules())
        propagate_shapes(self.prepared, to_device(inputs, model_device(self.prepared)))  # for the MACs
        self.layers = [Layer(n.target, type(modules[n.target]).__name__, modules[n.target].weight.numel(),
                             _macs(n, modules[n.target]))
                       for n in self.prepared.graph.nodes if ann.roles.get(n.name) is Role.COMPUTE]
        if not self.layers:
            raise QPassesError(f"sensitivity: no conv or linear layer is quantized under the {self.backend} "
                               "configuration; there is nothing to rank")
        nodes = {n.name: n for n in self.prepared.graph.nodes}
        # Activations folded into a layer's output range (ReLU6 → clamp) belong to it when it is quantized alone.
        self._folded: dict[str, list[str]] = {}
        for activation, producer in ann.fused.items():
            node = nodes[activation]
            self._folded.setdefault(nodes[producer].target, []).append(qualified_name(node))
        self._states: dict[_GroupKey, dict[str, torch.Tensor]] = {}
        self._ranges: dict[tuple[_GroupKey, QuantSpec], tuple[torch.Tensor, torch.Tensor]] = {}
        self._weight_qparams: dict[tuple[str, QuantSpec], tuple[torch.Tensor, torch.Tensor]] = {}
        self.calibration_passes = 0
        self._splitting = False  # measuring a share of the variants (torch.distributed): no collectives then

    @staticmethod
    def _prepare(model: nn.Module, inputs: tuple, float_passes: Sequence[Pass] | None) -> fx.GraphModule:
        passes = [FuseBN(), ReplaceFunctional()] if float_passes is None else list(float_passes)
        if passes:
            prepared = PassManager(passes).run(model, inputs)
        elif isinstance(model, fx.GraphModule):
            prepared = copy.deepcopy(model)
        else:
            raise QPassesError("sensitivity: float_passes=() needs a traced GraphModule with FloatFunctional "
                               "modules; give the model itself and keep the default float passes")
        return prepared.eval()

    # ---------------------------------------------------------------------------------- configurations

    def _layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise QPassesError(f"sensitivity: '{name}' is not a quantized layer; known: "
                           f"{', '.join(layer.name for layer in self.layers[:8])}{', ...' if len(self.layers) > 8 else ''}")

    def pair(self, name: str) -> QuantPair:
        """The weight/activation specs the base configuration gives layer ``name``."""
        pair = self.config.for_node(name, type(self.prepared.get_submodule(name)))
        assert pair is not None  # layers are the nodes the configuration quantizes
        return pair

    def only(self, name: str) -> QuantConfig:
        """Only layer ``name`` quantized (its input, weights and output, with the activations folded into
        its output range); everything else float."""
        pair = self.pair(self._layer(name).name)
        own = {exact_pattern(part): pair for part in [name, *self._folded.get(name, [])]}
        return dataclasses.replace(self.config, by_name={**own, "*": None}, by_module_type={},
                                   keep_float=set(self.config.keep_float))

    def keep_float_config(self, names: Iterable[str]) -> QuantConfig:
        """Everything quantized as configured except the layers ``names``, which stay float."""
        extra = {exact_pattern(self._layer(name).name) for name in names}
        return dataclasses.replace(self.config, keep_float=set(self.config.keep_float) | extra,
                                   by_name=dict(self.config.by_name), by_module_type=dict(self.config.by_module_type))

    def layer_pairs(self, names: Iterable[str], pair: QuantPair) -> dict[str, QuantPair]:
        """``pair`` for each layer of ``names`` and for the activations folded into its output range (what
        ``only`` quantizes with the layer), keyed by qualified name, for ``with_node_overrides``."""
        return {part: pair for name in names
                for part in [self._layer(name).name, *self._folded.get(self._layer(name).name, [])]}

    def weight_bits_pairs(self, bits: dict[str, int]) -> dict[str, QuantPair]:
        """Per-layer pairs with ``bits[name]``-bit weights (activations as configured)."""
        pairs = {}
        for name, b in bits.items():
            pair = self.pair(self._layer(name).name)
            pairs[name] = QuantPair(weight=pair.weight.replace(bits=b), activation=pair.activation)
        return pairs

    def weight_bits_config(self, bits: dict[str, int]) -> QuantConfig:
        return with_node_overrides(self.config, self.weight_bits_pairs(bits))

    # ------------------------------------------------------------------------------------ measurement

    def prefetch(self, configs: Iterable[QuantConfig]) -> None:
        """Calibrate, in one pass over the data, every observer group these configurations need that
        no earlier calibration covered."""
        backend = get_backend(self.backend)
        needed: dict[_GroupKey, QuantSpec] = {}
        for config in configs:
            needed.update(_annotation_groups(self.prepared, annotate(self.prepared, backend, config)))
        self._calibrate({key: spec for key, spec in needed.items() if key not in self._states})

    def _calibrate(self, groups: dict[_GroupKey, QuantSpec]) -> None:
        if not groups:
            return
        if self._splitting and distributed.is_distributed():
            # Calibration is a collective; inside work split over ranks the others would never join it.
            raise QPassesError(f"internal: sensitivity needs observers ({next(iter(groups))[0]}) its prefetch "
                               "did not calibrate")
        gm = copy.deepcopy(self.prepared)
        nodes = {n.name: n for n in gm.graph.nodes}
        targets = {}
        for key, spec in groups.items():
            values = key[0]
            target = unique_name(gm, f"{values[-1]}_sensitivity_obs")
            gm.add_submodule(target, make_observer(spec, name=values[-1]))
            # Side nodes: they watch the value without feeding anything, so the float function is intact.
            for value in values:
                with gm.graph.inserting_after(nodes[value]):
                    gm.graph.call_module(target, (nodes[value],))
            targets[key] = target
        gm.recompile()
        run_batches(gm, self.calibration, None, "calibrating (shared)", self.progress)
        for key, target in targets.items():
            self._states[key] = copy.deepcopy(gm.get_submodule(target).state_dict())
        self.calibration_passes += 1

    def quantize(self, config: QuantConfig) -> fx.GraphModule:
        """The lowered int8 model for ``config`` (the reference graph for a backend without torch.ao kernels),
        its observers loaded from the shared calibration (observer groups never calibrated before are calibrated
        now, in one pass)."""
        gm = copy.deepcopy(self.prepared)
        ctx = PassContext(example_inputs=self.example_inputs)
        gm = InsertObservers(self.backend, config).run(gm, ctx).graph_module
        groups = _observer_groups(gm)
        missing = {key: gm.get_submodule(target).spec for target, key in groups.items() if key not in self._states}
        self._calibrate(missing)
        for target, key in groups.items():
            observer = gm.get_submodule(target)
            set_module(gm, target, _fixed_range_observer(observer.spec, observer.name, self._range(key, observer.spec)))
        self._pin_weight_qparams(gm)
        # A runtime without torch.ao kernels (inductor) runs what the reference graph simulates.
        final = Lower(self.backend) if get_backend(self.backend).engine is not None else Reference(self.backend)
        gm = final.run(gm, ctx).graph_module
        return gm.eval()

    def _pin_weight_qparams(self, gm: fx.GraphModule) -> None:
        """Give each quantized layer the weight qparams lowering would compute, computed once per layer and
        spec for all variants: a per-channel MSE weight range costs more than lowering the rest."""
        ann = state_of(gm).annotation
        for node in gm.graph.nodes:
            if ann.roles.get(node.name) is not Role.COMPUTE or WEIGHT_QPARAMS_KEY in node.meta:
                continue
            module = gm.get_submodule(node.target)
            spec = weight_spec(module, ann.pairs[node.name].weight)
            if (node.target, spec) not in self._weight_qparams:
                self._weight_qparams[node.target, spec] = weight_qparams(module.weight, spec)
            node.meta[WEIGHT_QPARAMS_KEY] = self._weight_qparams[node.target, spec]

    def _range(self, key: _GroupKey, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """The range an observer of ``spec`` selects from group ``key``'s buffers, computed once: the
        histogram observers' range searches cost far more than lowering and evaluating a variant."""
        if (key, spec) not in self._ranges:
            observer = make_observer(spec)
            observer.load_state_dict(self._states[key])
            self._ranges[key, spec] = observer.range()
        return self._ranges[key, spec]

    def measure(self, config: QuantConfig) -> float:
        """The metric of the model quantized with ``config``."""
        return self.metric(self.quantize(config))

    def _measure_all(self, configs: list[QuantConfig], description: str) -> list[float]:
        """The metric of each configuration; under torch.distributed each rank measures its share of them
        and every rank gets all the values (calibration, shared, runs first on all ranks together)."""
        self.prefetch(configs)
        self._splitting = True
        try:
            return distributed.map_items(configs, self.measure, show=lambda mine: progress(
                mine, len(mine), description, self.progress, "variant"))
        finally:
            self._splitting = False

    # --------------------------------------------------------------------------------------- analyses

    def run(self, layers: Iterable[str] | None = None, alone: bool = True) -> SensitivityTable:
        """Measure, for each layer (default: all), the model with only it quantized and with all but it.
        ``alone=False`` skips the first (half the variants; ``alone`` is then NaN): enough for ``gain``."""
        names = [layer.name for layer in self.layers] if layers is None else [self._layer(n).name for n in layers]
        only = [self.only(n) for n in names] if alone else []
        configs = [self.config, *only, *(self.keep_float_config([n]) for n in names)]
        values = self._measure_all(configs, "sensitivity")
        full, all_but = values[0], values[len(only) + 1:]
        alone = values[1:len(only) + 1] if alone else [math.nan] * len(names)
        rows = [LayerSensitivity(self._layer(n), a, b, b - full) for n, a, b in zip(names, alone, all_but, strict=True)]
        return SensitivityTable(self.metric.name, self.backend, full, rows)

    def keep_float(self, table: SensitivityTable, k: int) -> HybridResult:
        """The ``k`` most sensitive layers of ``table`` kept float, measured."""
        if not 0 <= k <= len(table.rows):
            raise ValueError(f"k must be in [0, {len(table.rows)}], got {k}")
        names = table.most_sensitive(k)
        config = self.keep_float_config(names)
        value = self.measure(config)
        return HybridResult(names, config, value, trials=[(k, value)])

    def smallest_float_set(self, table: SensitivityTable, target: float, max_float: int | None = None) -> HybridResult:
        """The fewest most-sensitive layers (greedy in ``table.ranked()`` order, by all-but-one gain) that
        must stay float for the metric to reach ``target``: prefixes of the ranking are measured, shortest
        first, and the first that meets the target is returned; so the returned metric is a real
        measurement. If none up to ``max_float`` layers does, the best measured prefix is returned with
        ``met == False``."""
        limit = len(table.rows) if max_float is None else min(max_float, len(table.rows))
        ranking = table.most_sensitive(limit)
        trials: list[tuple[int, float]] = []
        best: HybridResult | None = None
        for k in progress(range(limit + 1), limit + 1, "float-set search", self.progress, "variant"):
            config = self.keep_float_config(ranking[:k])
            value = table.full if k == 0 else self.measure(config)
            trials.append((k, value))
            if best is None or value > best.metric:
                best = HybridResult(ranking[:k], config, value, target)
            if value >= target:
                return HybridResult(ranking[:k], config, value, target, trials)
        assert best is not None
        best.trials = trials
        return best

    def weight_bit_losses(self, bits: Sequence[int]) -> dict[tuple[str, int], float]:
        """For each layer and each weight bit-width in ``bits`` other than the configured one: the
        measured loss increase (``Metric.loss``) with only that layer's weights at that width."""
        base = self.config.weight.bits
        candidates = [(layer.name, b) for layer in self.layers for b in bits if b != base]
        values = self._measure_all([self.weight_bits_config({n: b}) for n, b in candidates], "bit sensitivity")
        full_loss = self.metric.loss(self.measure(self.config))
        return {key: self.metric.loss(v) - full_loss for key, v in zip(candidates, values, strict=True)}

    def choose_weight_bits(self, budget: float | int, bits: Sequence[int] = (4, 6, 8)) -> BitsPlan:
        """Weight bits per layer from ``bits`` that fit ``budget`` (a float in (0, 1]: a fraction of the
        weights' 8-bit size; an int: bytes) with the least predicted loss, then measured.

        Each layer's loss at each width is measured alone (``weight_bit_losses``); losses are assumed to
        add up (noise powers of independent perturbations do). The choice is then a multiple-choice
        knapsack, solved exactly by dynamic programming over the budget in at most ``_KNAPSACK_UNITS``
        steps (sizes rounded up, so the budget is never exceeded): a greedy "cheapest loss per byte"
        order can strand budget, the DP cannot, and its cost is nothing next to the measurements.
        """
        bits = sorted(set(bits))
        for b in bits:
            QuantSpec(signed=True, symmetric=True, bits=b)  # validates the width
        eight = sum(layer.weight_bytes(8) for layer in self.layers)
        if isinstance(budget, bool) or not isinstance(budget, int | float):
            raise ValueError(f"budget must be a fraction (float) or bytes (int), got {budget!r}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(f"a fractional budget must be in (0, 1], got {budget}")
        budget_bytes = int(budget * eight) if isinstance(budget, float) else budget
        smallest = sum(layer.weight_bytes(bits[0]) for layer in self.layers)
        if budget_bytes < smallest:
            raise QPassesError(f"mixed precision: a budget of {budget_bytes} B is below {smallest} B, the size with "
                               f"every layer at {bits[0]} bits; raise the budget or allow fewer bits")
        losses = self.weight_bit_losses(bits)
        base = self.config.weight.bits
        sizes = [[layer.weight_bytes(b) for b in bits] for layer in self.layers]
        costs = [[0.0 if b == base else losses[(layer.name, b)] for b in bits] for layer in self.layers]
        choice = _solve_knapsack(sizes, costs, budget_bytes)
        chosen = {layer.name: bits[c] for layer, c in zip(self.layers, choice, strict=True)}
        pairs = self.weight_bits_pairs(chosen)
        measured = self.measure(with_node_overrides(self.config, pairs))
        uniform = self.measure(self.weight_bits_config({layer.name: bits[0] for layer in self.layers}))
        return BitsPlan(
            bits=chosen, pairs=pairs, weight_bytes=sum(layer.weight_bytes(chosen[layer.name]) for layer in self.layers),
            budget_bytes=budget_bytes, eight_bit_bytes=eight,
            predicted_loss=sum(costs[i][c] for i, c in enumerate(choice)), metric=measured, uniform_bits=bits[0],
            uniform_metric=uniform, losses=losses,
        )


def _macs(node: fx.Node, module: nn.Module) -> int:
    """Multiply-accumulates of a conv/linear node per sample: output elements × weights per output channel."""
    shape = node.meta["tensor_meta"].shape
    per_sample = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
    return per_sample * module.weight.numel() // out_channels(module)


_KNAPSACK_UNITS = 4096


def _solve_knapsack(sizes: list[list[int]], costs: list[list[float]], capacity: int) -> list[int]:
    """One option per item minimising the total cost with total size ≤ ``capacity`` (multiple-choice
    knapsack). Sizes are counted in units of ``ceil(capacity / _KNAPSACK_UNITS)`` bytes, rounded up."""
    unit = max(1, -(-capacity // _KNAPSACK_UNITS))
    slots = capacity // unit
    inf = math.inf
    best = torch.full((slots + 1,), inf, dtype=torch.float64)
    best[0] = 0.0  # best[s]: least cost of the items so far using exactly s units
    picks = []
    for item_sizes, item_costs in zip(sizes, costs, strict=True):
        options = torch.full((len(item_sizes), slots + 1), inf, dtype=torch.float64)
        for i, (size, cost) in enumerate(zip(item_sizes, item_costs, strict=True)):
            units = -(-size // unit)
            if units <= slots:
                options[i, units:] = best[: slots + 1 - units] + cost
        best, pick = options.min(dim=0)
        picks.append(pick)
    if not bool(torch.isfinite(best).any()):
        # Only reachable through rounding: every item at its smallest option fits in bytes.
        return [min(range(len(s)), key=s.__getitem__) for s in sizes]
    slot = int(torch.argmin(best))
    choice = []
    for item_sizes, pick in zip(reversed(sizes), reversed(picks), strict=True):
        option = int(pick[slot])
        choice.append(option)
        slot -= -(-item_sizes[option] // unit)
    return choice[::-1]


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.copysign(1e9, value)


def _fmt(value: float, signed: bool = False) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else _fmt(value)


# ---------------------------------------------------------------------------------------------------- CLI


def _load_model(spec: str, pretrained: bool) -> tuple[nn.Module, int, Any]:
    """A zoo name or ``module:factory``; returns the model, its input size and normalization (or None)."""
    if ":" in spec:
        module_name, _, factory = spec.partition(":")
        try:
            model = getattr(importlib.import_module(module_name), factory)()
        except (ImportError, AttributeError) as exc:
            raise QPassesError(f"cannot build '{spec}': {exc}; give MODULE:FACTORY, a callable returning the model") from exc
        return model.eval(), 224, None
    import qpasses_zoo as zoo

    model_spec = zoo.spec(spec)
    return zoo.get(spec, pretrained=pretrained), model_spec.input_size, model_spec.normalization


def _calibration(kind: str, n: int, batch_size: int, size: int, normalization: Any) -> list[torch.Tensor]:
    if kind == "photos":
        from qpasses_zoo.data import IMAGENET, loader, photo_crops

        dataset = photo_crops(n * batch_size, size, split="calib", normalization=normalization or IMAGENET)
        return [batch for (batch,) in loader(dataset, batch_size)]
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch_size, 3, size, size, generator=generator) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    """``qpasses sensitivity MODEL``: rank the layers of MODEL by quantization sensitivity."""
    parser = argparse.ArgumentParser(prog="qpasses sensitivity", description=main.__doc__)
    parser.add_argument("model", help="a zoo model name (see zoo.list_models()) or MODULE:FACTORY")
    parser.add_argument("--backend", default="x86", help="x86, fbgemm, qnnpack or onednn (default x86)")
    parser.add_argument("--calib", default="photos", choices=["photos", "random"],
                        help="calibration images: crops of real photos (offline) or Gaussian noise")
    parser.add_argument("--num-batches", type=int, default=4, help="calibration batches (default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--input-size", type=int, help="image size (default: the zoo model's, else 224)")
    parser.add_argument("--pretrained", action="store_true", help="load the zoo model's offline weights")
    parser.add_argument("--top", type=int, default=None, help="show only the K most sensitive layers")
    parser.add_argument("--out", type=Path, help="write the table (Markdown) to this file")
    parser.add_argument("--plot", type=Path, help="write a bar chart (PNG) to this file (needs matplotlib)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the plain-text table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        for flag, path in (("--out", args.out), ("--plot", args.plot)):
            if path is not None:
                check_out_path(path, flag)
        model, size, normalization = _load_model(args.model, args.pretrained)
        size = args.input_size or size
        data = _calibration(args.calib, args.num_batches, args.batch_size, size, normalization)
        sens = Sensitivity(model, data, data[0][:1], backend=args.backend, progress=not args.no_progress)
        table = sens.run()
        if args.out:
            args.out.write_text(table.to_markdown(args.top) + "\n")
        if args.plot:
            table.plot(args.plot, args.top or 20)
    except (QPassesError, ImportError, ValueError) as exc:
        print(f"qpasses sensitivity: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(table.to_dict(args.top), indent=2) if args.json else table.to_text(args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
