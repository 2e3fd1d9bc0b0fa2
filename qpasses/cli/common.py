"""What the subcommands share: their errors, the model and calibration arguments, progress lines."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from qpasses.errors import QPassesError, one_line
from qpasses.passes.base import Pass, PassContext
from qpasses.passes.manager import Instrument, PassRecord
from qpasses.passes.registry import PassOptions, pass_names
from qpasses.quant.backends import BACKENDS
from qpasses.validation import check_model


class CLIError(QPassesError):
    """Bad command-line input: a model that cannot be found or built, a missing file, a bad combination."""


ZOO_EXTRA = "pip install 'qpasses[zoo]'"


def import_zoo(module: str, purpose: str) -> ModuleType:
    """``module`` of ``qpasses_zoo``; where a dependency of the zoo is missing (qpasses installed without its
    ``zoo`` extra), one line saying what needs it and what to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        package = (exc.name or str(exc)).partition(".")[0]
        raise CLIError(f"{purpose} needs qpasses' zoo extra (no module '{package}'): {ZOO_EXTRA}") from exc


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    input_size: int
    normalization: Any  # qpasses_zoo.data.Normalization; None: ImageNet's (module:factory models)


def load_model(spec: str, pretrained: bool = False, input_size: int | None = None) -> LoadedModel:
    """A zoo model by name, or ``module:factory`` (a callable returning an ``nn.Module``, called without arguments).

    ``module:factory`` needs no zoo: drawing such a model works in an installation without the ``zoo`` extra."""
    if ":" in spec:
        if pretrained:
            raise CLIError(f"--pretrained applies to zoo models; '{spec}' builds its own weights")
        return LoadedModel(_from_factory(spec), input_size or 224, None)
    zoo = import_zoo("qpasses_zoo", f"zoo model '{spec}'")
    if spec not in zoo.MODELS:
        raise CLIError(f"unknown model '{spec}': give a zoo model ({', '.join(zoo.list_models())}) "
                       f"or module:factory (e.g. torchvision.models:resnet18)")
    model_spec = zoo.spec(spec)
    return LoadedModel(zoo.get(spec, pretrained=pretrained), input_size or model_spec.input_size,
                       model_spec.normalization)


def _from_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    # The `qpasses` script, unlike `python -m qpasses`, does not put the current folder on sys.path; a model
    # file beside the user must import all the same.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"cannot import '{module_name}' for model '{spec}': {one_line(exc)}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CLIError(f"model '{spec}': module '{module_name}' has no callable '{attr}'")
    try:
        model = factory()
    except Exception as exc:  # the user's code: report it on one line, whatever it raised
        raise CLIError(f"model '{spec}': calling {attr}() failed: {type(exc).__name__}: {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise CLIError(f"model '{spec}': {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    return check_model(model, f"model '{spec}'").eval()  # a half or meta model: say so, not "fails on images"


def check_runs(spec: str, loaded: LoadedModel, example: torch.Tensor) -> None:
    """Refuse, on one line, a model that does not take the images the command feeds it."""
    try:
        with torch.no_grad():
            loaded.model(example)
    except Exception as exc:  # whatever the user's forward raises, the cause is the input we chose
        raise CLIError(f"model '{spec}' fails on a {'×'.join(map(str, example.shape))} image batch "
                       f"({type(exc).__name__}: {one_line(exc)}); it needs 3-channel images (set their size "
                       f"with --input-size)") from exc


def calibration_loader(source: str, loaded: LoadedModel, num_batches: int, batch_size: int) -> Callable[[], list]:
    """A cached function returning the calibration batches: ``photos`` (offline photo crops) or an image folder."""
    if source != "photos" and not Path(source).is_dir():
        raise CLIError(f"--calib {source}: no such folder; give 'photos' (offline photo crops) or a folder of images")
    data = import_zoo("qpasses_zoo.data", f"calibrating on --calib {source}")
    normalization = loaded.normalization or data.IMAGENET

    @cache
    def batches() -> list[torch.Tensor]:
        if source == "photos":
            dataset = data.photo_crops(num_batches * batch_size, loaded.input_size, seed=0, split="calib",
                                       normalization=normalization)
        else:
            dataset = data.image_folder(source, loaded.input_size, normalization)
        return [images for (images,), _ in zip(data.loader(dataset, batch_size), range(num_batches), strict=False)]

    return batches


def held_out_photos(loaded: LoadedModel, num_batches: int, batch_size: int) -> list[torch.Tensor]:
    """Photo crops from the halves of the photos that ``--calib photos`` never reads (qpasses_zoo.data.photos)."""
    data = import_zoo("qpasses_zoo.data", "--eval (held-out photo crops)")
    dataset = data.photo_crops(num_batches * batch_size, loaded.input_size, seed=1, split="eval",
                               normalization=loaded.normalization or data.IMAGENET)
    return [images for (images,) in data.loader(dataset, batch_size)]


def add_pipeline_arguments(parser: argparse.ArgumentParser, passes_default: str | None) -> None:
    """The options that build passes (shared by ``quantize`` and ``viz``)."""
    group = parser.add_argument_group("pipeline")
    group.add_argument("--passes", default=passes_default, metavar="P1,P2,...",
                       help=f"comma-separated passes, ordered by their contracts ({', '.join(pass_names())})"
                       + (f"; default: {passes_default}" if passes_default else ""))
    group.add_argument("--backend", default="x86", choices=sorted(BACKENDS), help="int8 kernels to target (default: x86)")
    group.add_argument("--bits", type=int, choices=range(2, 9), metavar="{2..8}",
                       help="weight and activation bits (default: the backend's 8-bit preset)")
    channels = group.add_mutually_exclusive_group()
    channels.add_argument("--per-channel", dest="per_channel", action="store_true", default=None,
                          help="per-channel weights (default: the backend's preset)")
    channels.add_argument("--per-tensor", dest="per_channel", action="store_false", help="per-tensor weights")
    group.add_argument("--quantize-output", dest="quantize_output", action="store_true", default=None,
                       help="round the model's output (logits) to 8 bits; by default a linear writing it computes "
                       "int8 and writes float where the backend has such a kernel (x86, fbgemm)")
    group.add_argument("--calib", default="photos", metavar="photos|PATH",
                       help="calibration images: offline photo crops (default) or a folder of images")
    group.add_argument("--num-batches", type=positive_int, default=8, metavar="N", help="calibration batches (default: 8)")
    group.add_argument("--budget", type=float, default=0.6, metavar="F",
                       help="pass 'mixed': weight size budget, a fraction of the 8-bit size (default: 0.6)")
    group.add_argument("--target-sqnr", type=float, metavar="DB",
                       help="pass 'ptq': search for the cheapest pipeline whose output SQNR on the calibration data "
                            "reaches DB (recipe, BiasCorrection, AdaRound, then the fewest layers kept float)")
    group.add_argument("--no-recipe", dest="recipe", action="store_false",
                       help="pass 'ptq': PTQ alone, without the measured default accuracy passes of its setting")
    group.add_argument("--batch-size", type=positive_int, default=8, metavar="B", help="images per batch (default: 8)")
    group.add_argument("--input-size", type=positive_int, metavar="S",
                       help="inputs are 3×S×S (default: the zoo model's own size, else 224)")
    group.add_argument("--pretrained", action="store_true", help="load the zoo model's offline pretrained weights")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def pass_options(args: argparse.Namespace, calibration: Callable[[], list], progress: bool) -> PassOptions:
    return PassOptions(backend=args.backend, bits=args.bits, per_channel=args.per_channel,
                       quantize_output=args.quantize_output, num_batches=args.num_batches, budget=args.budget,
                       progress=progress, calibration=calibration, target_sqnr=args.target_sqnr, recipe=args.recipe)


class PrintProgress(Instrument):
    """One line on stderr as each pass starts and ends, so long pipelines show where they are."""

    def __init__(self, total: int):
        self.total = total
        self.started = 0.0

    def before_pass(self, p: Pass, gm: Any, ctx: PassContext) -> None:
        self.started = time.perf_counter()
        print(f"[{ctx.position + 1}/{self.total}] {p.name} ...", file=sys.stderr, flush=True)

    def after_pass(self, p: Pass, gm: Any, ctx: PassContext, record: PassRecord) -> None:
        quality = "" if record.sqnr_db is None else f", SQNR {json_number(record.sqnr_db)} dB vs float"
        print(f"[{ctx.position + 1}/{self.total}] {p.name} done in {time.perf_counter() - self.started:.1f} s"
              f"{quality}", file=sys.stderr, flush=True)


def json_number(value: float | None) -> float | str | None:
    """Finite floats rounded to 0.01; ±inf as the strings "inf"/"-inf" (JSON has no infinity)."""
    if value is None:
        return None
    return round(value, 2) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
