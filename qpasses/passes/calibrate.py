"""Calibrate: run calibration batches through an observed graph."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from qpasses.passes.base import Pass, PassContext, PassResult, Stage
from qpasses.quant.observers import CalibrationError, Observer
from qpasses.validation import check_count, check_data


def batch_inputs(batch: Any, n_inputs: int) -> tuple:
    """The model inputs in one batch: a tensor, or the first ``n_inputs`` items of (inputs, labels, ...)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, dict):
        raise CalibrationError("calibration batches are dicts; pass an iterable of tensors or (inputs, labels) tuples")
    if isinstance(batch, list | tuple) and len(batch) >= n_inputs:
        return tuple(batch[:n_inputs])
    raise CalibrationError(f"cannot read model inputs from a calibration batch of type {type(batch).__name__}")


def progress(iterable: Iterable, total: int | None, description: str, enabled: bool, unit: str = "batch") -> Iterable:
    """A tqdm progress bar when tqdm is installed and ``enabled``; the plain iterable otherwise."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=description, unit=unit, leave=False)


def _length(data: Iterable) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def run_batches(gm: fx.GraphModule, data: Iterable, num_batches: int | None, description: str,
                show_progress: bool = True) -> int:
    """Run ``gm`` in eval mode on up to ``num_batches`` batches of ``data``; returns how many ran."""
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    expected = [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
                if n.op == "placeholder" and "tensor_meta" in n.meta]
    total = _length(data)
    total = min(total, num_batches) if total is not None and num_batches is not None else (total or num_batches)
    count = 0
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for batch in progress(data, total, description, show_progress):
                if num_batches is not None and count >= num_batches:
                    break
                inputs = batch_inputs(batch, n_inputs)
                try:
                    gm(*inputs)
                except CalibrationError as exc:
                    raise CalibrationError(f"batch {count}: {exc}") from exc
                except (RuntimeError, ValueError, TypeError) as exc:
                    got = [tuple(i.shape) if isinstance(i, torch.Tensor) else type(i).__name__ for i in inputs]
                    raise CalibrationError(
                        f"batch {count}: the model fails on inputs of shape {got} (it was traced with {expected}): "
                        f"{str(exc).splitlines()[0]}"
                    ) from exc
                count += 1
    finally:
        gm.train(was_training)
    if count == 0:
        raise CalibrationError(f"{description}: the data yielded no batches; give at least one")
    return count


class Calibrate(Pass):
    """Run batches of ``data`` (any iterable or DataLoader) through the observers.

    Each batch is a tensor, or a tuple whose first items are the model inputs (labels are ignored).
    Observers keep bounded statistics (min/max or a fixed-size histogram), so memory does not grow
    with ``num_batches``. Empty data, NaN/Inf activations and inputs that do not fit the model are
    errors naming the batch. Requires: ``observed``. Provides: ``calibrated``.
    """

    stage = Stage.QUANTIZE
    requires = frozenset({"observed"})
    provides = frozenset({"calibrated"})

    def __init__(self, data: Iterable, num_batches: int | None = None, progress: bool = True):
        self.data = check_data(data, self.name)
        self.num_batches = check_count(num_batches, "num_batches", self.name)
        self.progress = progress

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        observers = {name: m for name, m in gm.named_modules() if isinstance(m, Observer)}
        if not observers:
            raise CalibrationError("the graph has no observers; run InsertObservers (or use PTQ) first")
        ctx.stats["batches"] = run_batches(gm, self.data, self.num_batches, "calibrating", self.progress)
        idle = sorted(name for name, m in observers.items() if not m.calibrated)
        if idle:
            raise CalibrationError(f"{len(idle)} observer(s) saw no data, e.g. '{idle[0]}': the calibration "
                                   f"batches never reach that part of the model")
        ctx.stats["observers"] = len(observers)
        return PassResult(gm, modified=True)
