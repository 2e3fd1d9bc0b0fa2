"""Sensitivity benchmark: hybrid and mixed-precision PTQ of pretrained EfficientNet-Lite0.

    python -m tools.bench.sensitivity            # writes its section into BENCHMARKS.md
    python -m tools.bench.sensitivity --quick    # fewer crops, prints only

For qnnpack (per-tensor weights) and x86 (per-channel): per-layer sensitivity on the calibration crops
(output SQNR against float), then, on other crops, the fidelity of full PTQ, of hybrids keeping the
k = 1, 3, 5 most sensitive layers float, and of 4/8-bit mixed-precision weights at 60% of the 8-bit
weight size against uniform 4-bit weights (which take 50%).
"""

from __future__ import annotations

import argparse
import time

import torch

from qpasses.analysis.sensitivity import Sensitivity
from qpasses.quant.overrides import with_node_overrides
from tools.bench.common import (
    PhotoSet,
    describe_machine,
    fidelity,
    markdown_table,
    pretrained_lite0,
    write_section,
)

COMMAND = "python -m tools.bench.sensitivity"
HYBRID_K = (1, 3, 5)


def backend_rows(model: torch.nn.Module, photos: PhotoSet, backend: str, ranking_batches: int,
                 budget: float) -> tuple[list[list[str]], str]:
    start = time.perf_counter()
    sens = Sensitivity(model, photos.calib, photos.calib[0][:1], backend=backend,
                       eval_data=photos.calib[:ranking_batches])
    table = sens.run()
    ranking_s = time.perf_counter() - start
    rows: list[list[str]] = []

    def row(label: str, config, weights: str, note: str = "") -> None:
        db, agreement = fidelity(sens.prepared, sens.quantize(config), photos.evals)
        rows.append([backend, label, f"{db:.1f}", f"{agreement:.1%}", weights, note])
        print(" | ".join(rows[-1]), flush=True)

    row("full PTQ", sens.config, "100%")
    for k in (k for k in HYBRID_K if k < len(sens.layers)):
        names = table.most_sensitive(k)
        row(f"hybrid, {k} float", sens.keep_float_config(names), "100%", ", ".join(names))
    start = time.perf_counter()
    plan = sens.choose_weight_bits(budget, (4, 8))
    mp_s = time.perf_counter() - start
    row("uniform 4-bit weights", sens.weight_bits_config({layer.name: 4 for layer in sens.layers}), "50%")
    eight = sum(1 for b in plan.bits.values() if b == 8)
    row(f"mixed 4/8-bit weights, {budget:.0%} budget", with_node_overrides(sens.config, plan.pairs),
        f"{plan.weight_bytes / plan.eight_bit_bytes:.0%}", f"{eight} of {len(plan.bits)} layers at 8 bits")
    timing = (f"{backend}: {len(sens.layers)} layers, ranking {ranking_s:.0f} s "
              f"({2 * len(sens.layers) + 1} variants, {sens.calibration_passes} calibration pass(es) in all), "
              f"bit choice {mp_s:.0f} s; top 5: {', '.join(table.most_sensitive(5))}")
    return rows, timing


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="sensitivity / hybrid / mixed-precision benchmark")
    parser.add_argument("--quick", action="store_true", help="8 calibration / 16 eval crops; no file")
    parser.add_argument("--calib", type=int, default=32, help="calibration crops (default 32)")
    parser.add_argument("--eval", type=int, default=64, help="evaluation crops (default 64)")
    parser.add_argument("--ranking-batches", type=int, default=1, help="calibration batches of 8 the ranking metric uses (default 1)")
    parser.add_argument("--budget", type=float, default=0.6, help="mixed-precision weight budget, fraction of 8-bit")
    parser.add_argument("--backends", nargs="+", default=["qnnpack", "x86"])
    parser.add_argument("--size", type=int, default=224, help="crop size (default 224; smaller is faster)")
    args = parser.parse_args(argv)
    if args.size < 32:
        parser.error(f"--size must be at least 32, got {args.size}")
    torch.manual_seed(0)
    photos = PhotoSet.make(8, 16, size=args.size) if args.quick else PhotoSet.make(args.calib, args.eval, size=args.size)
    model = pretrained_lite0("tf_efficientnet_lite0")
    machine = describe_machine()
    n_calib, n_eval = sum(len(b) for b in photos.calib), sum(len(b) for b in photos.evals)
    command = COMMAND if args.size == 224 else f"{COMMAND} --size {args.size}"
    for backend in args.backends:  # one section each, written as soon as it is measured
        rows, timing = backend_rows(model, photos, backend, args.ranking_batches, args.budget)
        body = "\n\n".join([
            f"## Sensitivity, hybrid and mixed precision: {backend} (`{command} --backends {backend}`)",
            f"Machine: {machine}. Pretrained tf_efficientnet_lite0 (qpasses FuseBN + PTQ), {n_calib} calibration "
            f"crops at {args.size}×{args.size} "
            f"(the ranking's SQNR uses the first {8 * args.ranking_batches}), fidelity vs float on {n_eval} "
            "other crops. Hybrid: the k layers with the largest all-but-one gain stay float. Mixed: per-layer "
            "4/8-bit weights by an exact knapsack on measured per-layer losses; weights = packed conv/linear "
            "weight bytes relative to 8-bit.",
            markdown_table(["backend", "method", "SQNR dB", "top-1 agreement", "weights", "float / note"], rows),
            f"- {timing}",
        ])
        print(body, flush=True)
        if not args.quick:
            write_section(f"sensitivity-{backend}", body)


if __name__ == "__main__":
    main()
