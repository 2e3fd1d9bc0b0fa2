"""qpasses → inductor with and without the inductor preset's post-op fusion, against torch.ao FX x86 eager.

    python -m tools.bench.inductor_fusion --models resnet18,mobilenet_v2,tf_efficientnet_lite0,resnet50

The ``inductor`` preset names the ops inductor computes inside a conv's int8 kernel (``Backend.post_op``): a conv
read only by a residual add is left unrounded, and inductor runs conv + add (+ ReLU) as one
``qconv2d_pointwise.binary``. The ablation row is the same PTQ with the preset's ``post_op`` removed (each conv
requantizes, each add runs as its own dequantize/add/quantize loop). Rows as ``tools.bench.compare`` builds them; pretrained Lite0 also gets SQNR and top-1 agreement with the float
model on 128 photo crops (64 calibration crops; 16 for the random-weight models, which only give latency).
``qpasses-inductor-aoti`` runs the same reference graph from an AOTInductor package (``deploy(..., out=.pt2)``):
the same kernels, called from C++ without dynamo's guards and torch.compile's Python wrappers.

``--kernels`` also lists the oneDNN primitives each row runs per call (oneDNN's verbose log, rows called in turns),
per conv shape with their implementation and ms, and the rest of each call outside them.

Timing (batch 1, 224², ``--threads``): ``--rounds`` rounds, each calling every row ``--calls`` times in turn after two
warm-up calls. On a host shared with other work, a 2-thread call is slowed most by waits for a descheduled thread,
so each row reports the median call, the fastest call, and the median over rounds of its round median divided by
torch.ao FX x86's in the same round (the ratio column): rows of a round see the same load. At 1 thread it also
reports the calling thread's CPU time per call (``time.thread_time``: the work itself, whatever the load) and its
ratio to torch.ao FX x86's.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import qpasses_zoo as zoo
from qpasses.lower import deploy
from qpasses.quant import backends
from tools.bench import compare
from tools.bench.common import PhotoSet, describe_machine, markdown_table
from tools.bench.ptq import qpasses_ptq

ROWS = ("fx-x86", "pt2e", "qpasses-inductor-unfused", "qpasses-inductor", "qpasses-inductor-aoti")


def unfused_inductor(s: compare.Setup) -> compare.Prepared:
    """``compare.qpasses_inductor`` with the inductor preset's post-ops removed while it quantizes."""
    fused = backends.BACKENDS["inductor"]
    backends.BACKENDS["inductor"] = dataclasses.replace(fused, post_op=None)
    try:
        return compare.qpasses_inductor(s)
    finally:
        backends.BACKENDS["inductor"] = fused


def inductor_package(s: compare.Setup) -> compare.Prepared:
    """``compare.qpasses_inductor``'s reference graph deployed as an AOTInductor package (``deploy(..., out=.pt2)``)
    and run from the loaded package: the same kernels, called from its C++ wrapper without dynamo's guards and
    torch.compile's Python wrappers."""
    reference = qpasses_ptq(s.model, s.photos.calib, "inductor", lower=False)
    deployed = deploy(reference, "inductor", (s.example,), out=s.workdir / "qpasses_inductor.pt2")
    return compare.Prepared(compare.PerSample(deployed), compare.graph_tensor_bytes(reference),
                            note=f"{sum(deployed.int8_kernels.values())} oneDNN int8 kernels")


# One line per oneDNN primitive run: ``onednn_verbose,v1,primitive,exec,cpu,KIND,IMPLEMENTATION,...,PROBLEM,MS``.
_PRIMITIVE_RUN = re.compile(r"^onednn_verbose,(?:v1,)?primitive,exec,cpu,(\w+),([^,]+),.*,([^,]+),([0-9.]+)$")


def onednn_primitive_runs(runners: dict[str, Callable], x: torch.Tensor, threads: int,
                          calls: int) -> dict[str, list[tuple[str, str, float]]]:
    """The oneDNN primitives one call of each runner runs, in order, as (kind and problem, implementation, median
    ms over ``calls`` calls), from oneDNN's verbose log: the library writes it to file descriptor 1, which points at
    a temporary file meanwhile. The runners are called in turns, so that all see the same load."""
    libc = ctypes.CDLL(None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), tempfile.TemporaryFile(mode="w+") as log:
            for runner in runners.values():
                for _ in range(2):
                    runner(x)
            sys.stdout.flush()
            saved = os.dup(1)
            os.dup2(log.fileno(), 1)
            try:
                with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                    for _ in range(calls):
                        for key, runner in runners.items():
                            libc.fflush(None)  # oneDNN prints through C stdio; the marker goes straight to the file
                            os.write(1, f"runner {key}\n".encode())
                            runner(x)
            finally:
                libc.fflush(None)
                os.dup2(saved, 1)
                os.close(saved)
            log.seek(0)
            runs: dict[str, list[list[tuple[str, ...]]]] = {key: [] for key in runners}
            for line in log.read().splitlines():
                if line.startswith("runner "):
                    current = runs[line.split(" ", 1)[1]]
                    current.append([])
                elif match := _PRIMITIVE_RUN.match(line):
                    current[-1].append(match.groups())
    finally:
        torch.set_num_threads(previous)
    table = {}
    for key, per_call in runs.items():
        if len({len(call) for call in per_call}) != 1:
            raise RuntimeError(f"{key} ran a different number of oneDNN primitives from call to call")
        table[key] = [(f"{kind} {problem}", impl, statistics.median(float(call[i][3]) for call in per_call))
                      for i, (kind, impl, problem, _) in enumerate(per_call[0])]
    return table


def kernel_table(name: str, keys: list[str], primitive_runs: dict[str, list[tuple[str, str, float]]],
                 call_ms: dict[str, float]) -> list[list[str]]:
    """Rows per primitive problem (a conv's shape, stride and padding; a matmul's sizes): how often each runner
    runs it per call, with which implementation, and the ms they take in all; then each runner's sum and the rest
    of its call (``call_ms`` minus that sum: everything outside oneDNN's primitives). ``keys``: the columns;
    a runner missing from ``primitive_runs`` (its row failed) gets empty cells."""
    problems = list(dict.fromkeys(p for runs in primitive_runs.values() for p, _, _ in runs))
    table = []
    for problem in problems:
        cells = []
        for key in keys:
            mine = [(impl, ms) for p, impl, ms in primitive_runs.get(key, []) if p == problem]
            impls = ", ".join(sorted({impl for impl, _ in mine}))
            cells.append(f"{len(mine)}× {sum(ms for _, ms in mine):.3f} ({impls})" if mine else "")
        table.append([name, problem, *cells])
    totals = {key: sum(ms for _, _, ms in runs) for key, runs in primitive_runs.items()}
    table.append([name, "**all oneDNN primitives**", *(f"{totals[k]:.2f}" if k in totals else "" for k in keys)])
    table.append([name, "**rest of the call** (call − primitives)",
                  *(f"{call_ms[k] - totals[k]:.2f}" if k in totals else "" for k in keys)])
    return table


def time_in_turns(runners: dict[str, Callable], x: torch.Tensor, threads: int, rounds: int,
                  calls: int) -> tuple[dict[str, list[list[float]]], dict[str, list[float]]]:
    """Each runner's call times (ms), round by round, the runners called in turns within each round; and each
    runner's CPU time of the calling thread per call (ms)."""
    times: dict[str, list[list[float]]] = {key: [] for key in runners}
    cpu: dict[str, list[float]] = {key: [] for key in runners}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for key, runner in runners.items():
                    for _ in range(2):  # warm-up: oneDNN primitives are rebuilt when the thread count changed
                        runner(x)
                    round_times = []
                    for _ in range(calls):
                        start, start_cpu = time.perf_counter(), time.thread_time()
                        runner(x)
                        round_times.append((time.perf_counter() - start) * 1e3)
                        cpu[key].append((time.thread_time() - start_cpu) * 1e3)
                    times[key].append(round_times)
    finally:
        torch.set_num_threads(previous)
    return times, cpu


def load() -> str:
    """The 1, 5 and 15-minute load averages, as ``uptime`` prints them."""
    return ", ".join(f"{average:.2f}" for average in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,tf_efficientnet_lite0,resnet50")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--threads", default="2", help="comma-separated thread counts to time at")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--kernels", action="store_true",
                        help="also list the oneDNN primitives each row runs (oneDNN's verbose log), per conv shape, "
                             "with their ms per call and the rest of the call, at each of --threads")
    args = parser.parse_args(argv)
    compare.METHODS["qpasses-inductor-unfused"] = (
        "qpasses → inductor, no post-op fusion", unfused_inductor, None)
    compare.METHODS["qpasses-inductor-aoti"] = ("qpasses → inductor (AOTInductor package)", inductor_package, None)
    rows = args.rows.split(",")
    if "fx-x86" not in rows:
        parser.error("--rows needs fx-x86, the baseline of the ratio column")
    torch.manual_seed(0)
    torch.set_num_threads(compare.THREADS)
    table, kernels = [], []
    for name in args.models.split(","):
        pretrained = name == compare.FIDELITY_MODEL
        photos = PhotoSet.make(64, 128) if pretrained else PhotoSet.make(16, 16)
        with tempfile.TemporaryDirectory() as workdir:
            setup = compare.Setup(name, zoo.get(name, pretrained=pretrained).eval(), photos, Path(workdir))
            measured, runners = {}, {}
            for method in rows:
                measured[method], runner = compare.measure(setup, method)
                if runner is not None:
                    runners[method] = runner
            for threads in map(int, args.threads.split(",")):
                before = load()
                times, cpu = time_in_turns(runners, setup.example, threads, args.rounds, args.calls)
                machine_load = f"load {before} → {load()}"
                if args.kernels:
                    # at 1 thread the call's median CPU time (robust to load); otherwise its fastest wall time, as
                    # waits for a descheduled thread inflate the median on a loaded host
                    call_ms = {key: statistics.median(cpu[key]) if threads == 1 else min(c for r in times[key] for c in r)
                               for key in runners}
                    kernels += kernel_table(f"{name}, {threads} thread(s)", rows, onednn_primitive_runs(runners, setup.example, threads, 20),
                                            call_ms)
                base = [statistics.median(t) for t in times.get("fx-x86", [])]
                for method in rows:
                    row = measured[method]
                    fidelity = f"{row['sqnr_db']:.1f} dB, {row['agreement']:.1%}" if "sqnr_db" in row else ""
                    note = row.get("failure") or row.get("note", "")
                    if method not in times or not base:
                        table.append([name, row["method"], str(threads), "fails", "", "", "", fidelity, note])
                    else:
                        calls = [c for r in times[method] for c in r]
                        ratio = statistics.median([statistics.median(t) / b for t, b in zip(times[method], base, strict=True)])
                        work = (f"{statistics.median(cpu[method]):.2f} ms, "
                                f"{statistics.median(cpu[method]) / statistics.median(cpu['fx-x86']):.2f}"
                                if threads == 1 else "")
                        table.append([name, row["method"], str(threads), f"{statistics.median(calls):.2f}",
                                      f"{min(calls):.2f}", f"{ratio:.2f}", work, fidelity, f"{note}; {machine_load}"])
                    print(" | ".join(table[-1]), flush=True)
    print(f"\nMachine: {describe_machine(compare.THREADS)}, batch 1, 224×224\n")
    print(markdown_table(["model", "method", "threads", "median ms", "fastest ms", "/ FX x86 (rounds' median)",
                          "CPU per call, / FX x86", "Lite0 SQNR, top-1", "note"], table))
    if kernels:
        print("\noneDNN primitives per call (median ms over 20 calls in turns, oneDNN's verbose log): count× ms "
              "(implementation); the rest of the call is its median CPU time at 1 thread, its fastest wall time "
              "otherwise, minus the primitives' sum\n")
        print(markdown_table(["model", "primitive", *(compare.METHODS[k][0] for k in rows)], kernels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
