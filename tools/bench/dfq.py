"""Data-free and data-light accuracy passes on pretrained EfficientNet-Lite0: CLE, HighBiasAbsorption,
BiasCorrection, AdaRound, on top of PTQ, for per-tensor (qnnpack) and per-channel (x86) weights, W8A8
and W4A8, against torch.ao FX PTQ.

    python -m tools.bench.dfq                  # full run (64 calibration / 128 evaluation crops, 224×224)
    python -m tools.bench.dfq --quick          # 16 / 32 crops at 96×96, few AdaRound iterations; prints only

Fidelity is measured against the float model on photo crops disjoint from the calibration crops (the PTQ
benchmark's set): SQNR of the logits and top-1 agreement.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from collections.abc import Callable

import torch
from torch import nn

from qpasses import PassManager
from qpasses.passes import CLE, PTQ, AdaRound, BiasCorrection, FuseBN, HighBiasAbsorption
from qpasses.passes.base import Pass
from qpasses.quant.backends import get_backend
from qpasses.quant.spec import QuantConfig
from tools.bench.common import (
    PhotoSet,
    fidelity,
    markdown_table,
    pretrained_lite0,
    timed,
    torch_ao_fx_ptq,
    write_section,
)

COMMAND = "python -m tools.bench.dfq"
SETTINGS = [("qnnpack", "per-tensor"), ("x86", "per-channel")]


def config_for(backend: str, weight_bits: int) -> QuantConfig:
    config = get_backend(backend).default_config()
    return dataclasses.replace(config, weight=config.weight.replace(bits=weight_bits))


def pipelines(calib: list[torch.Tensor], iterations: int) -> list[tuple[str, Callable[[], list[Pass]]]]:
    """Each row: a label and a factory of the passes before PTQ (fresh instances per run)."""
    def adaround() -> AdaRound:
        return AdaRound(calib, iterations=iterations, lr=1e-2, progress=False)

    return [
        ("PTQ", lambda: []),
        ("+ CLE", lambda: [CLE()]),
        ("+ CLE + HBA", lambda: [CLE(), HighBiasAbsorption()]),
        ("+ CLE + HBA + BiasCorrection (analytical)", lambda: [CLE(), HighBiasAbsorption(), BiasCorrection()]),
        ("+ CLE + HBA + BiasCorrection (empirical)", lambda: [CLE(), HighBiasAbsorption(), BiasCorrection(calib)]),
        ("+ BiasCorrection (empirical)", lambda: [BiasCorrection(calib)]),
        ("+ CLE + HBA + AdaRound", lambda: [CLE(), HighBiasAbsorption(), adaround()]),
        ("+ AdaRound + BiasCorrection", lambda: [adaround(), BiasCorrection(calib)]),
        ("+ CLE + HBA + AdaRound + BiasCorrection", lambda: [CLE(), HighBiasAbsorption(), adaround(),
                                                              BiasCorrection(calib)]),
    ]


def quantize(model: nn.Module, passes: list[Pass], calib: list[torch.Tensor], backend: str,
             config: QuantConfig) -> nn.Module:
    ptq = PTQ(calib, backend=backend, config=config, progress=False)
    return PassManager([FuseBN(), *passes, ptq]).run(model, calib[0][:1])


def fidelity_rows(photos: PhotoSet, iterations: int, weight_bits: list[int], backends: list[str]) -> list[list[str]]:
    model = pretrained_lite0("tf_efficientnet_lite0")
    rows = []
    for bits in weight_bits:
        for backend, granularity in [(b, g) for b, g in SETTINGS if b in backends]:
            config = config_for(backend, bits)
            results = []
            for label, passes in pipelines(photos.calib, iterations):
                if bits == 8 and "AdaRound" in label and "BiasCorrection" in label:
                    continue  # at 8 bits AdaRound alone shows its effect; keep the run short
                built, seconds, error = timed(lambda p=passes, b=backend, c=config: quantize(model, p(), photos.calib, b, c))
                setting = f"W{bits}A8 {backend} ({granularity})"
                if built is None:
                    rows.append([setting, label, "fails", "fails", f"{seconds:.0f}", error])
                    continue
                db, agreement = fidelity(model, built, photos.evals)
                results.append((db, agreement, label))
                rows.append([setting, label, f"{db:.1f}", f"{agreement:.1%}", f"{seconds:.0f}", ""])
                print(" | ".join(rows[-1]), flush=True)
            if results:
                db, agreement, label = max(results)
                rows.append([f"W{bits}A8 {backend} ({granularity})", f"**best: {label}**", f"**{db:.1f}**",
                             f"**{agreement:.1%}**", "", ""])
    lite0 = pretrained_lite0("efficientnet_lite0")
    for backend, granularity in [(b, g) for b, g in SETTINGS if b in backends and 8 in weight_bits]:
        built, seconds, error = timed(lambda b=backend: torch_ao_fx_ptq(lite0, photos.calib, b))
        label = "torch.ao FX PTQ (efficientnet_lite0: the tf_ variant does not trace)"
        if built is None:
            rows.append([f"W8A8 {backend}", label, "fails", "fails", f"{seconds:.0f}", error])
            continue
        db, agreement = fidelity(lite0, built, photos.evals)
        rows.append([f"W8A8 {backend} ({granularity})", label, f"{db:.1f}", f"{agreement:.1%}", f"{seconds:.0f}", ""])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="CLE / HBA / BiasCorrection / AdaRound benchmark on Lite0")
    parser.add_argument("--quick", action="store_true", help="16 / 32 crops at 96×96, 20 AdaRound iterations; no file")
    parser.add_argument("--size", type=int, help="crop size (default 224, quick 96)")
    parser.add_argument("--calib", type=int, help="calibration crops (default 64, quick 16)")
    parser.add_argument("--eval", type=int, help="evaluation crops (default 128, quick 32)")
    parser.add_argument("--iterations", type=int, help="AdaRound iterations per layer (default 200, quick 20)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="weight bits to run (default 8 4)")
    parser.add_argument("--backends", nargs="+", default=[b for b, _ in SETTINGS], help="default: qnnpack x86")
    parser.add_argument("--write", action="store_true", help="write the section even for a reduced run")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    size = args.size or (96 if args.quick else 224)
    n_calib, n_eval = args.calib or (16 if args.quick else 64), args.eval or (32 if args.quick else 128)
    iterations = args.iterations or (20 if args.quick else 200)
    photos = PhotoSet.make(n_calib, n_eval, size=size)
    rows = fidelity_rows(photos, iterations, args.bits, args.backends)
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    body = "\n\n".join([
        f"## Data-free / data-light passes (`{' '.join([COMMAND, *(argv if argv is not None else sys.argv[1:])])}`)\n\nMachine: {machine}. Pretrained tf_efficientnet_lite0, "
        f"{n_calib} calibration crops, {n_eval} evaluation crops (other photo halves), {size}×{size}; "
        f"AdaRound {iterations} iterations per layer. Every pipeline starts with FuseBN and ends with PTQ "
        "(observers, calibration, int8 lowering); activations are 8-bit with the backend's default observer. "
        "Fidelity is against the float model; 'prepare s' includes calibration and the passes.",
        markdown_table(["setting", "pipeline", "SQNR dB", "top-1 agreement", "prepare s", "failure"], rows),
    ])
    print(body)
    full = args.size is None and args.calib is None and args.eval is None and len(args.backends) == len(SETTINGS)
    if not args.quick and (full or args.write):
        write_section("dfq", body)


if __name__ == "__main__":
    main()
