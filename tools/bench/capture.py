"""Capture coverage on models symbolic tracing alone could not quantize: which capture rung was used, how many
convs/linears run int8, and the SQNR of FuseBN + PTQ (x86) against the float model on random inputs.

``python -m tools.bench.capture [model ...]`` prints a table (it writes nothing). Random weights
(``pretrained=False``; zero-initialised weights drawn at random), BN statistics randomised so that folding is
not the identity, 4 calibration batches.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.ao.nn.quantized as nnq
import torchvision
from torch import nn

from qpasses import PassManager
from qpasses.analysis.metrics import sqnr
from qpasses.passes import PTQ, FuseBN

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
QUANTIZED = (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear)


def _timm(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    import timm

    return timm.create_model(name, pretrained=False), (1, 3, 224, 224)


def _torchvision(name: str, shape: tuple[int, ...]):
    def build() -> tuple[nn.Module, tuple[int, ...]]:
        builder = torchvision.models
        for part in name.split("."):
            builder = getattr(builder, part)
        return builder(weights=None), shape

    return build


MODELS = {
    "convnext_nano": lambda: _timm("convnext_nano"),
    "vit_tiny_patch16_224": lambda: _timm("vit_tiny_patch16_224"),
    "vit_b_16": _torchvision("vit_b_16", (1, 3, 224, 224)),
    "r3d_18": _torchvision("video.r3d_18", (1, 3, 8, 56, 56)),
}


def _randomize(model: nn.Module) -> None:
    """BN statistics away from (0, 1); weights initialised to zero (torchvision's ViT head) drawn at random,
    else the output is the bias whatever the rest computes."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() > 1 and not weight.any():
            weight.data.normal_(0, 0.02, generator=g)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def measure(name: str) -> dict[str, object]:
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    model.eval()
    _randomize(model)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(*shape, generator=g) for _ in range(4)]
    # an attention block's in-projection is a linear on its in_proj_weight, not a module: counted once per block
    weighted = sum(isinstance(m, WEIGHTED) + isinstance(m, nn.MultiheadAttention) for m in model.modules())
    pm = PassManager([FuseBN(), PTQ(data, backend="x86", progress=False)])
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = pm.run(model, data[0])
    except Exception as exc:  # a failure is the figure here
        return {"model": name, "capture": "failed", "int8": f"0/{weighted}", "sqnr_db": "",
                "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"}
    seconds = time.perf_counter() - start
    x = torch.randn(*shape, generator=g)
    with torch.no_grad():
        quality = sqnr(model(x), qm(x))
    capture = getattr(pm.report, "capture", None)
    quantized = sum(isinstance(m, QUANTIZED) for m in qm.modules())
    return {"model": name, "capture": capture.method if capture is not None else "symbolic_trace",
            "int8": f"{quantized}/{weighted}", "sqnr_db": f"{quality:.1f}",
            "note": f"{seconds:.0f} s" + (f"; {capture.tried}" if capture is not None and capture.tried else "")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", metavar="model", help=f"some of {', '.join(MODELS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    print("| model | capture | int8 convs+linears / float model's | SQNR dB | note |")
    print("|---|---|---|---|---|")
    for name in args.models or MODELS:
        row = measure(name)
        print(f"| {row['model']} | {row['capture']} | {row['int8']} | {row['sqnr_db']} | {row['note']} |", flush=True)


if __name__ == "__main__":
    main()
