"""Helpers to read, replace and name submodules of a GraphModule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.fx as fx
from torch import nn


def get_module(gm: nn.Module, qualname: str) -> nn.Module:
    return gm.get_submodule(qualname)


def set_module(gm: nn.Module, qualname: str, module: nn.Module) -> None:
    """Put ``module`` at ``qualname``, replacing what is there."""
    parent_name, _, child = qualname.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, child, module)


def unique_name(gm: nn.Module, base: str) -> str:
    """A qualified name next to ``base`` that no submodule or attribute of ``gm`` uses yet."""
    # Submodules, parameters and buffers are attributes too: looking the candidate up is enough, and does not
    # list the whole model for each new name (quadratic in the observers InsertObservers adds).
    candidate, i = base, 1
    while _has_attr(gm, candidate):
        candidate = f"{base}_{i}"
        i += 1
    return candidate


def _has_attr(gm: nn.Module, qualname: str) -> bool:
    obj = gm
    for part in qualname.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def remove_unused_modules(gm: fx.GraphModule) -> list[str]:
    """Delete submodules that no node calls or reads; returns their names."""
    used = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    removed = []
    for name, _ in list(gm.named_children()):
        if not any(u == name or u.startswith(name + ".") for u in used):
            delattr(gm, name)
            removed.append(name)
    return removed


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Verification forwards must not update BN statistics or sample dropout; restore modes after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Verification forwards leave no trace: observers must not count the example inputs as calibration data."""
    saved = [(m, name, buf.clone()) for m in module.modules() for name, buf in m._buffers.items() if buf is not None]
    try:
        yield
    finally:
        for m, name, buf in saved:
            current = m._buffers.get(name)
            if current is not None and current.shape == buf.shape and current.dtype == buf.dtype:
                current.copy_(buf)
            else:
                m._buffers[name] = buf
