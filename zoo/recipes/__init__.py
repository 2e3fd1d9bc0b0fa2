"""One-command reruns of the quantization studies: ``qpasses recipe NAME`` or ``python -m qpasses_zoo.recipes NAME``.

Each recipe trains its float model when no checkpoint is cached (resumable, a checkpoint per epoch),
builds the quantization variants, scores and measures them, and writes ``NAME.md`` (table),
``NAME.json`` and ``NAME.png`` (score vs latency vs size) under ``--out`` (default ``runs/NAME``).
``--quick`` is the smoke run the tests use; ``--data PATH`` uses the real dataset instead of the
offline default.
"""

from __future__ import annotations

import argparse
import importlib
import warnings
from pathlib import Path

from qpasses.errors import QPassesError
from qpasses_zoo.recipes.common import DEFAULT_CACHE, Settings

# name → (module, one-line description); modules are imported only when their recipe runs.
RECIPES: dict[str, tuple[str, str]] = {
    "resnet": ("qpasses_zoo.recipes.resnet", "float, dynamic fp16/int8, static int8 PTQ, eager and TorchScript: "
                                     "top-1/5, size, latency, peak memory (CIFAR ResNets)"),
    "resnet_ddp": ("qpasses_zoo.recipes.resnet_ddp", "the resnet recipe's ResNet-18 float / PTQ / QAT rows, trained "
                                                 "with torchrun on N processes (gloo on CPU, NCCL on GPU)"),
    "bits": ("qpasses_zoo.recipes.bits", "8- to 4-bit PTQ (plain, +BiasCorrection, +AdaRound) and QAT of ResNet-18 "
                                 "(and ResNet-50 with --model)"),
    "calibration": ("qpasses_zoo.recipes.calibration", "max vs percentile vs entropy vs MSE calibration "
                                               "(pretrained EfficientNet-Lite0; Imagenette with --data)"),
    "depth": ("qpasses_zoo.recipes.depth", "FuseBN / PTQ combinations of the depth U-Net, per-channel and "
                                   "per-tensor, x86 and qnnpack: MSE, SSIM, size, latency"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qpasses recipe", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(RECIPES), metavar="NAME",
                   help="; ".join(f"{k}: {v[1]}" for k, v in sorted(RECIPES.items())))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny inputs, 1 epoch on a few batches")
    p.add_argument("--data", type=Path, help="the real dataset's root (default: offline data)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/NAME)")
    p.add_argument("--model", action="append", dest="models", metavar="MODEL",
                   help="zoo model to study (repeatable; default: the recipe's own)")
    p.add_argument("--epochs", type=int, help="training epochs of the float model (default: the recipe's)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"checkpoint folder (default: {DEFAULT_CACHE})")
    p.add_argument("--size", type=int, help="input size of the depth and calibration recipes "
                                            "(default: 128 and 224; --quick: 64)")
    p.add_argument("--adaround-iterations", type=int, metavar="N",
                   help="AdaRound iterations per layer of the bits and calibration recipes (default: 200; --quick: 10)")
    p.add_argument("--bits", type=int, nargs="+", default=[], metavar="N",
                   help="bit widths of the bits recipe, 2 to 8 (default: 8 7 6 5 4)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads when timing latency (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a recipe; returns the exit status (2 with a one-line message for a bad request)."""
    args = parser().parse_args(argv)
    for option in ("epochs", "threads", "size", "adaround_iterations"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser().error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if any(not 2 <= b <= 8 for b in args.bits):
        parser().error(f"--bits must be between 2 and 8, got {' '.join(map(str, args.bits))}")
    settings = Settings(recipe=args.name, quick=args.quick, data=args.data,
                        out=args.out or Path("runs") / args.name, models=args.models or [],
                        epochs=args.epochs, cache=args.cache, show_progress=not args.no_progress,
                        threads=args.threads, size=args.size, adaround_iterations=args.adaround_iterations,
                        bits=args.bits)
    module = importlib.import_module(RECIPES[args.name][0])
    try:
        with warnings.catch_warnings():
            # The recipes use TorchScript and quantized tensors on purpose; their deprecation notes
            # would bury the tables (pytorch #184982 is why qpasses isolates them in one module).
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
            warnings.filterwarnings("ignore", category=UserWarning, message=r".*quantized tensor creation")
            module.run(settings)
    except QPassesError as exc:
        print(f"qpasses recipe {args.name}: {exc}")
        return 2
    return 0


__all__ = ["RECIPES", "Settings", "main"]
