"""Calibrate: run calibration batches through an observed graph."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qpasses import distributed
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


def model_device(gm: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without either)."""
    for tensor in itertools.chain(gm.parameters(), gm.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(inputs: tuple, device: torch.device) -> tuple:
    """The tensors of ``inputs`` on ``device`` (other items as they are)."""
    return tuple(x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x for x in inputs)


def run_batches(gm: fx.GraphModule, data: Iterable, num_batches: int | None, description: str,
                show_progress: bool = True) -> int:
    """Run ``gm`` in eval mode on up to ``num_batches`` batches of ``data``, on the model's device; returns
    how many ran. Under torch.distributed (``qpasses.distributed``) each rank runs its shard of the first
    ``num_batches`` batches, the observers are merged over the ranks (bit-identical to one process running
    all of them in order), and the count is of all ranks' batches."""
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    expected = [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
                if n.op == "placeholder" and "tensor_meta" in n.meta]
    device = model_device(gm)
    total = _length(data)
    total = min(total, num_batches) if total is not None and num_batches is not None else (total or num_batches)
    rank, size = distributed.rank_and_size()
    if total is not None:
        total = len(range(rank, total, size))
    observers = [m for m in gm.modules() if isinstance(m, Observer)]
    count, error = 0, None
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for index, batch in progress(distributed.shard(data, num_batches), total, description, show_progress):
                inputs = to_device(batch_inputs(batch, n_inputs), device)
                if size > 1:
                    for observer in observers:
                        observer.batch_index = index
                try:
                    gm(*inputs)
                except CalibrationError as exc:
                    raise CalibrationError(f"batch {index}: {exc}") from exc
                except (RuntimeError, ValueError, TypeError) as exc:
                    got = [tuple(i.shape) if isinstance(i, torch.Tensor) else type(i).__name__ for i in inputs]
                    raise CalibrationError(
                        f"batch {index}: the model fails on inputs of shape {got} (it was traced with {expected}): "
                        f"{str(exc).splitlines()[0]}"
                    ) from exc
                count += 1
    except CalibrationError as exc:
        if size == 1:
            raise
        error = exc
    finally:
        gm.train(was_training)
        for observer in observers:
            observer.batch_index = None
    if size > 1:
        distributed.raise_if_any_failed(error, description)
        count = sum(distributed.all_gather_object(count))
    if count == 0:
        raise CalibrationError(f"{description}: the data yielded no batches; give at least one")
    distributed.merge_observers(gm)
    return count


class Calibrate(Pass):
    """Run batches of ``data`` (any iterable or DataLoader) through the observers.

    Each batch is a tensor, or a tuple whose first items are the model inputs (labels are ignored).
    Observers keep bounded statistics (min/max or a fixed-size histogram), so memory does not grow
    with ``num_batches``. Empty data, NaN/Inf activations and inputs that do not fit the model are
    errors naming the batch. Batches run on ``device`` (the graph moves there first; default: where the
    graph's parameters are), their tensors moved to it. Under torch.distributed, each rank runs its shard
    (batch ``i`` on rank ``i % world_size``, ``num_batches`` counting all ranks' batches) and the observers
    are merged: every rank ends with the state one process calibrating on all batches would have.
    Requires: ``observed``. Provides: ``calibrated``.
    """

    stage = Stage.QUANTIZE
    requires = frozenset({"observed"})
    provides = frozenset({"calibrated"})

    def __init__(self, data: Iterable, num_batches: int | None = None, progress: bool = True,
                 device: str | torch.device | None = None):
        self.data = check_data(data, self.name)
        self.num_batches = check_count(num_batches, "num_batches", self.name)
        self.progress = progress
        self.device = None if device is None else torch.device(device)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        observers = {name: m for name, m in gm.named_modules() if isinstance(m, Observer)}
        if not observers:
            raise CalibrationError("the graph has no observers; run InsertObservers (or use PTQ) first")
        if self.device is not None:
            gm.to(self.device)
        ctx.stats["batches"] = run_batches(gm, self.data, self.num_batches, "calibrating", self.progress)
        idle = sorted(name for name, m in observers.items() if not m.calibrated)
        if idle:
            raise CalibrationError(f"{len(idle)} observer(s) saw no data, e.g. '{idle[0]}': the calibration "
                                   f"batches never reach that part of the model")
        ctx.stats["observers"] = len(observers)
        return PassResult(gm, modified=True)
