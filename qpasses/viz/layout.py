"""DOT → SVG with Graphviz's ``dot`` layout engine, in-process through pygraphviz or via the ``dot`` program."""

from __future__ import annotations

import shutil
import subprocess

from qpasses.errors import QPassesError

INSTALL_HINT = (
    "rendering .svg needs the Graphviz layout engine and none was found: pip install 'qpasses[viz]' "
    "(pygraphviz, whose wheels bundle Graphviz), or install the `dot` program (apt-get install graphviz, "
    "brew install graphviz); .html and .dot output need neither"
)


class LayoutEngineMissing(QPassesError):
    """Neither pygraphviz nor a ``dot`` program is available (one line: what to install)."""


def dot_to_svg(dot: str) -> str:
    """Lay out ``dot`` with Graphviz ``dot`` and return the SVG text.

    pygraphviz comes first: pip installs it with Graphviz inside, so it works on a fresh machine; the
    ``dot`` program covers platforms that pygraphviz has no wheel for.
    """
    try:
        import pygraphviz
    except ImportError:
        pygraphviz = None
    if pygraphviz is not None:
        return pygraphviz.AGraph(string=dot).draw(format="svg", prog="dot").decode("utf-8")
    program = shutil.which("dot")
    if program is None:
        raise LayoutEngineMissing(INSTALL_HINT)
    result = subprocess.run([program, "-Tsvg"], input=dot.encode("utf-8"), capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{program} -Tsvg failed: {result.stderr.decode('utf-8', 'replace').strip()}")
    return result.stdout.decode("utf-8")
