"""Subcommands that belong to other modules (recipes, sensitivity analysis, benchmarks): each of those
modules has ``main(argv: list[str] | None = None) -> int``; it is imported only when its command runs."""

from __future__ import annotations

import importlib
import importlib.util

from qpasses.cli.common import CLIError


def module_available(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def forward(command: str, module_name: str, argv: list[str]) -> int:
    """Run ``module_name.main(argv)``; its ``--help`` and usage errors exit through argparse as usual."""
    if not module_available(module_name):
        raise CLIError(f"'qpasses {command}' needs {module_name}, which is not part of this installation")
    main = getattr(importlib.import_module(module_name), "main", None)
    if not callable(main):
        raise CLIError(f"{module_name} has no main(argv) function to run 'qpasses {command}'")
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse inside the module: --help (0) or a usage error (2)
        code = exc.code
    if code is None:
        return 0
    return code if isinstance(code, int) else 1
