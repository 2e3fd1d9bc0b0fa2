"""``qpasses.viz.render``: the public entry point of the visualiser, with heat from ``node_sqnr``."""

import builtins
import copy

import pytest
import torch

from qpasses import trace
from qpasses.analysis.node_sqnr import node_sqnr
from qpasses.viz import VisualiserUnavailable, render
from tests.nets import TinyUNet
from tools.viz.dot import heat_color


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


def test_missing_visualiser_is_a_one_line_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tools(name, *args, **kwargs):
        if name == "tools.viz" or name.startswith("tools.viz."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tools)
    with pytest.raises(VisualiserUnavailable, match=r"pip install 'qpasses\[viz\]'") as info:
        render(trace(TinyUNet().eval(), torch.randn(1, 3, 8, 8)), tmp_path / "g.html")
    assert "\n" not in str(info.value)
