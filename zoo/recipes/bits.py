"""The low-bit study: PTQ, PTQ with empirical bias correction, PTQ with AdaRound and QAT (one epoch of
fine-tuning from the float weights) at 8, 7, 6, 5 and 4 bits (weights and activations) of
ResNet-18 and ResNet-50.

CIFAR-style ResNets on CIFAR-10 with ``--data``, sklearn's digits offline (the checkpoints are shared
with the ``resnet`` recipe). Sub-8-bit grids run in the 8-bit kernels (x86/fbgemm, per-channel weights)
with their integer range narrowed; the size column counts weights packed at n bits, as a deployment
format that stores them so would. Round-to-nearest loses more of each weight the coarser the grid, which
is what AdaRound (learned up/down rounding, layer by layer on the calibration batches) recovers without
training; bias correction removes only the mean output shift the rounding causes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qpasses.passes import PTQ, QAT, BiasCorrection, FuseBN, Pass
from qpasses_zoo.recipes.common import (
    Column,
    Failed,
    PlotAxes,
    Settings,
    Variant,
    adaround,
    adaround_iterations,
    batches,
    build,
    calibration_batches,
    chosen_models,
    classification_score,
    classification_task,
    classifier_qat,
    copy_of,
    pipeline,
    qat_variant,
    quant_config,
    score_all,
    trained_classifier,
    training_note,
    write_outputs,
)

MODELS = ("cifar_resnet18", "cifar_resnet50")
# ResNet-50 by default would take about an hour on 2 CPU cores (its float epochs and five QAT epochs are
# ~5x ResNet-18's): add it with --model cifar_resnet18 --model cifar_resnet50.
DEFAULT_MODELS = ("cifar_resnet18",)
QUICK_MODELS = ("cifar_resnet18",)
BITS = (8, 7, 6, 5, 4)
BACKEND = "x86"
# The PTQ pipelines of each bit width: label → the accuracy passes that run with PTQ (after FuseBN), given
# the calibration batches and the settings.
# AdaRound is by far the costliest (minutes per bit width on 2 CPU cores), so it runs once per bit width and
# bias correction's row shows its effect alone.
PTQ_METHODS: dict[str, Callable[[list[torch.Tensor], Settings], list[Pass]]] = {
    "PTQ": lambda calibration, settings: [],
    "PTQ+BiasCorrection": lambda calibration, settings: [BiasCorrection(calibration)],
    "PTQ+AdaRound": lambda calibration, settings: [adaround(calibration, settings)],
}

COLUMNS = [
    Column("model", "model"), Column("variant", "variant"), Column("bits", "bits"),
    Column("top1", "top-1 %", "{:.2f}"), Column("top5", "top-5 %", "{:.2f}"),
    Column("size_mb", "size MB (n-bit packed)", "{:.2f}"), Column("latency_ms", "latency ms", "{:.2f}"),
]


def ptq_variants(model: nn.Module, calibration: list[torch.Tensor], example: torch.Tensor, bits: int,
                 settings: Settings) -> list[Variant | Failed]:
    """Plain PTQ, PTQ with empirical bias correction, and PTQ with AdaRound at ``bits``."""
    variants = []
    for method, accuracy_passes in PTQ_METHODS.items():
        ptq = PTQ(calibration, backend=BACKEND, config=quant_config(settings, BACKEND), bits=bits,
                  progress=settings.show_progress)
        passes = [FuseBN(), *accuracy_passes(calibration, settings), ptq]
        variants.append(build(f"{method} {bits}-bit", pipeline(model, example, *passes), bits=bits,
                              columns={"bits": bits}))
    return variants


def run(settings: Settings) -> list[dict]:
    rows, meta = [], {}
    widths = settings.bits or BITS
    for name in chosen_models(settings, MODELS, DEFAULT_MODELS, QUICK_MODELS):
        task = classification_task(name, settings)
        model, record = trained_classifier(task, settings)
        test = batches(task.test_set, 64)
        calibration = calibration_batches(task, settings)
        example = test[0][0][:1]
        variants = [Variant("float", copy_of(model), columns={"bits": 32})]
        for bits in widths:
            variants += ptq_variants(model, calibration, example, bits, settings)
        qat = classifier_qat(task, record, settings)
        for bits in widths:
            variants.append(qat_variant(f"QAT {bits}-bit", model, example,
                                        [QAT(backend=BACKEND, config=quant_config(settings, BACKEND), bits=bits)],
                                        qat, settings, bits=bits, columns={"bits": bits}))
        rows += [{"model": name, **row} for row in score_all(variants, classification_score(test), example, settings)]
        meta[name] = training_note(task, record)
    meta["AdaRound"] = (f"{adaround_iterations(settings)} iterations per layer on the calibration images "
                        "(batches of 8, lr 1e-2); BiasCorrection: empirical, on the same images")
    title = f"PTQ, bias correction, AdaRound and QAT at {', '.join(map(str, widths))} bits ({BACKEND}, per-channel weights)"
    write_outputs(settings, title, COLUMNS, rows, PlotAxes("top1", "top-1 accuracy (%)", group="model"), meta)
    return rows
