"""PTQ benchmark: fidelity on pretrained EfficientNet-Lite0, latency and size on four CNNs.

    python -m tools.bench.ptq            # full run, writes its tables into BENCHMARKS.md
    python -m tools.bench.ptq --quick    # fewer crops and iterations, prints only

Side by side in one run, same data, 2 threads, batch 1, 224×224: qpasses (FuseBN + PTQ) for x86 and
qnnpack against torch.ao FX PTQ with its default qconfig mappings.
"""

from __future__ import annotations

import argparse
import platform

import torch

import qpasses_zoo as zoo
from qpasses import PassManager
from qpasses.analysis.metrics import latency, model_size
from qpasses.passes import PTQ, FuseBN
from tools.bench.common import (
    PhotoSet,
    fidelity,
    markdown_table,
    pretrained_lite0,
    timed,
    torch_ao_fx_ptq,
    write_section,
)

COMMAND = "python -m tools.bench.ptq"


def qpasses_ptq(model: torch.nn.Module, calib: list[torch.Tensor], backend: str, **kw) -> torch.nn.Module:
    return PassManager([FuseBN(), PTQ(calib, backend=backend, progress=False, **kw)]).run(model, calib[0][:1])


def fidelity_rows(photos: PhotoSet) -> list[list[str]]:
    tf_lite0, lite0 = pretrained_lite0("tf_efficientnet_lite0"), pretrained_lite0("efficientnet_lite0")
    runs = [
        ("qpasses x86 (per-channel)", "tf_efficientnet_lite0", tf_lite0, lambda: qpasses_ptq(tf_lite0, photos.calib, "x86")),
        ("qpasses qnnpack (per-tensor)", "tf_efficientnet_lite0", tf_lite0,
         lambda: qpasses_ptq(tf_lite0, photos.calib, "qnnpack")),
        ("torch.ao FX x86", "tf_efficientnet_lite0", tf_lite0, lambda: torch_ao_fx_ptq(tf_lite0, photos.calib, "x86")),
        ("torch.ao FX x86", "efficientnet_lite0", lite0, lambda: torch_ao_fx_ptq(lite0, photos.calib, "x86")),
        ("torch.ao FX qnnpack", "efficientnet_lite0", lite0, lambda: torch_ao_fx_ptq(lite0, photos.calib, "qnnpack")),
    ]
    rows = []
    for label, variant, reference, build in runs:
        model, seconds, error = timed(build)
        if model is None:
            rows.append([label, variant, "fails", "fails", f"{seconds:.1f}", error])
            continue
        db, agreement = fidelity(reference, model, photos.evals)
        rows.append([label, variant, f"{db:.1f}", f"{agreement:.1%}", f"{seconds:.1f}", ""])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def speed_rows(photos: PhotoSet, iters: int) -> list[list[str]]:
    rows = []
    x = photos.evals[0][:1]
    for name in ("resnet18", "resnet50", "mobilenet_v2", "tf_efficientnet_lite0"):
        float_model = zoo.get(name, pretrained=name == "tf_efficientnet_lite0")
        variants = [
            ("float eager", lambda m=float_model: m),
            ("torch.ao FX x86", lambda m=float_model, n=name: torch_ao_fx_ptq(
                pretrained_lite0("efficientnet_lite0") if n == "tf_efficientnet_lite0" else m, photos.calib, "x86")),
            ("qpasses x86", lambda m=float_model: qpasses_ptq(m, photos.calib, "x86")),
            ("qpasses qnnpack", lambda m=float_model: qpasses_ptq(m, photos.calib, "qnnpack")),
        ]
        for label, build in variants:
            model, seconds, error = timed(build)
            if model is None:
                rows.append([name, label, "fails", "", "", error])
                continue
            timing = latency(model, (x,), warmup=5, iters=iters, threads=2)
            size = model_size(model)["serialized_bytes"] / 2**20
            note = "efficientnet_lite0 variant (tf_ cannot be traced)" if label.startswith("torch.ao") and \
                name == "tf_efficientnet_lite0" else ""
            rows.append([name, label, f"{timing['median_ms']:.1f}", f"{size:.1f}", f"{seconds:.1f}", note])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qpasses bench ptq", description="PTQ benchmark (fidelity, latency, size)")
    parser.add_argument("--quick", action="store_true", help="16 calibration / 32 eval crops, 10 iterations; no file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    photos = PhotoSet.make(16, 32) if args.quick else PhotoSet.make(64, 128)
    fid = fidelity_rows(photos)
    speed = speed_rows(photos, iters=10 if args.quick else 30)
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads, batch 1, 224×224"
    body = "\n\n".join([
        f"## PTQ (`{COMMAND}`)\n\nMachine: {machine}. Calibration: {sum(len(b) for b in photos.calib)} photo crops; "
        f"evaluation: {sum(len(b) for b in photos.evals)} other crops (disjoint photo halves, fixed seeds).",
        "### Fidelity on ImageNet-pretrained EfficientNet-Lite0 (vs the float model)",
        markdown_table(["method", "model", "SQNR dB", "top-1 agreement", "prepare s", "failure"], fid),
        "### Latency (median) and size",
        markdown_table(["model", "method", "latency ms", "size MB", "prepare s", "note"], speed),
    ])
    print(body)
    if not args.quick:
        write_section("ptq", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
