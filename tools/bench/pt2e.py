"""qpasses' decisions inside torchao's PT2E flow against torchao's own X86InductorQuantizer, same graph and data.

    python -m tools.bench.pt2e                          # resnet18, mobilenet_v2; 32 calibration, 32 evaluation crops
    python -m tools.bench.pt2e --models resnet18 --calib 16 --evals 16 --backends x86,onednn
    python -m tools.bench.pt2e --models resnet18,mobilenet_v2,mobilenet_v3_small,tf_efficientnet_lite0 --write

Each model (torchvision, random weights, BatchNorm statistics re-estimated as in ``tools.bench.coverage``, on as
many crops of their own as there are calibration crops; ``tf_efficientnet_lite0``: pretrained, the zoo's packaged ImageNet weights) is exported once (``torch.export``, non-strict, batch 8) and quantized by
``prepare_pt2e`` → calibration → ``convert_pt2e`` with each quantizer: torchao's ``X86InductorQuantizer`` (default
config) and ``qpasses.quant.pt2e.QPassesQuantizer(backend)``. Per row: SQNR of the logits of the converted (Q/DQ,
uncompiled) graph against the float model on the evaluation crops, top-1 agreement, convs/linears with int8
weights, prepare + calibration seconds (or the quantizer's error). One thread.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from torch import nn

from tools.bench.common import (
    PhotoSet,
    describe_machine,
    markdown_table,
    photo_batches,
    pretrained_lite0,
    timed,
    write_section,
)
from tools.bench.coverage import pt2e_quantized_layers, reestimate_batchnorm

BATCH = 8


def fidelity(model: nn.Module, converted: nn.Module, evals: list[torch.Tensor]) -> tuple[float, float]:
    from qpasses.analysis.metrics import sqnr, topk_agreement

    with torch.no_grad():
        ref = torch.cat([model(b) for b in evals])
        out = torch.cat([converted(b) for b in evals])
    return sqnr(ref, out), topk_agreement(ref, out)


def float_weight_layers(converted: torch.fx.GraphModule) -> set[str]:
    """Module paths of the convs/linears whose weight the converted graph reads in float (a plain attribute)."""
    aten = torch.ops.aten
    return {node.args[1].target.rpartition(".")[0] for node in converted.graph.nodes
            if node.target in (aten.conv2d.default, aten.linear.default) and node.args[1].op == "get_attr"}


def add_row(rows: list[list[str]], name: str, label: str, model: nn.Module, quantizer, calib: list[torch.Tensor],
            evals: list[torch.Tensor]) -> torch.fx.GraphModule | None:
    """Quantize ``model`` with ``quantizer``; append its row (or its error: the anchor's failures are results, e.g.
    on ResNets' reused ReLU) to ``rows``; return the converted graph or None."""
    from qpasses.quant.pt2e import quantize_pt2e

    converted, seconds, error = timed(lambda: quantize_pt2e(model, quantizer, calib))
    if converted is None:
        rows.append([name, label, error, "", "", f"{seconds:.1f}"])
    else:
        db, top1 = fidelity(model, converted, evals)
        rows.append([name, label, f"{db:.2f}", f"{top1:.3f}", str(pt2e_quantized_layers(converted)), f"{seconds:.1f}"])
    print(" | ".join(rows[-1]), flush=True)
    return converted


def main(argv: list[str] | None = None) -> None:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    import torchvision

    from qpasses.quant.backends import get_backend
    from qpasses.quant.pt2e import QPassesQuantizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--backends", default="x86,onednn")
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--evals", type=int, default=32)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    photos = PhotoSet.make(n_calib=args.calib, n_eval=args.evals)
    calib = list(torch.cat(photos.calib).split(BATCH))
    evals = list(torch.cat(photos.evals).split(BATCH))
    norm = photo_batches(args.calib, 224, seed=2, split="calib", batch_size=BATCH)  # the random models' statistics
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        if name == "tf_efficientnet_lite0":
            model = pretrained_lite0().eval()
        else:
            model = reestimate_batchnorm(torchvision.models.get_model(name, weights=None), norm).eval()
        quantizers = {"X86InductorQuantizer": lambda: xiq.X86InductorQuantizer().set_global(
            xiq.get_default_x86_inductor_quantization_config())}
        for backend in args.backends.split(","):
            quantizers[f"QPassesQuantizer({backend})"] = lambda backend=backend: QPassesQuantizer(backend)
        converted_by = {}
        for label, make in quantizers.items():
            converted_by[label] = add_row(rows, name, label, model, make(), calib, evals)
        # With the layers the anchor leaves float kept float too: the same quantized layers, compared.
        anchor, first = converted_by["X86InductorQuantizer"], args.backends.split(",")[0]
        ours = converted_by[f"QPassesQuantizer({first})"]
        if anchor is not None and ours is not None and float_weight_layers(anchor) - float_weight_layers(ours):
            config = get_backend(first).default_config()
            config.keep_float = float_weight_layers(anchor)
            label = f"QPassesQuantizer({first}), the {len(config.keep_float)} layers X86InductorQuantizer leaves float too"
            add_row(rows, name, label, model, QPassesQuantizer(first, config=config), calib, evals)
    header = ["model", "quantizer (prepare_pt2e → convert_pt2e)", "SQNR dB", "top-1 agr.", "int8 convs/linears",
              "prepare+calib s"]
    command = "python -m tools.bench.pt2e " + " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n\n".join([
        "## qpasses' decisions in torchao's PT2E flow (QPassesQuantizer vs X86InductorQuantizer)",
        f"`{command.strip()}`: torchvision models with random weights, BatchNorm statistics re-estimated on "
        "other crops than the calibration ones; tf_efficientnet_lite0 pretrained. SQNR of the converted (Q/DQ, uncompiled) graph's "
        "logits against the float model.",
        markdown_table(header, rows),
        f"{describe_machine()}; {args.calib} calibration and {args.evals} evaluation photo crops (224 px)."])
    print("\n" + body)
    if args.write:
        write_section("pt2e-quantizer", body)


if __name__ == "__main__":
    main()
