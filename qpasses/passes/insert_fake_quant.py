"""InsertFakeQuant: fake quantization wherever PTQ would observe, and on every quantized weight."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qpasses.graph.match import any_of, is_function, is_method, is_module
from qpasses.graph.modules import set_module
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.passes.insert_observers import ANNOTATION_KEY, InsertObservers
from qpasses.quant.annotate import Annotation
from qpasses.quant.fake_quant import FakeQuantize, make_fake_quant
from qpasses.quant.observers import Observer
from qpasses.quant.ops import Role
from qpasses.quant.qat_modules import to_qat
from qpasses.quant.spec import QuantConfig

REQUANTIZE_METHOD = "requantize"
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
    gradients; see ``qpasses.quant.fake_quant``), shared where observers were shared; each int8
    conv/linear becomes its QAT class with a fake-quant on its (BN-folded) weight. If observers were
    already calibrated (PTQ in the same pipeline), the fake-quants start from the calibrated ranges.
    Averaging ops that keep their input's qparams (average pooling, bilinear upsampling, mean) are followed
    by ``<fake-quant>.requantize``: their int8 kernels round to the input's grid, so training does too.
    ``learnable``: LSQ scales (and zero points with ``learn_zero_point``) instead of min/max tracking.
    Requires: ``functional_modules``. Provides: ``fake_quantized``: the PassManager then leaves lowering
    to ``qpasses.convert``, after training.
    """

    stage = Stage.QUANTIZE
    requires = frozenset({"functional_modules"})
    after = frozenset({"bn_folded", "qat_blocks", "equalized", "bias_absorbed", "observed", "calibrated"})
    provides = frozenset({"fake_quantized"})

    def __init__(self, backend: str = "x86", config: QuantConfig | None = None, bits: int | None = None,
                 per_channel: bool | None = None, learnable: bool = False, learn_zero_point: bool = False):
        self.observers = InsertObservers(backend, config, bits, per_channel)
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
        if ANNOTATION_KEY not in gm.meta:
            gm = self.observers.run(gm, ctx).graph_module
        ann: Annotation = gm.meta[ANNOTATION_KEY]
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
        for node in gm.graph.nodes:
            if ann.roles.get(node.name) is not Role.COMPUTE:
                continue
            module = to_qat(gm.get_submodule(node.target), node.target)
            module.attach_weight_fake_quant(make_fake_quant(
                ann.pairs[node.name].weight, f"{node.target}.weight", "weight", self.learnable, self.learn_zero_point
            ))
            ctx.stats["weight_fake_quants"] += 1
        ctx.stats["rounded_averages"] = _round_after_averaging_ops(gm, ann)
        gm.recompile()
        return PassResult(gm, modified=True)


def _round_after_averaging_ops(gm: fx.GraphModule, ann: Annotation) -> int:
    """Insert ``fake_quant.requantize(value)`` after each averaging op that reads a fake-quantized value,
    with the fake-quant whose grid that value is on (through any chain of qparams-preserving ops)."""
    grid_of: dict[fx.Node, str] = {}  # value → target of the fake-quant whose grid it lies on
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantize):
            grid_of[node] = node.target
            continue
        inputs = node.all_input_nodes
        if ann.roles.get(node.name) is not Role.PRESERVING or not inputs or inputs[0] not in grid_of:
            continue
        target = grid_of[node] = grid_of[inputs[0]]
        if not _AVERAGING(gm, node):
            continue
        with gm.graph.inserting_before(node):
            owner = gm.graph.get_attr(target)
        with gm.graph.inserting_after(node):
            rounded = gm.graph.call_method(REQUANTIZE_METHOD, (owner, node))
        node.replace_all_uses_with(rounded, delete_user_cb=lambda user, r=rounded: user is not r)
        rounded.meta = dict(node.meta)
        grid_of[rounded] = target
        count += 1
    return count
