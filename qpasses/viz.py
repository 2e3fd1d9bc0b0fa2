"""``qpasses.viz.render``: the graph visualiser (``tools.viz``) behind a stable public name.

The visualiser ships in the ``tools`` package and lays out SVG with pygraphviz (the ``viz`` extra); it is
imported only when called, so ``import qpasses`` never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.fx as fx

from qpasses.errors import QPassesError

INSTALL_HINT = "install the visualiser with: pip install 'qpasses[viz]'"


class VisualiserUnavailable(QPassesError):
    """The visualiser or its layout engine is not installed."""


def render(
    graphs: fx.GraphModule | Sequence[tuple[str, fx.GraphModule]] | None,
    out_path: str | Path,
    fmt: str | None = None,
    heat: bool = False,
    diff: str | tuple[fx.GraphModule, fx.GraphModule] | None = None,
    title: str | None = None,
) -> Path:
    """Draw a GraphModule or a pass-by-pass list ``[(label, gm), ...]`` to ``.html``, ``.svg`` or ``.dot``.

    See :func:`tools.viz.render` for the arguments. ``heat=True`` colours nodes by ``meta['sqnr_db']``,
    which :func:`qpasses.analysis.node_sqnr.node_sqnr` writes. Raises ``VisualiserUnavailable`` when the
    visualiser, or the Graphviz layout engine an SVG needs, is not installed.
    """
    try:
        from tools.viz import LayoutEngineMissing
        from tools.viz import render as render_graphs
    except ImportError as exc:
        raise VisualiserUnavailable(f"the graph visualiser is not available ({exc}); {INSTALL_HINT}") from exc
    try:
        return render_graphs(graphs, out_path, fmt=fmt, heat=heat, diff=diff, title=title)
    except LayoutEngineMissing as exc:
        raise VisualiserUnavailable(f"{str(exc).splitlines()[0]} {INSTALL_HINT}, or write .html/.dot") from exc
