"""``qpasses quantize``: run a pipeline on a model, print the plan and the report, save the result."""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import asdict, replace
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
from qpasses.lower import TARGETS, Deployed, deploy
from qpasses.passes.manager import PassManager, Report
from qpasses.passes.registry import build_pipeline, parse_pipeline
from qpasses.quant.backends import BACKENDS
from qpasses.validation import check_out_path

EXAMPLES = """examples:
  qpasses quantize resnet18 --passes fusebn,ptq --backend x86 --out resnet18_int8.pt
  qpasses quantize tf_efficientnet_lite0 --pretrained --backend qnnpack --calib photos --num-batches 4
  qpasses quantize torchvision.models:mobilenet_v2 --bits 6 --calib ~/photos --json
  qpasses quantize resnet18 --target inductor --out resnet18_int8.pt2
"""

# torch.ao's engines, whose rows in the backend table carry the engine's own name; every other --target is a
# deployment runtime of qpasses.lower (read at run time, so a newly registered one needs no edit here).
TORCH_AO_TARGETS = tuple(name for name, backend in BACKENDS.items() if name == backend.engine)


def target_names() -> list[str]:
    return sorted({*TORCH_AO_TARGETS, *TARGETS})


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize", help="quantize a model and save it",
        description="Trace MODEL, run the passes (ordered by their contracts, each verified), print the plan, "
                    "progress and the report table, and save the result with torch.save.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="a zoo model (see `qpasses list models`) or module:factory")
    add_pipeline_arguments(parser, passes_default="fusebn,ptq")
    torch_ao, runtimes = ", ".join(TORCH_AO_TARGETS), ", ".join(sorted(TARGETS))
    parser.add_argument("--target", choices=target_names(),
                        help=f"where the model runs: a torch.ao engine ({torch_ao}: the int8 model, saved with "
                             f"torch.save; same as --backend) or a runtime ({runtimes}: PTQ with the runtime's preset "
                             "to the reference graph, then that runtime's artifact, e.g. an AOTInductor .pt2 for "
                             "inductor)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="save the quantized model here (torch.save), or the --target runtime's artifact")
    parser.add_argument("--eval", type=positive_int, metavar="N",
                        help="compare with the float model on N batches of held-out photo crops (never calibrated on): "
                             "SQNR of the outputs and top-1 agreement")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the plan and the table")
    parser.set_defaults(run=run, backend=None)  # None: not given (x86, or the --target's preset)


def resolve_target(args: argparse.Namespace) -> str | None:
    """Set ``args.backend`` from ``--backend``/``--target``; return the runtime target (None: torch.ao), after
    checking, before any work, that its runtime is installed and the pipeline ends in PTQ's reference graph."""
    target = args.target
    preset = target if target in TORCH_AO_TARGETS else TARGETS[target].backend if target else None
    if args.backend is not None and preset is not None and args.backend != preset:
        raise CLIError(f"--backend {args.backend} conflicts with --target {target}, whose kernels take the "
                       f"'{preset}' preset; drop --backend")
    args.backend = args.backend or preset or "x86"
    if target is None or target in TORCH_AO_TARGETS:
        return None
    extra = f"pip install 'qpasses[{TARGETS[target].extra}]'"
    try:
        module = importlib.import_module(TARGETS[target].module)
    except ModuleNotFoundError as exc:
        raise CLIError(f"--target {target} needs its runtime (no module '{exc.name}'): {extra}") from exc
    missing = getattr(module, "missing_runtime", lambda: None)()
    if missing is not None:
        raise CLIError(f"--target {target}: {missing}")
    suffix = getattr(module, "OUT_SUFFIX", None)
    if args.out is not None and suffix is not None and args.out.suffix != suffix:
        raise CLIError(f"--out {args.out}: --target {target} writes a {suffix} file; name it "
                       f"{args.out.with_suffix(suffix)}")
    if "ptq" not in parse_pipeline(args.passes):
        raise CLIError(f"--target {target} deploys the reference graph that pass 'ptq' writes; add ptq to --passes")
    return target


def run(args: argparse.Namespace) -> int:
    target = resolve_target(args)
    if args.out is not None:
        check_out_path(args.out)
    loaded = load_model(args.model, args.pretrained, args.input_size)
    calibration = calibration_loader(args.calib, loaded, args.num_batches, args.batch_size)
    options = replace(pass_options(args, calibration, progress=not args.json), lower=target is None)
    passes = build_pipeline(args.passes, options)
    pm = PassManager(passes)
    if not args.json:
        plan = pm.plan()
        pm.instruments.append(PrintProgress(len(plan.passes)))
        print(plan, flush=True)
    example = calibration()[0][:1]
    check_runs(args.model, loaded, example)
    quantized = pm.run(loaded.model, example)
    deployed = deploy_to(target, quantized, example, args.out) if target is not None else None
    if args.out is not None and deployed is None:
        try:
            torch.save(quantized, args.out)
        except (OSError, RuntimeError) as exc:  # torch's writer reports an unwritable file as a RuntimeError
            raise CLIError(f"--out {args.out}: cannot write: {one_line(exc)}") from exc
    held_out = evaluate(loaded, quantized, args.eval, args.batch_size) if args.eval else None
    if args.json:
        print(json.dumps({**summary(args, pm.report, example), "eval": held_out, **deployed_summary(deployed)},
                         indent=2))
        return 0
    print(pm.report)
    if held_out is not None:
        agreement = "" if held_out["top1_agreement"] is None else f", top-1 agreement {held_out['top1_agreement']:.1%}"
        simulated = "" if target is None else f", of the reference graph {target}'s int8 kernels compute"
        print(f"held-out ({held_out['images']} photo crops never calibrated on{simulated}): "
              f"SQNR {held_out['sqnr_db']} dB vs float{agreement}")
    if deployed is not None:
        kernels = ", ".join(f"{name} ×{count}" for name, count in deployed.int8_kernels.items())
        shape = "×".join(map(str, example.shape))
        where = f"saved {deployed.artifact} ({target}, " if deployed.artifact else f"deployed to {target} in memory ("
        print(f"{where}inputs {shape}); int8 kernels: {kernels}")
    elif args.out is not None:
        print(f"saved {args.out}")
    return 0


def deploy_to(target: str, reference: torch.nn.Module, example: torch.Tensor, out: Path | None) -> Deployed:
    """``qpasses.lower.deploy``; a runtime that fails to import is one line naming the pip extra."""
    try:
        return deploy(reference, target, (example,), out)
    except ModuleNotFoundError as exc:
        raise CLIError(f"--target {target} needs its runtime (no module '{exc.name}'): "
                       f"pip install 'qpasses[{TARGETS[target].extra}]'") from exc


def deployed_summary(deployed: Deployed | None) -> dict:
    if deployed is None:
        return {}
    return {"artifact": None if deployed.artifact is None else str(deployed.artifact),
            "int8_kernels": deployed.int8_kernels}


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
        "target": args.target,
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
