"""Fidelity metrics."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._pytree import tree_flatten


def _float_leaves(value: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.dequantize() if leaf.is_quantized else leaf
            if leaf.is_floating_point():
                out.append(leaf.detach().double())
    return out


def sqnr(reference: Any, test: Any) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(Σ ref² / Σ (ref − test)²)``.

    Nested outputs (tuples, lists, dicts) are compared leaf by leaf and the worst leaf is returned;
    identical outputs give ``inf``.
    """
    refs, tests = _float_leaves(reference), _float_leaves(test)
    if len(refs) != len(tests):
        raise ValueError(f"outputs differ in structure: {len(refs)} vs {len(tests)} floating tensors")
    worst = math.inf
    for r, t in zip(refs, tests, strict=True):
        if r.shape != t.shape:
            raise ValueError(f"output shapes differ: {tuple(r.shape)} vs {tuple(t.shape)}")
        noise = float(((r - t) ** 2).sum())
        signal = float((r**2).sum())
        if noise == 0.0:
            continue
        worst = min(worst, 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf)
    return worst
