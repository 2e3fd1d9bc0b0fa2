"""Capture and graph helpers: tracing, the networkx view, pattern search."""

from qpasses.graph.match import any_of, find_chains, is_function, is_method, is_module
from qpasses.graph.nx import to_networkx
from qpasses.graph.trace import CaptureInfo, propagate_shapes, trace

__all__ = [
    "CaptureInfo",
    "any_of",
    "find_chains",
    "is_function",
    "is_method",
    "is_module",
    "propagate_shapes",
    "to_networkx",
    "trace",
]
