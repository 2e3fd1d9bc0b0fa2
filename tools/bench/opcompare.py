"""qpasses' lowered x86 graph next to torch.ao FX's, op by op: what each runs and what it costs.

    python -m tools.bench.opcompare                                 # ResNet-18, 1 and 2 threads
    python -m tools.bench.opcompare --models resnet18,resnet50 --reps 200 --threads 1

Prints three tables per model (nothing is written to BENCHMARKS.md):

- graph nodes by kind (module class, function or method name) in each lowered graph;
- torch.profiler self CPU time and number of calls per aten/quantized op, per forward;
- latency: the models alternate call by call in one process (so load from other processes hits both alike),
  medians over ``--reps`` calls. With 1 thread the CPU time of the calling thread is reported as well:
  it does not count time the thread waited while other processes ran, so it is stable on a busy machine.

Both are calibrated on the same random batches (latency does not depend on the weights' values). Each thread
count gets fresh copies of the models: the x86 engine's oneDNN convolutions cache the primitive built for
their first call's shape and thread count, and rebuild it on every call that differs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.profiler import ProfilerActivity, profile

import qpasses_zoo as zoo
from qpasses.graph.nx import node_kind
from tools.bench.common import markdown_table, torch_ao_fx_ptq
from tools.bench.ptq import qpasses_ptq

BACKEND = "x86"


def node_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """``module <class>``, ``function <name>`` or ``method <name>`` for calls; the op otherwise."""
    kinds = {"call_module": "module", "call_function": "function", "call_method": "method"}
    return f"{kinds[node.op]} {node_kind(gm, node)}" if node.op in kinds else node.op


def node_counts(gm: fx.GraphModule) -> Counter[str]:
    return Counter(node_label(gm, n) for n in gm.graph.nodes)


def profiled_ops(model: nn.Module, x: torch.Tensor, iters: int) -> dict[str, tuple[float, float]]:
    """Per op: self CPU ms and number of calls, per forward (averaged over ``iters`` forwards)."""
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                model(x)
    return {e.key: (e.self_cpu_time_total / 1e3 / iters, e.count / iters) for e in prof.key_averages()}


def interleaved_latency(models: dict[str, nn.Module], x: torch.Tensor, reps: int,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median ms of each model's ``model(x)``, the models called in turn ``reps`` times."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(3):
                model(x)
        for _ in range(reps):
            for name, model in models.items():
                start = clock()
                model(x)
                times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def lowered_pair(name: str, size: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    model = zoo.get(name).eval()
    calib = [torch.randn(2, 3, size, size) for _ in range(2)]
    return {"qpasses": qpasses_ptq(model, calib, BACKEND), "torch.ao": torch_ao_fx_ptq(model, calib, BACKEND)}


def count_table(models: dict[str, fx.GraphModule]) -> str:
    counts = {name: node_counts(gm) for name, gm in models.items()}
    kinds = sorted(set().union(*counts.values()))
    rows = [[kind, *(str(counts[name][kind]) for name in models)] for kind in kinds]
    rows.append(["**all nodes**", *(str(sum(c.values())) for c in counts.values())])
    return markdown_table(["node", *models], rows)


def profile_table(profiles: dict[str, dict[str, tuple[float, float]]], top: int = 15) -> str:
    total = {op: sum(p.get(op, (0.0, 0.0))[0] for p in profiles.values()) for p in profiles.values() for op in p}
    ops = sorted(total, key=total.get, reverse=True)[:top]
    header = ["op", *(f"{name} ms" for name in profiles), *(f"{name} calls" for name in profiles)]
    rows = [[op, *(f"{p.get(op, (0.0, 0.0))[0]:.3f}" for p in profiles.values()),
             *(f"{p.get(op, (0.0, 0.0))[1]:.0f}" for p in profiles.values())] for op in ops]
    rows.append(["**all ops**", *(f"{sum(v[0] for v in p.values()):.3f}" for p in profiles.values()),
                 *(f"{sum(v[1] for v in p.values()):.0f}" for p in profiles.values())])
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="qpasses vs torch.ao FX x86: lowered graphs op by op")
    parser.add_argument("--models", default="resnet18", help="comma-separated zoo names")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts for latency")
    parser.add_argument("--reps", type=int, default=100, help="calls of each model per latency measurement")
    parser.add_argument("--profile-iters", type=int, default=20)
    parser.add_argument("--size", type=int, default=224, help="input height and width (batch 1)")
    args = parser.parse_args(argv)
    x = torch.randn(1, 3, args.size, args.size)
    for name in args.models.split(","):
        threads = [int(t) for t in args.threads.split(",")]
        torch.set_num_threads(threads[0])
        models = lowered_pair(name, args.size)
        torch.backends.quantized.engine = BACKEND
        print(f"\n## {name}, {args.size}×{args.size}, batch 1\n\n{count_table(models)}\n")
        profiles = {label: profiled_ops(m, x, args.profile_iters) for label, m in models.items()}
        print(f"torch.profiler, {threads[0]} thread(s), per forward:\n\n{profile_table(profiles)}\n")
        for n in threads:
            torch.set_num_threads(n)
            fresh = {label: copy.deepcopy(m) for label, m in models.items()}
            wall = interleaved_latency(fresh, x, args.reps)
            line = ", ".join(f"{label} {ms:.2f} ms" for label, ms in wall.items())
            if n == 1:
                cpu = interleaved_latency(fresh, x, args.reps, time.thread_time)
                line += "; thread CPU time: " + ", ".join(f"{label} {ms:.2f} ms" for label, ms in cpu.items())
            print(f"latency, {n} thread(s), median of {args.reps}: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
