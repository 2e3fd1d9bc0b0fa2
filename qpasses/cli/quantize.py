"""``qpasses quantize``: run a pipeline on a model, print the plan and the report, save the result."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from qpasses.analysis.metrics import sqnr, topk_agreement
from qpasses.cli.common import (
    CLIError,
    LoadedModel,
    PrintProgress,
    add_pipeline_arguments,
    calibration_loader,
    check_runs,
    held_out_photos,
    json_number,
    load_model,
    one_line,
    pass_options,
    positive_int,
)
from qpasses.passes.manager import PassManager, Report
from qpasses.passes.registry import build_pipeline
from qpasses.validation import check_out_path

EXAMPLES = """examples:
  qpasses quantize resnet18 --passes fusebn,ptq --backend x86 --out resnet18_int8.pt
  qpasses quantize tf_efficientnet_lite0 --pretrained --backend qnnpack --calib photos --num-batches 4
  qpasses quantize torchvision.models:mobilenet_v2 --bits 6 --calib ~/photos --json
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize", help="quantize a model and save it",
        description="Trace MODEL, run the passes (ordered by their contracts, each verified), print the plan, "
                    "progress and the report table, and save the result with torch.save.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="a zoo model (see `qpasses list models`) or module:factory")
    add_pipeline_arguments(parser, passes_default="fusebn,ptq")
    parser.add_argument("--out", type=Path, metavar="FILE", help="save the quantized model here (torch.save)")
    parser.add_argument("--eval", type=positive_int, metavar="N",
                        help="compare with the float model on N batches of held-out photo crops (never calibrated on): "
                             "SQNR of the outputs and top-1 agreement")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the plan and the table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_out_path(args.out)
    loaded = load_model(args.model, args.pretrained, args.input_size)
    calibration = calibration_loader(args.calib, loaded, args.num_batches, args.batch_size)
    passes = build_pipeline(args.passes, pass_options(args, calibration, progress=not args.json))
    pm = PassManager(passes)
    if not args.json:
        plan = pm.plan()
        pm.instruments.append(PrintProgress(len(plan.passes)))
        print(plan, flush=True)
    example = calibration()[0][:1]
    check_runs(args.model, loaded, example)
    quantized = pm.run(loaded.model, example)
    if args.out is not None:
        try:
            torch.save(quantized, args.out)
        except (OSError, RuntimeError) as exc:  # torch's writer reports an unwritable file as a RuntimeError
            raise CLIError(f"--out {args.out}: cannot write: {one_line(exc)}") from exc
    held_out = evaluate(loaded, quantized, args.eval, args.batch_size) if args.eval else None
    if args.json:
        print(json.dumps({**summary(args, pm.report, example), "eval": held_out}, indent=2))
        return 0
    print(pm.report)
    if held_out is not None:
        agreement = "" if held_out["top1_agreement"] is None else f", top-1 agreement {held_out['top1_agreement']:.1%}"
        print(f"held-out ({held_out['images']} photo crops never calibrated on): "
              f"SQNR {held_out['sqnr_db']} dB vs float{agreement}")
    if args.out is not None:
        print(f"saved {args.out}")
    return 0


def evaluate(loaded: LoadedModel, quantized: torch.nn.Module, num_batches: int, batch_size: int) -> dict:
    """SQNR of ``quantized``'s outputs against the float model's, and top-1 agreement for classifiers."""
    batches = held_out_photos(loaded, num_batches, batch_size)
    with torch.no_grad():
        reference = torch.cat([loaded.model(b) for b in batches])
        output = torch.cat([quantized(b) for b in batches])
    classifier = reference.dim() == 2
    return {"images": sum(len(b) for b in batches), "sqnr_db": json_number(sqnr(reference, output)),
            "top1_agreement": round(topk_agreement(reference, output), 4) if classifier else None}


def summary(args: argparse.Namespace, report: Report, example: torch.Tensor) -> dict:
    records = []
    for record in report.records:
        fields = asdict(record)
        fields["sqnr_db"] = json_number(record.sqnr_db)
        records.append(fields)
    return {
        "model": args.model,
        "backend": args.backend,
        "bits": args.bits,
        "input_shape": list(example.shape),
        "plan": [p.name for p in report.plan.passes],
        "plan_notes": report.plan.notes,
        "sqnr_db_on_example": json_number(report.records[-1].sqnr_db),
        "out": str(args.out) if args.out is not None else None,
        "passes": records,
        "capture": report.capture.method if report.capture is not None else None,
        "left_opaque": report.opaque_modules,
    }
