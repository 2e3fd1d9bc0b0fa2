"""``qpasses recipe NAME ...``: end-to-end recipes on the zoo models (``qpasses_zoo.recipes.main``)."""

from __future__ import annotations

import argparse

from qpasses.cli.forward import forward

MODULE = "qpasses_zoo.recipes"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser("recipe", add_help=False, help=f"run a recipe (arguments go to {MODULE}; see `qpasses recipe --help`)")


def run(argv: list[str]) -> int:
    return forward("recipe", MODULE, argv)
