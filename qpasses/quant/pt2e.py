"""qpasses' annotation as a torchao PT2E ``Quantizer``: the decisions of ``qpasses.quant.annotate`` applied to a
graph the user exported, calibrated and converted with torchao's own ``prepare_pt2e``/``convert_pt2e``.

Example::

    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from qpasses.quant.pt2e import QPassesQuantizer, quantize_pt2e

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(model, (x,), strict=False).module()
    quantizer = QPassesQuantizer(backend="onednn")
    prepared = prepare_pt2e(exported, quantizer)
    for batch in (x, torch.randn(2, 3, 16, 16)):
        prepared(batch)                    # calibration
    converted = convert_pt2e(prepared)     # float ops between quantized_decomposed Q/DQ ops
    print(quantizer.float_reasons)         # ATen node → why it stays float
    print("\\n".join(quantizer.notes))      # activation bits and other decisions, as InsertObservers reports them

    # or the same in one call (export of a copy at the first batch's shapes, calibration, conversion):
    converted = quantize_pt2e(model, QPassesQuantizer(backend="onednn"), [x, torch.randn(2, 3, 16, 16)])

How the decisions reach the ATen nodes: the user's graph is normalised into qpasses' canonical graph
(``export_capture.normalise_module``: one canonical node per ATen op, each naming its ATen node in
``meta[SOURCE_KEY]``), ``ReplaceFunctional`` gives its arithmetic FloatFunctional modules, and ``annotate`` decides
on it exactly as for ``PTQ``. Each decision is then written onto the ATen nodes as PT2E's
``QuantizationAnnotation`` (``_Annotator``):

- an observed value (``Annotation.observe``): the ``output_qspec`` of its ATen node, with a qpasses observer
  (``QPassesObserver``) of its spec; a graph input or a tensor attribute instead on every edge that reads it (one
  spec object, which PT2E's implicit sharing turns into one observer). A folded activation is the observed
  value, its conv/linear is not: no Q/DQ between them.
- a cat sharing group (``Annotation.shared``, nested cats included): each member's value is observed on its edge
  into its cat, the first such edge (in graph order) with the group's spec, every other edge and the group's
  outermost cat with a ``SharedQuantizationSpec`` of that edge: one observer, so the cats concatenate codes.
- a conv/linear's weight: its edge, with the (backend-checked) weight spec; on backends whose kernels round the
  bias to int32 (``Backend.quantized_bias``, qnnpack) the bias edge with a ``DerivedQuantizationSpec`` at
  ``s_in·s_w``, else the bias stays float.
- ops that keep their input's grid (pooling, reshapes, unfused activations): a ``SharedQuantizationSpec`` of the
  edge or value their input is observed at (Q/DQ after them requantize onto the same grid: exact for max pool
  and reshapes, the kernel's rounding for average pools).
- fixed-range ops (sigmoid, tanh, hardsigmoid): ``FixedQParamsQuantizationSpec``, derived ones
  (``add_scalar``/``mul_scalar``) a ``DerivedQuantizationSpec`` of their input's observer; both grids are read
  from the int8 kernel itself (``lowering.kernel_output_grid``), as ``Lower`` reads them.
- ops left float get no annotation; ``float_reasons`` says why, per ATen node.

Limits: PTQ only (``prepare_qat_pt2e`` would need fake-quant modules for these observers); the quantizer
annotates the whole graph, so it does not compose with another quantizer's annotations.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qpasses.errors import QPassesError
from qpasses.graph.export_capture import SOURCE_KEY, normalise_module
from qpasses.graph.modules import buffers_restored
from qpasses.graph.trace import propagate_shapes
from qpasses.passes.base import PassContext
from qpasses.passes.insert_observers import activation_bits_note, resolve_config
from qpasses.passes.replace_functional import ReplaceFunctional
from qpasses.quant.annotate import Annotation, FusedKernels, annotate
from qpasses.quant.backends import Backend, get_backend, inductor_post_op
from qpasses.quant.lowering import kernel_output_grid
from qpasses.quant.observers import make_observer
from qpasses.quant.ops import Role
from qpasses.quant.spec import QuantConfig, QuantSpec

try:
    from torchao.quantization.pt2e import ObserverBase
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import (
        DerivedQuantizationSpec,
        FixedQParamsQuantizationSpec,
        QuantizationAnnotation,
        QuantizationSpec,
        QuantizationSpecBase,
        Quantizer,
        SharedQuantizationSpec,
    )
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("qpasses.quant.pt2e needs torchao (pip install 'qpasses[export]')") from exc

__all__ = ["QPassesObserver", "QPassesQuantizer", "QPassesWeightObserver", "canonical_graph", "quantization_spec",
           "quantize_pt2e"]

EdgeOrNode = tuple[fx.Node, fx.Node] | fx.Node


# torch.compile's CPU lowering of a converted PT2E graph: int8 convs/linears write float and take post-ops.
INDUCTOR_CPU = FusedKernels(float_output=True, post_op=inductor_post_op)
INDUCTOR_BACKENDS = ("x86", "fbgemm", "onednn")


class QPassesObserver(ObserverBase):
    """A qpasses observer (``make_observer(spec)``: min/max, moving average, the histogram observers' percentile,
    entropy or MSE range) behind torchao's observer interface, so PT2E's ``prepare`` places it and ``convert``
    reads its qparams (``compute_qparams`` of the chosen range on ``spec``'s grid).

    ``prepare`` builds it from the ``QuantizationSpec`` fields (``dtype``, ``quant_min``/``quant_max``: the codes'
    clipping range, ``qscheme``); ``spec`` is bound by ``quantization_spec``."""

    def __init__(self, dtype: torch.dtype, quant_min: int, quant_max: int, qscheme: torch.qscheme,
                 is_dynamic: bool = False, *, spec: QuantSpec):
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        self.quant_min, self.quant_max, self.qscheme = quant_min, quant_max, qscheme
        self.ch_axis = spec.axis
        self.spec = spec
        self.observer = make_observer(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.observer(x)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.observer.qparams()


class QPassesWeightObserver(QPassesObserver):
    """A weight's observer: calibration sends the same weight through it on every batch, and qpasses' weight range
    search (``ChannelMSEObserver``) takes exactly one tensor, so each value of the weight is observed once; a
    weight that changed since (another tensor, or an in-place update) is observed afresh."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        seen = (w.data_ptr(), w._version, tuple(w.shape))
        if getattr(self, "_seen", None) != seen:
            if self.observer.calibrated:
                self.observer = make_observer(self.spec)
            self.observer(w)
            self._seen = seen
        return w


def quantization_spec(spec: QuantSpec, weight: bool = False) -> QuantizationSpec:
    """The PT2E spec of ``spec``'s grid, observed by a qpasses observer of its kind. Codes are clipped at
    ``spec.code_min``/``code_max`` (a ``headroom`` grid's codes run on past its 7-bit step's range)."""
    observer = QPassesWeightObserver if weight else QPassesObserver
    return QuantizationSpec(
        dtype=torch.int8 if spec.signed else torch.uint8, quant_min=spec.code_min, quant_max=spec.code_max,
        qscheme=spec.qscheme, ch_axis=spec.axis, observer_or_fake_quant_ctr=observer.with_args(spec=spec))


def _example(value: Any) -> Any:
    """A concrete stand-in (zeros) for an exported placeholder's value; symbolic sizes take their hint."""
    if not isinstance(value, torch.Tensor):
        return value
    sizes = [size.node.hint if isinstance(size, torch.SymInt) else size for size in value.shape]
    return torch.zeros(sizes, dtype=value.dtype, device=value.device)


def canonical_graph(model: fx.GraphModule) -> fx.GraphModule:
    """qpasses' canonical graph of an exported graph module, ready to annotate: normalised, with shapes, and its
    arithmetic as FloatFunctional calls (``ReplaceFunctional``). Shares ``model``'s tensors, changes nothing of it."""
    gm = normalise_module(model).graph_module
    inputs = tuple(_example(node.meta.get("val")) for node in model.graph.nodes if node.op == "placeholder")
    with buffers_restored(model), torch.no_grad():
        propagate_shapes(gm, inputs)
    ReplaceFunctional().run(gm, PassContext(example_inputs=inputs))
    return gm


def _bias_qparams(observers: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 bias grid of a kernel that rounds the bias: scale ``s_in·s_w`` (per weight channel), zero point 0."""
    (input_scale, _), (weight_scale, _) = (observer.calculate_qparams() for observer in observers)
    scale = (input_scale * weight_scale).float()
    return scale, torch.zeros(scale.shape, dtype=torch.int64)


def _derived_qparams(gm: fx.GraphModule, node: fx.Node, observers: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid ``node``'s kernel writes on its input's observed grid."""
    scale, zero_point = observers[0].calculate_qparams()
    out_scale, out_zero_point = kernel_output_grid(gm, node, (float(scale), int(zero_point)))
    return torch.tensor(out_scale), torch.tensor(out_zero_point)


class _Annotator:
    """Writes ``ann`` (decided on ``canonical``) onto the ATen nodes of ``model`` (see the module docstring)."""

    def __init__(self, model: fx.GraphModule, canonical: fx.GraphModule, ann: Annotation, backend: Backend):
        self.model, self.canonical, self.ann, self.backend = model, canonical, ann, backend
        self.aten = {node.name: node for node in model.graph.nodes}
        self.attributes = {node.target: node for node in model.graph.nodes if node.op == "get_attr"}
        self.inputs: dict[fx.Node, dict[fx.Node, QuantizationSpecBase]] = {}
        self.outputs: dict[fx.Node, QuantizationSpecBase] = {}
        self.grid: dict[str, EdgeOrNode] = {}  # canonical value → the ATen edge or node its observer is on
        self.roots: dict[str, tuple[fx.Node, fx.Node]] = {}  # cat group owner → the edge holding its spec

    def aten_of(self, node: fx.Node) -> fx.Node:
        found = (self.attributes.get(node.target) if node.op == "get_attr"
                 else self.aten.get(node.meta.get(SOURCE_KEY, "")))
        if found is None:
            raise QPassesError(f"canonical node '{node.name}' has no node in the exported graph to annotate")
        return found

    def edge(self, value: fx.Node, consumer: fx.Node) -> tuple[fx.Node, fx.Node]:
        """The ATen edge from canonical ``value`` into canonical ``consumer``."""
        source, target = self.aten_of(value), self.aten_of(consumer)
        if source not in target.all_input_nodes:
            raise QPassesError(f"exported node '{target.name}' does not read '{source.name}' directly (an op "
                               "between them has no canonical node); the quantizer cannot place its grid")
        return source, target

    def run(self) -> None:
        for node in self.canonical.graph.nodes:
            if node.op == "call_method" and node.target == "cat":
                self.cat_inputs(node)
            if self.ann.roles.get(node.name) is Role.COMPUTE:
                self.weights(node)
            self.value(node)
        for node in self.model.graph.nodes:
            if node in self.inputs or node in self.outputs:
                node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
                    input_qspec_map=self.inputs.get(node, {}), output_qspec=self.outputs.get(node), _annotated=True)

    def annotate_input(self, edge: tuple[fx.Node, fx.Node], qspec: QuantizationSpecBase) -> None:
        self.inputs.setdefault(edge[1], {})[edge[0]] = qspec

    def cat_inputs(self, cat: fx.Node) -> None:
        """Members of a sharing group are observed on their edge into their cat (see the module docstring)."""
        for value in cat.args[1]:
            owner = self.ann.shared.get(value.name)
            if owner is None:
                continue
            edge = self.edge(value, cat)
            if owner in self.roots:
                self.annotate_input(edge, SharedQuantizationSpec(self.roots[owner]))
            else:
                self.roots[owner] = edge
                self.annotate_input(edge, quantization_spec(self.ann.observe[owner]))

    def weights(self, node: fx.Node) -> None:
        conv = self.aten_of(node)
        weight, bias = conv.args[1], conv.args[2] if len(conv.args) > 2 else None
        self.annotate_input((weight, conv), quantization_spec(self.ann.pairs[node.name].weight, weight=True))
        if bias is not None and self.backend.quantized_bias:
            weight_spec = self.ann.pairs[node.name].weight
            self.annotate_input((bias, conv), DerivedQuantizationSpec(
                derived_from=[self.grid[node.all_input_nodes[0].name], (weight, conv)],
                derive_qparams_fn=_bias_qparams, dtype=torch.int32, quant_min=-(2**31), quant_max=2**31 - 1,
                qscheme=torch.per_channel_symmetric if weight_spec.per_channel else torch.per_tensor_symmetric,
                ch_axis=0 if weight_spec.per_channel else None))

    def value(self, node: fx.Node) -> None:
        """The output side of ``node``: its own observer, its group's, or the grid its op decides or keeps."""
        ann, name = self.ann, node.name
        role = ann.roles.get(name, Role.NONE)
        if name in ann.observe and name not in ann.shared:
            qspec = (SharedQuantizationSpec(self.roots[name]) if name in self.roots
                     else quantization_spec(ann.observe[name]))
            self.observe(node, qspec)
        elif role is Role.FIXED:
            scale, zero_point = kernel_output_grid(self.canonical, node, (1.0, 0))
            self.observe(node, FixedQParamsQuantizationSpec(
                dtype=torch.uint8, scale=scale, zero_point=zero_point, quant_min=0, quant_max=255,
                qscheme=torch.per_tensor_affine))
        elif role is Role.DERIVED:
            source = next(arg for arg in node.args[1:] if isinstance(arg, fx.Node))
            self.observe(node, DerivedQuantizationSpec(
                derived_from=[self.grid[source.name]],
                derive_qparams_fn=functools.partial(_derived_qparams, self.canonical, node), dtype=torch.uint8,
                quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine))
        elif role is Role.PRESERVING:
            source = next((arg for arg in node.all_input_nodes if arg.name in self.grid), None)
            if source is None:
                return
            aten = self.aten_of(node)
            if isinstance(aten.meta.get("val"), torch.Tensor):
                self.observe(node, SharedQuantizationSpec(self.grid[source.name]))
            else:  # several outputs (split, chunk): the values read from it are on its input's grid
                self.grid[name] = self.grid[source.name]

    def observe(self, node: fx.Node, qspec: QuantizationSpecBase) -> None:
        """Observe canonical ``node``'s value: on its ATen node's output, or, for a graph input or a tensor
        attribute (whose outputs PT2E does not observe), on every edge that reads it."""
        aten = self.aten_of(node)
        if aten.op in ("placeholder", "get_attr"):
            readers = [user for user in aten.users if user.op == "call_function"]  # not the input guards
            for reader in readers:
                self.annotate_input((aten, reader), qspec)
            self.grid[node.name] = (aten, readers[0])
        else:
            self.outputs[aten] = qspec
            self.grid[node.name] = aten


class QPassesQuantizer(Quantizer):
    """A PT2E ``Quantizer`` whose decisions are qpasses' (``qpasses.quant.annotate``), for ``backend``'s kernels
    (x86, fbgemm, onednn, qnnpack: the backend table's weight formats and, per this CPU, ``reduce_range``) and
    ``config`` (None: the backend's default; ``bits``, ``per_channel``, ``quantize_output`` as for ``PTQ``; its
    ``keep_float``/``by_name`` patterns match the exported graph's module paths, e.g. ``layer1.0.conv1``).
    ``for_inductor``: the converted graph runs under ``torch.compile``'s CPU lowering, whose int8 convs/linears
    write float and compute a hardswish or add after them in the same kernel (``INDUCTOR_CPU``), so those
    values are not rounded; None: for the backends it runs (x86, fbgemm, onednn), not for qnnpack (XNNPACK).

    After ``prepare_pt2e``: ``annotation`` holds the decisions on the canonical graph, ``float_reasons`` maps each
    ATen node left float to why, ``notes`` the report lines ``InsertObservers`` would print.
    """

    def __init__(self, backend: str = "x86", config: QuantConfig | None = None, bits: int | None = None,
                 per_channel: bool | None = None, quantize_output: bool | None = None,
                 for_inductor: bool | None = None):
        super().__init__()
        self.backend = get_backend(backend)
        inductor = backend in INDUCTOR_BACKENDS if for_inductor is None else for_inductor
        self.kernels = INDUCTOR_CPU if inductor else None
        self.config = resolve_config(backend, config, bits, per_channel, quantize_output)
        self.given_config = config is not None
        self.annotation: Annotation | None = None
        self.float_reasons: dict[str, str] = {}
        self.notes: list[str] = []

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        canonical = canonical_graph(model)
        ann = annotate(canonical, self.backend, self.config, kernels=self.kernels)
        ann.int8_ops()
        _Annotator(model, canonical, ann, self.backend).run()
        nodes = {node.name: node for node in canonical.graph.nodes}
        self.annotation = ann
        self.float_reasons = {nodes[name].meta.get(SOURCE_KEY, name): reason
                              for name, reason in ann.float_reasons.items()}
        self.notes = [*ann.notes, activation_bits_note(self.backend, self.config, ann, self.given_config)]
        return model

    def validate(self, model: fx.GraphModule) -> None:
        """Nothing beyond ``annotate``: every spec it writes was checked against the backend table there."""


def quantize_pt2e(model: nn.Module, quantizer: Quantizer, batches: Iterable[torch.Tensor]) -> fx.GraphModule:
    """torchao's PT2E post-training flow with any ``quantizer``: ``torch.export`` (non-strict) of a copy of the
    eval-mode ``model`` at the first batch's shapes, ``prepare_pt2e``, a forward pass per batch (all of the same
    shape), ``convert_pt2e``. Returns the converted Q/DQ graph; ``model`` is not changed."""
    batches = iter(batches)
    first = next(batches)
    exported = torch.export.export(copy.deepcopy(model).eval(), (first,), strict=False).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(first)
        for batch in batches:
            prepared(batch)
    return convert_pt2e(prepared)
