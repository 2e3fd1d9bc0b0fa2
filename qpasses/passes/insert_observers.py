"""InsertObservers: annotate the graph and place an observer on every value that needs a range."""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from qpasses.graph.modules import unique_name
from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.quant.annotate import Annotation, annotate
from qpasses.quant.backends import Backend, get_backend
from qpasses.quant.observers import make_observer
from qpasses.quant.overrides import apply_overrides
from qpasses.quant.spec import QuantConfig
from qpasses.quant.state import QSTATE_KEY, state_of


def resolve_config(backend: str, config: QuantConfig | None, bits: int | None, per_channel: bool | None,
                   quantize_output: bool | None = None) -> QuantConfig:
    """The backend's default configuration unless one is given; ``bits`` sets weight and activation bits,
    ``quantize_output`` (if not None) ``QuantConfig.quantize_output``."""
    chosen = get_backend(backend)
    config = config if config is not None else chosen.default_config(per_channel=per_channel)
    if bits is not None:
        config = config.with_bits(bits)
    if quantize_output is not None and quantize_output != config.quantize_output:
        config = dataclasses.replace(config, quantize_output=quantize_output)
    chosen.check_config(config)
    return config


def activation_bits_note(backend: Backend, config: QuantConfig, ann: Annotation, given: bool) -> str:
    """Which activation bits the annotation of ``config`` (``given`` by the user, which wins over the table, or
    the backend's default) chose under ``backend`` on this CPU, and why."""
    activation = config.activation
    bits = f"{activation.bits}-bit activations"
    if not activation.reduce_range:
        if given:
            why = "as the given config asks"
        elif not backend.has_saturating_kernels():
            why = backend.reduce_range_reason()
        else:
            why = f"{activation.bits}-bit grids cannot overflow an int16 pair sum"
        return f"{backend.name}: {bits}: {why}"
    reduced = sum(spec.reduce_range for spec in ann.observe.values())
    where = f"on all {len(ann.observe)} observed values" if not reduced else (
        f"{activation.bits - 1}-bit steps (reduce_range) on the {reduced} of {len(ann.observe)} observed values "
        "read by kernels that add int16 pairs")
    asked = " (the given config asks for reduce_range where it is needed)" if given else ""
    return f"{backend.name}: {bits}, {where}{asked}: {backend.reduce_range_reason()}"


class InsertObservers(Pass):
    """Insert observers where a real int8 kernel needs a range (see ``qpasses.quant.annotate`` for the rules).

    Math: none yet; each observer records the values flowing through it and later yields
    ``scale = (max − min) / (quant_max − quant_min)``, ``zero_point = quant_min − round(min / scale)``.
    Requires: float arithmetic as FloatFunctional modules (ReplaceFunctional), so every requantizing op
    has a module. Preserves: the function exactly (observers return their input).
    Provides: ``observed``. An annotation that quantizes nothing is an error, not silence.
    Per-node overrides recorded by an earlier pass (``qpasses.quant.overrides``) apply on top of ``config``.
    ``quantize_output``: sets ``QuantConfig.quantize_output`` (None: the config's, False by default): whether
    a linear writing the model's output (the logits) rounds it to 8 bits or, where the engine has such a
    kernel, writes float (``qpasses.quant.annotate``).
    """

    stage = Stage.QUANTIZE
    requires = frozenset({"functional_modules"})
    after = frozenset({"bn_folded", "equalized", "bias_absorbed", "config_overrides"})
    provides = frozenset({"observed"})
    preserves_function = True

    def __init__(self, backend: str = "x86", config: QuantConfig | None = None, bits: int | None = None,
                 per_channel: bool | None = None, quantize_output: bool | None = None):
        self.backend = get_backend(backend)
        self.config = resolve_config(backend, config, bits, per_channel, quantize_output)
        self.given_config = config is not None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        config = apply_overrides(gm, self.config)
        if config is not self.config:
            self.backend.check_config(config)
        ann = annotate(gm, self.backend, config)
        int8 = ann.int8_ops()
        nodes = {n.name: n for n in gm.graph.nodes}
        targets: dict[str, str] = {}
        for value in sorted(ann.observe, key=lambda name: name in ann.shared):
            owner = ann.shared.get(value)
            if owner is None:
                target = unique_name(gm, f"{value}_obs")
                gm.add_submodule(target, make_observer(ann.observe[value], name=value))
            else:
                target = targets[owner]
            targets[value] = target
            node = nodes[value]
            with gm.graph.inserting_after(node):
                observed = gm.graph.call_module(target, (node,))
            observed.meta = dict(node.meta)
            observed.meta[QSTATE_KEY] = "observed"
            node.replace_all_uses_with(observed, delete_user_cb=lambda user, o=observed: user is not o)
        state_of(gm).annotation = ann
        for name in ann.float_reasons:
            ctx.note(f"stays float: {ann.float_reasons[name]}")
        for note in ann.notes:
            ctx.note(note)
        ctx.stats["int8_ops"] = len(int8)
        ctx.stats["float_ops"] = len(ann.float_reasons)
        ctx.stats["observers"] = len(set(targets.values()))
        ctx.stats["fused_activations"] = len(ann.fused)
        ctx.stats["float_outputs"] = len(ann.float_output)
        ctx.note(activation_bits_note(self.backend, config, ann, self.given_config))
        gm.recompile()
        return PassResult(gm, modified=True)
