"""The integer grid of every int8 value of a calibrated graph: the grid decisions the reference graph
(``qpasses.passes.Reference``) is built on, and through it every lowering (``qpasses.passes.Lower``'s torch.ao
kernels read them from the reference graph's quantize ops).

A value's grid is its observer's (scale, zero point) and code range, or where the backend's add kernels refuse
the observed grids' scale ratios (qnnpack), the wider grid ``legalize_add_scales`` gives it; the output of a
fixed-range or derived op (sigmoid, ``mul_scalar``) is on the grid its kernel gives; qparams-preserving ops
(pools, reshapes) keep their input's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from qpasses.errors import QPassesError
from qpasses.quant import lowering
from qpasses.quant.annotate import Annotation
from qpasses.quant.backends import Backend
from qpasses.quant.observers import Observer
from qpasses.quant.ops import Role, kernel_output_grid
from qpasses.quant.state import WEIGHT_QPARAMS_KEY

WeightQParams = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Grid:
    """One value's integer grid: real value ``(code − zero_point) · scale`` for codes in ``[qmin, qmax]`` of an
    8-bit container of ``dtype`` (``torch.uint8`` or ``torch.int8``, as ``torch.ops.quantized_decomposed``
    names them)."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    dtype: torch.dtype

    @property
    def quantized_dtype(self) -> torch.dtype:
        """The torch.ao quantized dtype of the same container (``torch.quint8``/``torch.qint8``)."""
        return torch.qint8 if self.dtype == torch.int8 else torch.quint8

    @property
    def narrowed(self) -> bool:
        """Whether the codes are narrower than the 8-bit container (sub-8-bit, reduce_range 7-bit)."""
        info = torch.iinfo(self.dtype)
        return self.qmin > info.min or self.qmax < info.max


def container(dtype: torch.dtype) -> torch.dtype:
    """The plain integer dtype of a torch.ao quantized dtype (``torch.quint8`` → ``torch.uint8``)."""
    return torch.int8 if dtype == torch.qint8 else torch.uint8


def weight_qparams_by_node(gm: fx.GraphModule, ann: Annotation) -> dict[str, WeightQParams]:
    """The weight (scale, zero point) of each int8 conv/linear, by node name: the grid a pass rounded the weight
    on (AdaRound, QAT's convert: ``node.meta['weight_qparams']``), else the one observed on the weight with its
    spec. Decided once for the reference graph and the kernels (an MSE weight observer searches)."""
    chosen = {}
    for node in gm.graph.nodes:
        if ann.roles.get(node.name) is Role.COMPUTE:
            pinned = node.meta.get(WEIGHT_QPARAMS_KEY)
            if pinned is None:
                module = gm.get_submodule(node.target)
                pinned = lowering.weight_qparams(module.weight, lowering.weight_spec(module, ann.pairs[node.name].weight))
            chosen[node.name] = pinned
    return chosen


class Grids:
    """The grid decisions for one observed, calibrated graph under ``backend``, made on construction (add grids
    widened; ``note`` receives a line for each widening). Read them before the graph is rewritten; they also
    answer for the nodes of an unmodified copy of the graph (the same names, targets and edges)."""

    def __init__(self, gm: fx.GraphModule, ann: Annotation, backend: Backend, note: Callable[[str], None]):
        self.gm, self.ann, self.backend, self.note = gm, ann, backend, note
        self.widened: dict[Observer, tuple[float, int]] = {}  # observer → the legal grid it gets instead
        self.observed: dict[Observer, tuple[float, int]] = {}  # observer → its qparams (MSE ones search)
        self.legalize_add_scales()

    def observer(self, node: fx.Node) -> Observer | None:
        if node.op != "call_module":
            return None
        module = self.gm.get_submodule(node.target)
        return module if isinstance(module, Observer) else None

    def output_observer(self, node: fx.Node) -> Observer:
        """The observer reading ``node``'s value (after its fused activation)."""
        value = next((self.graph_node(a) for a, p in self.ann.fused.items() if p == node.name), node)
        users = [u for u in value.users if self.observer(u) is not None]
        if not users:
            raise QPassesError(f"internal: no observer reads '{value.name}'")
        return self.observer(users[0])

    def output_qparams(self, node: fx.Node) -> tuple[float, int]:
        """Scale and zero point ``node`` writes its value at (after its fused activation)."""
        return self.qparams(self.output_observer(node))

    def qparams(self, observer: Observer) -> tuple[float, int]:
        """An observer's scale and zero point, or the wider grid ``legalize_add_scales`` gave it."""
        if observer in self.widened:
            return self.widened[observer]
        if observer not in self.observed:
            scale, zero_point = observer.qparams()
            self.observed[observer] = float(scale), int(zero_point)
        return self.observed[observer]

    def observer_grid(self, observer: Observer) -> Grid:
        """The grid an observer's value is quantized to: its (widened) qparams and its spec's code range."""
        spec = observer.spec
        return Grid(*self.qparams(observer), spec.code_min, spec.code_max, container(spec.dtype))

    def grid_source(self, node: fx.Node) -> fx.Node:
        """The node that decides ``node``'s grid: ``node`` itself, or through qparams-preserving ops the
        value they read, up to one that is observed or computes its own grid."""
        while (self.observer(node) is None and self.ann.roles.get(node.name) is Role.PRESERVING
               and node.all_input_nodes):
            node = node.all_input_nodes[0]
        return node

    def value_grid(self, node: fx.Node) -> Grid | None:
        """The grid ``node``'s value has in the int8 graph: its observer's (or the widened one), or for an op
        whose kernel decides its output grid (fixed-range, derived), what that kernel gives on its input's grid
        (full container range), read from the kernel itself on a one-element probe. None for a value left
        float."""
        node = self.grid_source(node)
        if self.observer(node) is not None:
            return self.observer_grid(self.observer(node))
        if self.ann.roles.get(node.name) not in (Role.FIXED, Role.DERIVED):
            return None
        source = next((a for a in node.all_input_nodes if a.op != "get_attr"), None)
        grid = self.value_grid(source) if source is not None else None
        if grid is None:
            return None
        scale, zero_point = kernel_output_grid(self.gm, node, (grid.scale, grid.zero_point),
                                                        grid.quantized_dtype)
        info = torch.iinfo(grid.dtype)
        return Grid(scale, zero_point, info.min, info.max, grid.dtype)

    def value_observer(self, node: fx.Node) -> Observer | None:
        """The observer whose grid ``node``'s value is on: its own, or through qparams-preserving ops, that
        of the value they read; None where a kernel decides it (fixed-range, derived ops)."""
        return self.observer(self.grid_source(node))

    def legalize_add_scales(self) -> None:
        """Widen grids until every int8 add's input-to-output scale ratios lie in the backend's
        ``add_scale_ratio`` (qnnpack refuses others at run time).

        A ratio out of range means one grid is degenerate next to the other, e.g. a ReLU branch that never
        fires (range 0, so the smallest scale) added to a live one. The narrower grid is widened to the
        nearest legal scale, keeping its zero point (so it still covers its observed range): its step stays
        at most 2**-14 of an output step (or the output's at most 2**-8 of an input step), so no output
        code moves except at a rounding tie. Widening one grid can break another add's ratio; this repeats
        until none changes (scales only grow).
        """
        if self.backend.add_scale_ratio is None:
            return
        margin = 1e-3  # the kernel divides in float32
        low, high = self.backend.add_scale_ratio[0] * (1 + margin), self.backend.add_scale_ratio[1] / (1 + margin)
        adds = []
        for node in self.gm.graph.nodes:
            if self.ann.roles.get(node.name) is Role.FUNCTIONAL and node.target in ("add", "add_relu"):
                values = [arg for arg in node.args[1:] if isinstance(arg, fx.Node)]
                inputs = [self.value_observer(arg) for arg in values]
                adds.append((node, values, [o for o in inputs if o is not None], self.output_observer(node)))
        changed = True
        while changed:
            changed = False
            for node, values, inputs, output in adds:
                # Every input's grid, those a kernel decides (sigmoid's, a scalar multiply's) included: only
                # the observed ones can be widened, but the output must be wide enough for all of them.
                widest = max((grid.scale for grid in map(self.value_grid, values) if grid is not None), default=0.0)
                # Widened past the checked bound by the margin again: a grid widened to the bound itself can
                # round back onto it and be widened for ever.
                if widest / self.qparams(output)[0] >= high:
                    self.widen(output, widest / high * (1 + margin), node)
                    changed = True
                for observer in inputs:
                    if self.qparams(observer)[0] / self.qparams(output)[0] < low:
                        self.widen(observer, self.qparams(output)[0] * low * (1 + margin), node)
                        changed = True

    def widen(self, observer: Observer, scale: float, add: fx.Node) -> None:
        old_scale, zero_point = self.qparams(observer)
        self.widened[observer] = (scale, zero_point)
        low, high = self.backend.add_scale_ratio
        self.note(f"{self.backend.name}: widened the grid of '{observer.name}' from scale {old_scale:.3g} to "
                  f"{scale:.3g}: add '{add.name}' needs input/output scale ratios in [{low:g}, {high:g})")

    def graph_node(self, name: str) -> fx.Node:
        return next(n for n in self.gm.graph.nodes if n.name == name)
