"""Prepare-time benchmark: how long PTQ takes, from the float model to the int8 model, against torch.ao FX
and torchao PT2E on the same calibration batches.

    python -m tools.bench.prepare                       # 4 models, 8 batches of 8 crops, 3 rounds; prints
    python -m tools.bench.prepare --write               # and writes the table into BENCHMARKS.md
    python -m tools.bench.prepare --models resnet18 --batches 2 --rounds 1 --tools qpasses,fx
    python -m tools.bench.prepare --threads 1 --write --note "Other jobs shared the machine."

Per model (random weights, BatchNorm statistics re-estimated on the calibration crops: a timing, which the
statistics' inputs do not change, unlike ``tools.bench.coverage``'s fidelity), each tool quantizes a copy of the float model with the same ``--batches``
calibration batches of 8 photo crops at 224×224 (``PhotoSet``):

- qpasses: ``PassManager([FuseBN(), PTQ(batches, recipe=False)]).run`` (``tools.bench.ptq.qpasses_ptq``, x86):
  capture and its check against the eager model, the passes each verified, observers, calibration, int8
  lowering; without the default recipe's accuracy passes (BiasCorrection), which torch.ao FX has no counterpart of;
- torch.ao FX: ``prepare_fx`` + the batches + ``convert_fx``, ``get_default_qconfig_mapping("x86")``;
- torchao PT2E: ``torch.export`` + ``prepare_pt2e`` (``X86InductorQuantizer``) + the batches + ``convert_pt2e``;
  its graph is exported for batch 1, so it calibrates one sample at a time (``tools.bench.common``).

Rounds are interleaved (each round runs every tool once on every model), and the table gives each tool's
median over the rounds. torch.ao FX cannot trace ``tf_efficientnet_lite0`` (its padding); that row's FX and
ratio columns time timm's ``efficientnet_lite0``, the same network with symmetric padding.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import warnings
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

import qpasses_zoo as zoo
from tools.bench.common import (
    PhotoSet,
    describe_machine,
    markdown_table,
    timed,
    torch_ao_fx_ptq,
    torchao_pt2e_ptq,
    write_section,
)
from tools.bench.coverage import reestimate_batchnorm
from tools.bench.ptq import qpasses_ptq

COMMAND = "python -m tools.bench.prepare --threads 1 --write"
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "tf_efficientnet_lite0")
# The model torch.ao FX is timed on where it cannot trace the model itself.
FX_STAND_IN = {"tf_efficientnet_lite0": "efficientnet_lite0"}
TARGET = 1.5  # qpasses' prepare time may be at most this multiple of torch.ao FX's

Quantize = Callable[[nn.Module, list[torch.Tensor]], nn.Module]
TOOLS: dict[str, tuple[str, Quantize]] = {
    "qpasses": ("qpasses PTQ", lambda model, calib: qpasses_ptq(model, calib, "x86", recipe=False)),
    "fx": ("torch.ao FX", lambda model, calib: torch_ao_fx_ptq(model, calib, "x86")),
    "pt2e": ("torchao PT2E", torchao_pt2e_ptq),
}


def float_model(name: str, calib: list[torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    return reestimate_batchnorm(zoo.get(name), calib).eval()


def measure(models: list[str], tools: list[str], calib: list[torch.Tensor], rounds: int
            ) -> dict[tuple[str, str], tuple[list[float], str]]:
    """Seconds of each (model, tool) in each round, and the tool's error if it failed."""
    floats = {name: float_model(name, calib) for name in models}
    floats |= {FX_STAND_IN[name]: float_model(FX_STAND_IN[name], calib) for name in models if name in FX_STAND_IN}
    results: dict[tuple[str, str], tuple[list[float], str]] = {}
    for round_ in range(rounds):
        for name in models:
            for tool in tools:
                model = floats[FX_STAND_IN.get(name, name) if tool == "fx" else name]
                times, error = results.get((name, tool), ([], ""))
                if error:  # a tool that failed once fails again: no second try
                    continue
                gc.collect()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _, seconds, error = timed(partial(TOOLS[tool][1], model, calib))
                results[(name, tool)] = (times + [seconds], error)
                print(f"round {round_ + 1}: {name} {tool}: {seconds:.2f} s {error}", flush=True)
    return results


def table(models: list[str], tools: list[str], results: dict[tuple[str, str], tuple[list[float], str]]) -> str:
    header = ["model"] + [f"{TOOLS[tool][0]} s" for tool in tools]
    if {"qpasses", "fx"} <= set(tools):
        header += ["qpasses / FX", f"within {TARGET}×"]
    rows = []
    for name in models:
        medians: dict[str, float] = {}
        row = [name]
        for tool in tools:
            times, error = results[(name, tool)]
            if error:
                row.append(f"fails: {error}")
                continue
            medians[tool] = statistics.median(times)
            stand_in = f" ({FX_STAND_IN[name]})" if tool == "fx" and name in FX_STAND_IN else ""
            row.append(f"{medians[tool]:.2f}{stand_in}")
        if {"qpasses", "fx"} <= set(tools):
            if {"qpasses", "fx"} <= medians.keys():
                ratio = medians["qpasses"] / medians["fx"]
                row += [f"{ratio:.2f}", "yes" if ratio <= TARGET else "no"]
            else:
                row += ["", ""]
        rows.append(row)
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from {', '.join(TOOLS)}")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches of 8 crops (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--note", default="", help="what else ran on the machine, written under the table")
    args = parser.parse_args(argv)
    models, tools = args.models.split(","), args.tools.split(",")
    for name in models:
        if name not in zoo.list_models():
            parser.error(f"unknown model {name!r}; the zoo has {', '.join(zoo.list_models())}")
    for tool in tools:
        if tool not in TOOLS:
            parser.error(f"unknown tool {tool!r}; choose from {', '.join(TOOLS)}")
    if args.batches < 1 or args.rounds < 1:
        parser.error("--batches and --rounds must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    calib = PhotoSet.make(8 * args.batches, 8).calib
    machine = describe_machine()
    print(f"machine: {machine}", flush=True)
    results = measure(models, tools, calib, args.rounds)
    body = "\n\n".join([
        f"## Prepare time (`{COMMAND}`)",
        f"Machine: {machine}. {args.batches} calibration batches of 8 photo crops, 224×224, random weights "
        f"(BatchNorm statistics re-estimated on the crops); median of {args.rounds} interleaved rounds, each "
        "tool timed from the float model to its int8 model (qpasses: FuseBN + PTQ with capture and pass "
        "verification on; torch.ao FX: prepare_fx + calibration + convert_fx; torchao PT2E: export + "
        "prepare_pt2e + calibration one sample at a time + convert_pt2e).",
        table(models, tools, results),
        *([args.note] if args.note else []),
    ])
    print(body)
    if args.write:
        write_section("prepare", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
