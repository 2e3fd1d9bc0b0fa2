"""Per-node configuration overrides that a pass hands to observer insertion through the graph.

A pass that decides something about individual nodes before quantization (``MixedPrecision`` choosing
weight bit-widths) records it with ``add_overrides`` in the graph's ``QuantState`` and declares
``provides = {"config_overrides"}``; ``InsertObservers`` runs after any such pass and applies the
overrides on top of its own configuration (``apply_overrides``). No pass reaches into another's state.
"""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Mapping

import torch.fx as fx

from qpasses.quant.spec import QuantConfig, QuantPair
from qpasses.quant.state import existing_state, state_of


def exact_pattern(name: str) -> str:
    """An fnmatch pattern that matches ``name`` only (module names may contain ``[``, ``*``, ``?``)."""
    return glob.escape(name)


def with_node_overrides(config: QuantConfig, pairs: Mapping[str, QuantPair | None]) -> QuantConfig:
    """``config`` with ``pairs`` (qualified node/module name → pair, None: float) taking precedence over
    its ``by_name`` rules; ``keep_float`` still wins, as in ``QuantConfig.for_node``."""
    by_name = {exact_pattern(name): pair for name, pair in pairs.items()}
    by_name.update((pattern, pair) for pattern, pair in config.by_name.items() if pattern not in by_name)
    return dataclasses.replace(config, by_name=by_name, by_module_type=dict(config.by_module_type),
                               keep_float=set(config.keep_float))


def add_overrides(gm: fx.GraphModule, pairs: Mapping[str, QuantPair | None]) -> None:
    """Record ``pairs`` for the observer insertion that follows; later calls win over earlier ones."""
    state_of(gm).overrides.update(pairs)


def apply_overrides(gm: fx.GraphModule, config: QuantConfig) -> QuantConfig:
    """``config`` with the overrides recorded on ``gm`` (``config`` itself if there are none)."""
    state = existing_state(gm)
    pairs = state.overrides if state is not None else None
    return with_node_overrides(config, pairs) if pairs else config
