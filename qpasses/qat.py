"""Helpers for training a QAT model in any loop, and ``convert`` to lower it afterwards.

``qm = PassManager([QAT(bits=4)]).run(model, x)`` returns a plain ``nn.Module`` (a GraphModule) in
training mode: any optimizer, AMP, gradient clipping, DistributedDataParallel. The helpers switch its
fake-quant and BN behaviour; each returns the model, to chain calls.
"""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn

from qpasses.errors import QPassesError
from qpasses.graph.modules import set_module
from qpasses.passes.base import PassContext
from qpasses.passes.insert_fake_quant import FROM_STEPS_METHOD, TO_STEPS_METHOD
from qpasses.passes.lower import Lower
from qpasses.passes.manager import TRAINABLE
from qpasses.passes.reference import Reference
from qpasses.quant.fake_quant import FakeQuantize
from qpasses.quant.qat_modules import QATModule
from qpasses.quant.state import WEIGHT_QPARAMS_KEY, existing_state, properties_of, state_of

__all__ = ["convert", "disable_fake_quant", "enable_fake_quant", "freeze_bn_stats", "freeze_observers"]


def _fake_quants(model: nn.Module) -> list[FakeQuantize]:
    found = [m for m in model.modules() if isinstance(m, FakeQuantize)]
    if not found:
        raise QPassesError("the model has no fake-quant modules; prepare it with PassManager([QAT(...)]).run(model, x)")
    return found


def freeze_observers(model: nn.Module) -> nn.Module:
    """Stop updating min/max-tracked ranges (LSQ scales keep learning from gradients)."""
    for fq in _fake_quants(model):
        fq.observer_enabled.fill_(0)
    return model


def enable_fake_quant(model: nn.Module) -> nn.Module:
    """Fake-quantize weights and activations (the default)."""
    for fq in _fake_quants(model):
        fq.fake_quant_enabled.fill_(1)
    return model


def disable_fake_quant(model: nn.Module) -> nn.Module:
    """Run in float (ranges are still tracked while observers are enabled), e.g. to warm up first."""
    for fq in _fake_quants(model):
        fq.fake_quant_enabled.fill_(0)
    return model


def freeze_bn_stats(model: nn.Module) -> nn.Module:
    """Stop updating BatchNorm statistics in QAT blocks: from now on they normalise with the running ones,
    exactly as the converted model folds them (usual for the last epochs)."""
    for m in model.modules():
        if isinstance(m, QATModule):
            m.freeze_bn_stats()
    return model


def convert(model: fx.GraphModule, inplace: bool = False, lower: bool = True) -> fx.GraphModule:
    """Lower a trained QAT model to the int8 kernels of the backend given to ``QAT`` (``lower=False``: to its
    reference quantized graph, ``qpasses.passes.Reference``, which the deployment targets take).

    BN is folded with its running statistics, each weight (and, where the kernels quantize it, bias) is
    lowered as its fake-quant rounded it, each activation at its fake-quant's qparams; then ``Lower`` runs
    as after PTQ. The QAT model simulates the kernels' arithmetic, so the result computes the same int
    codes as the QAT model in eval mode; only a value within float error (~1e-6 of a step) of a rounding
    tie can fall on the other side. ``model`` is left as it is unless ``inplace``.
    """
    if TRAINABLE not in properties_of(model) or existing_state(model).annotation is None:
        raise QPassesError("convert() takes the model PassManager([QAT(...)]).run(model, x) returned "
                           f"(after training); got a {type(model).__name__} without fake-quant annotation")
    gm = model if inplace else copy.deepcopy(model)
    gm.eval()
    _remove_steps(gm)
    trained: dict[str, tuple | None] = {}  # QAT module name → its trained weight qparams (a module may be called twice)
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, QATModule):
            plain = module.float_module()  # fake-quantizes the weight: its fake-quant now holds the eval range
            fake_quant = module.weight_fake_quant
            trained[node.target] = fake_quant.qparams() if fake_quant is not None else None
            set_module(gm, node.target, plain)
        if trained.get(node.target) is not None:
            node.meta[WEIGHT_QPARAMS_KEY] = trained[node.target]
    ctx = PassContext(example_inputs=())
    conversion = Lower() if lower else Reference()
    gm = conversion.run(gm, ctx).graph_module
    state = state_of(gm)
    state.properties = (state.properties - conversion.invalidates - {TRAINABLE}) | conversion.provides
    return gm


def _remove_steps(gm: fx.GraphModule) -> None:
    """Averaging ops back on their plain input: the int8 kernels compute on the codes themselves."""
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target in (TO_STEPS_METHOD, FROM_STEPS_METHOD):
            owner, value = node.args
            node.replace_all_uses_with(value)
            gm.graph.erase_node(node)
            if not owner.users:
                gm.graph.erase_node(owner)
