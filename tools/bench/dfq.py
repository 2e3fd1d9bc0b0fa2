"""Data-free and data-light accuracy passes on pretrained EfficientNet-Lite0: CLE, HighBiasAbsorption,
BiasCorrection, AdaRound, on top of PTQ, W8A8 and W4A8, against torch.ao FX PTQ and torchao PT2E.

    python -m tools.bench.dfq                  # full run (64 calibration / 128 evaluation crops, 224×224)
    python -m tools.bench.dfq --quick          # 16 / 32 crops at 96×96, few AdaRound iterations; prints only
    python -m tools.bench.dfq --backends x86 --results dfq.json --write   # one setting, merged into dfq.json

Settings (``--backends``): qnnpack (per-tensor weights, 8-bit activations), x86 (per-channel weights; at W8
its preset's reduce_range, A7, leaves 7-bit activation steps into the kernels that add int16 pairs on this CPU:
every conv and linear without AVX-512 VNNI, only depthwise convs of more than 100 groups with it; at W4 affine
weights), onednn (per-channel symmetric weights; A7 likewise: no kernel on a VNNI CPU, all without).
Fidelity is measured against the float model on photo crops disjoint from the calibration crops (the PTQ
benchmark's set): SQNR of the logits and top-1 agreement. With ``--results`` every row is saved as soon as
it is measured, and rows of earlier invocations with the same crops and iterations are kept, so settings can
run as separate processes and a stopped run keeps what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qpasses import PassManager
from qpasses.passes import CLE, PTQ, AdaRound, BiasCorrection, FuseBN, HighBiasAbsorption
from qpasses.passes.base import Pass
from qpasses.quant.backends import get_backend
from qpasses.quant.spec import QuantConfig
from tools.bench.common import (
    PerSample,
    PhotoSet,
    describe_machine,
    fidelity,
    markdown_table,
    pretrained_lite0,
    timed,
    torch_ao_fx_ptq,
    torchao_pt2e_ptq,
    write_section,
)

COMMAND = "python -m tools.bench.dfq"
BACKENDS = ("qnnpack", "x86", "onednn")
HEADER = ["setting", "pipeline", "SQNR dB", "top-1 agreement", "prepare s", "failure"]


def config_for(backend: str, weight_bits: int) -> QuantConfig:
    """The backend's preset at ``weight_bits``; x86 below 8 bits with affine weights (a zero point per
    channel, which routes its convs to fbgemm): a grid over [min, max] rather than [−max|w|, max|w|] doubles
    the resolution of a one-signed channel (a depthwise kernel's large centre); the preset's symmetric grid
    keeps convs on oneDNN on VNNI CPUs."""
    config = get_backend(backend).default_config().with_weight_bits(weight_bits)
    if backend == "x86" and weight_bits < 8:
        config = dataclasses.replace(config, weight=config.weight.replace(symmetric=False))
    return config


def _setting_order(label: str) -> tuple[int, int]:
    """W8 before W4, then in BACKENDS order (labels are ``setting_label``'s)."""
    backend = label.split()[1]
    return -int(label[1:label.index("A")]), BACKENDS.index(backend)


def setting_label(backend: str, config: QuantConfig) -> str:
    activation = config.activation
    activation_bits = activation.bits - 1 if activation.reduce_range else activation.bits
    granularity = "per-channel" if config.weight.per_channel else "per-tensor"
    grid = "" if config.weight.symmetric else ", affine"
    return f"W{config.weight.bits}A{activation_bits} {backend} ({granularity}{grid})"


def pipelines(calib: list[torch.Tensor], iterations: int) -> list[tuple[str, Callable[[], list[Pass]]]]:
    """Each row: a label and a factory of the passes before PTQ (fresh instances per run)."""
    def adaround(granularity: str = "layer", rescale: bool = False, longer: int = 1) -> AdaRound:
        return AdaRound(calib, iterations=longer * iterations, lr=1e-2, granularity=granularity, rescale=rescale,
                        progress=False)

    return [
        ("PTQ", lambda: []),
        ("+ CLE", lambda: [CLE()]),
        ("+ CLE + HBA", lambda: [CLE(), HighBiasAbsorption()]),
        ("+ CLE + HBA + BiasCorrection (analytical)", lambda: [CLE(), HighBiasAbsorption(), BiasCorrection()]),
        ("+ CLE + HBA + BiasCorrection (empirical)", lambda: [CLE(), HighBiasAbsorption(), BiasCorrection(calib)]),
        ("+ BiasCorrection (empirical)", lambda: [BiasCorrection(calib)]),
        ("+ AdaRound", lambda: [adaround()]),
        ("+ AdaRound (rescaled)", lambda: [adaround(rescale=True)]),
        ("+ AdaRound (rescaled, 3× iterations)", lambda: [adaround(rescale=True, longer=3)]),
        ("+ AdaRound (by block, rescaled)", lambda: [adaround("block", rescale=True)]),
        ("+ CLE + HBA + AdaRound", lambda: [CLE(), HighBiasAbsorption(), adaround()]),
        ("+ AdaRound + BiasCorrection (empirical)", lambda: [adaround(), BiasCorrection(calib)]),
        ("+ CLE + HBA + AdaRound + BiasCorrection (empirical)",
         lambda: [CLE(), HighBiasAbsorption(), adaround(), BiasCorrection(calib)]),
    ]


# Rows of a setting appear in this order, whichever runs measured them.
PIPELINE_ORDER = {label: i for i, (label, _) in enumerate(pipelines([], 1))}


def quantize(model: nn.Module, passes: list[Pass], calib: list[torch.Tensor], backend: str,
             config: QuantConfig) -> nn.Module:
    ptq = PTQ(calib, backend=backend, config=config, progress=False, recipe=False)  # the row's passes only
    return PassManager([FuseBN(), *passes, ptq]).run(model, calib[0][:1])


def pt2e_x86_inductor(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    """torchao PT2E (``torchao_pt2e_ptq``: X86InductorQuantizer's default config), run one sample at a time."""
    return PerSample(torchao_pt2e_ptq(model, calib))


class Results:
    """Measured rows. With a ``path``, after each row the file is updated under a lock: rows saved there by other
    runs with the same ``params`` are kept unless this run ``owns`` them (it measures their setting and pipeline),
    so settings and pipelines can run as parallel processes; the section in BENCHMARKS.md (if ``write``) is
    rendered from the merged rows."""

    def __init__(self, path: Path | None, params: dict, command: str, owns: Callable[[dict], bool], write: bool,
                 note: str | None = None):
        self.path, self.params, self.command, self.owns, self.write = path, params, command, owns, write
        self.note = note  # a sentence for the section's header, kept in the file until another replaces it
        self.rows: list[dict] = []  # this run's
        self.merged: list[dict] = []  # this run's and the kept ones, in setting order
        self.update()  # refuses a file of other params before anything runs

    def add(self, setting: str, pipeline: str, seconds: float, error: str, measured: tuple[float, float] | None,
            reference: bool = False) -> None:
        db, agreement = measured if measured is not None else (None, None)
        self.rows.append({"setting": setting, "pipeline": pipeline, "db": db, "agreement": agreement,
                          "seconds": seconds, "failure": error, "reference": reference, "command": self.command})
        print(" | ".join(self.table_row(self.rows[-1])), flush=True)
        self.update()

    def update(self) -> None:
        if self.path is None:
            self.merged = list(self.rows)
        else:
            with open(self.path, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
                f.seek(0)
                text = f.read()
                saved = json.loads(text) if text else {"params": self.params, "rows": []}
                self.note = self.note if self.note is not None else saved.get("note")
                if saved["params"] != self.params:
                    raise SystemExit(f"{self.path} holds rows measured with {saved['params']}, this run uses "
                                     f"{self.params}; give another --results file")
                kept = [r for r in saved["rows"] if not self.owns(r)]
                self.merged = sorted(kept + self.rows, key=lambda r: _setting_order(r["setting"]))
                f.seek(0)
                f.truncate()
                f.write(json.dumps({"params": self.params, "note": self.note, "rows": self.merged}, indent=1))
                if self.write and self.merged:
                    write_section("dfq", self.section())
            return
        if self.write and self.merged:
            write_section("dfq", self.section())

    def section(self) -> str:
        p = self.params
        machine = describe_machine()
        commands = "\n".join(f"- `{c}`" for c in dict.fromkeys(r["command"] for r in self.merged))
        return "\n\n".join([
            "## Data-free / data-light passes (`python -m tools.bench.dfq`)",
            f"Commands (settings as separate processes, rows merged with `--results`):\n\n{commands}",
            *([self.note] if self.note else []),
            f"Machine: {machine}. Pretrained tf_efficientnet_lite0, {p['calib']} calibration crops, {p['eval']} "
            f"evaluation crops (other photo halves), {p['size']}×{p['size']}; AdaRound {p['iterations']} iterations "
            "per layer (per block for 'by block': BRECQ-style, a block's layers jointly against its output; "
            "'rescaled': with learned channel gains and bias shifts; '3× iterations': three times as many). "
            "Every pipeline starts with FuseBN and ends with PTQ (observers, calibration, int8 "
            "lowering) with the backend's preset observers (activations: MSE; weights: min/max per tensor for "
            "qnnpack, MSE per channel for x86 and onednn). AxN: the activation grid; A7: 7-bit steps "
            "(reduce_range) into the kernels that add int16 pairs on this CPU (every conv and linear without "
            "AVX-512 VNNI; with it, x86's depthwise convs of more than 100 groups, none of onednn's), 8-bit "
            "elsewhere; x86's with headroom (codes past the observed range run on to 255, as torch.ao's x86 "
            "default). onednn's weights are x86's. At W4, x86's weights are affine per channel (a zero "
            "point per channel; its convs then run on fbgemm), onednn's symmetric. Fidelity is against the float "
            "model; 'prepare s' "
            "includes calibration and the passes.",
            self.table(),
        ])

    @staticmethod
    def table_row(row: dict, bold: bool = False) -> list[str]:
        if row["db"] is None:
            return [row["setting"], row["pipeline"], "fails", "fails", f"{row['seconds']:.0f}", row["failure"]]
        mark = "**" if bold else ""
        return [row["setting"], f"{mark}{row['pipeline']}{mark}", f"{mark}{row['db']:.1f}{mark}",
                f"{mark}{row['agreement']:.1%}{mark}", f"{row['seconds']:.0f}", row["failure"]]

    def table(self) -> str:
        """Rows by setting, each setting's qpasses pipelines followed by its best one (by SQNR), then the
        reference tools."""
        lines = []
        for setting in dict.fromkeys(r["setting"] for r in self.merged):
            ours = sorted((r for r in self.merged if r["setting"] == setting and not r["reference"]),
                          key=lambda r: PIPELINE_ORDER.get(r["pipeline"], len(PIPELINE_ORDER)))
            lines += [self.table_row(r) for r in ours]
            measured = [r for r in ours if r["db"] is not None]
            if measured:
                best = max(measured, key=lambda r: r["db"])
                lines.append(self.table_row({**best, "pipeline": f"best: {best['pipeline']}"}, bold=True))
            lines += [self.table_row(r) for r in self.merged if r["setting"] == setting and r["reference"]]
        return markdown_table(HEADER, lines)


def selection(row: dict) -> str:
    """The ``--pipelines`` name of a row: its pipeline's label, or 'reference' for the reference tools."""
    return "reference" if row["reference"] else row["pipeline"]


def measure(results: Results, photos: PhotoSet, iterations: int, weight_bits: list[int], backends: list[str],
            selected: list[str] | None) -> None:
    model = pretrained_lite0("tf_efficientnet_lite0")
    for bits in weight_bits:
        for backend in backends:
            config = config_for(backend, bits)
            setting = setting_label(backend, config)
            for label, passes in pipelines(photos.calib, iterations):
                if selected is not None and label not in selected:
                    continue
                built, seconds, error = timed(lambda p=passes, b=backend, c=config: quantize(model, p(), photos.calib,
                                                                                               b, c))
                results.add(setting, label, seconds, error, None if built is None else
                            fidelity(model, built, photos.evals))
            if bits == 8 and (selected is None or "reference" in selected):
                reference(results, setting, backend, photos)


def reference(results: Results, setting: str, backend: str, photos: PhotoSet) -> None:
    """torch.ao FX PTQ with the backend's default qconfig mapping (on the PyTorch-padded efficientnet_lite0,
    its own reference: the tf_ variant does not trace); for onednn also torchao PT2E X86InductorQuantizer."""
    lite0 = pretrained_lite0("efficientnet_lite0")
    built, seconds, error = timed(lambda: torch_ao_fx_ptq(lite0, photos.calib, backend))
    label = f"reference: torch.ao FX PTQ, {backend} qconfig (efficientnet_lite0: the tf_ variant does not trace)"
    results.add(setting, label, seconds, error, None if built is None else fidelity(lite0, built, photos.evals),
                reference=True)
    if backend == "onednn":
        model = pretrained_lite0("tf_efficientnet_lite0")
        built, seconds, error = timed(lambda: pt2e_x86_inductor(model, photos.calib))
        results.add(setting, "reference: torchao PT2E X86InductorQuantizer (Q/DQ graph)", seconds, error,
                    None if built is None else fidelity(model, built, photos.evals), reference=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="CLE / HBA / BiasCorrection / AdaRound benchmark on Lite0")
    parser.add_argument("--quick", action="store_true", help="16 / 32 crops at 96×96, 20 AdaRound iterations; no file")
    parser.add_argument("--size", type=int, help="crop size (default 224, quick 96)")
    parser.add_argument("--calib", type=int, help="calibration crops (default 64, quick 16)")
    parser.add_argument("--eval", type=int, help="evaluation crops (default 128, quick 32)")
    parser.add_argument("--iterations", type=int, help="AdaRound iterations per layer (default 200, quick 20)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="weight bits to run (default 8 4)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="settings to run (default: qnnpack x86 onednn)")
    parser.add_argument("--results", type=Path, help="JSON file the rows are saved to after each one and merged "
                        "with (rows of other settings measured with the same crops and iterations are kept)")
    parser.add_argument("--pipelines", nargs="+", choices=[*PIPELINE_ORDER, "reference"],
                        help="rows to run (default: all; 'reference': the other tools, at W8)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--write", action="store_true", help="write the section even for a reduced run")
    parser.add_argument("--note", help="a sentence for the section's header (e.g. why the run is reduced)")
    parser.add_argument("--render", action="store_true", help="measure nothing: rewrite the section from the rows "
                        "in --results")
    args = parser.parse_args(argv)
    command = " ".join([COMMAND, shlex.join(argv if argv is not None else sys.argv[1:])])
    if args.render:
        if args.results is None or not args.results.exists():
            parser.error("--render needs an existing --results file")
        params = json.loads(args.results.read_text())["params"]
        Results(args.results, params, command, lambda row: False, write=True, note=args.note)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = args.size or (96 if args.quick else 224)
    n_calib, n_eval = args.calib or (16 if args.quick else 64), args.eval or (32 if args.quick else 128)
    iterations = args.iterations or (20 if args.quick else 200)
    params = {"size": size, "calib": n_calib, "eval": n_eval, "iterations": iterations}
    settings = [setting_label(b, config_for(b, bits)) for bits in args.bits for b in args.backends]

    def owns(row: dict) -> bool:
        return row["setting"] in settings and (args.pipelines is None or selection(row) in args.pipelines)

    full = args.size is None and args.calib is None and args.eval is None and args.iterations is None
    results = Results(args.results, params, command, owns, write=not args.quick and (full or args.write),
                      note=args.note)
    photos = PhotoSet.make(n_calib, n_eval, size=size)
    measure(results, photos, iterations, args.bits, args.backends, args.pipelines)
    print(results.section())


if __name__ == "__main__":
    main()
