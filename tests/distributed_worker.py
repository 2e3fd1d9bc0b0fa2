"""Calibration, AdaRound and sensitivity on a fixed problem, written to ``OUT/<rank>.pt`` (``single.pt``
without torch.distributed). Run as ``torchrun --standalone --nproc_per_node 2 -m tests.distributed_worker OUT``
(gloo, CPU) and in one process; tests/test_distributed.py compares the files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from qpasses import PassManager
from qpasses.analysis.sensitivity import Sensitivity
from qpasses.errors import QPassesError
from qpasses.passes import AdaRound, BiasCorrection, Calibrate, FuseBN, InsertObservers
from qpasses.passes.calibrate import run_batches
from qpasses.quant.backends import get_backend
from qpasses.quant.observers import Observer, make_observer
from qpasses.quant.spec import QuantSpec

U8 = QuantSpec(signed=False, symmetric=False)
KINDS = {
    "minmax": U8,
    "moving_average": U8.replace(observer="moving_average", averaging_constant=0.3),
    "percentile": U8.replace(observer="percentile", percentile=99.0),
    "entropy": U8.replace(observer="entropy"),
    "mse": U8.replace(observer="mse"),
    "minmax_per_channel": U8.replace(axis=1),
    "moving_average_per_channel": U8.replace(axis=1, observer="moving_average", averaging_constant=0.3),
}


class Watched(nn.Module):
    """A conv whose output every observer kind watches; one moving-average observer also watches the input
    (twice a batch: its replay must keep the order within a batch too)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.watch = nn.ModuleDict({kind: make_observer(spec, kind) for kind, spec in KINDS.items()})
        self.shared = make_observer(KINDS["moving_average"], "shared")

    def forward(self, x):
        y = self.conv(self.shared(x))
        for observer in self.watch.values():
            observer(y)
        return self.shared(torch.relu(y))


class Weight(nn.Module):
    """One per-channel MSE observer (it accepts a single batch: with 2 ranks, one rank has no data)."""

    def __init__(self):
        super().__init__()
        self.obs = make_observer(U8.replace(axis=0, observer="mse", signed=True, symmetric=True), "weight")

    def forward(self, x):
        return self.obs(x)


class _ObserversAsLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, Observer) or super().is_leaf_module(m, qualified_name)


def traced(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, _ObserversAsLeaves().trace(model))


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Batches whose scale and offset change, so that the order of the batches matters to the moving
    average (and did to the old streaming histogram)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 8, 8, generator=g) * (0.5 + i) + (-1) ** i * i for i in range(n)]


def net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)).eval()


def config(observer: str):
    base = get_backend("x86").default_config()
    return base.__class__(**{**base.__dict__, "activation": base.activation.replace(observer=observer),
                             "weight": base.weight.replace(bits=4)})


def observer_states(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every observer buffer and qparam of ``model``."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, Observer):
            found.update({f"{name}.{key}": value.clone() for key, value in module.state_dict().items()})
            found[f"{name}.scale"], found[f"{name}.zero_point"] = module.qparams()
    return found


def scenario() -> dict[str, object]:
    data = batches(7)
    results: dict[str, object] = {}
    watched = traced(Watched())
    results["batches"] = run_batches(watched, data, 5, "calibrating", False)
    results["observers"] = observer_states(watched)
    weight = traced(Weight())
    run_batches(weight, [torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(3))], None, "weights", False)
    results["weight_observer"] = observer_states(weight)
    for observer in ("percentile", "entropy", "mse"):
        calibrated = PassManager([FuseBN(), InsertObservers("x86", config(observer)),
                                  Calibrate(data, num_batches=5, progress=False)]).run(net(), data[0])
        results[f"ptq_{observer}"] = observer_states(calibrated)
    rounded = PassManager([FuseBN(), InsertObservers("x86", config("minmax")), Calibrate(data, progress=False),
                           AdaRound(data[:3], iterations=40, lr=1e-2, checkpoints=4, progress=False)]).run(net(), data[0])
    results["adaround"] = {key: value.clone() for key, value in rounded.state_dict().items()}
    rounded = PassManager([FuseBN(), InsertObservers("x86", config("minmax")), Calibrate(data, progress=False),
                           AdaRound(data[:3], iterations=40, lr=1e-2, checkpoints=4, rows=16, progress=False)]
                          ).run(net(), data[0])
    results["adaround_rows"] = {key: value.clone() for key, value in rounded.state_dict().items()}
    corrected = PassManager([FuseBN(), InsertObservers("x86", config("minmax")), Calibrate(data, progress=False),
                             BiasCorrection(data, num_batches=5)]).run(net(), data[0])
    results["bias_correction"] = {key: value.clone() for key, value in corrected.state_dict().items()}
    poisoned = [x.clone() for x in data]
    poisoned[3][0, 0, 0, 0] = float("nan")  # rank 1's second batch
    try:
        run_batches(traced(Watched()), poisoned, None, "calibrating", False)
    except QPassesError as exc:
        results["failure"] = str(exc).splitlines()[0]
    sens = Sensitivity(net(), data[:3], config=config("minmax"), progress=False)
    table = sens.run()
    results["sensitivity"] = [table.full] + [(r.layer.name, r.alone, r.all_but) for r in table.rows]
    return results


def main(out: str) -> None:
    torch.set_num_threads(1)  # the same float arithmetic in every process
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        try:
            torch.save(scenario(), Path(out) / f"{dist.get_rank()}.pt")
        finally:
            dist.destroy_process_group()
    else:
        torch.save(scenario(), Path(out) / "single.pt")


if __name__ == "__main__":
    main(sys.argv[1])
