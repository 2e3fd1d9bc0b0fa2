"""``qpasses list``: the models, passes, backends, datasets and benchmarks this installation has."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from qpasses.cli.bench import benchmarks
from qpasses.cli.common import CLIError, import_zoo
from qpasses.passes.registry import PASSES
from qpasses.quant.backends import BACKENDS

SECTIONS = ("models", "passes", "backends", "datasets", "benchmarks")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list models, passes, backends, datasets, benchmarks",
                                   description="List what the other commands accept.")
    parser.add_argument("what", nargs="?", choices=SECTIONS, help="one section (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def collect(what: str) -> dict[str, str]:
    """``{name: one-line description}`` for one section."""
    if what == "models":
        zoo = import_zoo("qpasses_zoo", "listing the zoo's models")
        return {name: f"{s.input_size}×{s.input_size}" + (f", {s.num_classes} classes" if s.num_classes else "")
                for name, s in zoo.MODELS.items()}
    if what == "passes":
        return {name: entry.summary for name, entry in PASSES.items()}
    if what == "backends":
        engines = torch.backends.quantized.supported_engines
        return {name: ("no torch.ao engine" if b.engine is None else f"engine {b.engine}")
                + ("" if b.engine is None or b.engine in engines else " (not in this torch build)")
                + (f"; {b.notes}" if b.notes else "") for name, b in BACKENDS.items()}
    if what == "datasets":
        return {name: "" for name in import_zoo("qpasses_zoo.data", "listing the zoo's datasets").list_datasets()}
    return {name: "" for name in benchmarks()}


def run(args: argparse.Namespace) -> int:
    sections = [args.what] if args.what else list(SECTIONS)
    found, missing = {}, {}
    for what in sections:
        try:
            found[what] = collect(what)
        except CLIError as exc:  # a section of the zoo without the zoo extra: the others are still listed
            if args.what:
                raise
            missing[what] = str(exc)
    for what, message in missing.items():
        print(f"{what}: {message}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    for what, entries in found.items():
        print(f"{what}:")
        width = max((len(name) for name in entries), default=0)
        for name, text in entries.items():
            print(f"  {name:<{width}}  {text}".rstrip())
    return 0
