"""The self-contained HTML viewer: one file with the graphs' specs, the viewer script and Graphviz inside.

Nothing is loaded from the network: the CSS, the viewer's JS and Viz.js (Graphviz compiled to
WebAssembly, the module embedded in the script) are inlined, so the page works offline and as an email
attachment.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from qpasses.viz.describe import QSTATES
from qpasses.viz.diff import ADDED, CHANGED, REMOVED
from qpasses.viz.dot import (
    DIFF_ATTRS,
    DIFF_COLOR,
    GHOST_EDGE_ATTRS,
    GRAPH_HEAD,
    HEAT_STOPS,
    NO_SQNR_FILL,
    PROXY_MIXED_FILL,
    QSTATE_FILL,
    QSTATE_TEXT,
    escape_html,
    heat_color,
)

# Above this many nodes a graph opens with its blocks collapsed (ResNet-18 has 71, ResNet-50 about 175).
EXPAND_LIMIT = 120


def _asset(name: str) -> str:
    return resources.files("qpasses.viz").joinpath(name).read_text(encoding="utf-8")


def _inline_script(code: str) -> str:
    """JS to put inside ``<script>``: it must not contain what would end or re-mode the element early."""
    lowered = code.lower()
    if "</script" in lowered or "<!--" in lowered:
        raise ValueError("script text contains '</script' or '<!--' and cannot be inlined")
    return code


def _inline_json(data: Any) -> str:
    # "<" only occurs inside JSON strings, where \u003c means the same and cannot close the element.
    return json.dumps(data).replace("<", "\\u003c")


def _legend(heat: bool, with_diff: bool) -> str:
    items = []
    if heat:
        stops = ", ".join(f"{heat_color(db)} {100 * db / HEAT_STOPS[-1][0]:.0f}%" for db, _ in HEAT_STOPS)
        ticks = "".join(f"<span>{db:.0f}</span>" for db, _ in HEAT_STOPS)
        items.append(f'<li style="display:block"><div class="heat-bar" style="background:linear-gradient(to right, '
                     f'{stops})"></div><div class="heat-ticks">{ticks}</div>SQNR (dB)</li>')
        items.append(f'<li><span class="swatch" style="background:{NO_SQNR_FILL}"></span>no SQNR recorded</li>')
    else:
        items.extend(f'<li><span class="swatch" style="background:{QSTATE_FILL[state]}"></span>'
                     f"{QSTATE_TEXT[state]}</li>" for state in QSTATES)
    diff_items = "".join(
        f'<li><span class="swatch border{" ghost" if status == REMOVED else ""}" '
        f'style="border-color:{DIFF_COLOR[status]}"></span>{text}</li>'
        for status, text in ((ADDED, "added by the pass"), (REMOVED, "removed by the pass (ghost)"),
                             (CHANGED, "changed: op, target, module or args")))
    states = f'<h2>{"SQNR heat" if heat else "Quantization state"}</h2><ul class="legend">{"".join(items)}</ul>'
    changes = f'<h2>Changes vs previous pass</h2><ul class="legend">{diff_items}</ul>' if with_diff else ""
    modules = (
        '<h2>Modules</h2><ul class="legend"><li><span class="swatch proxy" style="background:#f1f3f4"></span>'
        "collapsed module</li></ul>"
        '<p class="hint">Click a module box to collapse it, a collapsed module to expand it, a node for its '
        "details. Search with <kbd>/</kbd>, <kbd>Enter</kbd> for the next match.</p>"
    )
    return states + changes + modules


def html_page(specs: list[dict[str, Any]], *, title: str, initial: int, show_diff: bool, heat: bool) -> str:
    """The page for the specs of a pass-by-pass dump (or a single graph), opened on ``specs[initial]``."""
    single = ' hidden' if len(specs) < 2 else ""
    data = {
        "snapshots": specs,
        "initial": initial,
        "show_diff": show_diff,
        "expand_limit": EXPAND_LIMIT,
        "graph_head": GRAPH_HEAD,
        "diff_attrs": DIFF_ATTRS,
        "ghost_edge_attrs": GHOST_EDGE_ATTRS,
        "proxy_mixed_fill": PROXY_MIXED_FILL,
    }
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape_html(title)}</title>
<style>
{_asset("viewer.css")}</style>
</head>
<body>
<header>
  <h1>{escape_html(title)}</h1>
  <label{single}>after pass <select id="pass"></select></label>
  <label{single}><input type="checkbox" id="show-diff"> show changes</label>
  <span class="group"><input type="search" id="search" placeholder="find node by name ( / )"
    aria-label="find node by name"><span id="search-count"></span></span>
  <span class="group"><button id="expand-all">expand all</button><button id="collapse-all">collapse all</button></span>
  <span class="group"><button id="zoom-out" aria-label="zoom out">−</button><span id="zoom-level">100%</span>
    <button id="zoom-in" aria-label="zoom in">+</button><button id="zoom-fit">fit</button></span>
  <span id="status"></span>
</header>
<aside>
{_legend(heat, with_diff=any(spec["has_diff"] for spec in specs))}
<h2>Node</h2>
<div id="details"><p class="hint">Click a node.</p></div>
</aside>
<main><div id="canvas">Laying out the graph…</div></main>
<script type="application/json" id="qviz-data">{_inline_json(data)}</script>
<script>{_inline_script(_asset("vendor/viz-global.js"))}</script>
<script>{_inline_script(_asset("viewer.js"))}</script>
</body>
</html>
"""
