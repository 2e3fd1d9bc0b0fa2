"""The model's output in float (default) against rounded to 8 bits (``quantize_output=True``): logit SQNR, top-1
agreement with the float model and latency, same calibration, for x86 and qnnpack.

    python -m tools.bench.logits            # writes its table into BENCHMARKS.md
    python -m tools.bench.logits --quick    # fewer crops, prints only

ResNet-18 and MobileNetV2 with random weights (seeded), tf_efficientnet_lite0 pretrained; real photo crops
(``PhotoSet``), 224×224, FuseBN + PTQ, latency at batch 1 on 2 threads.
"""

from __future__ import annotations

import argparse

import torch

import qpasses_zoo as zoo
from qpasses.analysis.metrics import latency
from tools.bench.common import PhotoSet, fidelity, markdown_table, pretrained_lite0, write_section
from tools.bench.ptq import qpasses_ptq

COMMAND = "python -m tools.bench.logits"
MODELS = ("resnet18", "mobilenet_v2", "tf_efficientnet_lite0")


def model(name: str) -> torch.nn.Module:
    if name == "tf_efficientnet_lite0":
        return pretrained_lite0(name)
    torch.manual_seed(0)
    return zoo.get(name, pretrained=False).eval()


def rows(photos: PhotoSet, iters: int, backends: list[str]) -> list[list[str]]:
    found = []
    x = photos.evals[0][:1]
    for name in MODELS:
        reference = model(name)
        for backend in backends:
            row = [name, backend]
            for quantize_output in (True, False):
                qmodel = qpasses_ptq(reference, photos.calib, backend, quantize_output=quantize_output)
                db, agreement = fidelity(reference, qmodel, photos.evals)
                ms = latency(qmodel, (x,), warmup=5, iters=iters, threads=2)["median_ms"]
                row += [f"{db:.2f}", f"{agreement:.1%}", f"{ms:.2f}"]
            found.append(row)
            print(" | ".join(row), flush=True)
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 calibration and 32 evaluation crops; print only")
    parser.add_argument("--backends", default="x86,qnnpack")
    args = parser.parse_args(argv)
    photos = PhotoSet.make(16, 32) if args.quick else PhotoSet.make(64, 128)
    table = markdown_table(
        ["model", "backend", "8-bit output: SQNR dB", "top-1 agr.", "ms", "float output: SQNR dB", "top-1 agr.", "ms"],
        rows(photos, 10 if args.quick else 50, args.backends.split(",")))
    print(table)
    if not args.quick:
        write_section("logits", f"## The model's output: float (default) or 8-bit (`{COMMAND}`)\n\n"
                                f"{__doc__.split(chr(10) + chr(10))[0]}\n\n{table}\n")


if __name__ == "__main__":
    main()
