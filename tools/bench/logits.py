"""The model's output in float (default) against rounded to 8 bits (``quantize_output=True``): logit SQNR and top-1
agreement with the float model, same calibration, on x86 (qnnpack has no int8 linear that writes float, so its
logits are rounded either way).

    python -m tools.bench.logits            # writes its table into BENCHMARKS.md
    python -m tools.bench.logits --quick    # fewer crops, prints only

ResNet-18 and MobileNetV2 with random weights (seeded; BatchNorm statistics from the calibration photos),
tf_efficientnet_lite0 pretrained; real photo crops (``PhotoSet``: 64 calibration, 128 evaluation), 224×224,
FuseBN + PTQ. "head µs": the lowered last linear alone on
its int8 input at batch 1, one thread (``torch.utils.benchmark``): the 8-bit form followed by the dequantize the
graph then runs, against the int8 kernel that writes float.
"""

from __future__ import annotations

import argparse

import torch
import torch.ao.nn.quantized as nnq
from torch.utils import benchmark

import qpasses_zoo as zoo
from tools.bench.common import PhotoSet, fidelity, markdown_table, pretrained_lite0, write_section
from tools.bench.ptq import qpasses_ptq

COMMAND = "python -m tools.bench.logits"
MODELS = ("resnet18", "mobilenet_v2", "tf_efficientnet_lite0")


def model(name: str, photos: PhotoSet) -> torch.nn.Module:
    """The pretrained Lite0, or a seeded random model whose BatchNorm statistics are those of the calibration
    photos (with torchvision's init and unit statistics, MobileNetV2's ReLU6s saturate and every logit is
    the same)."""
    if name == "tf_efficientnet_lite0":
        return pretrained_lite0(name)
    torch.manual_seed(0)
    network = zoo.get(name, pretrained=False)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the batches
    network.train()
    with torch.no_grad():
        for batch in photos.calib:
            network(batch)
    return network.eval()


def head_microseconds(qmodel: torch.fx.GraphModule, x: torch.Tensor) -> float:
    """Median time of the lowered model's last linear on the int8 value it reads for ``x`` (plus the dequantize
    the graph runs after it when it writes 8 bits)."""
    node = [n for n in qmodel.graph.nodes
            if n.op == "call_module" and isinstance(qmodel.get_submodule(n.target), nnq.Linear)][-1]
    head, seen = qmodel.get_submodule(node.target), []
    handle = head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    qmodel(x)
    handle.remove()
    statement = "head(value).dequantize()" if head(seen[0]).is_quantized else "head(value)"
    timer = benchmark.Timer(statement, globals={"head": head, "value": seen[0]}, num_threads=1)
    return timer.blocked_autorange(min_run_time=1.0).median * 1e6


def rows(photos: PhotoSet, backends: list[str]) -> list[list[str]]:
    found = []
    x = photos.evals[0][:1]
    for name in MODELS:
        reference = model(name, photos)
        for backend in backends:
            row = [name, backend]
            for quantize_output in (True, False):
                qmodel = qpasses_ptq(reference, photos.calib, backend, quantize_output=quantize_output)
                db, agreement = fidelity(reference, qmodel, photos.evals)
                row += [f"{db:.2f}", f"{agreement:.1%}", f"{head_microseconds(qmodel, x):.1f}"]
            found.append(row)
            print(" | ".join(row), flush=True)
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 calibration and 32 evaluation crops; print only")
    parser.add_argument("--backends", default="x86")
    args = parser.parse_args(argv)
    photos = PhotoSet.make(16, 32) if args.quick else PhotoSet.make(64, 128)
    table = markdown_table(
        ["model", "backend", "8-bit logits: SQNR dB", "top-1 agreement", "head µs",
         "float logits (default): SQNR dB", "top-1 agreement", "head µs"],
        rows(photos, args.backends.split(",")))
    print(table)
    if not args.quick:
        what, _usage, setup = __doc__.strip().split("\n\n")
        write_section("logits", f"## The model's output: float (default) or 8-bit (`{COMMAND}`)\n\n"
                                f"{what}\n\n{setup}\n\n{table}\n")


if __name__ == "__main__":
    main()
