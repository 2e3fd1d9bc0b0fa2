"""Shared pieces of the benchmarks: the Lite0 photo-crop setup, the torch.ao FX reference, BENCHMARKS.md."""

from __future__ import annotations

import copy
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

import qpasses_zoo as zoo
from qpasses.analysis.metrics import sqnr, topk_agreement
from qpasses.cpu import cpu_int8_features
from qpasses_zoo.data import SYMMETRIC, loader, photo_crops

BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


@dataclass
class PhotoSet:
    """Calibration and evaluation crops of real photos (disjoint halves of each photo, fixed seeds)."""

    calib: list[torch.Tensor]
    evals: list[torch.Tensor]

    @classmethod
    def make(cls, n_calib: int = 64, n_eval: int = 128, size: int = 224) -> PhotoSet:
        return cls(photo_batches(n_calib, size, seed=0, split="calib", batch_size=8),
                   photo_batches(n_eval, size, seed=1, split="eval", batch_size=16))


def photo_batches(n: int, size: int, seed: int, split: str, batch_size: int) -> list[torch.Tensor]:
    """``n`` crops of the photos' ``split`` half (``qpasses_zoo.data.photo_crops``, drawn with ``seed``), in
    batches of ``batch_size``."""
    return [b for (b,) in loader(photo_crops(n, size, seed=seed, split=split, normalization=SYMMETRIC), batch_size)]


def describe_machine(threads: int | None = None) -> str:
    """What a timing ran on, for the line next to every table: the CPU's model and int8 features (they decide
    which kernels run, and x86's activation bits), torch's version and the threads (None: torch's current)."""
    threads = torch.get_num_threads() if threads is None else threads
    return f"{cpu_int8_features()}, torch {torch.__version__}, {threads} thread{'s' * (threads != 1)}"


def pretrained_lite0(variant: str = "tf_efficientnet_lite0") -> nn.Module:
    return zoo.get(variant, pretrained=True)


def fidelity(reference: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """SQNR (dB) of the logits and top-1 agreement of ``model`` with ``reference`` over ``batches``."""
    with torch.no_grad():
        ref = torch.cat([reference(b) for b in batches])
        out = torch.cat([model(b) for b in batches])
    return sqnr(ref, out), topk_agreement(ref, out)


def torch_ao_fx_ptq(model: nn.Module, calib: list[torch.Tensor], backend: str) -> nn.Module:
    """The reference tool: torch.ao FX PTQ with its default qconfig mapping for ``backend``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(backend), (calib[0][:1],))
        with torch.no_grad():
            for batch in calib:
                prepared(batch)
        return convert_fx(prepared)


def torchao_pt2e_ptq(model: nn.Module, calib: list[torch.Tensor]) -> torch.fx.GraphModule:
    """torchao PT2E with X86InductorQuantizer's default config (per-channel weights, 8-bit activations): the
    converted Q/DQ graph, not compiled (compiling changes the kernels, not the quantization grid). The graph is
    exported (non-strict) for batch 1 and calibrated on every sample of ``calib``; run it with ``PerSample``."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(copy.deepcopy(model).eval(), (calib[0][:1],), strict=False).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calib:
            for x in batch.split(1):  # the exported graph is specialized to batch 1
                prepared(x)
    return convert_pt2e(prepared)


class PerSample(nn.Module):
    """Calls ``fn`` one sample at a time under inference mode: fixed-shape runtimes (ONNX sessions exported for
    batch 1, graphs compiled for it) always see the shape and grad mode they were built for. Structured outputs
    (a segmentation model's dict) are joined leaf by leaf."""

    def __init__(self, fn: Callable[[torch.Tensor], object]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> object:
        with torch.inference_mode():
            outputs = [tree_flatten(self.fn(x[i : i + 1])) for i in range(len(x))]
        leaves = [torch.cat(samples) for samples in zip(*(flat for flat, _ in outputs), strict=True)]
        return tree_unflatten(leaves, outputs[0][1])


def timed(fn: Callable[[], nn.Module]) -> tuple[nn.Module | None, float, str]:
    """Run ``fn``; return its model, the seconds it took, and '' or the first line of its error."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # a reference tool failing is a result to record, not a crash
        return None, time.perf_counter() - start, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return result, time.perf_counter() - start, ""


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name -->`` markers in BENCHMARKS.md."""
    start, end = f"<!-- {name} start -->", f"<!-- {name} end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
