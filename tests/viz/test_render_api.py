"""``qpasses.viz.render``: the public entry point of the visualiser, with heat from ``node_sqnr``."""

import copy
import shutil
import sys

import pytest
import torch

from qpasses import trace
from qpasses.analysis.node_sqnr import node_sqnr
from qpasses.viz import VisualiserUnavailable, render
from qpasses.viz.dot import heat_color
from tests.nets import TinyUNet


def test_renders_heat_from_node_sqnr(tmp_path):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    gm = trace(TinyUNet().eval(), x)
    noisy = copy.deepcopy(gm)
    with torch.no_grad():
        noisy.get_submodule("head").weight.mul_(1.1)
    db = node_sqnr(gm, noisy, x)["head"]
    dot = render(noisy, tmp_path / "g.dot", heat=True).read_text()
    assert f"SQNR {db:.1f} dB" in dot
    assert heat_color(db) in dot and heat_color(float("inf")) in dot
    html = render([("float", gm), ("noisy", noisy)], tmp_path / "g.html", heat=True).read_text()
    assert html.startswith("<!DOCTYPE html>") and f"SQNR {db:.1f} dB" in html


def test_svg_without_layout_engine_is_a_one_line_error_and_html_still_works(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pygraphviz", None)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    gm = trace(TinyUNet().eval(), torch.randn(1, 3, 8, 8))
    with pytest.raises(VisualiserUnavailable, match=r"pip install 'qpasses\[viz\]'") as info:
        render(gm, tmp_path / "g.svg")
    assert "\n" not in str(info.value) and not (tmp_path / "g.svg").exists()
    assert render(gm, tmp_path / "g.html").read_text().startswith("<!DOCTYPE html>")
