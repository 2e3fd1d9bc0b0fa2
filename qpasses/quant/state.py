"""The typed state qpasses keeps on a GraphModule, which survives ``copy.deepcopy`` and ``torch.save``/``load``.

torch.fx pickles a GraphModule as its generated code and its instance ``__dict__``, and ``torch.load`` traces
that code again: ``gm.meta`` and every ``node.meta`` are gone, nodes get new names, and the methods of a module
the graph reads with ``get_attr`` (FloatFunctional owners, fake-quant step helpers) are traced into. So the
state that consumers of a quantized model need (the PassManager's properties, the capture record, the QAT
annotation ``convert`` lowers with, FuseBN's channel statistics, per-layer overrides) is one
:class:`QuantState`, reached only through :func:`state_of`:

- it is an instance attribute of the GraphModule, which ``torch.load`` sets back (``_deserialize_graph_module``
  restores every pickled ``__dict__`` entry a fresh GraphModule lacks);
- it is listed in ``gm.meta['_user_preserved_attributes']``, which ``GraphModule.__deepcopy__`` sets back on
  the copy (its constructor keeps only attributes the graph references; torch.ao's ``quantize_fx`` keeps its
  attributes the same way);
- pickled, it records the graph's nodes in order (name, op, target) with the node metadata of
  :data:`NODE_META_KEYS`; ``torch.load`` rebuilds the graph with :class:`ReloadTracer` (``gm._tracer_cls``),
  which keeps ``get_attr`` nodes and gives the rebuilt nodes their saved names and metadata back, so that
  everything keyed by node name (the annotation, reports, the visualiser) holds.

After a plain ``torch.load``, the state is listed for deepcopy again on the first qpasses read
(:func:`existing_state`; ``qpasses.load``, ``PassManager``, ``convert`` and the exporters all read it): a
deepcopy before any such read drops it, as it drops any attribute the graph does not reference.

A QuantizedEngine module does not say whether a model is lowered: DynamicQuant's models have one too, and the
exporters take static int8 graphs only; ``backend`` does.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

if TYPE_CHECKING:
    from qpasses.graph.channels import ChannelStats
    from qpasses.graph.trace import CaptureInfo
    from qpasses.quant.annotate import Annotation
    from qpasses.quant.spec import QuantPair

ATTRIBUTE = "qpasses_state"

# node.meta keys: a node's quantization state ("float", "observed", "fake_quant", "int8", read by the visualiser)
# and the qparams it writes at (scale, zero_point; dtype and bits where a spec's range narrows the codes).
QSTATE_KEY = "qstate"
QPARAMS_KEY = "qparams"
# node.meta key: a conv/linear's weight (scale, zero_point) pinned by a pass that rounded on that grid
# (AdaRound, QAT's convert); lowering and bias correction quantize the weight at exactly these.
WEIGHT_QPARAMS_KEY = "weight_qparams"
# node.meta key: a conv/linear's float weight from before a pass replaced it by its rounded values (AdaRound);
# the reference later passes measure quantization error against. Lowering drops it.
FLOAT_WEIGHT_KEY = "float_weight"
# node.meta key of a reference graph's int8 op: a ``qpasses.passes.reference.Int8Op`` (its op-table record, role
# and the module the observed graph called), which the lowerings of the reference graph read. Not saved.
INT8_OP_KEY = "int8_op"
# The node metadata a saved graph keeps: qpasses' own, and the module stack the visualiser groups nodes by
# (torch.load itself restores ``stack_trace``; shapes are recomputed from inputs).
NODE_META_KEYS = (QSTATE_KEY, QPARAMS_KEY, WEIGHT_QPARAMS_KEY, FLOAT_WEIGHT_KEY, "nn_module_stack")

_log = logging.getLogger("qpasses")


@dataclass(frozen=True)
class _SavedNode:
    name: str
    op: str
    target: str
    meta: dict[str, Any]


@dataclass
class QuantState:
    """State passes hand on to later passes and to consumers of the model.

    ``properties``: the PassManager's established properties (``lowered``, ``bn_folded``, …).
    ``capture``: how the graph was captured. ``annotation``: InsertObservers' decisions, from observer
    insertion (or QAT's fake-quant insertion) to lowering. ``output_stats``: per-channel output statistics of
    layers FuseBN folded, by module name (CLE/HBA keep them current). ``overrides``: per-node QuantPairs a pass
    recorded for the next observer insertion (MixedPrecision), by node or module name. ``backend``: the
    backend ``Lower`` lowered the graph for (None: float, or quantized dynamically); the exporters need it.
    ``reference_backend``: set on a reference quantized graph (``qpasses.passes.Reference``: float ops between
    ``quantized_decomposed`` quantize/dequantize ops), the backend whose int8 kernels it simulates.
    ``reference``: on a lowered model, the reference graph of the same decisions (a GraphModule holding the int8
    weight codes), from which exporters read the grids.
    """

    properties: frozenset[str] = frozenset()
    capture: CaptureInfo | None = None
    annotation: Annotation | None = None
    output_stats: dict[str, ChannelStats] = field(default_factory=dict)
    overrides: dict[str, QuantPair | None] = field(default_factory=dict)
    backend: str | None = None
    reference_backend: str | None = None
    reference: fx.GraphModule | None = None

    def __post_init__(self) -> None:
        self._owner: fx.GraphModule | None = None  # the graph module whose nodes are pickled with the state
        self._saved_nodes: list[_SavedNode] | None = None  # unpickled, for the ReloadTracer rebuilding the graph

    def __getstate__(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        nodes = self._owner.graph.nodes if self._owner is not None else ()
        state["saved_nodes"] = [_SavedNode(n.name, n.op, _target_name(n),
                                           {k: n.meta[k] for k in NODE_META_KEYS if k in n.meta}) for n in nodes]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state.pop("saved_nodes")
        self.__init__(**state)
        self._saved_nodes = saved or None

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantState:
        clone = QuantState(**{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)})
        # GraphModule.__deepcopy__ memoizes its copy first: the copied state belongs to the copied module.
        clone._owner = memo.get(id(self._owner))
        return clone


def state_of(gm: fx.GraphModule) -> QuantState:
    """``gm``'s quantization state, attached (empty) on first use; see :func:`existing_state`."""
    state = existing_state(gm)
    if state is None:
        state = QuantState()
        gm.__dict__[ATTRIBUTE] = state
        _bind(gm, state)
    return state


def existing_state(model: nn.Module | None) -> QuantState | None:
    """The state qpasses attached to ``model``, None if there is none (nothing is attached then). A state
    ``torch.load`` brought back is listed for deepcopy again here (see the module docstring)."""
    state = model.__dict__.get(ATTRIBUTE) if isinstance(model, fx.GraphModule) else None
    if state is not None and state._owner is not model:  # loaded, or copied other than by deepcopy
        _bind(model, state)
    return state


def properties_of(model: nn.Module | None) -> frozenset[str]:
    """The properties a PassManager established on ``model`` (none for a model qpasses did not produce)."""
    state = existing_state(model)
    return state.properties if state is not None else frozenset()


def _bind(gm: fx.GraphModule, state: QuantState) -> None:
    state._owner = gm
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[ATTRIBUTE] = state
    # How torch.load rebuilds the graph from the code: the module's tracer class, which a deepcopy takes from
    # the graph's.
    gm._tracer_cls = gm.graph._tracer_cls = ReloadTracer


def _target_name(node: fx.Node) -> str:
    """``node``'s target as a name that is the same in every process (no object addresses)."""
    target = node.target
    if isinstance(target, str):
        return target
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    return f"{getattr(target, '__module__', '')}.{name}" if name else str(target)


def _with_saved_nodes(rebuilt: fx.Graph, state: QuantState) -> fx.Graph:
    """``rebuilt`` (the graph ``torch.load`` traced from the code) with the saved node names and metadata.

    Renaming in place would collide with the rebuilt names, so the graph is copied node by node under the
    saved names. A rebuilt graph that does not match the saved one node for node keeps its names; the
    annotation, keyed by the lost names, is dropped, with a log line.
    """
    saved, state._saved_nodes = state._saved_nodes, None
    nodes = list(rebuilt.nodes)
    if [(n.op, _target_name(n)) for n in nodes] != [(s.op, s.target) for s in saved]:
        _log.warning("the graph torch.load rebuilt differs from the saved one; its node names and "
                     "quantization metadata are not restored")
        state.annotation = None
        return rebuilt
    graph = fx.Graph(tracer_cls=rebuilt._tracer_cls)
    graph._codegen = rebuilt._codegen
    env: dict[fx.Node, fx.Node] = {}
    for node, record in zip(nodes, saved, strict=True):
        copied = graph.create_node(node.op, node.target, fx.map_arg(node.args, env.__getitem__),
                                   fx.map_arg(node.kwargs, env.__getitem__), name=record.name, type_expr=node.type)
        copied.meta = {**node.meta, **record.meta}
        env[node] = copied
    return graph


class ReloadTracer(fx.Tracer):
    """The tracer ``torch.load`` rebuilds a qpasses graph module with (``gm._tracer_cls``; torch makes every
    module a leaf on top): modules the saved graph read with ``get_attr`` stay ``get_attr`` nodes, whose method
    calls (``FloatFunctional.add``, a fake-quant's ``to_steps``) stay ``call_method`` nodes, where fx's tracer
    would trace into the methods and change the graph; buffers the code reads (a reference graph's int8 weight
    codes) stay ``get_attr`` nodes too, where fx's tracer would run the ops reading only them at load time and keep
    their results as constants; then the nodes get their saved names and metadata."""

    proxy_buffer_attributes = True

    # A buffer read by the saved graph stays a get_attr node: fx's default runs ops on buffers while tracing and
    # stores their result as a new constant (a reference graph's dequantized int8 weights would become float).
    proxy_buffer_attributes = True

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        state = getattr(root, "__dict__", {}).get(ATTRIBUTE)
        saved = (state._saved_nodes or []) if isinstance(state, QuantState) else []
        self._read_modules = {id(m): s.target for s in saved
                              if s.op == "get_attr" and isinstance(m := _submodule(root, s.target), nn.Module)}
        graph = super().trace(root, concrete_args)
        for node in reversed(graph.nodes):  # a module called from a get_attr proxy left its get_attr unused
            if node.op == "get_attr" and not node.users and id(_submodule(root, node.target)) in self._read_modules:
                graph.erase_node(node)
        return _with_saved_nodes(graph, state) if saved else graph

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        target = self._read_modules.get(id(attr_val)) if isinstance(attr_val, nn.Module) else None
        if target is not None:
            return self.create_proxy("get_attr", target, (), {})
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest: Any, **options: Any) -> Any:
        owner = args[0] if args else None
        if kind == "call_method" and target == "__call__" and isinstance(owner, fx.Proxy) \
                and owner.node.op == "get_attr" and owner.node.target in self._read_modules.values():
            return super().create_proxy("call_module", owner.node.target, args[1:], kwargs, *rest, **options)
        return super().create_proxy(kind, target, args, kwargs, *rest, **options)


def _submodule(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part, None)
    return value
