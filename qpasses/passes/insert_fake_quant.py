"""InsertFakeQuant: fake quantization wherever PTQ would observe, and on every quantized weight."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qpasses.graph.match import any_of, is_function, is_method, is_module
from qpasses.graph.modules import set_module
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.insert_observers import InsertObservers
from qpasses.quant.annotate import Annotation
from qpasses.quant.fake_quant import FakeQuantize, make_fake_quant
from qpasses.quant.observers import Observer
from qpasses.quant.ops import Role
from qpasses.quant.qat_modules import to_qat
from qpasses.quant.spec import QuantConfig
from qpasses.quant.state import state_of

# Methods of a fake-quant the graph calls around an averaging op: op(x) becomes from_steps(op(to_steps(x))).
TO_STEPS_METHOD, FROM_STEPS_METHOD = "to_steps", "from_steps"
# qparams-preserving ops whose outputs are new values: their int8 kernels round them to the input's grid.
_AVERAGING = any_of(
    is_module(nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Upsample),
    is_function(F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.interpolate, torch.mean),
    is_method("mean"),
)


class InsertFakeQuant(Pass):
    """Turn the graph into a quantization-aware training model.

    Placement is PTQ's: the same annotation (``InsertObservers``) decides which values get a range,
    which activations fold into their producer's range, which cat inputs share one. Each observer
    becomes a fake-quant module ``y = (clamp(round(x / s) + z, qmin, qmax) − z) · s`` (straight-through
    gradients; see ``qpasses.quant.fake_quant``), shared where observers were shared (a cat group's
    members pass through it and its owner, the outermost cat's output, observes and rounds the concatenation:
    one observation of the group per forward); each int8
    conv/linear becomes its QAT class with a fake-quant on its (BN-folded) weight. If observers were
    already calibrated (PTQ in the same pipeline), the fake-quants start from the calibrated ranges.
    Averaging ops that keep their input's qparams (average pooling, bilinear upsampling, mean) run on the
    integer codes of their input's grid and round back onto it, ``from_steps(op(to_steps(x)))``, as their
    int8 kernels do (exact averages, ties to even). On backends whose kernels round the bias to int32
    (``Backend.quantized_bias``: ``round(b / (s_in·s_w))·s_in·s_w``, ``s_in`` from the fake-quant
    of the layer's input), the deployed (BN-folded) bias is fake-quantized that way too, straight-through.
    A linear writing the model's output in float (``QuantConfig.quantize_output`` False, on engines with such
    a kernel) has no fake-quant on its output, as the annotation places none.
    ``learnable``: LSQ scales (and zero points with ``learn_zero_point``) instead of min/max tracking.
    Requires: ``functional_modules``. Provides: ``fake_quantized``: the PassManager then leaves lowering
    to ``qpasses.convert``, after training.
    """

    stage = Stage.QUANTIZE
    requires = frozenset({"functional_modules"})
    after = frozenset({"bn_folded", "qat_blocks", "equalized", "bias_absorbed", "config_overrides", "observed",
                       "calibrated"})
    provides = frozenset({"fake_quantized"})

    def __init__(self, backend: str = "x86", config: QuantConfig | None = None, bits: int | None = None,
                 per_channel: bool | None = None, learnable: bool = False, learn_zero_point: bool = False,
                 quantize_output: bool | None = None):
        self.observers = InsertObservers(backend, config, bits, per_channel, quantize_output)
        self.learnable = learnable
        self.learn_zero_point = learn_zero_point

    @property
    def backend(self) -> str:
        return self.observers.backend.name

    @property
    def config(self) -> QuantConfig:
        return self.observers.config

    def conflict_with(self, other: Pass) -> str | None:
        if isinstance(other, InsertObservers) and (other.backend.name, other.config) != (self.backend, self.config):
            return (f"PTQ initialises QAT, so both need the same backend and config; got PTQ {other.backend.name} "
                    f"{other.config.activation.bits}-bit, QAT {self.backend} {self.config.activation.bits}-bit "
                    f"(or other differing specs): pass the same backend, config and bits to both")
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if state_of(gm).annotation is None:
            gm = self.observers.run(gm, ctx).graph_module
        ann: Annotation = state_of(gm).annotation
        for target, observer in list(gm.named_modules()):
            if not isinstance(observer, Observer) or isinstance(observer, FakeQuantize):
                continue
            fake_quant = make_fake_quant(observer.spec, observer.name, "activation", self.learnable,
                                         self.learn_zero_point)
            if observer.calibrated:
                fake_quant.initialize_from(observer)
                ctx.stats["from_calibration"] += 1
            set_module(gm, target, fake_quant)
            ctx.stats["activation_fake_quants"] += 1
        ctx.stats["cat_members"] = _mark_cat_members(gm, ann)
        grid_of = _grids(gm, ann)
        quantized_bias = self.observers.backend.quantized_bias
        for node in gm.graph.nodes:
            if ann.roles.get(node.name) is not Role.COMPUTE:
                continue
            module = to_qat(gm.get_submodule(node.target), node.target)
            module.attach_weight_fake_quant(make_fake_quant(
                ann.pairs[node.name].weight, f"{node.target}.weight", "weight", self.learnable, self.learn_zero_point
            ))
            ctx.stats["weight_fake_quants"] += 1
            source = node.args[0] if node.args else None
            if quantized_bias and source in grid_of:
                module.quantize_bias_with(gm.get_submodule(grid_of[source]))
                ctx.stats["bias_fake_quants"] += 1
        ctx.stats["averages_on_codes"] = _average_on_codes(gm, ann, grid_of)
        gm.recompile()
        return PassResult(gm, modified=True)


def _mark_cat_members(gm: fx.GraphModule, ann: Annotation) -> int:
    """Call the shared fake-quant of a cat group with ``member=True`` on each value of the group but its owner
    (the outermost cat's output): those calls pass through, and the owner's call observes and rounds the whole
    concatenation (``FakeQuantize.forward``). Lowering still reads the member calls' qparams, which are the
    owner's. Returns how many calls were marked."""
    marked = [node for node in gm.graph.nodes if node.op == "call_module" and node.args
              and isinstance(node.args[0], fx.Node) and node.args[0].name in ann.shared
              and isinstance(gm.get_submodule(node.target), FakeQuantize)]
    for node in marked:
        node.kwargs = {**node.kwargs, "member": True}
    return len(marked)


def _grids(gm: fx.GraphModule, ann: Annotation) -> dict[fx.Node, str]:
    """Each value on a fake-quant's grid → that fake-quant's target: its outputs, and the outputs of
    qparams-preserving ops (pooling, reshapes) that read them, through any chain of such ops."""
    grid_of: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantize):
            grid_of[node] = node.target
        elif ann.roles.get(node.name) is Role.PRESERVING and node.all_input_nodes \
                and node.all_input_nodes[0] in grid_of:
            grid_of[node] = grid_of[node.all_input_nodes[0]]
    return grid_of


def _average_on_codes(gm: fx.GraphModule, ann: Annotation, grid_of: dict[fx.Node, str]) -> int:
    """Rewrite each averaging op ``op(x, ...)`` whose input lies on a fake-quant's grid to
    ``fq.from_steps(op(fq.to_steps(x), ...))`` with that fake-quant (the ops are linear and homogeneous,
    so this is the same function, computed on the codes)."""
    count = 0
    for node in list(gm.graph.nodes):
        value = node.args[0] if node.args else None
        if node not in grid_of or value not in grid_of or not _AVERAGING(gm, node):
            continue
        target = grid_of[node]
        with gm.graph.inserting_before(node):
            owner = gm.graph.get_attr(target)
            steps = gm.graph.call_method(TO_STEPS_METHOD, (owner, value))
        node.args = (steps, *node.args[1:])
        with gm.graph.inserting_after(node):
            rounded = gm.graph.call_method(FROM_STEPS_METHOD, (owner, node))
        node.replace_all_uses_with(rounded, delete_user_cb=lambda user, r=rounded: user is not r)
        rounded.meta = dict(node.meta)
        count += 1
    return count
