"""Long fuzz run: random networks through every pipeline for N minutes, failures classified and tabulated.

    python -m tools.fuzz --minutes 10 [--seed S] [--json FILE] [--pipelines ptq_x86,qat_x86] [--all-features]

Runs the generator and checks of ``tests/fuzz/random_graphs.py`` (the fast property test runs the same ones
under hypothesis). Graph ``i`` of seed ``S`` is ``random_spec(random.Random(f"{S}:{i}"))``; every failure
class is listed with its smallest graph as ``check(Spec(...))``, which reproduces it. Prints a Markdown
summary: per pipeline, the outcome counts and the smallest margin of the measured SQNR over the predicted
one (the per-op error budget: ``predicted_sqnr_db``), which is how ``MARGIN_DB`` was calibrated.
``--all-features`` ignores ``KNOWN_OPEN``: every feature is drawn and every pipeline checked on it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tests.fuzz.random_graphs import (
    CAPTURE,
    FAILURES,
    INTERNAL,
    MARGIN_DB,
    PIPELINES,
    REFUSED,
    SKIPPED,
    UNCLEAR,
    Outcome,
    Spec,
    check,
    random_spec,
)

STATUSES = ("ok", REFUSED, SKIPPED, *FAILURES)


def signature(outcome: Outcome) -> str:
    """What identifies a failure class: the status, and for an error its type and message with the names,
    numbers and pass positions that vary from graph to graph taken out."""
    if outcome.status not in (INTERNAL, UNCLEAR, REFUSED, SKIPPED):
        return outcome.status
    text = re.sub(r"\(pass \d+ of \d+[^)]*\)", "", outcome.detail.splitlines()[0])
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    text = re.sub(r"; reproducer written to .*", "", text)
    return f"{outcome.status}: {text[:160]}"


@dataclass
class Class:
    count: int = 0
    graph: int = -1
    spec: Spec | None = None
    detail: str = ""
    features: list[str] = field(default_factory=list)


@dataclass
class Summary:
    seed: int
    graphs: int = 0
    seconds: float = 0.0
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    classes: dict[tuple[str, str], Class] = field(default_factory=dict)
    margins: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    tightest: dict[str, tuple[float, int, Spec]] = field(default_factory=dict)  # smallest SQNR − prediction

    def add(self, graph: int, spec: Spec, outcomes: list[Outcome]) -> None:
        self.graphs += 1
        for o in outcomes:
            self.counts[o.pipeline][o.status] += 1
            if o.sqnr_db is not None and o.floor_db is not None and o.pipeline.startswith(("ptq", "qat")):
                margin = o.sqnr_db - o.floor_db - MARGIN_DB
                self.margins[o.pipeline].append(margin)
                if o.pipeline not in self.tightest or margin < self.tightest[o.pipeline][0]:
                    self.tightest[o.pipeline] = (margin, graph, spec)
            if o.status == "ok":
                continue
            cls = self.classes.setdefault((o.pipeline, signature(o)), Class())
            cls.count += 1
            if cls.spec is None or len(spec.ops) < len(cls.spec.ops):  # keep the smallest reproducer
                cls.graph, cls.spec, cls.detail, cls.features = graph, spec, o.detail, sorted(spec.features())

    def markdown(self) -> str:
        pipelines = [p for p in (CAPTURE, *PIPELINES) if p in self.counts]
        minutes = self.seconds / 60
        lines = [f"## qpasses fuzz: {self.graphs} random graphs in {minutes:.1f} min (seed {self.seed})", "",
                 f"Quantized pipelines fail below their predicted SQNR − {MARGIN_DB:.0f} dB.", "",
                 "| pipeline | " + " | ".join(STATUSES) + " | SQNR − prediction, dB: min / 5% / median |",
                 "|---" * (len(STATUSES) + 2) + "|"]
        for p in pipelines:
            margins = self.margins.get(p)
            low = ""
            if margins:
                low = " / ".join(f"{v:+.1f}" for v in _quantiles(margins)) + f" (#{self.tightest[p][1]})"
            lines.append(f"| {p} | " + " | ".join(str(self.counts[p][s]) for s in STATUSES) + f" | {low} |")
        for title, wanted in (("Failures", FAILURES), ("Refusals (one-line QPassesError: allowed)", (REFUSED,)),
                              ("Known open (skipped)", (SKIPPED,))):
            rows = [(key, c) for key, c in sorted(self.classes.items(), key=lambda kc: -kc[1].count)
                    if any(key[1].startswith(w) for w in wanted)]
            lines += ["", f"### {title}", ""]
            if not rows:
                lines.append("none")
                continue
            lines += ["| pipeline | class | count | smallest graph |", "|---|---|---|---|"]
            lines += [f"| {p} | {sig.replace('|', '/')} | {c.count} | #{c.graph} ({len(c.spec.ops)} ops) |"
                      for (p, sig), c in rows]
            if wanted is FAILURES:
                for (p, sig), c in rows:
                    lines += ["", f"- {p}, {sig} (#{c.graph}; features {', '.join(c.features)}): {c.detail[:300]}",
                              "  ```python", f"  check({c.spec!r}, pipelines=({p!r},))", "  ```"]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "seed": self.seed, "graphs": self.graphs, "seconds": round(self.seconds, 1),
            "counts": {p: dict(c) for p, c in self.counts.items()},
            "sqnr_minus_prediction_db": {p: dict(zip(("min", "p5", "median"), map(round, _quantiles(m), [2] * 3),
                                                     strict=True)) for p, m in self.margins.items()},
            "margin_db": MARGIN_DB,
            "tightest": {p: {"graph": g, "reproducer": f"check({spec!r})"}
                         for p, (_, g, spec) in self.tightest.items()},
            "classes": [{"pipeline": p, "class": sig, "count": c.count, "graph": c.graph, "detail": c.detail,
                         "features": c.features, "reproducer": f"check({c.spec!r})"}
                        for (p, sig), c in self.classes.items()],
        }


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return ordered[0], ordered[int(0.05 * (len(ordered) - 1))], statistics.median(ordered)


def run(minutes: float, seed: int, pipelines: tuple[str, ...], all_features: bool) -> Summary:
    summary = Summary(seed)
    start = time.perf_counter()
    graph = 0
    while time.perf_counter() - start < minutes * 60:
        spec = random_spec(random.Random(f"{seed}:{graph}"), exclude=frozenset() if all_features else None)
        summary.add(graph, spec, check(spec, pipelines, known_open={} if all_features else None))
        graph += 1
    summary.seconds = time.perf_counter() - start
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="how long to generate graphs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated, of {PIPELINES}")
    parser.add_argument("--all-features", action="store_true",
                        help="ignore KNOWN_OPEN: draw every feature and check every pipeline on it")
    args = parser.parse_args(argv)
    pipelines = tuple(p for p in args.pipelines.split(",") if p)
    if unknown := set(pipelines) - set(PIPELINES):
        parser.error(f"unknown pipeline(s) {sorted(unknown)}; choose from {PIPELINES}")
    warnings.filterwarnings("ignore")  # torch's deprecation warning for quantized tensors, once per op
    summary = run(args.minutes, args.seed, pipelines, args.all_features)
    print(summary.markdown())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary.to_json(), f, indent=1)
    return 1 if any(sig.split(":")[0] in FAILURES for _, sig in summary.classes) else 0


if __name__ == "__main__":
    sys.exit(main())
