"""Graphviz DOT for an fx graph: one styled node per fx node, clusters by module path, diff marks.

The graph is first turned into a *spec*, a JSON-able description whose DOT fragments are final; both
:func:`assemble_dot` here and the HTML viewer (which also collapses clusters) only put fragments
together, so every styling decision lives in this module.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch.fx as fx

from qpasses.viz.describe import QSTATES, NodeView, describe
from qpasses.viz.diff import ADDED, CHANGED, REMOVED, diff_graphs

FONT = "Helvetica"  # one of the fonts whose metrics Graphviz knows without a font library

QSTATE_FILL = {"float": "#ffffff", "observed": "#cfe2ff", "fake_quant": "#e4d7fb", "int8": "#b9e6dc",
               "int8_float_output": "#e3f5f0"}
QSTATE_TEXT = {"float": "float", "observed": "observed", "fake_quant": "fake-quant", "int8": "int8",
               "int8_float_output": "int8 → float output"}
NO_SQNR_FILL = "#eceff1"
DIFF_COLOR = {ADDED: "#1e8e3e", REMOVED: "#d93025", CHANGED: "#f29900"}

# Diff marks are borders so they combine with the fill, which tells the quantization state.
DIFF_ATTRS = {
    ADDED: f'color="{DIFF_COLOR[ADDED]}" penwidth=3',
    CHANGED: f'color="{DIFF_COLOR[CHANGED]}" penwidth=3',
    REMOVED: f'color="{DIFF_COLOR[REMOVED]}" penwidth=2 style="dashed,rounded,filled" fillcolor="#fbeceb"',
}
GHOST_EDGE_ATTRS = f'style=dashed color="{DIFF_COLOR[REMOVED]}"'

# SQNR (dB) → colour, interpolated: red where quantization destroys the signal, green where it is harmless.
HEAT_STOPS = ((0.0, (0xD7, 0x30, 0x27)), (10.0, (0xF4, 0x6D, 0x43)), (20.0, (0xFD, 0xAE, 0x61)),
              (30.0, (0xFE, 0xE0, 0x8B)), (40.0, (0xA6, 0xD9, 0x6A)), (50.0, (0x1A, 0x98, 0x50)))

GRAPH_HEAD = (
    f'graph [rankdir=TB fontname="{FONT}" fontsize=11 nodesep=0.25 ranksep=0.3 newrank=true];\n'
    f'node [shape=box style="rounded,filled" fontname="{FONT}" fontsize=10 color="#5f6368" '
    'margin="0.12,0.04"];\n'
    'edge [color="#80868b" arrowsize=0.6];'
)
CLUSTER_FILLS = ("#f8f9fa", "#f1f3f4", "#e8eaed")
PROXY_MIXED_FILL = "#f1f3f4"


def heat_color(sqnr_db: float) -> str:
    """The heat colour of an SQNR value, clamped to the 0–50 dB scale."""
    x = min(max(sqnr_db, HEAT_STOPS[0][0]), HEAT_STOPS[-1][0])
    upper = next(i for i, (stop, _) in enumerate(HEAT_STOPS) if i > 0 and x <= stop)
    (x0, c0), (x1, c1) = HEAT_STOPS[upper - 1], HEAT_STOPS[upper]
    t = (x - x0) / (x1 - x0)
    return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(c0, c1, strict=True))


def escape_html(text: str) -> str:
    """Text for a Graphviz HTML-like label (and for HTML)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def quote(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node_label(view: NodeView, ghost: bool) -> str:
    detail_color = "#9aa0a6" if ghost else "#3c4043"
    name_color = ' COLOR="#9aa0a6"' if ghost else ""
    kind = {"placeholder": "input", "output": "output"}.get(view.op, f"{view.op} · {view.kind}")
    if view.qstate != "float":
        kind += f" · {QSTATE_TEXT[view.qstate]}"
    lines = [f'<FONT POINT-SIZE="11"{name_color}><B>{escape_html(view.name)}</B></FONT>',
             f'<FONT POINT-SIZE="9" COLOR="{detail_color}">{escape_html(kind)}</FONT>']
    for extra in (view.output, view.qparams,
                  f"SQNR {view.sqnr_db:.1f} dB" if view.sqnr_db is not None else None):
        if extra:
            lines.append(f'<FONT POINT-SIZE="9" COLOR="{detail_color}">{escape_html(extra)}</FONT>')
    # Rows of a borderless table rather than <BR/> lines: the cell padding keeps a line's descenders off
    # the next line when the browser's sans-serif is taller than the Helvetica metrics used for layout.
    rows = "".join(f"<TR><TD>{line}</TD></TR>" for line in lines)
    return f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">{rows}</TABLE>>'


def _fill(view: NodeView, heat: bool) -> str:
    if not heat:
        return QSTATE_FILL[view.qstate]
    return heat_color(view.sqnr_db) if view.sqnr_db is not None else NO_SQNR_FILL


_SHAPES = {"placeholder": "oval", "output": "oval", "get_attr": "note"}


def _node_spec(view: NodeView, heat: bool, status: str | None) -> dict[str, Any]:
    shape = _SHAPES.get(view.op)
    attrs = f"id={quote('n-' + view.name)} label={_node_label(view, status == REMOVED)}"
    if shape:
        attrs += f' shape={shape} style="filled"'
    return {
        "name": view.name,
        "cluster": view.module_path,
        "attrs": attrs,
        "classes": f"qnode {view.qstate}",
        "fill": _fill(view, heat),
        "diff": status,
        "details": [list(item) for item in view.details],
    }


def _cluster_paths(module_path: str) -> list[str]:
    parts = module_path.split(".") if module_path else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _module_classes(graphs: list[fx.GraphModule]) -> dict[str, str]:
    """Module path → class name, from what tracing recorded; the GraphModule's own submodules are no help
    here, since fx rebuilds the containers it copies (``layer1.0`` comes back as a plain ``Module``)."""
    classes: dict[str, str] = {}
    for gm in reversed(graphs):  # the first graph wins
        for node in gm.graph.nodes:
            for path, cls in node.meta.get("nn_module_stack", {}).values():
                classes[str(path)] = getattr(cls, "__name__", str(cls).rpartition(".")[2])
    return classes


def _clusters(nodes: list[dict[str, Any]], graphs: list[fx.GraphModule]) -> list[dict[str, Any]]:
    """Clusters for module paths holding two or more nodes, parents first; re-points nodes at their cluster.

    A module holding a single node (``fc`` inside ``head``) gets no box: it would only add a frame.
    """
    subtree_size: Counter[str] = Counter()
    for node in nodes:
        for path in _cluster_paths(node["cluster"]):
            subtree_size[path] += 1
    kept = [path for path in subtree_size if subtree_size[path] >= 2]
    kept_set = set(kept)
    for node in nodes:
        node["cluster"] = next((p for p in reversed(_cluster_paths(node["cluster"])) if p in kept_set), "")
    module_classes = _module_classes(graphs)
    clusters = []
    for path in sorted(kept, key=lambda p: (p.count("."), kept.index(p))):
        parent = next((p for p in reversed(_cluster_paths(path)[:-1]) if p in kept_set), "")
        depth = path.count(".") + 1
        module_class = module_classes.get(path)
        title = f"{path} · {module_class}" if module_class else path
        size = sum(1 for node in nodes if node["diff"] != REMOVED
                   and (node["cluster"] == path or node["cluster"].startswith(path + ".")))
        clusters.append({
            "path": path,
            "parent": parent,
            "depth": depth,
            "attrs": (f"id={quote('c-' + path)} class=\"qcluster\" label={quote(title)} labeljust=l "
                      f'style="rounded,filled" color="#bdc1c6" fillcolor="{CLUSTER_FILLS[(depth - 1) % 3]}" '
                      'fontsize=10 fontcolor="#5f6368"'),
            "proxy_attrs": (f"id={quote('p-' + path)} shape=box3d style=filled "
                            f'label=<<FONT POINT-SIZE="11"><B>{escape_html(path)}</B></FONT><BR/>'
                            f'<FONT POINT-SIZE="9" COLOR="#3c4043">'
                            f"{escape_html(module_class or 'module')} · {size} nodes · collapsed</FONT>>"),
        })
    return clusters


def build_spec(gm: fx.GraphModule, *, label: str, heat: bool = False,
               before: fx.GraphModule | None = None) -> dict[str, Any]:
    """The JSON-able spec of ``gm``; with ``before``, nodes carry diff marks and removed nodes come back as ghosts."""
    diff = diff_graphs(before, gm) if before is not None else None
    nodes = [_node_spec(describe(gm, node), heat, diff.status(node.name) if diff else None)
             for node in gm.graph.nodes]
    edges = [[src.name, node.name] for node in gm.graph.nodes for src in node.all_input_nodes]
    if diff is not None and before is not None:
        ghosts = [node for node in before.graph.nodes if node.name in diff.removed]
        nodes.extend(_node_spec(describe(before, node), heat, REMOVED) for node in ghosts)
        shown = {node["name"] for node in nodes}
        edges.extend([src.name, node.name] for node in before.graph.nodes for src in node.all_input_nodes
                     if (src.name in diff.removed or node.name in diff.removed)
                     and src.name in shown and node.name in shown)
    return {
        "label": label,
        "nodes": nodes,
        "edges": edges,
        "clusters": _clusters(nodes, [gm] + ([before] if before is not None else [])),
        "has_diff": diff is not None,
        "counts": {status: sum(1 for n in nodes if n["diff"] == status) for status in (ADDED, REMOVED, CHANGED)},
    }


def node_statement(node: dict[str, Any], show_diff: bool) -> str:
    status = node["diff"] if show_diff else None
    classes = node["classes"] + (f" {status}" if status else "")
    diff_attrs = f" {DIFF_ATTRS[status]}" if status else ""
    return f'{quote(node["name"])} [{node["attrs"]} class={quote(classes)} fillcolor="{node["fill"]}"{diff_attrs}];'


def graph_label(title: str, heat: bool, show_diff: bool) -> str:
    """The graph's label: the title over a one-row legend of the fills (or the heat scale) and diff borders."""
    entries = []
    if heat:
        entries.extend((f'BGCOLOR="{heat_color(db)}"', f"{db:.0f} dB") for db, _ in HEAT_STOPS)
        entries.append((f'BGCOLOR="{NO_SQNR_FILL}"', "no SQNR"))
    else:
        entries.extend((f'BGCOLOR="{QSTATE_FILL[state]}"', QSTATE_TEXT[state]) for state in QSTATES)
    if show_diff:
        entries.extend((f'BGCOLOR="#ffffff" COLOR="{DIFF_COLOR[status]}"', status)
                       for status in (ADDED, REMOVED, CHANGED))
    cells = "".join(f'<TD {swatch} BORDER="2" WIDTH="22" HEIGHT="14"> </TD>'
                    f'<TD ALIGN="LEFT"><FONT POINT-SIZE="10">{escape_html(text)}</FONT></TD>'
                    for swatch, text in entries)
    return (f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="3"><TR><TD COLSPAN="{2 * len(entries)}">'
            f'<FONT POINT-SIZE="16">{escape_html(title)}</FONT></TD></TR><TR>{cells}</TR></TABLE>>')


def assemble_dot(spec: dict[str, Any], *, show_diff: bool, title: str | None = None, heat: bool = False) -> str:
    """The DOT text of a spec with every cluster expanded (the HTML viewer's JS mirrors this, plus collapsing).

    With a ``title`` the graph is labelled with it and a legend, for a drawing that stands alone.
    """
    nodes = [n for n in spec["nodes"] if show_diff or n["diff"] != REMOVED]
    ghosts = {n["name"] for n in spec["nodes"] if n["diff"] == REMOVED}
    by_cluster: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        by_cluster.setdefault(node["cluster"], []).append(node)
    children: dict[str, list[dict[str, Any]]] = {}
    for cluster in spec["clusters"]:
        children.setdefault(cluster["parent"], []).append(cluster)

    def has_nodes(path: str) -> bool:
        return bool(by_cluster.get(path)) or any(has_nodes(c["path"]) for c in children.get(path, []))

    lines = ["digraph qpasses {", GRAPH_HEAD]
    if title:
        lines.append(f"label={graph_label(title, heat, show_diff)} labelloc=t;")

    def emit(path: str, indent: str) -> None:
        lines.extend(indent + node_statement(node, show_diff) for node in by_cluster.get(path, []))
        for cluster in children.get(path, []):
            if not has_nodes(cluster["path"]):
                continue
            lines.append(f'{indent}subgraph {quote("cluster_" + cluster["path"])} {{')
            lines.append(f'{indent}  graph [{cluster["attrs"]}];')
            emit(cluster["path"], indent + "  ")
            lines.append(indent + "}")

    emit("", "  ")
    shown = {n["name"] for n in nodes}
    for src, dst in spec["edges"]:
        if src in shown and dst in shown:
            ghost = src in ghosts or dst in ghosts
            lines.append(f"  {quote(src)} -> {quote(dst)}" + (f" [{GHOST_EDGE_ATTRS}];" if ghost else ";"))
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_dot(gm: fx.GraphModule, *, heat: bool = False, before: fx.GraphModule | None = None,
           title: str | None = None) -> str:
    """Graphviz DOT of ``gm``: nodes styled by quantization state (or SQNR heat), clusters by module path.

    With ``before``, nodes added since ``before`` are marked green, changed ones amber, and removed ones
    come back as dashed red ghosts.
    """
    title = title or type(gm).__name__
    spec = build_spec(gm, label=title, heat=heat, before=before)
    return assemble_dot(spec, show_diff=before is not None, title=title, heat=heat)
