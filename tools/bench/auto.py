"""Accuracy you can ask for, on pretrained EfficientNet-Lite0: the measured default recipe, and PTQ to a target.

    python -m tools.bench.auto --write-table   # measure the cheap pipelines per setting; write the recipe table
    python -m tools.bench.auto                 # default PTQ vs PT2E, then target_sqnr 25/30/35 per backend
    python -m tools.bench.auto --calib 16 --eval 32 --backends x86 --no-adaround --write   # a reduced run
    python -m tools.bench.auto --backends x86 --adaround 200 200+bc 500 --threads 1   # AdaRound's settings
    python -m tools.bench.auto --calib 16 --backends x86 inductor --where '' conv_stem,blocks.0.0.conv_dw

``--write-table`` measures, per setting (backend at 8-bit weights, the dfq benchmark's settings), every cheap
pipeline (no weight training: PTQ, + BiasCorrection, + CLE + HBA + BiasCorrection) on the PTQ
benchmark's photo crops and writes the best one per setting to ``qpasses/passes/recipe_table.py``, the table
``PTQ(data)`` reads its default passes from. The default run measures, per backend, ``FuseBN + PTQ(data)``
(with that recipe) against torchao PT2E X86InductorQuantizer, then ``PTQ(data, target_sqnr=T)``: met or not,
the layers raised to 8 bits (with ``--target-bits`` below 8) or kept float and the share of the conv/linear MACs
kept float, prepare time, and the held-out fidelity. ``--adaround`` measures AdaRound alone (``ITERATIONS``,
lr 1e-2 as the search runs it; ``@ROWS``: ``rows=ROWS`` output positions per step; ``+bc``: BiasCorrection
after it) on the calibration crops as the search does. ``--where`` splits the error between weight and activation
roundings (``where_rows``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import fcntl
import importlib
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from qpasses import PassManager
from qpasses.analysis.sensitivity import OutputSQNR, Sensitivity
from qpasses.passes import PTQ, AdaRound, BiasCorrection, FuseBN
from qpasses.passes.recipes import Recipe, build_passes
from qpasses.passes.reference import DEQUANTIZE, DEQUANTIZE_PER_CHANNEL, QUANTIZE
from qpasses.quant.annotate import annotate
from qpasses.quant.backends import get_backend
from qpasses.quant.overrides import exact_pattern
from qpasses.quant.state import INT8_OP_KEY, state_of
from tools.bench.common import (
    PhotoSet,
    describe_machine,
    fidelity,
    markdown_table,
    pretrained_lite0,
    timed,
    write_section,
)
from tools.bench.dfq import BACKENDS, config_for, pt2e_x86_inductor, quantize, setting_label

COMMAND = "python -m tools.bench.auto"
TABLE = Path(__file__).resolve().parents[2] / "qpasses" / "passes" / "recipe_table.py"
# The cheap pipelines (registry names, before PTQ): no weight training, so each prepares in about a minute.
# CLE + HBA without BiasCorrection is left out: it never beat CLE + HBA + BiasCorrection in the dfq rows.
CHEAP = ((), ("biascorrection",), ("cle", "hba", "biascorrection"))
# The target rows also run on the inductor preset (issue 18's runtime: its reference graph is what inductor runs),
# where a conv can write fp32, so a layer kept float reads its input unrounded.
TARGET_BACKENDS = (*BACKENDS, "inductor")


def measure_recipes(photos: PhotoSet, backends: list[str], bits: list[int], source: str) -> None:
    """Per setting, every ``CHEAP`` pipeline measured; the best (logit SQNR on the evaluation crops) written to
    the table as soon as its setting is done."""
    model = pretrained_lite0("tf_efficientnet_lite0")
    for weight_bits in bits:
        for backend in backends:
            config = config_for(backend, weight_bits)
            rows = []
            for names in CHEAP:
                built, seconds, error = timed(lambda n=names, c=config, b=backend: quantize(
                    model, build_passes(n, photos.calib, None), photos.calib, b, c))
                if built is None:
                    print(f"{setting_label(backend, config)} | {names} | fails: {error}", flush=True)
                    continue
                db, agreement = fidelity(model, built, photos.evals)
                rows.append((db, names, seconds))
                print(f"{setting_label(backend, config)} | PTQ {' + '.join(names)} | {db:.1f} dB | {agreement:.1%} | "
                      f"{seconds:.0f} s", flush=True)
            ptq_db = next(db for db, names, _ in rows if not names)
            db, names, seconds = max(rows)
            write_table(Recipe(backend, config.weight.per_channel, weight_bits, names, round(db, 1), round(ptq_db, 1),
                               round(seconds), source))


def write_table(recipe: Recipe) -> None:
    """Replace ``recipe``'s setting in the table (or add it), keeping the others: settings measured by separate
    invocations (in parallel: the file is locked while it is rewritten) end up in one table."""
    with open(TABLE, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        from qpasses.passes import recipe_table

        importlib.reload(recipe_table)
        key = (recipe.backend, recipe.per_channel, recipe.weight_bits)
        kept = [r for r in recipe_table.MEASURED if (r.backend, r.per_channel, r.weight_bits) != key]
        _write(sorted([*kept, recipe], key=lambda r: (-r.weight_bits, BACKENDS.index(r.backend))))


def _field(value: object) -> str:
    """A field's Python literal; long strings split into adjacent literals, so the table keeps the line limit."""
    if not isinstance(value, str) or len(value) <= 80:
        return repr(value)
    parts = textwrap.wrap(value, 80, drop_whitespace=False, break_on_hyphens=False)
    return "(\n" + "".join(f"            {part!r}\n" for part in parts) + "        )"


def _write(recipes: list[Recipe]) -> None:
    rows = "\n".join("    Recipe(\n" + "".join(f"        {f.name}={_field(getattr(r, f.name))},\n"
                                                 for f in dataclasses.fields(r)) + "    )," for r in recipes)
    TABLE.write_text(f'''"""The measured recipe table (see ``qpasses.passes.recipes``): each row written by
``python -m tools.bench.auto --write-table`` (its ``source`` says which run). Do not edit: rerun it.
"""

from qpasses.passes.recipes import Recipe

MEASURED: tuple[Recipe, ...] = (
{rows}
)
''')


def cpu_timed(fn):
    """``timed(fn)`` with the process's CPU seconds added (all its threads): on a shared machine wall seconds
    grow with the load, CPU seconds at a fixed thread count much less."""
    start = time.process_time()
    built, seconds, error = timed(fn)
    return built, seconds, time.process_time() - start, error


def adaround_rows(photos: PhotoSet, backends: list[str], variants: list[str]) -> None:
    """Per backend, FuseBN + AdaRound (``ITERATIONS`` per layer, lr 1e-2; ``ITERATIONS+bc``: then BiasCorrection)
    + PTQ at the backend's preset: output SQNR on the calibration crops (the search's measure), held-out
    fidelity, wall and CPU seconds, printed per variant."""
    model = pretrained_lite0("tf_efficientnet_lite0")
    metric = OutputSQNR(model, [(b,) for b in photos.calib])
    for backend in backends:
        config = config_for(backend, 8)
        for variant in variants:
            iterations, _, after = variant.partition("+")
            iterations, _, rows = iterations.partition("@")  # ITERATIONS@ROWS: AdaRound(rows=ROWS)
            passes = [AdaRound(photos.calib, iterations=int(iterations), lr=1e-2, rows=int(rows) if rows else None,
                               progress=False)]
            passes += [BiasCorrection(photos.calib)] if after == "bc" else []
            built, seconds, cpu, error = cpu_timed(lambda p=passes, c=config, b=backend: quantize(
                model, p, photos.calib, b, c))
            if built is None:
                print(f"{backend} | AdaRound {variant} | fails: {error}", flush=True)
                continue
            db, agreement = fidelity(model, built, photos.evals)
            print(f"{backend} | AdaRound {variant} | calibration {metric(built):.2f} dB | held-out {db:.2f} dB / "
                  f"{agreement:.1%} | {seconds:.0f} s | CPU {cpu:.0f} s | load {os.getloadavg()[0]:.1f}", flush=True)


def reference_variant(reference: torch.fx.GraphModule, fused: torch.nn.Module, unround: bool,
                      float_weights: bool) -> torch.fx.GraphModule:
    """A copy of a reference quantized graph with every activation rounding removed (``unround``: each
    quantize/dequantize pair reads through) and/or every conv/linear weight back at its float value
    (``float_weights``, from ``fused``, the FuseBN'd float graph); biases as the reference has them."""
    graph = copy.deepcopy(reference)
    for node in list(graph.graph.nodes):
        if unround and node.target is QUANTIZE:
            for dequantize in list(node.users):
                dequantize.replace_all_uses_with(node.args[0])
        reader = next(iter(node.users), None)
        if (float_weights and node.target in (DEQUANTIZE, DEQUANTIZE_PER_CHANNEL) and node.args[0].op == "get_attr"
                and reader is not None and INT8_OP_KEY in reader.meta and reader.args[1] is node):
            module = reader.meta[INT8_OP_KEY].module
            attribute = f"{module.replace('.', '_')}_float_weight"
            graph.register_buffer(attribute, fused.get_submodule(module).weight.detach().clone())
            with graph.graph.inserting_before(reader):
                node.replace_all_uses_with(graph.graph.get_attr(attribute))
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph


def where_rows(photos: PhotoSet, backends: list[str], keep_float: list[str]) -> None:
    """Where the error sits, per backend (calibration SQNR, printed): PTQ alone and with the backend's recipe, each
    as its reference graph with (c) everything rounded, (a) weights only (activation roundings removed), (b)
    activations only (float weights); then FuseBN + BiasCorrection + PTQ with each comma-separated set of
    ``keep_float`` layers kept float (the real pipeline, BiasCorrection measured again with them float), with
    the share of the conv/linear MACs they hold and the activation values the model rounds."""
    model = pretrained_lite0("tf_efficientnet_lite0")
    example = photos.calib[0][:1]
    fused = PassManager([FuseBN()]).run(model, example)
    metric = OutputSQNR(model, [(b,) for b in photos.calib])
    for backend in backends:
        for recipe in (False, True):
            ptq = PTQ(photos.calib, backend=backend, progress=False, recipe=recipe)
            built = PassManager([FuseBN(), ptq]).run(model, example)
            reference = state_of(built).reference or built  # inductor: the model is its reference graph
            both, weights, activations = (metric(reference_variant(reference, fused, u, f))
                                          for u, f in ((False, False), (True, False), (False, True)))
            print(f"{backend} | PTQ{' + recipe' if recipe else ''} | (c) both {both:.2f} dB | (a) weights only "
                  f"{weights:.2f} dB | (b) activations only {activations:.2f} dB", flush=True)
        sens = Sensitivity(model, photos.calib[:1], backend=backend, progress=False)
        macs = {layer.name: layer.macs for layer in sens.layers}
        for names in keep_float:
            layers = [n for n in names.split(",") if n]
            config = PTQ(photos.calib, backend=backend, progress=False).config  # as PTQ resolves it (the CPU's bits)
            config = dataclasses.replace(config, keep_float={exact_pattern(n) for n in layers})
            start = time.process_time()
            built = quantize(model, build_passes(("biascorrection",), photos.calib, None), photos.calib, backend, config)
            rounded = len(annotate(sens.prepared, get_backend(backend), config).observe)
            share = sum(macs[n] for n in layers) / sum(macs.values())
            print(f"{backend} | BiasCorrection, float: {names or 'none'} ({share:.2%} of MACs) | {metric(built):.2f} dB "
                  f"| {rounded} activation values rounded | CPU {time.process_time() - start:.0f} s | load {os.getloadavg()[0]:.1f}", flush=True)


def target_rows(photos: PhotoSet, backends: list[str], targets: list[float], adaround: bool,
                max_float_share: float, bits: int | None) -> list[list[str]]:
    model = pretrained_lite0("tf_efficientnet_lite0")
    rows = []

    def add(row: list[str]) -> None:
        rows.append(row)
        print(" | ".join(row), flush=True)

    built, seconds, cpu, error = cpu_timed(lambda: pt2e_x86_inductor(model, photos.calib))
    db, agreement = fidelity(model, built, photos.evals) if built is not None else (float("nan"), float("nan"))
    add(["any", "torchao PT2E X86InductorQuantizer (reference)", "", f"{db:.1f}", f"{agreement:.1%}", "", "",
         f"{seconds:.0f}", f"{cpu:.0f}", error])
    for backend in backends:
        pm = PassManager([FuseBN(), PTQ(photos.calib, backend=backend, progress=False)])
        built, seconds, cpu, error = cpu_timed(lambda p=pm: p.run(model, photos.calib[0][:1]))
        db, agreement = fidelity(model, built, photos.evals)
        added = "; ".join(n.split(":")[0] for n in pm.report.plan.notes if n.startswith("PTQ added"))
        add([backend, "FuseBN + PTQ(data) (default recipe)", "", f"{db:.1f}", f"{agreement:.1%}", "0", "0%",
             f"{seconds:.0f}", f"{cpu:.0f}", added])
        for target in targets:
            ptq = PTQ(photos.calib, backend=backend, bits=bits, target_sqnr=target, adaround=adaround,
                      max_float_share=max_float_share, progress=False)
            load = os.getloadavg()[0]
            built, seconds, cpu, error = cpu_timed(
                lambda p=ptq: PassManager([FuseBN(), p]).run(model, photos.calib[0][:1]))
            result = ptq.search
            path = "; ".join([f"{s.label}: {s.value:.2f} dB ({s.seconds:.0f} s"
                              + (f", {s.float_share:.1%} of MACs float)" if s.keep_float else ")") for s in result.steps]
                             + result.notes + ([result.ranking] if result and result.ranking else [])) if result else error
            path += f"; load {load:.1f} → {os.getloadavg()[0]:.1f}"
            if built is None:
                path = f"{path}; {error}" if result and result.steps else error
                add([backend, f"PTQ(target_sqnr={target:g})", "not met", "", "", "", "", f"{seconds:.0f}", f"{cpu:.0f}",
                     path])
                continue
            db, agreement = fidelity(model, built, photos.evals)
            chosen = result.chosen
            protected = [f"{len(chosen.raised)} at 8 bits: {', '.join(chosen.raised)}"] if chosen.raised else []
            protected += [f"{len(chosen.keep_float)} float: {', '.join(chosen.keep_float)}"] if chosen.keep_float else []
            add([backend, f"PTQ(target_sqnr={target:g})", f"met: {chosen.value:.2f} dB", f"{db:.1f}",
                 f"{agreement:.1%}", "; ".join(protected) or "0", f"{chosen.float_share:.1%}", f"{seconds:.0f}",
                 f"{cpu:.0f}", path])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qpasses bench auto", description=__doc__.splitlines()[0])
    parser.add_argument("--write-table", action="store_true", help="measure the cheap pipelines per setting and write "
                        "qpasses/passes/recipe_table.py (no target runs)")
    parser.add_argument("--calib", type=int, default=64, help="calibration crops (default 64)")
    parser.add_argument("--eval", type=int, default=128, help="evaluation crops (default 128)")
    parser.add_argument("--size", type=int, default=224, help="crop size (default 224)")
    parser.add_argument("--backends", nargs="+", choices=TARGET_BACKENDS, default=list(BACKENDS),
                        help="default: the torch.ao engines; inductor for the target and AdaRound rows only")
    parser.add_argument("--bits", type=int, nargs="+", default=[8], help="--write-table: weight bits (default 8)")
    parser.add_argument("--targets", type=float, nargs="*", default=[25.0, 30.0, 35.0],
                        help="target SQNRs, dB (none: only the default rows)")
    parser.add_argument("--no-adaround", dest="adaround", action="store_false", help="targets: skip the AdaRound step")
    parser.add_argument("--target-bits", type=int, help="targets: PTQ(bits=...), weights and activations (default: "
                        "the backend's 8; below 8 the search raises layers to 8 bits before keeping any float)")
    parser.add_argument("--max-float-share", type=float, default=0.2,
                        help="targets: the most MACs the search may keep float (default 0.2, PTQ's)")
    parser.add_argument("--adaround", dest="adaround_variants", nargs="+", metavar="ITERATIONS[@ROWS][+bc]",
                        help="measure AdaRound alone at these settings (no target runs)")
    parser.add_argument("--where", nargs="*", metavar="LAYER[,LAYER...]",
                        help="where the error sits (no target runs): weights vs activation roundings per backend, then "
                        "BiasCorrection with each set of layers kept float ('' for none)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = parser.parse_args(argv)
    command = " ".join([COMMAND, shlex.join(argv if argv is not None else sys.argv[1:])])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    photos = PhotoSet.make(args.calib, args.eval, size=args.size)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    today = datetime.date.today().isoformat()
    if args.write_table:
        source = f"`{command}`, {today}, commit {commit}"
        measure_recipes(photos, args.backends, args.bits, source)
        print(TABLE.read_text())
        return 0
    if args.where is not None:
        where_rows(photos, args.backends, args.where)
        return 0
    if args.adaround_variants:
        adaround_rows(photos, args.backends, args.adaround_variants)
        return 0
    rows = target_rows(photos, args.backends, args.targets, args.adaround, args.max_float_share, args.target_bits)
    machine = describe_machine()
    body = "\n\n".join([
        f"## Accuracy you can ask for (`{COMMAND}`)",
        f"Command: `{command}` ({today}, commit {commit}). Machine: {machine}. Pretrained tf_efficientnet_lite0, "
        f"{args.calib} calibration crops, {args.eval} evaluation crops (the PTQ benchmark's photo crops), "
        f"{args.size}×{args.size}. 'target': output SQNR on the calibration crops, what the search measures; "
        "'held-out': logits against the float model on the evaluation crops. 'float MACs': the share of the "
        "conv/linear multiply-accumulates in layers the search kept float (layers raised to 8 bits stay on the int8 "
        "kernels). 'prepare s' (wall) and 'CPU s' (the process's, all threads) include the whole search."
        + (f" Targets at `bits={args.target_bits}`." if args.target_bits else "")
        + ("" if args.adaround else " The AdaRound step was skipped (`--no-adaround`)."),
        markdown_table(["backend", "pipeline", "target", "held-out SQNR dB", "top-1 agreement", "layers protected",
                        "float MACs", "prepare s", "CPU s", "path / note"], rows),
    ])
    print(body)
    if args.write:
        write_section("auto", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
