"""Deployment targets: each lowers qpasses' reference quantized graph to one runtime's int8 kernels.

The reference graph (``qpasses.passes.Reference``) holds float ops between explicit
``torch.ops.quantized_decomposed`` quantize/dequantize ops, the dialect torchao's ``convert_pt2e`` emits. Each
target module here turns it into that runtime's artifact and checks that the runtime's int8 kernels really
run (generated code, delegated partitions or executed node types), failing loudly where it fell back to float.

``deploy(model, target, example_inputs, out)`` dispatches on ``TARGETS``, one ``Target`` record per runtime:
the module that implements it (its ``deploy(reference, example_inputs, out) -> Deployed`` does the work), the
backend-table preset whose grids that runtime's kernels run exactly (``qpasses.quant.backends``), and the pip
extra that installs the runtime. Targets import their runtime lazily; a target module may define
``missing_runtime() -> str | None`` (why this machine cannot deploy to it, None where it can) and ``OUT_SUFFIX``
(its artifact's file suffix), which the CLI checks before quantizing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qpasses.errors import InputError


@dataclass(frozen=True)
class Target:
    """One deployment target: ``module`` implements it, ``backend`` names the preset to quantize for it,
    ``extra`` is the ``pip install qpasses[extra]`` that brings its runtime."""

    name: str
    module: str
    backend: str
    extra: str


TARGETS: dict[str, Target] = {
    "inductor": Target("inductor", "qpasses.lower.inductor", backend="inductor", extra="inductor"),
    "onnx": Target("onnx", "qpasses.lower.onnx", backend="onnx", extra="onnx"),
    "openvino": Target("openvino", "qpasses.lower.openvino", backend="openvino", extra="openvino"),
    "xnnpack": Target("xnnpack", "qpasses.lower.xnnpack", backend="xnnpack", extra="executorch"),
}


@dataclass
class Deployed:
    """A deployed model: ``run(*inputs)`` calls the runtime; ``artifact`` is the file written (None where the
    target keeps it in memory); ``int8_kernels`` names the runtime's int8 kernels found in it, with how many."""

    target: str
    run: Callable[..., Any]
    artifact: Path | None
    int8_kernels: dict[str, int] = field(default_factory=dict)

    def __call__(self, *inputs: Any) -> Any:
        return self.run(*inputs)


def deploy(model: nn.Module, target: str, example_inputs: Any, out: str | Path | None = None) -> Deployed:
    """Lower ``model`` (a qpasses reference graph, or a ``convert_pt2e`` one) to ``target``'s int8 kernels."""
    if target not in TARGETS:
        raise InputError(f"unknown deployment target {target!r}; choose one of {', '.join(sorted(TARGETS))}")
    module = importlib.import_module(TARGETS[target].module)
    return module.deploy(model, example_inputs, None if out is None else Path(out))
