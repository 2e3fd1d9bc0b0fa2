"""Coverage sweep: which models each quantization tool takes, how many of their convs/linears it quantizes,
and how close the result stays to the float model.

    python -m tools.bench.coverage --results .bench/coverage.json --write   # full sweep, writes BENCHMARKS.md
    python -m tools.bench.coverage --models resnet18,lstm --tools qpasses-ptq,pt2e --quick
    python -m tools.bench.coverage --results .bench/coverage.json           # resumes: measured rows are kept
    python -m tools.bench.coverage --results .bench/coverage.json --report-only --write   # what it holds
    python -m tools.bench.coverage --models mobilenet_v2 --tools qpasses-ref,pt2e --seeds 0,1,2,3   # seed noise

Tools (``--tools``): qpasses PTQ (``FuseBN`` + ``PTQ``, x86), qpasses PTQ to the reference graph with the inductor
preset (``lower=False``: the Q/DQ simulation at PT2E's grids, run one sample at a time), the same with the convs/linears
that PT2E leaves float kept float (``qpasses_reference_at_pt2e_layers``: where PT2E's layer computes on float
activations, so does qpasses', and the two differ only in how they quantize what both quantize), qpasses QAT (``QAT`` pass, training-mode forward
passes over the calibration batches to initialise the fake-quants, BN statistics frozen, no optimizer step, then ``qpasses.convert``),
torch.ao FX PTQ (x86 default qconfig mapping) and torchao PT2E (``torch.export`` non-strict →
``X86InductorQuantizer`` default config → ``convert_pt2e``, the Q/DQ graph uncompiled, run one sample at a time).

Models (``MODELS``): random weights (nothing is downloaded), BatchNorm statistics re-estimated on inputs of
their own (``reestimate_batchnorm`` on ``--norm`` samples, neither calibration nor evaluation ones: otherwise random
deep models output ~0; a trained model's statistics come from its training data, and re-estimated on the
calibration samples themselves they would normalise exactly those, which every calibration-fitted range and
correction would then fit rather than the inputs the model meets), image models fed crops of real photos
(``PhotoSet``), the video model clips of 4 consecutive crops, the sequence models seeded random tensors. Each model runs in its own subprocess, each tool with a time limit, so an exception, a segfault or a
hang is a row, not the end of the sweep (the tools after it get a fresh subprocess). Per row: ok or the first
line of the error, SQNR of the outputs against the float model on the evaluation inputs (the worst output leaf
for structured outputs), top-1 agreement for logits, convs/linears quantized (``lowered_quantized_layers`` /
``pt2e_quantized_layers``) out of those of the float model (``float_weighted_layers``), prepare seconds
(quantization with calibration), activation bits.

Seeds (``--seeds``): the weights' seed (``torch.manual_seed`` before building the model; the inputs stay the same).
With more than one, the report adds each tool's mean and standard error over the seeds per model, and the paired
difference of each of qpasses' reference graphs and PT2E (same weights, same inputs) with its standard error, so
that "at least PT2E's SQNR" is judged against the seed-to-seed noise; the other tables show the first seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import operator
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
import torch.fx as fx
from torch import nn

import qpasses
from qpasses import PassManager
from qpasses.analysis.metrics import sqnr, topk_agreement
from qpasses.graph.trace import trace
from qpasses.passes import QAT
from qpasses.quant.annotate import qualified_name
from qpasses.quant.backends import get_backend
from qpasses.quant.overrides import exact_pattern
from tools.bench.common import (
    PerSample,
    PhotoSet,
    describe_machine,
    markdown_table,
    photo_batches,
    timed,
    torch_ao_fx_ptq,
    torchao_pt2e_ptq,
    write_section,
)
from tools.bench.ptq import qpasses_ptq

COMMAND = "python -m tools.bench.coverage"
# The preset of the reference-graph row: X86InductorQuantizer's grids (8-bit activations on AVX-512 VNNI CPUs,
# symmetric per-channel weights), run as its Q/DQ simulation like the PT2E row, so the two compare at the same bits.
REFERENCE_PRESET = "inductor"
ROOT = Path(__file__).resolve().parents[2]
FRAMES = 4  # frames per video clip
SEQUENCE = (16, 32)  # (steps, features) of the LSTM's input
TOKENS = 16  # sequence length of the TransformerEncoder's input


# ---------------------------------------------------------------- models


class LSTMClassifier(nn.Module):
    """Two-layer LSTM over a (batch, steps, features) float input; a linear head on the last step."""

    def __init__(self, features: int = SEQUENCE[1], hidden: int = 64, classes: int = 10):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TransformerClassifier(nn.Module):
    """``nn.TransformerEncoder`` (2 layers, d_model 64, 4 heads) over (batch, tokens, 64); a linear head on the
    mean token."""

    def __init__(self, d_model: int = 64, classes: int = 10):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def _torchvision(name: str, **kwargs) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)

    return build


def _torchvision_sized(name: str, size_kwarg: str, as_pair: bool = False) -> Callable[[int], nn.Module]:
    """A torchvision model whose positional embeddings or partitions are built for the input size."""

    def build(size: int) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **{size_kwarg: (size, size) if as_pair else size})

    return build


def _torchvision_dense(name: str, **kwargs) -> Callable[[int], nn.Module]:
    """Segmentation and detection models: no weights and no backbone weights (their default downloads them)."""
    return _torchvision(name, weights_backbone=None, **kwargs)


def _detection_at_size(name: str) -> Callable[[int], nn.Module]:
    """A detector that resizes its inputs to ``size`` (its default, 800, would be the sweep's slowest row)."""

    def build(size: int) -> nn.Module:
        return _torchvision_dense(name, min_size=size, max_size=size)(size)

    return build


def _timm(name: str, sized: bool = False) -> Callable[[int], nn.Module]:
    def build(size: int) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **({"img_size": size} if sized else {}))

    return build


@dataclass(frozen=True)
class ModelCase:
    """One model of the sweep. ``inputs``: "image" (photo crops), "video" (clips of ``FRAMES`` crops) or
    "sequence" (seeded random tensors of ``sample_shape`` a sample); ``min_size``/``fixed_size``: the image size
    when ``--size`` is too small for the model, or the one size it is built for."""

    name: str
    family: str
    build: Callable[[int], nn.Module]
    inputs: str = "image"
    min_size: int = 0
    fixed_size: int | None = None
    sample_shape: tuple[int, ...] = ()

    def size(self, requested: int) -> int | None:
        if self.inputs == "sequence":
            return None
        return self.fixed_size or max(requested, self.min_size)


MODELS: dict[str, ModelCase] = {c.name: c for c in [
    ModelCase("resnet18", "torchvision classification", _torchvision("resnet18")),
    ModelCase("mobilenet_v2", "torchvision classification", _torchvision("mobilenet_v2")),
    ModelCase("mobilenet_v3_small", "torchvision classification", _torchvision("mobilenet_v3_small")),
    ModelCase("efficientnet_b0", "torchvision classification", _torchvision("efficientnet_b0")),
    ModelCase("convnext_tiny", "torchvision classification", _torchvision("convnext_tiny")),
    ModelCase("regnet_x_400mf", "torchvision classification", _torchvision("regnet_x_400mf")),
    ModelCase("shufflenet_v2_x1_0", "torchvision classification", _torchvision("shufflenet_v2_x1_0")),
    ModelCase("squeezenet1_1", "torchvision classification", _torchvision("squeezenet1_1")),
    ModelCase("densenet121", "torchvision classification", _torchvision("densenet121")),
    ModelCase("inception_v3", "torchvision classification", _torchvision("inception_v3", aux_logits=False,
                                                                        init_weights=False), min_size=75),
    ModelCase("googlenet", "torchvision classification", _torchvision("googlenet", aux_logits=False,
                                                                     init_weights=False)),
    ModelCase("mnasnet0_5", "torchvision classification", _torchvision("mnasnet0_5")),
    ModelCase("vit_b_16", "torchvision classification", _torchvision_sized("vit_b_16", "image_size")),
    ModelCase("swin_t", "torchvision classification", _torchvision("swin_t")),
    ModelCase("maxvit_t", "torchvision classification", _torchvision_sized("maxvit_t", "input_size", as_pair=True)),
    ModelCase("fcn_resnet50", "torchvision segmentation", _torchvision_dense("fcn_resnet50", aux_loss=False)),
    ModelCase("deeplabv3_mobilenet_v3_large", "torchvision segmentation",
              _torchvision_dense("deeplabv3_mobilenet_v3_large", aux_loss=False)),
    ModelCase("lraspp_mobilenet_v3_large", "torchvision segmentation",
              _torchvision_dense("lraspp_mobilenet_v3_large")),
    ModelCase("fasterrcnn_mobilenet_v3_large_320_fpn", "torchvision detection",
              _detection_at_size("fasterrcnn_mobilenet_v3_large_320_fpn")),
    ModelCase("retinanet_resnet50_fpn", "torchvision detection", _detection_at_size("retinanet_resnet50_fpn")),
    ModelCase("ssdlite320_mobilenet_v3_large", "torchvision detection",
              _torchvision_dense("ssdlite320_mobilenet_v3_large")),
    ModelCase("r3d_18", "torchvision video", _torchvision("r3d_18"), inputs="video"),
    ModelCase("tf_efficientnet_lite0", "timm CNN", _timm("tf_efficientnet_lite0")),
    ModelCase("convnext_nano", "timm CNN", _timm("convnext_nano")),
    ModelCase("resnet18d", "timm CNN", _timm("resnet18d")),
    ModelCase("resnet26t", "timm CNN", _timm("resnet26t")),
    ModelCase("mobilevit_xxs", "timm ViT", _timm("mobilevit_xxs"), min_size=128),
    ModelCase("vit_tiny_patch16_224", "timm ViT", _timm("vit_tiny_patch16_224", sized=True)),
    ModelCase("deit_tiny_distilled_patch16_224", "timm ViT", _timm("deit_tiny_distilled_patch16_224", sized=True)),
    ModelCase("lstm", "sequence", lambda size: LSTMClassifier(), inputs="sequence",
              sample_shape=SEQUENCE),
    ModelCase("transformer_encoder", "sequence", lambda size: TransformerClassifier(),
              inputs="sequence", sample_shape=(TOKENS, 64)),
]}


@dataclass
class Inputs:
    calib: list[torch.Tensor]
    evals: list[torch.Tensor]
    norm: list[torch.Tensor]  # for the BatchNorm statistics only


def make_inputs(case: ModelCase, size: int, n_calib: int, n_eval: int, n_norm: int) -> Inputs:
    """Calibration, evaluation and BatchNorm-statistics batches for ``case`` (8, 16 and 8 samples a batch; video:
    clips of ``FRAMES`` consecutive crops). The statistics' crops are other crops of the calibration half of
    the photos (seed 2; calibration: seed 0), the sequences further draws of the same generator."""
    if case.inputs == "sequence":
        generator = torch.Generator().manual_seed(0)

        def batches(n: int, per_batch: int) -> list[torch.Tensor]:
            return [torch.randn(len(idx), *case.sample_shape, generator=generator)
                    for idx in torch.arange(n).split(per_batch)]

        return Inputs(batches(n_calib, 8), batches(n_eval, 16), batches(n_norm, 8))
    photos = PhotoSet.make(n_calib, n_eval, case.size(size))
    norm = photo_batches(n_norm, case.size(size), seed=2, split="calib", batch_size=8)
    if case.inputs == "video":
        def clips(batches: list[torch.Tensor]) -> list[torch.Tensor]:
            return [b[: len(b) - len(b) % FRAMES].reshape(-1, FRAMES, *b.shape[1:]).transpose(1, 2).contiguous()
                    for b in batches]

        return Inputs(clips(photos.calib), clips(photos.evals), clips(norm))
    return Inputs(photos.calib, photos.evals, norm)


# ---------------------------------------------------------------- counting convs and linears

FLOAT_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.rnn.RNNBase, nn.MultiheadAttention)
LOWERED_WEIGHTED = (nnq.modules.conv._ConvNd, nnq.Linear, nnqd.LSTM, nnqd.GRU)
_QUANTIZED_FUNCTIONAL = re.compile(r"^quantized\.(conv|linear)")


def float_weighted_layers(model: nn.Module) -> int:
    """Convs (transposed too) and linears of a float model: each such module once, each recurrent module
    (LSTM, GRU, RNN) once, each ``nn.MultiheadAttention`` once more for its packed input projection (a
    parameter it applies functionally; its output projection is an ``nn.Linear`` counted already)."""
    return sum(isinstance(m, FLOAT_WEIGHTED) for m in model.modules())


def lowered_quantized_layers(model: nn.Module) -> int:
    """Convs/linears a qpasses- or torch.ao FX-lowered model runs quantized: modules of torch.ao.nn.quantized
    conv/linear types (their fused and dynamic variants included, and dynamic LSTM/GRU), plus calls of
    ``torch.ops.quantized`` conv/linear functions in its graph."""
    modules = sum(isinstance(m, LOWERED_WEIGHTED) for m in model.modules())
    graph = model.graph if isinstance(model, fx.GraphModule) else None
    functions = 0 if graph is None else sum(
        n.op == "call_function" and bool(_QUANTIZED_FUNCTIONAL.match(str(n.target))) for n in graph.nodes)
    return modules + functions


# op (aten, or the functional form qpasses' reference graph calls) → position of its weight argument
_PT2E_WEIGHT_ARG = {"conv1d": 1, "conv2d": 1, "conv3d": 1, "convolution": 1, "conv_transpose1d": 1,
                    "conv_transpose2d": 1, "conv_transpose3d": 1, "linear": 1, "matmul": 1, "mm": 1, "bmm": 1,
                    "addmm": 2}
_VIEWS = {"t", "permute", "transpose", "view", "reshape", "expand", "unsqueeze", "squeeze", "contiguous"}


def _aten_name(node: fx.Node) -> str | None:
    """The op a call_function node calls: its aten overload packet's name, else the function's own
    (``F.conv2d`` → ``conv2d``)."""
    if node.op != "call_function":
        return None
    target = getattr(node.target, "overloadpacket", node.target)
    return getattr(target, "__name__", None)


def _through_views(node: object) -> object:
    while isinstance(node, fx.Node) and _aten_name(node) in _VIEWS:
        node = node.args[0]
    return node


def _weights(gm: fx.GraphModule) -> list[tuple[fx.Node, bool]]:
    """The weight source of each conv/linear/matmul of a Q/DQ graph (PT2E-converted, or qpasses' reference graph)
    that has one, and whether it is quantized: the weight argument is (through view ops) a dequantize node of a
    constant (a ``get_attr``, quantized directly or already folded to int8); a float one is the ``get_attr``
    itself. Matmuls of two activations (attention) have none: neither side is a weight."""
    weights = []
    for node in gm.graph.nodes:
        position = _PT2E_WEIGHT_ARG.get(_aten_name(node) or "")
        if position is None or len(node.args) <= position:
            continue
        weight = _through_views(node.args[position])
        quantized = isinstance(weight, fx.Node) and "dequantize" in (_aten_name(weight) or "")
        if quantized:
            weight = weight.args[0]
            if isinstance(weight, fx.Node) and "quantize" in (_aten_name(weight) or ""):
                weight = weight.args[0]
            weight = _through_views(weight)
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            weights.append((weight, quantized))
    return weights


def pt2e_quantized_layers(gm: fx.GraphModule) -> int:
    """Convs/linears/matmuls of a Q/DQ graph whose weight is quantized (``_weights``)."""
    return sum(quantized for _, quantized in _weights(gm))


def pt2e_float_weights(gm: fx.GraphModule) -> set[str]:
    """The qualified names of the parameters that a Q/DQ graph's convs/linears use unquantized: the layers it
    leaves float, named as in the model it was exported from (``torch.export`` keeps parameter names)."""
    return {weight.target for weight, quantized in _weights(gm) if not quantized}


# ---------------------------------------------------------------- tools


def qpasses_qat(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    """QAT pass, training-mode forward passes over ``calib`` to initialise the fake-quants' ranges (no optimizer
    step; BN statistics frozen, so the model stays the float model's function), then ``qpasses.convert``."""
    trainable = PassManager([QAT(backend="x86")]).run(model, calib[0][:1])
    qpasses.freeze_bn_stats(trainable.train())
    with torch.no_grad():
        for batch in calib:
            trainable(batch)
    return qpasses.convert(trainable)


def _parameters_read(gm: fx.GraphModule, node: fx.Node) -> list[object]:
    """The parameters a node of qpasses' graph computes with: a module's ``weight``, or the parameters a function
    call reads (``F.linear``'s weight; a wrapped function such as torchvision's ``shifted_window_attention``
    reads several)."""
    if node.op == "call_module":
        return [getattr(gm.get_submodule(node.target), "weight", None)]
    if node.op != "call_function":
        return []
    return [operator.attrgetter(arg.target)(gm) for arg in node.all_input_nodes if arg.op == "get_attr"]


def qpasses_layers_using(model: nn.Module, parameters: set[str], example: torch.Tensor) -> set[str]:
    """The names that ``QuantConfig.keep_float`` matches (``annotate.qualified_name``), in qpasses' capture of
    ``model``, of the nodes that compute with one of ``parameters`` (qualified names in ``model``); an error if one
    of them is not found."""
    wanted = {id(weight): name for name, weight in model.named_parameters() if name in parameters}
    captured = trace(model, (example,), verify=False)
    found: dict[str, set[str]] = {}
    for node in captured.graph.nodes:
        for weight in _parameters_read(captured, node):
            if id(weight) in wanted:
                found.setdefault(qualified_name(node), set()).add(wanted[id(weight)])
    unmatched = parameters.difference(*found.values())
    if unmatched:
        raise ValueError(f"no layer of qpasses' graph uses {', '.join(sorted(unmatched))}")
    return set(found)


def qpasses_reference_at_pt2e_layers(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    """``qpasses-ref`` with the convs/linears that PT2E leaves float kept float too (``QuantConfig.keep_float``):
    where PT2E's layer reads and computes on float activations, this one does too, and the two graphs differ only
    in how they quantize the layers both quantize. Its prepare time includes PT2E's."""
    try:
        float_weights = pt2e_float_weights(torchao_pt2e_ptq(model, calib))
    except Exception as exc:
        raise RuntimeError(f"PT2E fails, so its float layers are unknown ({_first_line(exc)})") from exc
    config = get_backend(REFERENCE_PRESET).default_config()
    config.keep_float |= {exact_pattern(name) for name in qpasses_layers_using(model, float_weights, calib[0][:1])}
    return qpasses_ptq(model, calib, REFERENCE_PRESET, lower=False, config=config)


def _bits(quant_min: int, quant_max: int) -> int:
    return (quant_max - quant_min).bit_length()


def _qpasses_activation_bits() -> int:
    spec = get_backend("x86").default_config().activation  # 7 where a kernel needs it (see the report's text)
    return _bits(spec.quant_min, spec.quant_max)


def _reference_activation_bits() -> int:
    spec = get_backend(REFERENCE_PRESET).default_config().activation
    return _bits(spec.quant_min, spec.quant_max)


def _fx_activation_bits() -> int:
    from torch.ao.quantization import get_default_qconfig_mapping

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's own default still passes reduce_range
        observer = get_default_qconfig_mapping("x86").global_qconfig.activation()
    return _bits(observer.quant_min, observer.quant_max)


def _pt2e_activation_bits() -> int:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    spec = xiq.get_default_x86_inductor_quantization_config().input_activation
    return _bits(spec.quant_min, spec.quant_max)


@dataclass(frozen=True)
class Tool:
    """How a tool quantizes a model (``quantize(model, calib)`` → what to count), how its result runs on a batch
    (``runner``), how its quantized convs/linears are counted, its activation bits (from its own config), and
    whether it runs PT2E first (``after_pt2e``: it fails where PT2E does)."""

    name: str
    label: str
    quantize: Callable[[nn.Module, list[torch.Tensor]], nn.Module]
    runner: Callable[[nn.Module], Callable[[torch.Tensor], object]]
    quantized_layers: Callable[[nn.Module], int]
    activation_bits: Callable[[], int]
    after_pt2e: bool = False


TOOLS: dict[str, Tool] = {t.name: t for t in [
    Tool("qpasses-ptq", "qpasses PTQ", lambda m, calib: qpasses_ptq(m, calib, "x86"), lambda m: m,
         lowered_quantized_layers, _qpasses_activation_bits),
    Tool("qpasses-qat", "qpasses QAT→convert", qpasses_qat, lambda m: m, lowered_quantized_layers,
         _qpasses_activation_bits),
    Tool("qpasses-ref", "qpasses PTQ → reference", lambda m, calib: qpasses_ptq(m, calib, REFERENCE_PRESET, lower=False),
         PerSample, pt2e_quantized_layers, _reference_activation_bits),
    Tool("qpasses-ref-pt2e-layers", "qpasses reference at PT2E's layers", qpasses_reference_at_pt2e_layers,
         PerSample, pt2e_quantized_layers, _reference_activation_bits, after_pt2e=True),
    Tool("fx", "torch.ao FX", lambda m, calib: torch_ao_fx_ptq(m, calib, "x86"), lambda m: m,
         lowered_quantized_layers, _fx_activation_bits),
    Tool("pt2e", "torchao PT2E", torchao_pt2e_ptq, PerSample, pt2e_quantized_layers, _pt2e_activation_bits),
]}


# ---------------------------------------------------------------- one model, in a worker process


@dataclass(frozen=True)
class Params:
    """What the rows of a results file were measured with; rows of other parameters are not comparable."""

    size: int
    calib: int
    eval: int
    norm: int  # samples the BatchNorm statistics are re-estimated on


@dataclass
class Row:
    model: str
    family: str
    tool: str
    ok: bool
    error: str = ""
    sqnr: float | None = None
    top1: float | None = None
    quantized: int | None = None
    total: int | None = None
    seconds: float | None = None
    activation_bits: int | None = None
    seed: int = 0  # the weights' seed (rows of results files written before seeds existed: 0)


def _outputs(run: Callable[[torch.Tensor], object], batches: list[torch.Tensor]) -> list[object]:
    with torch.no_grad():
        return [run(b) for b in batches]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"


def measure(case: ModelCase, tool: Tool, model: nn.Module, inputs: Inputs, reference: list[object],
            total: int) -> Row:
    """Quantize ``model`` with ``tool`` and compare it with ``reference`` (the float outputs on ``inputs.evals``);
    any exception is the row's error."""
    row = Row(case.name, case.family, tool.name, ok=False, total=total, activation_bits=tool.activation_bits())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized, row.seconds, row.error = timed(lambda: tool.quantize(model, inputs.calib))
        if quantized is None:
            return row
        try:
            row.quantized = tool.quantized_layers(quantized)
            outputs = _outputs(tool.runner(quantized), inputs.evals)
            row.sqnr = sqnr(reference, outputs)
            if all(isinstance(r, torch.Tensor) and r.dim() == 2 for r in reference):
                row.top1 = topk_agreement(torch.cat(reference), torch.cat(outputs))  # type: ignore[arg-type]
        except Exception as exc:  # a quantized model that cannot run is a result, not a crash
            row.error = _first_line(exc)
            return row
    row.ok = True
    return row


def reestimate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``batches``, in place.

    With random weights and the fresh statistics (mean 0, variance 1) a deep network's activations vanish or
    explode in eval mode (random mobilenet_v2's logits are ~1e-10), so every tool's SQNR would be 0 dB. With
    statistics of real inputs each layer's output is normalised, as in a trained model. Only the BN modules
    run in training mode: detectors in training mode would ask for targets."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
        norm.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for norm in norms:
        norm.eval()
    return model


def run_worker(name: str, tools: list[str], params: Params, rows_to: Path, seed: int = 0) -> None:
    """Measure ``tools`` on model ``name`` with weights drawn after ``torch.manual_seed(seed)``, appending each row
    to ``rows_to`` (JSON lines) as soon as it is done, so rows measured before a crash survive it."""
    case = MODELS[name]
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = case.build(case.size(params.size) or 0).eval()
            inputs = make_inputs(case, params.size, params.calib, params.eval, params.norm)
            reestimate_batchnorm(model, inputs.norm)
            reference = _outputs(model, inputs.evals)
    except Exception as exc:  # the float model itself fails (e.g. at this input size): a row for each tool
        failed = [Row(name, case.family, t, ok=False, error=f"float model: {_first_line(exc)}", seed=seed)
                  for t in tools]
        rows_to.write_text("".join(json.dumps(asdict(row)) + "\n" for row in failed))
        return
    total = float_weighted_layers(model)
    for tool in tools:
        print(f"[{name}] {tool} ...", file=sys.stderr, flush=True)
        row = measure(case, TOOLS[tool], copy.deepcopy(model), inputs, reference, total)
        row.seed = seed
        with rows_to.open("a") as f:
            f.write(json.dumps(asdict(row)) + "\n")


# ---------------------------------------------------------------- the sweep


class Results:
    """Rows by (model, tool, seed), saved to ``path`` (if any) after every model."""

    def __init__(self, path: Path | None, params: Params):
        self.path, self.params = path, params
        self.rows: dict[tuple[str, str], Row] = {}
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            # norm 0: a file from before --norm, when the statistics were those of the calibration samples
            if Params(**{"norm": 0} | saved["params"]) != params:
                raise SystemExit(f"{path} holds rows measured with {saved['params']}, not {asdict(params)}; "
                                 "pass the same --size/--calib/--eval/--norm or another --results file")
            for row in saved["rows"]:
                self.add(Row(**row))

    def add(self, row: Row) -> None:
        self.rows[row.model, row.tool, row.seed] = row

    def get(self, model: str, tool: str, seed: int = 0) -> Row | None:
        return self.rows.get((model, tool, seed))

    def missing(self, model: str, tools: list[str], seed: int = 0) -> list[str]:
        return [t for t in tools if (model, t, seed) not in self.rows]

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [asdict(r) for r in self.rows.values()]
        self.path.write_text(json.dumps({"params": asdict(self.params), "rows": rows}, indent=1) + "\n")


def _worker(name: str, tools: list[str], params: Params, timeout: float, seed: int
            ) -> tuple[list[Row], str, float]:
    """One worker subprocess measuring ``tools`` on ``name`` in order, stopped once a tool runs past ``timeout``
    seconds (the first tool's time includes building the model and its float outputs). Returns the rows it
    wrote, why it stopped before writing them all ('' if it did not) and the seconds since its last row."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_to, stderr_to = Path(tmp) / "rows.jsonl", Path(tmp) / "stderr.txt"
        command = [sys.executable, "-m", "tools.bench.coverage", "--worker", name, "--tools", ",".join(tools),
                   "--size", str(params.size), "--calib", str(params.calib), "--eval", str(params.eval),
                   "--norm", str(params.norm), "--seeds", str(seed), "--rows-to", str(rows_to)]

        def rows_written() -> int:  # complete lines only: the worker may be writing one
            return rows_to.read_text().count("\n") if rows_to.exists() else 0

        with stderr_to.open("w") as stderr:
            process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
            written, last_row, why = 0, time.monotonic(), ""
            while process.poll() is None:
                if rows_written() > written:
                    written, last_row = rows_written(), time.monotonic()
                elif time.monotonic() - last_row > timeout:
                    process.kill()
                    process.wait()
                    why = f"timed out: over {timeout:.0f} s"
                time.sleep(0.2)
        rows = [Row(**json.loads(line)) for line in rows_to.read_text().splitlines()] if rows_to.exists() else []
        if len(rows) > written:
            last_row = time.monotonic()
        if not why and len(rows) < len(tools):
            messages = [line for line in stderr_to.read_text().splitlines() if line.strip()]
            why = f"worker died (exit {process.returncode}): {messages[-1][:160] if messages else 'no message'}"
    return rows, why, time.monotonic() - last_row


def run_model(name: str, tools: list[str], params: Params, timeout: float, seed: int = 0) -> list[Row]:
    """``tools`` on ``name`` (weights of ``seed``) in worker subprocesses: the tool that stops a worker (crash, over
    ``timeout`` seconds) is a failed row naming why, and the tools after it get a fresh worker."""
    rows: list[Row] = []
    remaining = list(tools)
    while remaining:
        measured, why, seconds = _worker(name, remaining, params, timeout, seed)
        rows += measured
        remaining = remaining[len(measured):]
        if remaining:
            rows.append(Row(name, MODELS[name].family, remaining[0], ok=False, error=why, seconds=seconds, seed=seed))
            remaining = remaining[1:]
    return rows


def sweep(models: list[str], tools: list[str], results: Results, timeout: float, seeds: tuple[int, ...] = (0,)
          ) -> None:
    for name in models:
        for seed in seeds:
            todo = results.missing(name, tools, seed)
            if not todo:
                continue
            for row in run_model(name, todo, results.params, timeout, seed):
                results.add(row)
                print(f"{name:36s} {row.tool:12s} seed {seed} " + (
                    f"ok  SQNR {row.sqnr:6.3f} dB  {row.quantized}/{row.total} quantized  {row.seconds:.1f} s"
                    if row.ok else f"FAIL {row.error}"), flush=True)
            results.save()


# ---------------------------------------------------------------- the report


_INSTALL_PREFIX = re.compile(r"/\S*/(site|dist)-packages/")


def _cell(row: Row | None) -> list[str]:
    if row is None:
        return ["not run", "", "", "", "", ""]
    counts = f"{row.quantized}/{row.total}" if row.quantized is not None else f"–/{row.total}"
    if not row.ok:
        error = _INSTALL_PREFIX.sub("", row.error)  # where this machine installed a package is no one's business
        return ["fails", "", "", counts, f"{row.seconds:.1f}" if row.seconds is not None else "", error]
    top1 = f"{row.top1:.0%}" if row.top1 is not None else ""
    return ["ok", f"{row.sqnr:.1f}", top1, counts, f"{row.seconds:.1f}", ""]


def _versus_pt2e(ours: Row | None, theirs: Row | None) -> str:
    """Whether qpasses PTQ quantizes at least as many layers as PT2E and reaches at least its SQNR."""
    if ours is None or theirs is None:
        return "not measured"
    if TOOLS[ours.tool].after_pt2e and not theirs.ok:
        return "– (PT2E fails)"
    if not ours.ok:
        return "qpasses fails" + ("" if theirs.ok else ", PT2E too")
    if not theirs.ok:
        return "yes (PT2E fails)"
    layers = ours.quantized >= theirs.quantized
    fidelity = ours.sqnr >= theirs.sqnr
    if layers and fidelity:
        return "yes"
    short = [f"layers {ours.quantized} < {theirs.quantized}"] * (not layers) + \
        [f"SQNR {ours.sqnr:.1f} < {theirs.sqnr:.1f}"] * (not fidelity)
    return "no: " + ", ".join(short)


def _mean_and_error(values: list[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (sample standard deviation / √n; nan for one value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def _over_seeds(results: Results, model: str, tool: str, seeds: tuple[int, ...]) -> str:
    sqnrs = [row.sqnr for seed in seeds if (row := results.get(model, tool, seed)) is not None and row.ok]
    if not sqnrs:
        return "–"
    mean, error = _mean_and_error(sqnrs)
    return f"{mean:.3f} ± {error:.3f}" + (f" ({len(sqnrs)} of {len(seeds)})" if len(sqnrs) < len(seeds) else "")


REFERENCES = ("qpasses-ref", "qpasses-ref-pt2e-layers")  # the Q/DQ graphs paired with PT2E's over seeds


def _minus_pt2e(results: Results, model: str, tool: str, seeds: tuple[int, ...]) -> str:
    """The paired difference of ``tool``'s SQNR and PT2E's over the seeds both ran on: mean ± standard error, and
    on how many seeds ``tool`` is at least PT2E's. Seeds where both outputs equal the float model's (infinite
    SQNR: vit_b_16's head is initialised to zero) have no difference."""
    pairs = [(ours.sqnr, theirs.sqnr) for seed in seeds
             if (ours := results.get(model, tool, seed)) is not None and ours.ok
             and (theirs := results.get(model, "pt2e", seed)) is not None and theirs.ok]
    exact = [pair for pair in pairs if pair == (math.inf, math.inf)]
    pairs = [pair for pair in pairs if pair not in exact]
    if not pairs:
        return "both exact" if exact else "–"
    mean, error = _mean_and_error([a - b for a, b in pairs])
    return f"{mean:+.3f} ± {error:.3f} ({sum(a >= b for a, b in pairs)}/{len(pairs)} seeds ≥)"


def seeds_report(results: Results, models: list[str], tools: list[str], seeds: tuple[int, ...]) -> str:
    """Per model, the SQNR over ``seeds`` (mean ± standard error) of each tool measured on more than the first
    seed, and each such reference graph minus PT2E."""
    tools = [t for t in tools if any(results.get(m, t, seed) for m in models for seed in seeds[1:])]
    paired = [t for t in REFERENCES if t in tools and "pt2e" in tools]
    header = ["model", *(f"{TOOLS[t].label} SQNR dB" for t in tools)] + [f"{TOOLS[t].label} − PT2E dB" for t in paired]
    rows = [[m, *(_over_seeds(results, m, t, seeds) for t in tools)]
            + [_minus_pt2e(results, m, t, seeds) for t in paired] for m in models]
    return (f"### Over seeds {', '.join(map(str, seeds))} (mean ± standard error)\n\n"
            "The weights' seed varies, the inputs do not; the difference is paired (same weights, same inputs).\n\n"
            + markdown_table(header, rows))


def report(results: Results, models: list[str], tools: list[str], seeds: tuple[int, ...] = (0,)) -> str:
    """The coverage section: the tables at the first of ``seeds``, and with more than one, ``seeds_report``."""
    import torchao

    seed = seeds[0]
    p = results.params
    bits = {t: TOOLS[t].activation_bits() for t in tools}
    command = (f"{COMMAND} --size {p.size} --calib {p.calib} --eval {p.eval} --norm {p.norm} "
               + (f"--seeds {','.join(map(str, seeds))} " if len(seeds) > 1 else "")
               + "--results .bench/coverage.json --write")
    lines = [
        f"## Coverage (`{command}`)",
        f"Machine: {describe_machine()}, torchao {torchao.__version__}. Random weights, BatchNorm statistics set to those of "
        f"{p.norm} inputs of their own (random models' activations vanish otherwise; not the calibration inputs, "
        f"which the float model would then normalise exactly); images {p.size}×{p.size} (larger where a model needs "
        f"it: inception_v3 75, mobilevit_xxs 128) crops of real photos, {p.calib} for calibration, {p.eval} "
        f"others for evaluation and {p.norm} others for the statistics; video r3d_18 clips of {FRAMES} crops; sequence models seeded random inputs.",
        "Activation bits: " + ", ".join(f"{TOOLS[t].label} {bits[t]}" for t in tools) +
        ". torch.ao FX keeps x86's 7-bit activations (reduce_range: fbgemm's int16 pair sums on CPUs without "
        "VNNI) on every CPU; qpasses x86 takes 7-bit steps only into the kernels that add int16 pairs on this "
        "CPU (every conv and linear without AVX-512 VNNI; with it, depthwise convs of more than 100 groups), "
        "8-bit elsewhere; PT2E 8-bit. A bit short costs up to ~6 dB. "
        "Quantized: convs/linears whose weights run int8, out of those of the float model "
        "(`tools/bench/coverage.py`: `lowered_quantized_layers`, `pt2e_quantized_layers` (PT2E and reference graphs), "
        "`float_weighted_layers`). SQNR: outputs against the float model (worst leaf of structured outputs); "
        "top-1: agreement of the argmax for classifiers.",
        "### Summary",
    ]
    summary = []
    for t in tools:
        measured = [row for m in models if (row := results.get(m, t, seed)) is not None]
        ok = [r for r in measured if r.ok]
        summary.append([TOOLS[t].label, str(bits[t]), f"{len(ok)}/{len(measured)}",
                        str(sum(r.quantized > 0 for r in ok)), str(sum(r.quantized for r in ok))])
    lines.append(markdown_table(["tool", "act bits", "models ok", "models with ≥1 quantized layer",
                                 "quantized layers (ok rows)"], summary))
    compared = [t for t in ("qpasses-ptq", *REFERENCES) if t in tools]
    lines.append("qpasses ≥ PT2E (quantized layers and SQNR), per model: its x86 PTQ (torch.ao kernels, 7-bit steps "
                 "where they saturate), its reference graph at PT2E's bits (the inductor preset), and that graph with "
                 "the layers PT2E leaves float kept float (where PT2E's layer computes on float activations, so does "
                 "qpasses'):")
    lines.append(markdown_table(["model", "family", *(f"{TOOLS[t].label} ≥ PT2E" for t in compared)], [
        [m, MODELS[m].family, *(_versus_pt2e(results.get(m, t, seed), results.get(m, "pt2e", seed)) for t in compared)]
        for m in models]))
    missing = [f"{m} ({', '.join(results.missing(m, tools, seed))})" for m in models
               if results.missing(m, tools, seed)]
    if missing:
        lines.append("Not measured yet (model (tools)): " + "; ".join(missing) + ".")
    lines.append("### Per model")
    for m in models:
        rows = [[TOOLS[t].label, *_cell(results.get(m, t, seed))] for t in tools]
        lines.append(f"**{m}** ({MODELS[m].family})\n\n" + markdown_table(
            ["tool", "status", "SQNR dB", "top-1", "quantized/total", "prepare s", "error"], rows))
    if len(seeds) > 1:
        lines.append(seeds_report(results, models, tools, seeds))
    return "\n\n".join(lines)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(dict.fromkeys(int(s) for s in text.split(",") if s))
    except ValueError:
        raise SystemExit(f"--seeds takes comma-separated integers (weights seeds), got {text!r}") from None
    if not seeds:
        raise SystemExit("--seeds names no seed; give e.g. --seeds 0,1,2,3")
    return seeds


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of samples, at least 1, got {text!r}")
    return int(text)


def _names(text: str, known: dict, what: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.coverage", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated of {', '.join(TOOLS)}")
    # 64 px and one calibration batch: the 31 models × 4 tools take ~45 min on 2 shared cores at that size
    parser.add_argument("--size", type=int, default=64, help="image size (default 64)")
    parser.add_argument("--calib", type=int, default=8, help="calibration samples (default 8)")
    parser.add_argument("--eval", type=int, default=16, help="evaluation samples (default 16)")
    parser.add_argument("--norm", type=_positive, default=32,
                        help="samples the BatchNorm statistics are re-estimated on (default 32)")
    parser.add_argument("--quick", action="store_true", help="8 calibration and 8 evaluation samples, 32 px")
    parser.add_argument("--seeds", default="0", help="comma-separated weights seeds (default 0); with several the "
                        "report adds each tool's mean and standard error over them")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a tool may take (default 600)")
    parser.add_argument("--results", type=Path, help="JSON file of rows: read to resume, updated after each model")
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: report the rows --results holds (an interrupted sweep's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rows-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = _names(args.models, MODELS, "models")
    tools = _names(args.tools, TOOLS, "tools")
    seeds = _seeds(args.seeds)
    params = Params(32, 8, 8, 8) if args.quick else Params(args.size, args.calib, args.eval, args.norm)
    if args.worker:
        run_worker(args.worker, tools, params, args.rows_to, seeds[0])
        return 0
    results = Results(args.results, params)
    if not args.report_only:
        sweep(models, tools, results, args.timeout, seeds)
    body = report(results, models, tools, seeds)
    print(body)
    if args.write:
        write_section("coverage", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
