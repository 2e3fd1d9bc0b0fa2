"""The ResNet deployment study: float, dynamic fp16, dynamic int8, static int8 PTQ and QAT (one epoch of
fine-tuning from the float weights), each eager and TorchScript, scored by top-1/top-5 and measured for size, batch-1 latency and peak memory.

Models: the CIFAR-10 ResNet-18/34/50 and the CIFAR-100 pre-activation ResNet-34 (with ``--data``,
a CIFAR root holding ``cifar-10-batches-py`` and/or ``cifar-100-python``); offline they all learn
sklearn's digits at 32×32. Dynamic quantization only touches Linear layers: in a ResNet that is the
classifier, so its rows show how little it buys for a CNN. Static PTQ targets the x86 (fbgemm) engine.
"""

from __future__ import annotations

import torch

from qpasses.passes import PTQ, QAT, DynamicQuant, FuseBN
from qpasses_zoo.recipes.common import (
    CIFAR_DATASETS,
    Column,
    PlotAxes,
    QATRun,
    Settings,
    Variant,
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
    torchscript,
    trained_classifier,
    training_note,
    write_outputs,
)

DEFAULT_MODELS = ("cifar_resnet18", "preact_resnet34")
QUICK_MODELS = ("cifar_resnet18",)
BACKEND = "x86"

COLUMNS = [
    Column("model", "model"), Column("variant", "variant"), Column("top1", "top-1 %", "{:.2f}"),
    Column("top5", "top-5 %", "{:.2f}"), Column("size_mb", "size MB", "{:.2f}"),
    Column("latency_ms", "latency ms", "{:.2f}"), Column("peak_mb", "peak memory MB", "{:.2f}"),
]


def int8_variants(model: torch.nn.Module, calibration: list, example: torch.Tensor, qat: QATRun,
                  settings: Settings) -> list:
    """Static int8 PTQ (FuseBN, then PTQ on the calibration batches) and QAT int8 (fine-tuned as ``qat``)."""
    config = quant_config(settings, BACKEND)
    return [
        build(f"static int8 PTQ ({BACKEND})",
              pipeline(model, example, FuseBN(), PTQ(calibration, backend=BACKEND, config=config,
                                                     progress=settings.show_progress))),
        qat_variant(f"QAT int8 ({BACKEND})", model, example, [QAT(backend=BACKEND, config=config)], qat, settings),
    ]


def eager_variants(model: torch.nn.Module, calibration: list, example: torch.Tensor, qat: QATRun,
                   settings: Settings) -> list:
    return [
        Variant("float", copy_of(model)),
        build("dynamic fp16", pipeline(model, example, DynamicQuant(torch.float16))),
        build("dynamic int8", pipeline(model, example, DynamicQuant(torch.qint8))),
        *int8_variants(model, calibration, example, qat, settings),
    ]


def run(settings: Settings) -> list[dict]:
    rows, meta = [], {}
    for name in chosen_models(settings, tuple(CIFAR_DATASETS), DEFAULT_MODELS, QUICK_MODELS):
        task = classification_task(name, settings)
        model, record = trained_classifier(task, settings)
        test = batches(task.test_set, 64)
        calibration = calibration_batches(task, settings)
        example = test[0][0][:1]
        eager = eager_variants(model, calibration, example, classifier_qat(task, record, settings), settings)
        scripted = [torchscript(v, example) for v in eager if isinstance(v, Variant)]
        for row in score_all([*eager, *scripted], classification_score(test), example, settings, memory=True):
            rows.append({"model": name, **row})
        meta[name] = training_note(task, record)
    write_outputs(settings, "ResNets: float, dynamic fp16/int8, static int8 PTQ and QAT, eager and TorchScript",
                  COLUMNS, rows,
                  PlotAxes("top1", "top-1 accuracy (%)", group="model"), meta)
    return rows
