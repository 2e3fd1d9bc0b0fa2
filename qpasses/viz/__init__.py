"""The graph visualiser: fx graphs (and pass-by-pass dumps of them) as HTML, SVG or Graphviz DOT.

It reads the metadata that the passes write on nodes:

- ``meta['tensor_meta']`` (torch.fx ShapeProp): output shape and dtype, and whether it is quantized;
- ``meta['qstate']``: ``"float"`` (default), ``"observed"``, ``"fake_quant"``, ``"int8"`` or
  ``"int8_float_output"`` (an int8 linear writing the model's output in float); without it, a
  call to a ``torch.ao.nn.quantized`` module or a quantized output counts as int8, an ``*Observer``
  module as observed and a ``*FakeQuantize`` module as fake-quant;
- ``meta['qparams']``: ``scale`` and ``zero_point`` (numbers, or per-channel lists/tensors), ``dtype``,
  ``bits``, optionally ``axis``;
- ``meta['sqnr_db']``: shown on the node, and its fill with ``heat=True``.

``render`` is the public entry point; ``heat=True`` colours nodes by ``meta['sqnr_db']``, which
:func:`qpasses.analysis.node_sqnr.node_sqnr` writes. HTML and DOT need nothing beyond qpasses; SVG needs
Graphviz's layout engine (the ``viz`` extra), and its absence is a one-line ``VisualiserUnavailable``.

Layout is Graphviz ``dot`` throughout: for SVG through pygraphviz or the ``dot`` program, in the HTML page
through a vendored WebAssembly build, so that page can collapse and expand modules offline.
"""

from qpasses.viz.diff import GraphDiff, diff_graphs
from qpasses.viz.dot import to_dot
from qpasses.viz.layout import LayoutEngineMissing
from qpasses.viz.render import render

VisualiserUnavailable = LayoutEngineMissing

__all__ = ["GraphDiff", "LayoutEngineMissing", "VisualiserUnavailable", "diff_graphs", "render", "to_dot"]
