"""Calibration across processes: the few collectives every calibration site uses.

When ``torch.distributed`` is initialised with more than one process, calibration deals batch ``i`` of the
user's iterable to rank ``i % world_size`` (``shard``), each rank observes its own batches, and
``merge_observers`` combines every observer's state over the ranks. Each observer kind knows how to merge
its state (``Observer.shard_state`` / ``Observer.merge_states``), so that the merged state is bit-identical,
on every rank, to one process observing all batches in global order. ``split`` and ``gather_results`` let
per-item work (sensitivity variants, per-batch errors) run on one rank each, with the results on all.

Object collectives (pickled, through ``all_gather_object``) carry the states: they work with gloo and with
NCCL (where each process must have selected its GPU, ``torch.cuda.set_device(local_rank)``), and states are
small (a histogram is 2048 float64 counts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

from qpasses.errors import QPassesError

T = TypeVar("T")


def is_distributed(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process (in ``group``)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_size(group: Any = None) -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` without torch.distributed)."""
    if not is_distributed(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard(data: Iterable[T], num_batches: int | None = None, group: Any = None) -> Iterator[tuple[int, T]]:
    """``(global index, batch)`` for this rank's batches of ``data``: batch ``i`` goes to rank
    ``i % world_size``, and only the first ``num_batches`` batches (all ranks together) are dealt. Without
    torch.distributed, every batch. Every rank iterates over ``data`` (skipping others' batches), so each
    must be given the same iterable in the same order."""
    rank, size = rank_and_size(group)
    for index, batch in enumerate(data):
        if num_batches is not None and index >= num_batches:
            return
        if index % size == rank:
            yield index, batch


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without torch.distributed)."""
    if not is_distributed(group):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def raise_if_any_failed(error: Exception | None, what: str, group: Any = None) -> None:
    """A collective: if any rank failed (``error`` not None there), raise on every rank, so that none waits
    forever in the next collective. The failing rank re-raises its own error."""
    messages = all_gather_object(None if error is None else str(error).splitlines()[0], group)
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise QPassesError(f"{what} failed on rank {rank}: {message}")


def merge_observers(model: nn.Module, group: Any = None) -> int:
    """Merge the state of every observer of ``model`` over the ranks of ``group`` (a collective; a no-op
    without torch.distributed). Every rank must hold the same observers. Returns how many were merged."""
    from qpasses.quant.observers import Observer

    observers = {name: m for name, m in model.named_modules() if isinstance(m, Observer)}
    if not is_distributed(group):
        return 0
    contributions = all_gather_object({name: m.shard_state() for name, m in observers.items()}, group)
    for rank, contribution in enumerate(contributions):
        if contribution.keys() != observers.keys():
            differ = sorted(contribution.keys() ^ observers.keys())
            raise QPassesError(f"rank {rank} holds other observers than this rank (e.g. '{differ[0]}'); every rank "
                               "must build the same model and pipeline")
    for name, observer in observers.items():
        observer.merge_states([contribution[name] for contribution in contributions])
    return len(observers)


def gather_indexed(parts: dict[int, Any], group: Any = None) -> list[Any]:
    """Every rank's ``parts`` (global index → value, indices disjoint across ranks) as one list in index
    order, on every rank: per-batch results to be reduced in batch order, as one process would. Tensors
    travel on the CPU."""
    if not is_distributed(group):
        return [parts[i] for i in sorted(parts)]
    merged: dict[int, Any] = {}
    for part in all_gather_object({i: tree_map(_on_cpu, value) for i, value in parts.items()}, group):
        merged.update(part)
    return [merged[i] for i in sorted(merged)]


def _on_cpu(value: Any) -> Any:
    return value.cpu() if isinstance(value, torch.Tensor) else value


def split(count: int, group: Any = None) -> range:
    """The items of ``range(count)`` this rank computes: ``rank, rank + world_size, ...``."""
    rank, size = rank_and_size(group)
    return range(rank, count, size)


def map_items(items: Sequence[T], fn: Callable[[T], Any], group: Any = None,
              show: Callable[[range], Iterable[int]] = iter) -> list[Any]:
    """``[fn(item) for item in items]`` on every rank, each item computed by one rank (``split``) and the
    results gathered (they must pickle). ``show`` wraps the indices this rank computes (a progress bar)."""
    mine = {i: fn(items[i]) for i in show(split(len(items), group))}
    results: dict[int, Any] = {}
    for part in all_gather_object(mine, group):
        results.update(part)
    return [results[i] for i in range(len(items))]
