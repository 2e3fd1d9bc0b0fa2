"""The ResNet-18 study of the ``resnet`` recipe (float, static int8 PTQ, QAT int8) run by torchrun on 1 or N
processes, on the CPU (gloo) or one GPU per process (NCCL)::

    torchrun --standalone --nproc_per_node 2 -m qpasses_zoo.recipes resnet_ddp [--data CIFAR_ROOT] [--quick]

The float model and the QAT fine-tuning train as ``DistributedDataParallel``, each process on its
``DistributedSampler`` shard (see ``common.train``); calibration, PTQ and ``qpasses.convert`` run in every
process through the ordinary API, on the CPU, where the int8 kernels are. Rank 0 scores and measures the
variants and writes the ``resnet`` recipe's table. Before that, the processes compare fingerprints of their
quantized models (int8 weights, scales, zero points): replicas that disagree end the run with an error
instead of a table. Without torchrun it runs as one process. CIFAR-10 with ``--data``, else sklearn's
digits offline, as in the ``resnet`` recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qpasses_zoo.recipes.common import (
    PlotAxes,
    RecipeError,
    Settings,
    Variant,
    batches,
    calibration_batches,
    chosen_models,
    classification_score,
    classification_task,
    classifier_qat,
    copy_of,
    score_all,
    trained_classifier,
    training_device,
    training_note,
    world,
    write_outputs,
)
from qpasses_zoo.recipes.resnet import COLUMNS, int8_variants

MODELS = ("cifar_resnet18",)


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """torchrun's process group for the run: NCCL when this node has a GPU for each of its processes,
    else gloo on the CPU. Without torchrun (no ``WORLD_SIZE``), or in a process that has one, nothing."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        yield
        return
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    use_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_processes
    if use_gpus:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_gpus else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _canonical_bytes(value: Any) -> list[bytes]:
    """The exact content of a state-dict entry: int codes and qparams of quantized tensors, the bytes of
    others, recursively through the tuples packed parameters hold."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.is_quantized:
            if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                qparams = [t.q_per_channel_scales(), t.q_per_channel_zero_points(),
                           torch.tensor(t.q_per_channel_axis())]
            else:
                qparams = [torch.tensor(t.q_scale(), dtype=torch.float64), torch.tensor(t.q_zero_point())]
            return [b for part in (t.int_repr(), *qparams) for b in _canonical_bytes(part)]
        return [str(t.dtype).encode(), str(tuple(t.shape)).encode(), t.contiguous().numpy().tobytes()]
    if isinstance(value, tuple | list):
        return [b for item in value for b in _canonical_bytes(item)]
    return [repr(value).encode()]


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """SHA-256 over every state-dict entry of ``model`` (names and exact contents), and how many there are."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        digest.update(name.encode())
        for part in _canonical_bytes(state[name]):
            digest.update(part)
    return {"entries": len(state), "sha256": digest.hexdigest()}


def gathered(local: dict[str, Any]) -> list[dict[str, Any]]:
    """``local`` of every process, by rank (just ``[local]`` in a single process)."""
    rank, world_size = world()
    if world_size == 1:
        return [local]
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, local)
    return everyone


def run(settings: Settings) -> list[dict]:
    with process_group():
        rank, world_size = world()
        settings = dataclasses.replace(settings, show_progress=settings.show_progress and rank == 0)
        (name,) = chosen_models(settings, MODELS, MODELS, MODELS)
        task = classification_task(name, settings)
        model, record = trained_classifier(task, settings)
        test = batches(task.test_set, 64)
        calibration = calibration_batches(task, settings)
        example = test[0][0][:1]
        variants = [Variant("float", copy_of(model)),
                    *int8_variants(model, calibration, example, classifier_qat(task, record, settings), settings)]
        replicas = gathered({v.label: fingerprint(v.model) for v in variants if isinstance(v, Variant)})
        differing = sorted(label for label in replicas[0] if any(r.get(label) != replicas[0][label] for r in replicas))
        if differing:
            raise RecipeError(f"the {world_size} processes ended with different models for {', '.join(differing)}")
        rows = []
        if rank == 0:
            device = training_device()
            rows = [{"model": name, **row}
                    for row in score_all(variants, classification_score(test), example, settings, memory=True)]
            meta = {name: training_note(task, record),
                    "processes": f"{world_size} ({dist.get_backend() if world_size > 1 else 'no process group'}, "
                                 f"training on {device.type}); each trains on its shard, calibrates on all of "
                                 "the calibration batches",
                    "replica_fingerprints": replicas}
            write_outputs(settings, f"ResNet-18 on {world_size} process(es): float, static int8 PTQ and QAT",
                          COLUMNS, rows, PlotAxes("top1", "top-1 accuracy (%)", group="model"), meta)
        if world_size > 1:
            dist.barrier()  # the others wait for rank 0's table (torchrun stops them if rank 0 fails)
        return rows


if __name__ == "__main__":  # torchrun -m qpasses_zoo.recipes.resnet_ddp [options]
    from qpasses_zoo.recipes import main

    sys.exit(main(["resnet_ddp", *sys.argv[1:]]))
