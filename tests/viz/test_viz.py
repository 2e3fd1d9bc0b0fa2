"""The graph visualiser: DOT content, SVG/HTML files, diffs, and the HTML page in a real browser."""

from __future__ import annotations

import copy
import html
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

from qpasses.graph import propagate_shapes, trace
from qpasses.viz import LayoutEngineMissing, diff_graphs, render, to_dot
from qpasses.viz.dot import DIFF_COLOR, NO_SQNR_FILL, QSTATE_FILL, heat_color
from qpasses.viz.layout import dot_to_svg
from qpasses.viz.page import _inline_script
from tests.viz.chromium import Browser, find_chromium


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Block()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.stem(x)) + 1


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


@pytest.fixture
def tiny() -> fx.GraphModule:
    """The traced Tiny net with the metadata the quantization passes write, set by hand."""
    gm = trace(Tiny().eval(), torch.randn(1, 3, 8, 8))
    _node(gm, "stem_conv").meta.update(
        qstate="int8", sqnr_db=31.5,
        qparams={"scale": torch.tensor([0.01, 0.02, 0.03, 0.04]), "zero_point": [0, 0, 0, 0],
                 "dtype": torch.qint8, "bits": 8, "axis": 0},
    )
    _node(gm, "stem_relu").meta.update(
        qstate="observed", qparams={"scale": 0.05, "zero_point": 3, "dtype": torch.quint8, "bits": 8})
    _node(gm, "head").meta["qstate"] = "fake_quant"
    _node(gm, "add").meta["sqnr_db"] = 12.0
    return gm


def fold_bn_by_hand(before: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``before`` with ``stem_bn`` removed, a ``mul`` added after the conv and ``stem_relu`` re-wired."""
    after = copy.deepcopy(before)
    graph = after.graph
    conv, bn, relu = _node(after, "stem_conv"), _node(after, "stem_bn"), _node(after, "stem_relu")
    with graph.inserting_after(conv):
        scale = graph.call_function(torch.mul, (conv, 2.0))
    relu.args = (scale,)
    graph.erase_node(bn)
    after.recompile()
    propagate_shapes(after, (torch.randn(1, 3, 8, 8),))
    return after


def node_attrs(dot: str) -> dict[str, str]:
    """Node name → its attribute list, for every node statement of a DOT text."""
    return dict(re.findall(r'^\s*"([^"]+)" \[(.*)\];$', dot, flags=re.MULTILINE))


def fill_of(attrs: str) -> str:
    return re.findall(r'fillcolor="(#[0-9a-f]{6})"', attrs)[-1]


def test_dot_nodes_show_op_target_shape_qparams_and_state_colours(tiny):
    nodes = node_attrs(to_dot(tiny, title="tiny"))

    assert set(nodes) == {"x", "stem_conv", "stem_bn", "stem_relu", "head", "add", "output"}
    conv = nodes["stem_conv"]
    assert "call_module · Conv2d · int8" in conv
    assert "1×4×8×8 float32" in conv
    assert "qint8 8b · 4 ch (axis 0) · scale 0.01 / 0.025 / 0.04 (min/med/max) · zp 0" in conv
    assert "SQNR 31.5 dB" in conv
    assert "quint8 8b · scale 0.05 · zp 3" in nodes["stem_relu"]
    assert "call_function · add" in nodes["add"]
    assert "input" in nodes["x"] and "shape=oval" in nodes["x"]
    expected_fills = {"stem_conv": "int8", "stem_relu": "observed", "head": "fake_quant", "stem_bn": "float"}
    for name, state in expected_fills.items():
        assert fill_of(nodes[name]) == QSTATE_FILL[state], name
        assert f'class="qnode {state}"' in nodes[name]


def test_dot_legend_names_every_state(tiny):
    dot = to_dot(tiny, title="tiny")
    legend = re.search(r"^label=(<.*>) labelloc=t;$", dot, flags=re.MULTILINE).group(1)
    for state, text in (("float", "float"), ("observed", "observed"), ("fake_quant", "fake-quant"),
                        ("int8", "int8")):
        assert f'BGCOLOR="{QSTATE_FILL[state]}"' in legend and text in legend


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor.*deprecated:UserWarning")
def test_qstate_inferred_from_observer_fakequant_and_quantized_modules():
    from torch.ao.nn.quantized import Quantize
    from torch.ao.quantization import FakeQuantize, MinMaxObserver

    root = nn.Module()
    root.obs = MinMaxObserver()
    root.fq = FakeQuantize()
    root.quant = Quantize(scale=0.1, zero_point=2, dtype=torch.quint8)
    graph = fx.Graph()
    x = graph.placeholder("x")
    observed = graph.call_module("obs", (x,))
    fake = graph.call_module("fq", (observed,))
    quantized = graph.call_module("quant", (fake,))
    graph.output(graph.call_method("dequantize", (quantized,)))
    gm = fx.GraphModule(root, graph)
    propagate_shapes(gm, (torch.randn(2, 3),))

    nodes = node_attrs(to_dot(gm))
    assert fill_of(nodes["obs"]) == QSTATE_FILL["observed"]
    assert fill_of(nodes["fq"]) == QSTATE_FILL["fake_quant"]
    assert fill_of(nodes["quant"]) == QSTATE_FILL["int8"]
    # No meta['qparams'] here: the scale and zero point come from the quantized output's tensor_meta.
    assert "scale 0.1 · zp 2" in nodes["quant"] and "2×3 quint8" in nodes["quant"]
    assert fill_of(nodes["dequantize"]) == QSTATE_FILL["float"]


def test_heat_fills_by_sqnr(tiny):
    nodes = node_attrs(to_dot(tiny, heat=True))

    assert fill_of(nodes["stem_conv"]) == heat_color(31.5)
    assert fill_of(nodes["add"]) == heat_color(12.0)
    assert fill_of(nodes["stem_relu"]) == NO_SQNR_FILL
    assert heat_color(-5) == heat_color(0) == "#d73027"
    assert heat_color(80) == heat_color(50) == "#1a9850"


def test_diff_finds_added_removed_changed(tiny):
    after = fold_bn_by_hand(tiny)
    diff = diff_graphs(tiny, after)
    assert (diff.added, diff.removed, diff.changed) == ({"mul"}, {"stem_bn"}, {"stem_relu"})

    swapped = copy.deepcopy(tiny)
    swapped.stem.relu = nn.ReLU6()
    assert diff_graphs(tiny, swapped).changed == {"stem_relu"}


def test_diff_dot_marks_nodes_and_keeps_removed_as_ghosts(tiny):
    dot = to_dot(fold_bn_by_hand(tiny), before=tiny)
    nodes = node_attrs(dot)

    assert f'color="{DIFF_COLOR["added"]}" penwidth=3' in nodes["mul"] and "qnode float added" in nodes["mul"]
    assert f'color="{DIFF_COLOR["changed"]}"' in nodes["stem_relu"] and "changed" in nodes["stem_relu"]
    ghost = nodes["stem_bn"]
    assert f'color="{DIFF_COLOR["removed"]}"' in ghost and 'style="dashed' in ghost and "removed" in ghost
    assert "penwidth" not in nodes["stem_conv"]
    assert re.search(r'"stem_conv" -> "stem_bn" \[style=dashed', dot)
    assert re.search(r'"stem_bn" -> "stem_relu" \[style=dashed', dot)
    assert '"stem_conv" -> "mul";' in dot


def test_clusters_follow_module_paths(resnet18):
    dot = to_dot(resnet18)

    start = dot.index('subgraph "cluster_layer1.0" {')
    assert dot.index('subgraph "cluster_layer1" {') < start
    assert 'label="layer1.0 · BasicBlock"' in dot[start:]
    # ``add`` is a function call inside BasicBlock.forward: it belongs to layer1.0, not to the top level.
    assert start < dot.index('"add" [') < dot.index('subgraph "cluster_layer1.1" {')
    assert dot.index('"conv1" [') < dot.index('subgraph "cluster_layer1" {')


@pytest.fixture(scope="module")
def resnet18() -> fx.GraphModule:
    torch.manual_seed(0)
    return trace(torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32))


def bn_removed(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every BatchNorm call dropped, standing in for the FuseBN pass."""
    after = copy.deepcopy(gm)
    for node in list(after.graph.nodes):
        if node.op == "call_module" and isinstance(after.get_submodule(node.target), nn.BatchNorm2d):
            node.replace_all_uses_with(node.args[0])
            after.graph.erase_node(node)
    after.recompile()
    return after


def has_layout_engine() -> bool:
    try:
        import pygraphviz  # noqa: F401
    except ImportError:
        return shutil.which("dot") is not None
    return True


needs_layout_engine = pytest.mark.skipif(
    not has_layout_engine(), reason="no Graphviz layout engine: pip install 'pygraphviz>=2.0' or apt-get install graphviz")


def page_data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="qviz-data">(.*?)</script>', page).group(1))


def assert_self_contained(page: str) -> None:
    assert not re.search(r"""(?:src|href|action|poster)\s*=\s*["']?\s*(?:https?:)?//""", page, flags=re.I)
    assert not re.search(r"""url\(\s*["']?\s*(?:https?:)?//|@import|<link\b|<iframe\b""", page, flags=re.I)
    assert not re.search(r"<script[^>]*\ssrc=", page, flags=re.I)


@needs_layout_engine
def test_render_resnet18_svg(resnet18, tmp_path):
    # Graphviz writes "-" in ids as "&#45;"; the browser reads them back as "-".
    svg = html.unescape(render(resnet18, tmp_path / "r18.svg").read_text())

    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for name in ("conv1", "layer1_0_conv1", "layer4_1_conv2", "fc", "output"):
        assert f'id="n-{name}"' in svg
    assert 'id="c-layer4.1"' in svg and "ResNet" in svg


def test_render_resnet18_html_is_self_contained(resnet18, tmp_path):
    snapshots = [("traced", resnet18), ("FuseBN", bn_removed(resnet18))]
    page = render(snapshots, tmp_path / "r18.html").read_text()

    assert_self_contained(page)
    # Three script elements, each closed once: no inlined text ended one early.
    assert page.count("<script") == page.count("</script>") == 3
    data = page_data(page)
    assert [s["label"] for s in data["snapshots"]] == ["traced", "FuseBN"]
    assert data["initial"] == 1 and data["show_diff"] is False
    names = {n["name"] for n in data["snapshots"][1]["nodes"]}
    assert {"conv1", "layer4_1_conv2", "fc", "bn1"} <= names
    # 20 BatchNorms gone; their 17 consumers (the stem's relu, each block's relu and add) re-wired.
    assert data["snapshots"][1]["counts"] == {"added": 0, "removed": 20, "changed": 17}


@needs_layout_engine
def test_render_diff_of_two_graphs(tiny, tmp_path):
    after = fold_bn_by_hand(tiny)

    svg = html.unescape(render(None, tmp_path / "diff.svg", diff=(tiny, after)).read_text())
    assert re.search(r'<g id="n-stem_bn" class="node qnode float removed"', svg)
    assert re.search(r'<g id="n-mul" class="node qnode float added"', svg)
    assert DIFF_COLOR["removed"] in svg

    page = render(None, tmp_path / "diff.html", diff=(tiny, after)).read_text()
    assert_self_contained(page)
    data = page_data(page)
    assert data["initial"] == 1 and data["show_diff"] is True
    status = {n["name"]: n["diff"] for n in data["snapshots"][1]["nodes"]}
    assert (status["stem_bn"], status["mul"], status["stem_relu"], status["stem_conv"]) == (
        "removed", "added", "changed", None)


def test_render_picks_the_pass_and_format(tiny, tmp_path):
    after = fold_bn_by_hand(tiny)
    snapshots = [("traced", tiny), ("FuseBN", after)]

    last = render(snapshots, tmp_path / "last.dot").read_text()
    assert '"mul" [' in last and '"stem_bn" [' not in last and "penwidth=3" not in last
    marked = render(snapshots, tmp_path / "graph.txt", fmt="dot", diff="FuseBN").read_text()
    assert "Tiny: after FuseBN" in marked and '"stem_bn" [' in marked

    with pytest.raises(ValueError, match=r"not one of the passes: \['traced', 'FuseBN'\]"):
        render(snapshots, tmp_path / "x.dot", diff="Quantize")
    with pytest.raises(ValueError, match="first snapshot"):
        render(snapshots, tmp_path / "x.dot", diff="traced")
    with pytest.raises(ValueError, match="cannot tell the format"):
        render(tiny, tmp_path / "x.png")
    with pytest.raises(ValueError, match="pass None"):
        render(tiny, tmp_path / "x.dot", diff=(tiny, after))


def test_missing_layout_engine_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pygraphviz", None)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(LayoutEngineMissing, match=r"pip install 'qpasses\[viz\]'.*apt-get install graphviz") as info:
        dot_to_svg("digraph { a }")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(shutil.which("dot") is None, reason="no `dot` program (Debian: apt-get install graphviz)")
def test_dot_program_is_the_fallback_engine(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "pygraphviz", None)
    svg = html.unescape(dot_to_svg(to_dot(tiny)))
    assert 'id="n-stem_conv"' in svg and 'id="c-stem"' in svg


def test_inlined_script_cannot_close_its_element():
    with pytest.raises(ValueError, match="cannot be inlined"):
        _inline_script("const s = '</script>';")


# --- the page in a real browser -------------------------------------------------------------------------

CHROMIUM = find_chromium()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium not installed (Debian: apt-get install chromium; `make chromium`)")
    with Browser(CHROMIUM) as instance:
        yield instance


def shown(browser: Browser, element_id: str) -> bool:
    return browser.evaluate(f"document.getElementById({json.dumps(element_id)}) !== null")


def classes(browser: Browser, element_id: str) -> list[str]:
    return browser.evaluate(f"[...document.getElementById({json.dumps(element_id)}).classList]")


def open_page(browser: Browser, path: Path) -> None:
    browser.events.clear()
    browser.open(path)
    browser.wait_for("document.body.dataset.ready === '1'")


def render_count(browser: Browser) -> int:
    return int(browser.evaluate("document.body.dataset.renders"))


def test_html_page_in_chromium(browser, resnet18, tmp_path):
    snapshots = [("traced", resnet18), ("FuseBN", bn_removed(resnet18))]
    page = render(snapshots, tmp_path / "r18.html", diff="FuseBN")
    open_page(browser, page)

    for name in ("x", "conv1", "layer1_0_conv1", "add", "layer4_1_conv2", "fc", "output"):
        assert shown(browser, f"n-{name}"), name
    # All 71 nodes: the 51 left after the pass and the 20 removed BatchNorms as ghosts.
    assert browser.evaluate("document.querySelectorAll('#canvas g.qnode').length") == 71
    assert "removed" in classes(browser, "n-layer1_0_bn1")
    assert "changed" in classes(browser, "n-layer1_0_relu")

    # Collapse a module by clicking its box, expand it by clicking the collapsed block.
    renders = render_count(browser)
    browser.evaluate("document.getElementById('c-layer1').dispatchEvent(new MouseEvent('click'))")
    browser.wait_for(f"Number(document.body.dataset.renders) > {renders}")
    assert shown(browser, "p-layer1") and not shown(browser, "n-layer1_0_conv1")
    browser.evaluate("document.getElementById('p-layer1').dispatchEvent(new MouseEvent('click'))")
    browser.wait_for("document.getElementById('n-layer1_0_conv1')")

    # Search: Enter jumps to the match and shows its details.
    browser.evaluate("const s = document.getElementById('search'); s.value = 'layer3_1_conv2';"
                     "s.dispatchEvent(new Event('input'));"
                     "s.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}))")
    assert "current" in classes(browser, "n-layer3_1_conv2")
    assert browser.evaluate("document.querySelector('#details h3').textContent") == "layer3_1_conv2"

    # The selector switches to the graph after another pass.
    browser.evaluate("const p = document.getElementById('pass'); p.value = '0';"
                     "p.dispatchEvent(new Event('change'))")
    assert "removed" not in classes(browser, "n-layer1_0_bn1")
    assert browser.evaluate("document.getElementById('show-diff').disabled") is True

    assert browser.console_errors() == []
    assert all(url.startswith(("file:", "data:", "blob:")) for url in browser.requested_urls())


def test_big_graph_opens_with_blocks_collapsed(browser, resnet18, tmp_path, monkeypatch):
    monkeypatch.setattr("qpasses.viz.page.EXPAND_LIMIT", 30)
    open_page(browser, render(resnet18, tmp_path / "big.html"))

    assert shown(browser, "c-layer2") and shown(browser, "p-layer2.0") and not shown(browser, "n-layer2_0_conv1")
    assert shown(browser, "n-conv1") and shown(browser, "n-fc")
    browser.evaluate("document.getElementById('expand-all').click()")
    browser.wait_for("document.getElementById('n-layer2_0_conv1')")
    assert browser.console_errors() == []
