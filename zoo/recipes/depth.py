"""The depth study: the depth U-Net (EfficientNet-B0 encoder, Up-C decoder) quantized every way the
passes allow, scored by test MSE and SSIM against the true depth, and measured for size and latency.

Pipelines: Original, FuseBN, FuseBN+CLE, then PTQ, QAT and PTQ+QAT (QAT starting from PTQ's calibrated
ranges), each alone, after FuseBN and after FuseBN+CLE (CLE needs folded BN), for x86 and qnnpack with
per-channel and per-tensor weights. PTQ without FuseBN leaves every BatchNorm float between
dequantize/quantize (the row shows what fusion buys); QAT without FuseBN trains with BN folded into the
fake-quantized weights (FoldBNForTraining). QAT fine-tunes one epoch on the first training scenes.
One more PTQ row per backend and granularity, FuseBN+CLE+PTQ+BiasCorrection, removes the mean output shift
of weight quantization (empirical, on the calibration batches), which per-tensor weights need most.

CLE can only equalize through positively homogeneous activations (ReLU, clamps): the EfficientNet-B0
encoder's SiLU blocks are out of its reach, so it equalizes a few links (listed in the output's notes,
from ``gm.meta['qpasses_cle']``). Data: the rendered rooms of ``qpasses_zoo.data.synthetic_depth`` offline; with
``--data``, NYU Depth v2 (a DenseDepth ``nyu_data`` folder, or ``nyu_depth_v2_labeled.mat``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

import qpasses_zoo as zoo
from qpasses.passes import CLE, PTQ, QAT, BiasCorrection, FuseBN, Pass
from qpasses.passes.cle import CLE_REPORT_KEY
from qpasses_zoo.data import nyu_csv, nyu_mat, synthetic_depth
from qpasses_zoo.recipes.common import (
    Column,
    PlotAxes,
    QATRun,
    Settings,
    TrainConfig,
    Variant,
    batches,
    build,
    chosen_models,
    copy_of,
    depth_scores,
    first,
    outputs,
    pipeline,
    qat_variant,
    quant_config,
    score_all,
    train,
    write_outputs,
)

BACKENDS = ("x86", "qnnpack")
# --quick keeps each backend's own default granularity only.
QUICK_COMBINATIONS = [("x86", True), ("qnnpack", False)]
DEFAULT_SIZE = 128  # the study used 224; 128 keeps the CPU training within minutes (--size 224)
# (train scenes, test scenes, epochs, batch size, decoder width, scenes of QAT fine-tuning) for the full
# and the quick run; every QAT pipeline fine-tunes one epoch on the first scenes of the training set.
FULL = (192, 32, 3, 8, 64, 64)
QUICK = (16, 8, 1, 8, 16, 16)
NYU_MAT_TEST_FRACTION = 0.2

COLUMNS = [
    Column("variant", "pipeline"), Column("backend", "backend"), Column("weights", "weights"),
    Column("mse", "test MSE (m²)", "{:.4f}"), Column("ssim", "SSIM", "{:.4f}"),
    Column("size_mb", "size MB", "{:.2f}"), Column("latency_ms", "latency ms", "{:.2f}"),
]


def datasets(settings: Settings, size: int, n_train: int, n_test: int) -> tuple[Dataset, Dataset, str]:
    if settings.data is None:
        return (synthetic_depth(n_train, size, seed=0), synthetic_depth(n_test, size, seed=1),
                f"rendered rooms ({n_train} train / {n_test} test scenes, seeds 0/1) at {size}x{size}")
    if settings.data.suffix == ".mat":
        frames = nyu_mat(settings.data, size=size)
        split = int(len(frames) * (1 - NYU_MAT_TEST_FRACTION))
        train_set, test_set = Subset(frames, range(split)), Subset(frames, range(split, len(frames)))
    else:
        train_set, test_set = nyu_csv(settings.data, "train", size=size), nyu_csv(settings.data, "test", size=size)
    if settings.quick:
        train_set, test_set = Subset(train_set, range(n_train)), Subset(test_set, range(n_test))
    return train_set, test_set, f"NYU Depth v2 at {settings.data} ({len(train_set)} train / {len(test_set)} test) at {size}x{size}"


def mean_depth(dataset: Dataset, limit: int = 64) -> float:
    return float(torch.stack([dataset[i][1] for i in range(min(limit, len(dataset)))]).mean())


def float_prefixes() -> list[list[Pass]]:
    """The float rewrites a pipeline may start with: none, FuseBN, FuseBN then CLE (CLE needs BN folded)."""
    return [[], [FuseBN()], [FuseBN(), CLE()]]


def label(passes: list[Pass], quantization: str = "") -> str:
    return "+".join([p.name for p in passes] + ([quantization] if quantization else [])) or "Original"


def pipelines(model: nn.Module, calibration: list[torch.Tensor], example: torch.Tensor, qat: QATRun,
              settings: Settings) -> list:
    variants: list = [Variant("Original", copy_of(model))]
    variants += [build(label(prefix), pipeline(model, example, *prefix)) for prefix in float_prefixes()[1:]]
    combinations = QUICK_COMBINATIONS if settings.quick else [(b, pc) for b in BACKENDS for pc in (True, False)]
    for backend, per_channel in combinations:
        config = quant_config(settings, backend, per_channel=per_channel)
        columns = {"backend": backend, "weights": "per-channel" if per_channel else "per-tensor"}
        for prefix in float_prefixes():
            ptq = PTQ(calibration, backend=backend, config=config, progress=settings.show_progress)
            variants.append(build(label(prefix, "PTQ"), pipeline(model, example, *prefix, ptq), columns=columns))
            for name, head in (("QAT", []), ("PTQ+QAT", [ptq])):
                variants.append(qat_variant(label(prefix, name), model, example,
                                            [*prefix, *head, QAT(backend=backend, config=config)], qat,
                                            settings, columns=columns))
        corrected = [*float_prefixes()[-1], BiasCorrection(calibration),
                     PTQ(calibration, backend=backend, config=config, progress=settings.show_progress)]
        variants.append(build(label(float_prefixes()[-1], "PTQ+BiasCorrection"), pipeline(model, example, *corrected),
                              columns=columns))
    return variants


def equalized_links(variants: list) -> str:
    """What CLE did to the model: its links (producer → consumer), read from the FuseBN+CLE variant."""
    (equalized,) = [v for v in variants if isinstance(v, Variant) and v.label == label(float_prefixes()[-1])]
    links = equalized.model.meta.get(CLE_REPORT_KEY, [])
    names = "; ".join(f"{link.producer} → {link.consumer}" for link in links)
    return f"{len(links)} link(s) equalized" + (f": {names}" if names else "")


def run(settings: Settings) -> list[dict]:
    (name,) = chosen_models(settings, ("depth_unet",), ("depth_unet",), ("depth_unet",))
    n_train, n_test, epochs, batch_size, width, n_qat = QUICK if settings.quick else FULL
    size = settings.size or (64 if settings.quick else DEFAULT_SIZE)
    train_set, test_set, description = datasets(settings, size, n_train, n_test)

    torch.manual_seed(0)
    model = zoo.get(name, width=width)
    # A ReLU head starting near zero would mostly output 0 with no gradient; start at the mean depth.
    nn.init.constant_(model.head.bias, mean_depth(train_set))
    config = TrainConfig(epochs=settings.epochs or epochs, lr=1e-3, batch_size=batch_size)
    record = train(model, f"{name}-w{width}", train_set, nn.functional.l1_loss, config, description, settings)

    test = batches(test_set, batch_size)
    truth = torch.cat([b[1] for b in test])
    data_range = float(truth.max())
    calibration = [b[0] for b in batches(train_set, batch_size, limit=2 if settings.quick else 8)]
    example = test[0][0][:1]

    def score(variant: Variant) -> dict[str, float]:
        return depth_scores(outputs(variant, test), truth, data_range)

    qat = QATRun(first(train_set, n_qat), nn.functional.l1_loss, batch_size, record["config_hash"])
    variants = pipelines(model, calibration, example, qat, settings)
    rows = score_all(variants, score, example, settings)
    meta = {"data": description, "model": f"{name} (decoder width {width}), input {size}x{size}",
            "training": f"{len(record['losses'])} epochs of L1 loss, final {record['losses'][-1]:.3f} m; "
                        f"checkpoint {record.get('checkpoint')}",
            "SSIM": f"Gaussian window 11, data range {data_range:.2f} m (the largest true depth)",
            "CLE": equalized_links(variants),
            "BiasCorrection": "empirical, on the calibration batches",
            "QAT": f"one epoch on the first {len(qat.train_set)} training scenes, AdamW lr {qat.lr}"}
    write_outputs(settings, "Depth U-Net: FuseBN, CLE, bias correction, PTQ and QAT combinations", COLUMNS, rows,
                  PlotAxes("ssim", "SSIM vs true depth", group="backend"), meta)
    return rows
