"""``qpasses viz``: draw a model's graph, pass by pass, optionally with a diff and per-node SQNR heat."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.fx as fx

from qpasses.analysis.node_sqnr import node_sqnr
from qpasses.cli.common import (
    CLIError,
    PrintProgress,
    add_pipeline_arguments,
    calibration_loader,
    check_runs,
    load_model,
    one_line,
    pass_options,
)
from qpasses.graph.trace import propagate_shapes, trace
from qpasses.passes.manager import PassManager
from qpasses.passes.registry import build_pipeline
from qpasses.serialization import load
from qpasses.validation import check_out_path
from qpasses.viz import render

EXAMPLES = """examples:
  qpasses viz resnet18 --out resnet18.html
  qpasses viz resnet18 --passes fusebn,ptq --diff fusebn --out fusebn.html
  qpasses viz tf_efficientnet_lite0 --pretrained --passes fusebn,ptq --heat --out lite0_heat.html
  qpasses viz resnet18_int8.pt --out int8.svg
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "viz", help="draw a graph (HTML, SVG or DOT), pass by pass",
        description="Draw MODEL's graph, or the graph after each pass of --passes (the HTML page has a selector), "
                    "or a torch.save'd GraphModule FILE.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL_OR_FILE", help="a zoo model, module:factory, or a saved GraphModule")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="output .html, .svg or .dot")
    parser.add_argument("--format", choices=("html", "svg", "dot"), help="default: from the --out extension")
    parser.add_argument("--diff", metavar="PASS", help="open on the graph after PASS, with what it changed marked")
    parser.add_argument("--heat", action="store_true",
                        help="colour nodes by their SQNR against the float model (needs MODEL, not FILE)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    add_pipeline_arguments(parser, passes_default=None)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_out_path(args.out)
    if args.format is None and args.out.suffix.lower() not in (".html", ".svg", ".dot"):
        raise CLIError(f"--out {args.out}: cannot tell the format; end it in .html, .svg or .dot, or give --format")
    if args.diff and not args.passes:
        raise CLIError("--diff PASS needs --passes: it compares the graphs before and after that pass")
    snapshots = _snapshots(args)
    diff = _diff_label(args.diff, [label for label, _ in snapshots]) if args.diff else None
    out = render(snapshots if len(snapshots) > 1 else snapshots[0][1], args.out, fmt=args.format, heat=args.heat,
                 diff=diff)
    if args.json:
        print(json.dumps({"out": str(out), "graphs": [label for label, _ in snapshots], "diff": diff,
                          "nodes": len(snapshots[-1][1].graph.nodes)}))
    else:
        print(f"wrote {out} ({len(snapshots)} graph(s), {len(snapshots[-1][1].graph.nodes)} nodes in the last)")
    return 0


def _snapshots(args: argparse.Namespace) -> list[tuple[str, fx.GraphModule]]:
    path = Path(args.model)
    if path.is_file():
        return [(path.stem, _saved_graph(path, args))]
    loaded = load_model(args.model, args.pretrained, args.input_size)
    if not args.passes:
        example = _random_input(loaded.input_size)
        check_runs(args.model, loaded, example)
        return [("traced", trace(loaded.model, example))]
    calibration = calibration_loader(args.calib, loaded, args.num_batches, args.batch_size)
    pm = PassManager(build_pipeline(args.passes, pass_options(args, calibration, progress=not args.json)),
                     snapshots=True)
    planned = [p.name for p in pm.plan().passes]
    if args.diff:
        _diff_label(args.diff, ["traced", *planned])  # refuse a wrong --diff before the passes run
    if not args.json:
        pm.instruments.append(PrintProgress(len(planned)))
    example = calibration()[0][:1]
    check_runs(args.model, loaded, example)
    pm.run(loaded.model, example)
    if args.heat:
        reference = pm.snapshots[0][1]
        for _, gm in pm.snapshots[1:]:
            node_sqnr(reference, gm, example)
    return pm.snapshots


def _random_input(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def _saved_graph(path: Path, args: argparse.Namespace) -> fx.GraphModule:
    if args.heat:
        raise CLIError("--heat compares with the float model, which a saved file does not hold: give the MODEL")
    if args.passes:
        raise CLIError("--passes runs on a MODEL, not on a saved file: give the model's name")
    gm = _load_graph_module(path)
    example = _random_input(args.input_size or 224)
    try:
        propagate_shapes(gm, (example,))
    except Exception as exc:  # the saved model refuses this input: draw it without shapes, say why
        print(f"note: shapes not shown, {path} does not run on {tuple(example.shape)} (try --input-size): "
              f"{one_line(exc)}")
    return gm


def _load_graph_module(path: Path) -> fx.GraphModule:
    model = load(path)
    if not isinstance(model, fx.GraphModule):
        raise CLIError(f"{path} holds a {type(model).__name__}, not a torch.fx.GraphModule (save the result of "
                       f"qpasses quantize, or give the model's name)")
    return model


def _diff_label(name: str, labels: list[str]) -> str:
    """The snapshot label ``name`` stands for, in any case (``fusebn`` → ``FuseBN``)."""
    label = {label.lower(): label for label in labels[1:]}.get(name.lower())
    if label is None:
        raise CLIError(f"--diff {name}: not a pass of this pipeline; choose one of: {', '.join(labels[1:])}")
    return label
