"""The depth study: the depth U-Net (EfficientNet-B0 encoder, Up-C decoder) quantized every way the
passes allow, scored by test MSE and SSIM against the true depth, and measured for size and latency.

Pipelines: Original, FuseBN, PTQ, FuseBN+PTQ, each PTQ for x86 and qnnpack with per-channel and
per-tensor weights (PTQ without FuseBN leaves every BatchNorm float between dequantize/quantize: the
row shows what fusion buys). Data: the rendered rooms of ``zoo.data.synthetic_depth`` offline; with
``--data``, NYU Depth v2 (a DenseDepth ``nyu_data`` folder, or ``nyu_depth_v2_labeled.mat``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

import zoo
from qpasses.passes import PTQ, FuseBN
from zoo.data import nyu_csv, nyu_mat, synthetic_depth
from zoo.recipes.common import (
    Column,
    PlotAxes,
    Settings,
    TrainConfig,
    Variant,
    batches,
    build,
    chosen_models,
    copy_of,
    depth_scores,
    outputs,
    pipeline,
    quant_config,
    score_all,
    train,
    write_outputs,
)

BACKENDS = ("x86", "qnnpack")
DEFAULT_SIZE = 128  # the study used 224; 128 keeps the CPU training within minutes (--size 224)
# (train scenes, test scenes, epochs, batch size, decoder width) for the full and the quick run.
FULL = (192, 32, 3, 8, 64)
QUICK = (16, 8, 1, 8, 16)
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


def pipelines(model: nn.Module, calibration: list[torch.Tensor], example: torch.Tensor, settings: Settings) -> list:
    variants: list = [Variant("Original", copy_of(model)), build("FuseBN", pipeline(model, example, FuseBN()))]
    for backend in BACKENDS:
        for per_channel in (True, False):
            config = quant_config(settings, backend, per_channel=per_channel)
            columns = {"backend": backend, "weights": "per-channel" if per_channel else "per-tensor"}
            for fuse in (False, True):
                passes = [FuseBN()] if fuse else []
                ptq = PTQ(calibration, backend=backend, config=config, progress=settings.show_progress)
                variants.append(build("FuseBN+PTQ" if fuse else "PTQ", pipeline(model, example, *passes, ptq),
                                      columns=columns))
    return variants


def run(settings: Settings) -> list[dict]:
    (name,) = chosen_models(settings, ("depth_unet",), ("depth_unet",), ("depth_unet",))
    n_train, n_test, epochs, batch_size, width = QUICK if settings.quick else FULL
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

    rows = score_all(pipelines(model, calibration, example, settings), score, example, settings)
    meta = {"data": description, "model": f"{name} (decoder width {width}), input {size}x{size}",
            "training": f"{len(record['losses'])} epochs of L1 loss, final {record['losses'][-1]:.3f} m; "
                        f"checkpoint {record.get('checkpoint')}",
            "SSIM": f"Gaussian window 11, data range {data_range:.2f} m (the largest true depth)"}
    write_outputs(settings, "Depth U-Net: FuseBN and PTQ combinations", COLUMNS, rows,
                  PlotAxes("ssim", "SSIM vs true depth", group="backend"), meta)
    return rows
