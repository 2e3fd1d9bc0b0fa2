"""``qpasses sensitivity ...``: per-layer quantization sensitivity (``qpasses.analysis.sensitivity.main``)."""

from __future__ import annotations

import argparse

from qpasses.cli.forward import forward

MODULE = "qpasses.analysis.sensitivity"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser("sensitivity", add_help=False,
                          help=f"per-layer sensitivity analysis (arguments go to {MODULE}; see `qpasses sensitivity --help`)")


def run(argv: list[str]) -> int:
    return forward("sensitivity", MODULE, argv)
