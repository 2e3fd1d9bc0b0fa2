"""The low-bit study: PTQ and QAT (one epoch of fine-tuning from the float weights) at 8, 7, 6, 5 and 4 bits
(weights and activations) of ResNet-18 and ResNet-50.

CIFAR-style ResNets on CIFAR-10 with ``--data``, sklearn's digits offline (the checkpoints are shared
with the ``resnet`` recipe). Sub-8-bit grids run in the 8-bit kernels (x86/fbgemm, per-channel weights)
with their integer range narrowed; the size column counts weights packed at n bits, as a deployment
format that stores them so would.
"""

from __future__ import annotations

from qpasses.passes import PTQ, QAT, FuseBN
from zoo.recipes.common import (
    Column,
    PlotAxes,
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
    trained_classifier,
    training_note,
    write_outputs,
)

MODELS = ("cifar_resnet18", "cifar_resnet50")
QUICK_MODELS = ("cifar_resnet18",)
BITS = (8, 7, 6, 5, 4)
BACKEND = "x86"

COLUMNS = [
    Column("model", "model"), Column("variant", "variant"), Column("bits", "bits"),
    Column("top1", "top-1 %", "{:.2f}"), Column("top5", "top-5 %", "{:.2f}"),
    Column("size_mb", "size MB (n-bit packed)", "{:.2f}"), Column("latency_ms", "latency ms", "{:.2f}"),
]


def run(settings: Settings) -> list[dict]:
    rows, meta = [], {}
    for name in chosen_models(settings, MODELS, MODELS, QUICK_MODELS):
        task = classification_task(name, settings)
        model, record = trained_classifier(task, settings)
        test = batches(task.test_set, 64)
        calibration = calibration_batches(task, settings)
        example = test[0][0][:1]
        variants = [Variant("float", copy_of(model), columns={"bits": 32})]
        for bits in BITS:
            ptq = PTQ(calibration, backend=BACKEND, config=quant_config(settings, BACKEND), bits=bits,
                      progress=settings.show_progress)
            variants.append(build(f"PTQ {bits}-bit", pipeline(model, example, FuseBN(), ptq), bits=bits,
                                  columns={"bits": bits}))
        qat = classifier_qat(task, record, settings)
        for bits in BITS:
            variants.append(qat_variant(f"QAT {bits}-bit", model, example,
                                        [QAT(backend=BACKEND, config=quant_config(settings, BACKEND), bits=bits)],
                                        qat, settings, bits=bits, columns={"bits": bits}))
        rows += [{"model": name, **row} for row in score_all(variants, classification_score(test), example, settings)]
        meta[name] = training_note(task, record)
    write_outputs(settings, f"PTQ and QAT at 8 to 4 bits ({BACKEND}, per-channel weights)", COLUMNS, rows,
                  PlotAxes("top1", "top-1 accuracy (%)", group="model"), meta)
    return rows
