"""Side-by-side benchmark: every way to run int8 CNNs on this CPU, in one run, on the same inputs.

    python -m tools.bench.compare                          # full run (< 20 min on 2 cores), writes BENCHMARKS.md
    python -m tools.bench.compare --quick                  # smoke run: few crops and iterations, prints only
    python -m tools.bench.compare --models mobilenet_v2 --methods ort-static,qpasses-onnx
    python -m tools.bench.compare --resume                 # reuse rows measured by an interrupted run

Rows (``--methods``): float eager, and under ``torch.compile`` with inductor freezing; torch.ao FX PTQ (x86,
qnnpack); torchao PT2E with X86InductorQuantizer + ``torch.compile`` with inductor freezing (without freezing the
int8 rewrite never runs); qpasses PTQ (inductor preset) to the reference graph, deployed to inductor; ONNX Runtime
float and its own ``quantize_static`` after ``quant_pre_process`` (QDQ, per-channel, U8S8, min/max calibrated on
the same crops); OpenVINO float and NNCF → OpenVINO (``nncf.quantize`` defaults); qpasses lowered to x86 and
qnnpack, its TorchScript export, its QDQ export of the x86 model run by ONNX Runtime (7-bit ranges kept exactly,
or widened to 8 bits), and its PTQ with the ``onnx`` / ``openvino`` presets deployed by ``qpasses.lower`` to ONNX
Runtime / OpenVINO (the note counts the runtime's int8 kernels); ExecuTorch with the XNNPACK delegate: float, its own
XNNPACKQuantizer flow (prepare_pt2e → convert_pt2e → to_edge_transform_and_lower), and qpasses' xnnpack-preset PTQ
lowered by ``qpasses.lower.xnnpack``. Batch 1, 224×224, 2 threads. A method that fails is a row with its error's
first line.

Columns: latency median (a model's rows are timed in turns, six rounds of ten calls each, so drift in the
machine's speed reaches all of them alike); size (serialized state dict, TorchScript archive, or ONNX file); peak MB, how far the
process' peak resident memory rose above its size before the row while preparing (calibration, export,
compilation) and running it three times (Linux ``VmHWM`` after a reset; memory an earlier row freed and the
allocator kept is reused, so it is a lower bound); prepare s (quantize, export, compile, up to the
first output); on pretrained EfficientNet-Lite0, SQNR of the logits and top-1 agreement with the float model.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import qpasses_zoo as zoo
from qpasses.analysis.metrics import latency, model_size
from qpasses.export import onnx as export_onnx
from qpasses.export import torchscript
from qpasses.lower import deploy
from qpasses.lower.inductor import check_int8, freezing
from tools.bench.common import (
    BENCHMARKS,
    PerSample,
    PhotoSet,
    describe_machine,
    fidelity,
    markdown_table,
    pretrained_lite0,
    timed,
    torch_ao_fx_ptq,
    torchao_pt2e_ptq,
    write_section,
)
from tools.bench.ptq import qpasses_ptq

COMMAND = "python -m tools.bench.compare"
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "tf_efficientnet_lite0")
FIDELITY_MODEL = "tf_efficientnet_lite0"
CACHE = BENCHMARKS.parent / ".bench" / "compare.json"
THREADS = 2


class OnEngine(nn.Module):
    """Runs a torch.ao model with the quantized engine it was converted for (the engine is process-global)."""

    def __init__(self, model: nn.Module, engine: str):
        super().__init__()
        self.model, self.engine = model, engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.backends.quantized.engine = self.engine
        return self.model(x)


def ort_session(path: Path):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # the exported graphs' unused-constant warnings are noise here
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return PerSample(lambda t: torch.from_numpy(session.run(None, {name: t.numpy()})[0]))


@dataclass
class Prepared:
    runner: nn.Module
    size_bytes: int
    reference: nn.Module | None = None  # the float model fidelity compares with, when not the row's own
    note: str = ""


@dataclass
class Setup:
    """One model's float version, data and working directory; builds shared by several rows are made once."""

    name: str
    model: nn.Module
    photos: PhotoSet
    workdir: Path
    shared: dict[str, tuple[object, float]] = field(default_factory=dict)

    @property
    def example(self) -> torch.Tensor:
        return self.photos.evals[0][:1]

    @property
    def singles(self) -> list[torch.Tensor]:
        return [b[i : i + 1] for b in self.photos.calib for i in range(len(b))]

    def once(self, key: str, build: Callable[[], object]) -> tuple[object, float]:
        """``build()`` and its seconds, computed on first use."""
        if key not in self.shared:
            result, seconds, error = timed(build)
            if result is None:
                raise RuntimeError(error)
            self.shared[key] = (result, seconds)
        return self.shared[key]


def state_bytes(model: nn.Module) -> int:
    return model_size(model)["serialized_bytes"]


def graph_tensor_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of the tensors a graph reads (its state dict may also keep parameters that folding replaced)."""
    total = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def float_eager(s: Setup) -> Prepared:
    return Prepared(s.model, state_bytes(s.model))


def torch_ao_fx(backend: str) -> Callable[[Setup], Prepared]:
    def build(s: Setup) -> Prepared:
        # torch.ao FX cannot trace the TF-padded Lite0; it gets the PyTorch-padded variant (and its own reference)
        model = pretrained_lite0("efficientnet_lite0") if s.name == FIDELITY_MODEL else s.model
        quantized = OnEngine(torch_ao_fx_ptq(model, s.photos.calib, backend), backend)
        note = "efficientnet_lite0 variant (tf_ cannot be traced)" if model is not s.model else ""
        return Prepared(quantized, state_bytes(quantized), reference=model if model is not s.model else None, note=note)

    return build


def frozen(compiled: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``compiled`` called under inductor freezing, in the one grad mode it was compiled in (another would make
    dynamo recompile, without freezing where the caller's config has none)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with freezing():
            return compiled(x)

    return run


def float_compiled(s: Setup) -> Prepared:
    """Float eager under ``torch.compile`` (inductor, freezing: weights folded and prepacked for oneDNN)."""
    runner = frozen(torch.compile(s.model))
    runner(s.example)  # compiles
    return Prepared(PerSample(runner), state_bytes(s.model))


def pt2e_x86_inductor(s: Setup) -> Prepared:
    """torchao's documented flow: export, prepare_pt2e with X86InductorQuantizer, calibrate, convert_pt2e, then
    ``torch.compile`` under ``torch._inductor.config.freezing`` (without it the int8 rewrite never runs), whose
    generated code must call oneDNN's int8 kernels (checked as for qpasses' row)."""
    converted = torchao_pt2e_ptq(s.model, s.photos.calib)
    runner = frozen(torch.compile(converted))
    _, code = run_and_get_code(runner, s.example)
    kernels = check_int8(converted, "\n".join(code), "PT2E + torch.compile")
    return Prepared(PerSample(runner), graph_tensor_bytes(converted),
                    note=f"size: tensors the converted graph reads; {sum(kernels.values())} oneDNN int8 kernels")


def qpasses_inductor(s: Setup) -> Prepared:
    """qpasses PTQ with the inductor preset, to the reference graph, deployed by ``qpasses.lower``'s inductor target
    (torch.compile with freezing, int8 kernels checked)."""
    reference = qpasses_ptq(s.model, s.photos.calib, "inductor", lower=False)
    deployed = deploy(reference, "inductor", (s.example,))
    return Prepared(PerSample(deployed), graph_tensor_bytes(reference),
                    note=f"size: tensors the reference graph reads; {sum(deployed.int8_kernels.values())} oneDNN "
                         "int8 kernels")


def float_onnx(s: Setup) -> Path:
    def build() -> Path:
        path = s.workdir / f"{s.name}_float.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(s.model, (s.example,), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], do_constant_folding=True)
        return path

    return s.once("float_onnx", build)[0]


def ort_float(s: Setup) -> Prepared:
    path = float_onnx(s)
    return Prepared(ort_session(path), path.stat().st_size)


def ort_quantize_static(s: Setup) -> Prepared:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Crops(CalibrationDataReader):
        def __init__(self, batches: list[torch.Tensor]):
            self.items = iter([{"input": x.numpy()} for x in batches])

        def get_next(self):
            return next(self.items, None)

    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ONNX Runtime's documented flow: shape inference and graph optimization (BN folding, fusions) first;
    # quantizing the raw export instead runs slower than ORT float (ResNet-18: 25.0 vs 14.9 ms)
    source, quantized = s.workdir / f"{s.name}_ort_pre.onnx", s.workdir / f"{s.name}_ort_int8.onnx"
    quant_pre_process(str(float_onnx(s)), str(source))
    quantize_static(source, quantized, Crops(s.singles), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return Prepared(ort_session(quantized), quantized.stat().st_size)


def openvino_compiled(path: Path) -> nn.Module:
    import openvino as ov

    # f32: on CPUs with bf16 OpenVINO would run the float ops in bf16 by default
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": THREADS,
                                                          "INFERENCE_PRECISION_HINT": "f32"})
    output = compiled.output(0)
    return PerSample(lambda t: torch.from_numpy(compiled([t.numpy()])[output].copy()))


def openvino_float(s: Setup) -> Prepared:
    path = float_onnx(s)
    return Prepared(openvino_compiled(path), path.stat().st_size)


def nncf_openvino(s: Setup) -> Prepared:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(float_onnx(s)))
    calibration = nncf.Dataset([x.numpy() for x in s.singles])
    quantized = nncf.quantize(model, calibration, subset_size=len(s.singles))  # its defaults: the mixed preset
    path = s.workdir / f"{s.name}_nncf.xml"
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return Prepared(openvino_compiled(path), path.stat().st_size + path.with_suffix(".bin").stat().st_size)


def qpasses_lowered(s: Setup, backend: str) -> tuple[nn.Module, float]:
    return s.once(f"qpasses_{backend}", lambda: qpasses_ptq(s.model, s.photos.calib, backend))


def qpasses_eager(backend: str) -> Callable[[Setup], Prepared]:
    def build(s: Setup) -> Prepared:
        model, _ = qpasses_lowered(s, backend)
        return Prepared(model, state_bytes(model))

    return build


def qpasses_torchscript(s: Setup) -> Prepared:
    model, _ = qpasses_lowered(s, "x86")
    scripted = torchscript(model, s.example)
    archive = io.BytesIO()
    torch.jit.save(scripted, archive)
    # the trace is specialized to the example's shape; it runs like the other fixed-shape rows
    return Prepared(PerSample(OnEngine(scripted, "x86")), archive.getbuffer().nbytes)


def qpasses_onnx(reduce_range: str) -> Callable[[Setup], Prepared]:
    def build(s: Setup) -> Prepared:
        model, _ = qpasses_lowered(s, "x86")
        path = export_onnx(model, s.example, s.workdir / f"{s.name}_qpasses_{reduce_range}.onnx", reduce_range)
        return Prepared(ort_session(path), path.stat().st_size)

    return build


def qpasses_target(target: str) -> Callable[[Setup], Prepared]:
    """qpasses PTQ with the target's preset, ending at the reference graph, deployed by ``qpasses.lower``."""

    def build(s: Setup) -> Prepared:
        import importlib

        reference, _ = s.once(f"qpasses_reference_{target}",
                              lambda: qpasses_ptq(s.model, s.photos.calib, target, lower=False))
        path = s.workdir / f"{s.name}_qpasses_{target}.onnx"
        deployed = importlib.import_module(f"qpasses.lower.{target}").deploy(reference, s.example, path,
                                                                             threads=THREADS)
        return Prepared(PerSample(deployed), path.stat().st_size, note=_kernels(deployed.int8_kernels))

    return build


def _kernels(census: dict[str, int]) -> str:
    return "int8: " + ", ".join(f"{n} {op}" for op, n in census.items())

def executorch_threads() -> None:
    """ExecuTorch's XNNPACK runs on its own threadpool, not torch's: the rows' thread count there too."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(THREADS)


def executorch_float(s: Setup) -> Prepared:
    """ExecuTorch's float path: the exported model lowered whole to XNNPACK's fp32 kernels."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    executorch_threads()
    exported = torch.export.export(copy.deepcopy(s.model), (s.example,))
    path = s.workdir / f"{s.name}_float.pte"
    path.write_bytes(to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    program = Runtime.get().load_program(path)
    method = program.load_method("forward")
    runner = PerSample(lambda x, program=program: method.execute([x])[0])  # the method needs its program alive
    return Prepared(runner, path.stat().st_size)


def executorch_deployed(s: Setup, reference: nn.Module, label: str) -> Prepared:
    """``reference`` (a Q/DQ graph for batch 1) lowered by qpasses' xnnpack target, which checks that every
    quantized op runs in XNNPACK's int8 kernels."""
    executorch_threads()
    deployed = deploy(reference, "xnnpack", (s.example,), s.workdir / f"{s.name}_{label}.pte")
    return Prepared(PerSample(deployed), deployed.artifact.stat().st_size)


def executorch_xnnpack_quantizer(s: Setup) -> Prepared:
    """ExecuTorch's documented int8 flow: XNNPACKQuantizer (symmetric per-channel weights) → prepare_pt2e →
    calibrate → convert_pt2e → to_edge_transform_and_lower with the XnnpackPartitioner."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(copy.deepcopy(s.model), (s.example,)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in s.singles:  # the exported graph is specialized to batch 1
            prepared(x)
    return executorch_deployed(s, convert_pt2e(prepared), "xnnpack_quantizer")


def qpasses_xnnpack(s: Setup) -> Prepared:
    """qpasses PTQ with the xnnpack preset, its reference graph lowered to XNNPACK."""
    reference, _ = s.once("qpasses_xnnpack", lambda: qpasses_ptq(s.model, s.photos.calib, "xnnpack", lower=False))
    return executorch_deployed(s, reference, "qpasses")


# key: (label, build, the shared build it starts from: its seconds count into the row's prepare time)
METHODS: dict[str, tuple[str, Callable[[Setup], Prepared], str | None]] = {
    "float": ("float eager", float_eager, None),
    "fx-x86": ("torch.ao FX x86", torch_ao_fx("x86"), None),
    "fx-qnnpack": ("torch.ao FX qnnpack", torch_ao_fx("qnnpack"), None),
    "float-compile": ("float torch.compile (freezing)", float_compiled, None),
    "pt2e": ("torchao PT2E X86Inductor + compile", pt2e_x86_inductor, None),
    "qpasses-inductor": ("qpasses → inductor (compile, freezing)", qpasses_inductor, None),
    "ort-float": ("ONNX Runtime float", ort_float, "float_onnx"),
    "ort-static": ("ONNX Runtime quantize_static", ort_quantize_static, "float_onnx"),
    "qpasses-x86": ("qpasses x86", qpasses_eager("x86"), "qpasses_x86"),
    "qpasses-qnnpack": ("qpasses qnnpack", qpasses_eager("qnnpack"), "qpasses_qnnpack"),
    "qpasses-torchscript": ("qpasses x86 TorchScript", qpasses_torchscript, "qpasses_x86"),
    "qpasses-onnx": ("qpasses → ONNX Runtime (QDQ)", qpasses_onnx("keep"), "qpasses_x86"),
    "qpasses-onnx-widen": ("qpasses → ONNX Runtime (QDQ, 7-bit widened)", qpasses_onnx("widen"), "qpasses_x86"),
    "qpasses-ort": ("qpasses → target onnx (ONNX Runtime)", qpasses_target("onnx"), "qpasses_reference_onnx"),
    "ov-float": ("OpenVINO float", openvino_float, "float_onnx"),
    "nncf-ov": ("NNCF → OpenVINO", nncf_openvino, "float_onnx"),
    "qpasses-ov": ("qpasses → target openvino", qpasses_target("openvino"), "qpasses_reference_openvino"),
    "executorch-float": ("ExecuTorch XNNPACK float", executorch_float, None),
    "executorch-xnnpack": ("ExecuTorch XNNPACKQuantizer → XNNPACK", executorch_xnnpack_quantizer, None),
    "qpasses-xnnpack": ("qpasses → ExecuTorch XNNPACK", qpasses_xnnpack, "qpasses_xnnpack"),
}


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> int | None:
    """Reset the process' peak resident size (Linux ``VmHWM``) to the current one; return that size in kB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


def peak_growth_mb(since_kb: int | None) -> float | None:
    """How far the peak resident size rose above ``since_kb`` (from :func:`reset_peak`), in MiB."""
    peak = _status_kb("VmHWM")
    return None if since_kb is None or peak is None else max(peak - since_kb, 0) / 1024


def measure(s: Setup, method: str) -> tuple[dict, nn.Module | None]:
    """The row of ``method`` on ``s`` without its latency, and the runner to time (None if it failed)."""
    label, build, shared = METHODS[method]
    reused = shared in s.shared
    resident = reset_peak()
    prepared, seconds, error = timed(lambda: build(s))
    row = {"model": s.name, "method": label}
    if prepared is None:
        return {**row, "failure": error, "prepare_s": seconds}, None
    if reused:
        seconds += s.shared[shared][1]  # built for an earlier row, and part of this row's preparation too
    row["prepare_s"] = seconds

    def run() -> dict:
        x = s.example
        with torch.inference_mode():
            for _ in range(3):
                prepared.runner(x)
        peak = peak_growth_mb(resident)
        measured = {"size_mb": prepared.size_bytes / 2**20, "peak_mb": peak, "note": prepared.note}
        if s.name == FIDELITY_MODEL:
            reference = prepared.reference or s.model
            measured["sqnr_db"], measured["agreement"] = fidelity(reference, prepared.runner, s.photos.evals)
        return measured

    measured, _, error = timed(run)
    if measured is None:
        return {**row, "failure": f"builds, then fails: {error}"}, None
    return {**row, **measured}, prepared.runner


def time_round_robin(runners: dict[str, nn.Module], x: torch.Tensor, iters: int, rounds: int) -> dict[str, float]:
    """Median latency (ms) of each runner, timed in turns: ``rounds`` rounds of ``iters // rounds`` calls each.

    On a machine whose speed drifts (a shared host), timing one row after another would hand the drift to
    whichever row ran during it; in turns every row sees it alike. The result is the median of the rounds'
    medians."""
    medians: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(rounds):
        for key, runner in runners.items():
            timing = latency(runner, (x,), warmup=2, iters=max(iters // rounds, 1), threads=THREADS)
            medians[key].append(timing["median_ms"])
    return {key: statistics.median(values) for key, values in medians.items()}


def _format(row: dict) -> list[str]:
    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return "" if value is None else format(value, fmt)

    if "failure" in row:
        return [row["model"], row["method"], "fails", "", "", num("prepare_s", ".1f"), "", "", row["failure"]]
    return [row["model"], row["method"], num("latency_ms", ".1f"), num("size_mb", ".1f"), num("peak_mb", ".0f"),
            num("prepare_s", ".1f"), num("sqnr_db", ".1f"), num("agreement", ".1%"), row.get("note", "")]


HEADER = ["model", "method", "latency ms", "size MB", "peak MB", "prepare s", "SQNR dB", "top-1 agreement", "note"]


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="compare", unit="row")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Side-by-side int8 benchmark (latency, size, memory, fidelity)")
    parser.add_argument("--quick", action="store_true", help="8 calibration / 16 eval crops, 3 iterations; no file")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--resume", action="store_true",
                        help=f"reuse rows that an earlier full run cached in {CACHE} (every full run writes it)")
    parser.add_argument("--print-only", action="store_true",
                        help="a full run that prints its table only (no BENCHMARKS.md section, no cache)")
    args = parser.parse_args(argv)
    models, methods = args.models.split(","), args.methods.split(",")
    for value, known, what in ((models, MODELS, "model"), (methods, METHODS, "method")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")
    torch.manual_seed(0)
    # Every model's first call (qpasses' verification forward, the warm-up) at the timed thread count: the x86
    # engine's oneDNN convs keep the primitive built on their first call and rebuild it on every call that
    # differs in shape or thread count (measured: +8% per conv).
    torch.set_num_threads(THREADS)
    photos = PhotoSet.make(8, 16) if args.quick else PhotoSet.make(64, 128)
    iters, rounds = (3, 1) if args.quick else (60, 6)
    settings = {"quick": args.quick, "torch": torch.__version__}
    cache = json.loads(CACHE.read_text()) if args.resume and CACHE.exists() and not args.quick else {}
    if cache.get("settings") != settings:
        cache = {"settings": settings, "rows": {}}
    progress = _progress(len(models) * len(methods))
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            keys = [f"{name}|{method}" for method in methods]
            if not all(key in cache["rows"] for key in keys):
                # a model's rows are built, then timed in turns, together (resume skips only whole models)
                setup = Setup(name, zoo.get(name, pretrained=name == FIDELITY_MODEL).eval(), photos, Path(workdir))
                rows, runners = {}, {}
                for key, method in zip(keys, methods, strict=True):
                    rows[key], runner = measure(setup, method)
                    if runner is not None:
                        runners[key] = runner
                for key, ms in time_round_robin(runners, setup.example, iters, rounds).items():
                    rows[key]["latency_ms"] = ms
                cache["rows"].update(rows)
                del setup, runners
                if not (args.quick or args.print_only):
                    CACHE.parent.mkdir(exist_ok=True)
                    CACHE.write_text(json.dumps(cache, indent=1))
            for key in keys:
                line = " | ".join(_format(cache["rows"][key]))
                if progress is not None:
                    progress.update(1)
                    progress.write(line)
                else:
                    print(line, flush=True)
    if progress is not None:
        progress.close()
    rows = [_format(cache["rows"][f"{n}|{m}"]) for n in models for m in methods]
    machine = f"{describe_machine(THREADS)}, batch 1, 224×224"
    body = "\n\n".join([
        f"## Side by side (`{COMMAND}`)\n\nMachine: {machine}. Calibration: {sum(len(b) for b in photos.calib)} "
        f"photo crops; fidelity: {sum(len(b) for b in photos.evals)} other crops, pretrained "
        f"{FIDELITY_MODEL} (other models have random weights: latency and size only). Peak MB: rise of peak "
        "resident memory while preparing and running the row (a lower bound: freed memory is reused). Prepare s: quantize / export / "
        "compile until the first output (qpasses' export rows include its PTQ).",
        markdown_table(HEADER, rows),
    ])
    print(body)
    if not (args.quick or args.print_only):
        write_section("compare", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
