"""The calibration study: how the activation ranges are chosen (min/max, percentile, entropy, MSE) and
what it does to an ImageNet-pretrained EfficientNet-Lite0 quantized for x86 (per-channel weights); and
hybrid quantization, which keeps the most sensitive layers float (MSE calibration); and, as the
alternative that keeps every layer int8, MSE calibration with AdaRound (learned weight rounding), which
shows how much of the loss is the weights' rounding rather than the activation ranges.

With ``--data``, an Imagenette root (``train/`` and ``val/`` of wnid folders): calibration on training
images, top-1/top-5 accuracy on the validation split. Offline: crops of real photos, calibration and
evaluation from disjoint photo halves; there are no labels, so the scores are the agreement with the
float model (its top-1 class among the quantized model's top 1 / top 5). SQNR of the logits is against
the float model in both cases.
"""

from __future__ import annotations

import dataclasses

import torch

import qpasses_zoo as zoo
from qpasses.analysis.metrics import sqnr, topk_agreement
from qpasses.analysis.sensitivity import Sensitivity
from qpasses.passes import PTQ, FuseBN
from qpasses.quant.backends import get_backend
from qpasses.quant.spec import QuantConfig
from qpasses_zoo.data import SYMMETRIC, imagenette, photo_crops
from qpasses_zoo.recipes.common import (
    Column,
    PlotAxes,
    RecipeError,
    Settings,
    Variant,
    adaround,
    adaround_iterations,
    batches,
    build,
    chosen_models,
    copy_of,
    first,
    outputs,
    pipeline,
    score_all,
    topk_accuracy,
    write_outputs,
)

MODELS = ("tf_efficientnet_lite0", "efficientnet_lite0")
OBSERVERS = {"max": "minmax", "percentile": "percentile", "entropy": "entropy", "MSE": "mse"}
BACKEND = "x86"
HYBRID_FLOAT_LAYERS = (1, 3)


def datasets(settings: Settings) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, int, str]:
    """Calibration set, evaluation set, input size and a description of them."""
    n_calib, n_eval = (8, 16) if settings.quick else (64, 128)
    size = settings.size or (64 if settings.quick else 224)
    if settings.data is None:
        calib = photo_crops(n_calib, size, seed=0, split="calib", normalization=SYMMETRIC)
        evals = photo_crops(n_eval, size, seed=1, split="eval", normalization=SYMMETRIC)
        return calib, evals, size, f"{n_calib} calibration / {n_eval} evaluation crops of photos, {size}x{size}"
    calib = first(imagenette(settings.data, "train", size, normalization=SYMMETRIC), n_calib)
    evals = imagenette(settings.data, "val", size, normalization=SYMMETRIC)
    if settings.quick:
        evals = first(evals, n_eval)
    return calib, evals, size, f"Imagenette at {settings.data}: {n_calib} training images, {len(evals)} val images"


def hybrids(model: torch.nn.Module, calibration: list[torch.Tensor], example: torch.Tensor,
            config: QuantConfig, settings: Settings) -> list:
    """PTQ with the ``k`` most sensitive layers kept float, for each ``k`` in ``HYBRID_FLOAT_LAYERS``.

    Sensitivity (``qpasses.analysis.sensitivity``) ranks the layers by how much keeping each one float
    raises the output SQNR of the quantized model, measured on the calibration batches (the evaluation
    crops stay unseen); ``--quick`` ranks only the first four layers.
    """
    sensitivity = Sensitivity(model, calibration, example, backend=BACKEND, config=config,
                              progress=settings.show_progress)
    layers = [layer.name for layer in sensitivity.layers]
    table = sensitivity.run(layers[:4] if settings.quick else None)
    variants = []
    for k in HYBRID_FLOAT_LAYERS:
        hybrid = sensitivity.keep_float(table, k)
        variants.append(build(f"hybrid PTQ, {k} most sensitive layers float",
                              lambda h=hybrid: sensitivity.quantize(h.config),
                              columns={"observer": config.activation.observer, "float_layers": ", ".join(hybrid.keep_float)}))
    return variants


def run(settings: Settings) -> list[dict]:
    models = chosen_models(settings, MODELS, MODELS[:1], MODELS[:1])
    if len(models) != 1:
        raise RecipeError(f"the calibration recipe studies one model at a time, got {', '.join(models)}")
    name = models[0]
    model = zoo.get(name, pretrained=True)
    calib_set, eval_set, size, description = datasets(settings)
    calibration = [b[0] for b in batches(calib_set, 8)]
    evaluation = batches(eval_set, 16)
    example = evaluation[0][0][:1]
    labelled = settings.data is not None

    float_variant = Variant("float", copy_of(model))
    reference = outputs(float_variant, evaluation)
    labels = torch.cat([b[1] for b in evaluation]) if labelled else None

    def score(variant: Variant) -> dict[str, float]:
        logits = outputs(variant, evaluation)
        if labels is not None:
            top1, top5 = topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5)
        else:
            top1, top5 = topk_agreement(reference, logits, 1), topk_agreement(reference, logits, 5)
        return {"top1": 100 * top1, "top5": 100 * top5, "sqnr_db": sqnr(reference, logits)}

    base = get_backend(BACKEND).default_config()
    variants: list = [float_variant]
    for label, observer in OBSERVERS.items():
        config = dataclasses.replace(base, activation=base.activation.replace(observer=observer))
        ptq = PTQ(calibration, backend=BACKEND, config=config, progress=settings.show_progress)
        variants.append(build(f"PTQ, {label} calibration", pipeline(model, example, FuseBN(), ptq),
                              columns={"observer": observer}))
    base_label = {observer: label for label, observer in OBSERVERS.items()}[base.activation.observer]
    variants.append(build(f"PTQ, {base_label} calibration + AdaRound",
                          pipeline(model, example, FuseBN(), adaround(calibration, settings),
                                   PTQ(calibration, backend=BACKEND, config=base, progress=settings.show_progress)),
                          columns={"observer": base.activation.observer}))
    variants += hybrids(model, calibration, example, base, settings)
    rows = score_all(variants, score, example, settings)
    what = "accuracy %" if labelled else "agreement with float %"
    columns = [Column("variant", "variant"), Column("top1", f"top-1 {what}", "{:.2f}"),
               Column("top5", f"top-5 {what}", "{:.2f}"), Column("sqnr_db", "logit SQNR dB", "{:.1f}"),
               Column("size_mb", "size MB", "{:.2f}"), Column("latency_ms", "latency ms", "{:.2f}")]
    columns.insert(1, Column("float_layers", "float layers"))
    write_outputs(settings, f"Calibration methods and hybrid quantization, {name} int8 ({BACKEND}, per-channel weights)", columns, rows,
                  PlotAxes("top1", f"top-1 {what}"), {"data": description, "model": f"{name}, ImageNet-pretrained",
                   "AdaRound": f"{adaround_iterations(settings)} iterations per layer on the calibration batches (lr 1e-2)"})
    return rows
