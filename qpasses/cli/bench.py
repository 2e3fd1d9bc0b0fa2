"""``qpasses bench [NAME] ...``: the benchmarks in ``tools/bench`` (``tools.bench.<NAME>.main``).

``tools/`` belongs to the source checkout, not to the installed package: from a wheel, every ``qpasses bench``
command ends with one line saying where the benchmarks run."""

from __future__ import annotations

import argparse
import pkgutil

from qpasses.cli.common import CLIError
from qpasses.cli.forward import forward, module_available

PACKAGE = "tools.bench"
HELPERS = {"common"}  # modules of tools/bench that are not benchmarks
NOT_INSTALLED = ("the benchmarks are scripts of a qpasses source checkout, not part of this installation: "
                 "run them there with `python -m tools.bench.NAME`")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser("bench", add_help=False,
                          help="run a benchmark: qpasses bench NAME [its options]; without NAME, list them")


def benchmarks() -> list[str]:
    if not module_available(PACKAGE):
        return []
    import tools.bench

    return sorted(m.name for m in pkgutil.iter_modules(tools.bench.__path__) if m.name not in HELPERS)


def run(argv: list[str]) -> int:
    if not module_available(PACKAGE):
        raise CLIError(NOT_INSTALLED)
    names = benchmarks()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qpasses bench NAME [options]   (qpasses bench NAME --help for its options)")
        print(f"benchmarks: {', '.join(names) if names else '(none installed)'}")
        return 0
    name = argv[0]
    if name not in names:
        raise CLIError(f"unknown benchmark '{name}'; available: {', '.join(names) or '(none installed)'}")
    return forward(f"bench {name}", f"{PACKAGE}.{name}", argv[1:])
