"""The ``qpasses`` command: ``qpasses {quantize,viz,list,recipe,sensitivity,bench} ...``.

One module per subcommand, each with ``add_parser(subparsers)`` and ``run``. ``recipe``, ``sensitivity``
and ``bench`` hand their arguments, untouched, to the ``main(argv)`` of the module that implements them.
Bad input ends with exit status 1 (2 for usage errors) and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from qpasses import __version__
from qpasses.cli import bench, listing, quantize, recipe, sensitivity, viz
from qpasses.cli.common import CLIError, one_line
from qpasses.errors import QPassesError

__all__ = ["CLIError", "build_parser", "main"]

FORWARDED = {"recipe": recipe.run, "sensitivity": sensitivity.run, "bench": bench.run}


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, pointing at --help, instead of the usage block and the message."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qpasses", description="qpasses: a quantization compiler for PyTorch.",
                     epilog="`qpasses COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"qpasses {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error (before COMMAND)")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    for command in (quantize, viz, listing, recipe, sensitivity, bench):
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv[:1]
    if show_traceback:
        argv = argv[1:]
    with warnings.catch_warnings():
        # torch's deprecation notices for quantized tensors (design note 9) would bury the output.
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        try:
            if argv and argv[0] in FORWARDED:
                return FORWARDED[argv[0]](argv[1:])
            parser = build_parser()
            try:
                args = parser.parse_args(argv)
            except SystemExit as exc:  # --help, --version, usage errors
                return exc.code if isinstance(exc.code, int) else 0
            if getattr(args, "run", None) is None:
                parser.print_help()
                return 2
            return args.run(args)
        except (QPassesError, OSError) as exc:
            if show_traceback:
                raise
            print(f"qpasses: error: {one_line(exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("qpasses: interrupted", file=sys.stderr)
            return 130
