"""PTQ benchmark: fidelity on pretrained EfficientNet-Lite0, latency and size on four CNNs.

    python -m tools.bench.ptq                    # full run, writes its tables into BENCHMARKS.md
    python -m tools.bench.ptq --quick            # fewer crops and iterations, prints only
    python -m tools.bench.ptq --activation-bits  # Lite0 fidelity of x86's 7- and 8-bit activations only

Side by side in one run, same data, 2 threads, batch 1, 224×224: qpasses (FuseBN + PTQ) for x86 and
qnnpack against torch.ao FX PTQ with its default qconfig mappings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from unittest import mock

import torch

import qpasses_zoo as zoo
from qpasses import PassManager
from qpasses.analysis.metrics import latency, model_size, sqnr
from qpasses.cpu import OVERRIDE_ENV
from qpasses.export import qdq_model
from qpasses.passes import PTQ, FuseBN
from qpasses.quant.backends import get_backend
from tools.bench.common import (
    PhotoSet,
    describe_machine,
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


def activation_bits_rows(photos: PhotoSet) -> list[list[str]]:
    """x86's default PTQ on pretrained Lite0 as decided for a CPU without AVX-512 VNNI and for this one, x86 with
    8-bit activations everywhere (a given config), and onednn on this CPU; with how far each lowered int8 model is
    from its QDQ reference on this CPU (the float simulation of the same integer grids: only the requantization's
    rounding separates them, unless kernels saturate)."""
    model = pretrained_lite0("tf_efficientnet_lite0")
    x86 = get_backend("x86").default_config()
    full_range = dataclasses.replace(x86, activation=x86.activation.replace(reduce_range=False))
    runs = [("x86, decided for a CPU without VNNI", "x86", "novnni", None),
            ("x86, decided for this CPU (default)", "x86", None, None),
            ("x86, 8-bit activations everywhere (given config)", "x86", None, full_range),
            ("onednn, decided for this CPU (default)", "onednn", None, None)]
    rows = []
    for label, backend, cpu, config in runs:
        with mock.patch.dict(os.environ):
            os.environ.pop(OVERRIDE_ENV, None)
            if cpu is not None:
                os.environ[OVERRIDE_ENV] = cpu
            manager = PassManager([FuseBN(), PTQ(photos.calib, backend=backend, config=config, progress=False)])
            start = time.perf_counter()
            qm = manager.run(model, photos.calib[0][:1])
            seconds = time.perf_counter() - start
        note = next(n for r in manager.report.records for n in r.notes if n.startswith(f"{backend}: "))
        db, agreement = fidelity(model, qm, photos.evals)
        x = photos.evals[0]
        with torch.no_grad():
            exactness = sqnr(qdq_model(qm, x[:1])(x), qm(x))
        bits = note.split(": ")[1]
        rows.append([f"qpasses {label}", bits, f"{db:.1f}", f"{agreement:.1%}", f"{exactness:.1f}", f"{seconds:.0f}"])
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
    parser.add_argument("--activation-bits", action="store_true",
                        help="only x86's Lite0 fidelity with 7- and 8-bit activations (its own section)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    photos = PhotoSet.make(16, 32) if args.quick else PhotoSet.make(64, 128)
    crops = (f"Calibration: {sum(len(b) for b in photos.calib)} photo crops; evaluation: "
             f"{sum(len(b) for b in photos.evals)} other crops (disjoint photo halves, fixed seeds).")
    if args.activation_bits:
        rows = activation_bits_rows(photos)
        body = "\n\n".join([
            f"## x86 activation bits on pretrained EfficientNet-Lite0 (`{COMMAND} --activation-bits`)",
            f"Machine: {describe_machine()}. {crops} qpasses FuseBN + PTQ with the backend's preset, its "
            f"activation bits decided for the CPU the row names ({OVERRIDE_ENV}=novnni for a CPU without AVX-512 "
            "VNNI), as the InsertObservers note says. Fidelity: SQNR of the logits and top-1 agreement against the "
            "float model. Kernels vs reference: SQNR of the lowered int8 model's logits against its QDQ view (the "
            "float simulation of the same grids) on this CPU, on the first 16 evaluation crops: requantization "
            "rounding alone leaves ~25-30 dB over Lite0's depth; kernels that saturate fall far below. The row with "
            "8-bit activations everywhere shows what the 7-bit steps protect: the int16 pair sums of the kernels "
            "that add them (fbgemm's depthwise ones under x86, on every CPU).",
            markdown_table(["method", "activation bits", "SQNR dB", "top-1 agreement", "kernels vs reference dB",
                            "prepare s"], rows),
        ])
        print(body)
        if not args.quick:
            write_section("ptq-activation-bits", body)
        return 0
    fid = fidelity_rows(photos)
    speed = speed_rows(photos, iters=10 if args.quick else 30)
    body = "\n\n".join([
        f"## PTQ (`{COMMAND}`)\n\nMachine: {describe_machine(2)}, batch 1, 224×224. {crops}",
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
