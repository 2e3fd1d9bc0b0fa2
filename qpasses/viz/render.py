"""``render``: a graph, a pass-by-pass dump or a diff, to an HTML page, an SVG or DOT."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.fx as fx

from qpasses.viz.dot import assemble_dot, build_spec
from qpasses.viz.layout import dot_to_svg
from qpasses.viz.page import html_page

Snapshots = Sequence[tuple[str, fx.GraphModule]]
FORMATS = ("html", "svg", "dot")


def _snapshots(
    graphs: fx.GraphModule | Snapshots | None,
    diff: str | tuple[fx.GraphModule, fx.GraphModule] | None,
) -> tuple[list[tuple[str, fx.GraphModule]], int, bool]:
    """The (label, graph) list, the index of the graph to show, and whether to mark its diff."""
    if isinstance(diff, tuple):
        if graphs is not None:
            raise ValueError("with diff=(before, after) pass None as the graph: the pair is what is drawn")
        before, after = diff
        return [("before", before), ("after", after)], 1, True
    if graphs is None:
        raise ValueError("nothing to render: pass a GraphModule, a list of (label, GraphModule), or diff=(a, b)")
    if isinstance(graphs, fx.GraphModule):
        if diff is not None:
            raise ValueError(f"diff={diff!r} names a pass, so it needs a pass-by-pass list of (label, GraphModule)")
        return [(type(graphs).__name__, graphs)], 0, False
    snapshots = list(graphs)
    if not snapshots or not all(
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], fx.GraphModule) for item in snapshots
    ):
        raise TypeError("snapshots must be a non-empty sequence of (label, GraphModule) pairs")
    if diff is None:
        return snapshots, len(snapshots) - 1, False
    labels = [label for label, _ in snapshots]
    if diff not in labels:
        raise ValueError(f"diff={diff!r} is not one of the passes: {labels}")
    index = labels.index(diff)
    if index == 0:
        raise ValueError(f"diff={diff!r} is the first snapshot: there is no graph before it to compare with")
    return snapshots, index, True


def _model_name(graphs: list[fx.GraphModule]) -> str:
    """The traced model's class name, which ``trace`` gives the GraphModule class and copies lose."""
    return next((type(gm).__name__ for gm in graphs if type(gm).__name__ != "GraphModule"), "GraphModule")


def render(
    graphs: fx.GraphModule | Snapshots | None,
    out_path: str | Path,
    fmt: str | None = None,
    heat: bool = False,
    diff: str | tuple[fx.GraphModule, fx.GraphModule] | None = None,
    title: str | None = None,
) -> Path:
    """Draw ``graphs`` to ``out_path`` and return the path.

    ``graphs`` is a GraphModule, or a pass-by-pass dump ``[(label, gm), ...]``: the HTML page then has a
    selector for the graph after each pass, and the SVG/DOT show the last one. ``diff="FuseBN"`` opens on
    (or draws) the graph after that pass with what it added, removed and changed marked;
    ``diff=(before, after)`` with ``graphs=None`` does the same for two graphs. ``fmt`` is ``"html"``,
    ``"svg"`` or ``"dot"``, by default taken from the extension. ``heat`` fills nodes by
    ``meta['sqnr_db']`` instead of by quantization state.
    """
    out = Path(out_path)
    fmt = (fmt or out.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"cannot tell the format from {out.name!r}: pass fmt= one of {FORMATS} or use that extension")
    snapshots, index, show_diff = _snapshots(graphs, diff)
    title = title or _model_name([gm for _, gm in snapshots])
    if fmt == "html":
        specs = [build_spec(gm, label=label, heat=heat, before=snapshots[i - 1][1] if i else None)
                 for i, (label, gm) in enumerate(snapshots)]
        text = html_page(specs, title=title, initial=index, show_diff=show_diff, heat=heat)
    else:
        label, gm = snapshots[index]
        before = snapshots[index - 1][1] if show_diff else None
        spec = build_spec(gm, label=label, heat=heat, before=before)
        heading = f"{title}: after {label}" if len(snapshots) > 1 else title
        dot = assemble_dot(spec, show_diff=show_diff, title=heading, heat=heat)
        text = dot if fmt == "dot" else dot_to_svg(dot)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
