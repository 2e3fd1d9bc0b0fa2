"""The ``inductor`` target: the reference graph compiled by inductor with freezing into oneDNN's int8 kernels (x86).

How the int8 kernels come about (torch 2.14, torchao 0.18): with ``torch._inductor.config.freezing`` the weights
become constants and inductor's freezing passes rewrite each ``dequantize → conv/linear (→ relu/add) →
quantize`` pattern into one ``onednn.qconv_pointwise`` / ``qconv2d_pointwise.binary`` / ``qlinear_pointwise``
call on a prepacked int8 weight (pools and cats on int8 values into their int8 forms). torch 2.14 moved those
patterns to torchao; importing ``torchao.quantization.pt2e.quantizer.x86_inductor_quantizer`` registers them
(torchao's own registration, which users of its X86InductorQuantizer rely on too). Without freezing the rewrite
never runs and every conv runs in float on dequantized weights.

``deploy`` checks that the kernels really run: it counts those calls in the generated code (the Python wrapper
``torch.compile`` writes, the C++ wrapper inside the AOTInductor package) and raises ``DeployError`` unless every
conv and linear of the reference graph that reads a dequantized weight became one, naming the float kernels
found instead. One such fallback is by inductor's design: it computes a batch-1 linear with at most 16 inputs
and 16 outputs as a float loop (``torch._inductor.decomposition.addmm``). Per-tensor weights never match the
patterns, which take ``dequantize_per_channel`` weights only (the ``inductor`` preset quantizes per channel).
"""

from __future__ import annotations

import importlib
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.fx as fx
from torch import nn

from qpasses.errors import DeployError, InputError
from qpasses.lower import Deployed
from qpasses.validation import as_input_tuple, check_model, check_out_path

EXTRA = "pip install 'qpasses[inductor]'"
OUT_SUFFIX = ".pt2"  # AOTInductor packages; the CLI checks --out against it before quantizing
FUSION_PASSES = "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer"

_DEQUANTIZE = {
    torch.ops.quantized_decomposed.dequantize_per_tensor.default,
    torch.ops.quantized_decomposed.dequantize_per_tensor.tensor,
    torch.ops.quantized_decomposed.dequantize_per_channel.default,
}
# The int8 kernel calls in the generated code: ``torch.ops.onednn.qconv_pointwise.tensor(`` in the Python
# wrapper of torch.compile, ``aoti_torch_cpu__qconv_pointwise_tensor(`` in AOTInductor's C++ wrapper.
_INT8_CALL = re.compile(r"(?:torch\.ops\.onednn\.|aoti_torch_cpu__)(q(?:conv\w*?|linear)_pointwise)[._]?(\w*)\(")
# Float conv/linear kernels: extern calls (aten, mkldnn, mkl) and C++ loops inductor generated for a matmul.
_FLOAT_CALL = re.compile(
    r"\b((?:extern_kernels|torch\.ops\.(?:aten|mkldnn|mkl))\.\w*(?:conv|mm|linear)\w*"
    r"|aoti_torch_cpu_\w*(?:conv|mm|linear)\w*|cpp_fused\w*(?:conv|addmm|_mm_|bmm|linear)\w*)\("
)


def missing_runtime() -> str | None:
    """Why this machine cannot deploy to inductor (one line with the fix), or None where it can."""
    try:
        importlib.import_module(FUSION_PASSES)
    except ModuleNotFoundError as exc:
        return f"the inductor target needs torchao's int8 fusion passes (no module '{exc.name}'): {EXTRA}"
    if not torch.backends.mkldnn.is_available():
        return "the inductor target needs torch built with oneDNN (mkldnn), whose int8 kernels it runs"
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as exc:  # inductor's own probe; it raises its own error types when none is found
        return f"the inductor target compiles C++ and found no compiler ({type(exc).__name__}); install g++ or clang++"
    return None


@contextmanager
def freezing() -> Iterator[None]:
    """Inductor's freezing on for the compilations inside (config restored on exit), in inference mode: freezing
    applies to inference graphs only, and dynamo guards on the mode, so compiling and every later call in the same
    mode, whatever the caller's, keep to the one frozen graph (a call in another mode would recompile)."""
    with torch._inductor.config.patch(freezing=True), torch.inference_mode():
        yield


def quantized_compute(reference: fx.GraphModule) -> list[fx.Node]:
    """The convs and linears of ``reference`` that read a dequantized weight and input: the ones that must run
    on int8 kernels."""
    found = []
    for node in reference.graph.nodes:
        if node.op != "call_function" or len(node.args) < 2 or not _is_conv_or_linear(node):
            continue
        activation, weight = node.args[:2]
        if all(isinstance(a, fx.Node) and a.target in _DEQUANTIZE for a in (activation, weight)):
            found.append(node)
    return found


def _is_conv_or_linear(node: fx.Node) -> bool:
    """``F.conv2d``/``torch.conv2d``/``F.linear`` (qpasses' Reference) or ``aten.conv2d``/``aten.linear``
    (convert_pt2e), transposed and 1d/3d ones included."""
    name = str(node.target) if isinstance(node.target, torch._ops.OpOverload) else getattr(node.target, "__name__", "")
    return "conv" in name or "linear" in name


def int8_kernels(code: str) -> dict[str, int]:
    """How many calls of each oneDNN int8 kernel ``code`` (inductor's generated wrapper) makes."""
    counts: dict[str, int] = {}
    for op, overload in _INT8_CALL.findall(code):
        key = f"onednn.{op}" + (".binary" if "binary" in overload else "")
        counts[key] = counts.get(key, 0) + 1
    return counts


def check_int8(reference: fx.GraphModule, code: str, where: str) -> dict[str, int]:
    """``int8_kernels(code)``, after checking that every conv and linear of ``reference`` on dequantized weights
    became one of them (``DeployError`` naming the float kernels found instead)."""
    expected = quantized_compute(reference)
    kernels = int8_kernels(code)
    if sum(kernels.values()) >= len(expected):
        return kernels
    float_calls = sorted(set(_FLOAT_CALL.findall(code)))
    ran = ", ".join(f"{k} ×{n}" for k, n in sorted(kernels.items())) or "none"
    raise DeployError(
        f"inductor fell back to float ({where}): {sum(kernels.values())} of the {len(expected)} quantized "
        f"convs/linears ({', '.join(n.name for n in expected)}) run oneDNN int8 kernels ({ran}); float kernels in "
        f"their place: {', '.join(float_calls) or 'none found by name'}. Inductor computes batch-1 linears of at "
        "most 16 inputs and outputs as float loops, and matches per-channel weights only (dequantize_per_channel)"
    )


def deploy(reference: nn.Module, example_inputs: Any, out: Path | None = None) -> Deployed:
    """Compile ``reference`` (a reference quantized graph: qpasses' ``Reference``, ``PTQ(lower=False)``, or
    torchao's ``convert_pt2e``) to oneDNN's int8 kernels with inductor and freezing, for inputs shaped like
    ``example_inputs``; raise ``DeployError`` unless every quantized conv and linear runs on them.

    ``out`` None: ``torch.compile`` (compiled on this first call, whose generated code is checked); the result
    runs it under ``freezing()`` (inference mode: its outputs are inference tensors). ``out`` a ``.pt2`` file: an AOTInductor package of the exported graph,
    compiled with freezing; it loads with ``torch._inductor.aoti_load_package`` alone, without qpasses, and the
    result runs that loaded package (its C++ wrapper is what is checked). Both are specialized to the example's
    shapes. Both run the same kernels; the package calls them from C++, without dynamo's guard check and
    torch.compile's Python wrappers, which at batch 1 is the faster of the two (BENCHMARKS.md, inductor section).
    The reference graph is not modified.
    """
    reference = check_model(reference, "deploy to inductor")
    if not isinstance(reference, fx.GraphModule):
        raise InputError(f"deploy to inductor needs a reference quantized graph (an fx.GraphModule from "
                         f"qpasses' Reference / PTQ(lower=False), or convert_pt2e), got {type(reference).__name__}")
    if not quantized_compute(reference):
        raise InputError("deploy to inductor: the graph has no conv or linear reading dequantized weights and "
                         "inputs; pass the reference quantized graph (PTQ(..., lower=False)), not a float model")
    inputs = as_input_tuple(example_inputs)
    if out is not None:
        out = check_out_path(Path(out), flag="out")
        if out.suffix != OUT_SUFFIX:
            raise InputError(f"out {out}: an AOTInductor package is a {OUT_SUFFIX} file; name it "
                             f"{out.with_suffix(OUT_SUFFIX)}")
    reason = missing_runtime()
    if reason is not None:
        raise DeployError(reason)
    if out is None:
        return _compiled(reference, inputs)
    return _packaged(reference, inputs, out)


def _compiled(reference: fx.GraphModule, inputs: tuple) -> Deployed:
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(reference, fullgraph=True, dynamic=False)
    with freezing():
        _, code = run_and_get_code(compiled, *inputs)
    kernels = check_int8(reference, "\n".join(code), "torch.compile")

    def run(*args: Any) -> Any:
        with freezing():  # a recompilation (new shapes) must freeze too, or it runs float
            return compiled(*args)

    return Deployed("inductor", run, None, kernels)


def _packaged(reference: fx.GraphModule, inputs: tuple, out: Path) -> Deployed:
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    with torch.no_grad():  # export and AOTInductor trace in their own modes
        program = torch.export.export(reference, inputs)
        path = Path(aoti_compile_and_package(program, package_path=str(out), inductor_configs={"freezing": True}))
    kernels = check_int8(reference, package_wrapper_code(path), f"AOTInductor package {path}")
    return Deployed("inductor", aoti_load_package(str(path)), path, kernels)


def package_wrapper_code(path: Path) -> str:
    """The C++ wrapper source(s) inside an AOTInductor package: the calls it makes, int8 kernels included."""
    with zipfile.ZipFile(path) as package:
        return "\n".join(package.read(name).decode(errors="replace") for name in package.namelist()
                         if name.endswith(".wrapper.cpp"))
