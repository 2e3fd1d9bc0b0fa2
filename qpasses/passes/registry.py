"""Passes by name, for the command line and for pipelines written as text (``"fusebn,ptq"``).

Each entry is one line: a name, a factory that builds the pass from the shared ``PassOptions`` (backend,
bits, calibration data, ...), and a one-line summary for ``qpasses list``. A new pass is registered by
adding its line to ``PASSES``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from qpasses.errors import QPassesError
from qpasses.passes.adaround import AdaRound
from qpasses.passes.base import Pass
from qpasses.passes.bias_correction import BiasCorrection
from qpasses.passes.calibrate import Calibrate
from qpasses.passes.cle import CLE
from qpasses.passes.dynamic_quant import DynamicQuant
from qpasses.passes.fuse_bn import FuseBN
from qpasses.passes.high_bias_absorption import HighBiasAbsorption
from qpasses.passes.insert_observers import InsertObservers
from qpasses.passes.lower import Lower
from qpasses.passes.mixed_precision import MixedPrecision
from qpasses.passes.ptq import PTQ
from qpasses.passes.qat import QAT
from qpasses.passes.reference import Reference
from qpasses.passes.replace_functional import ReplaceFunctional


class PassOptionError(QPassesError):
    """A pass name that is not registered, or options a pass cannot take."""


@dataclass(frozen=True)
class PassOptions:
    """What the factories may read. ``calibration`` returns the calibration batches; it is called only by
    passes that need data, so a float-only pipeline never loads any (pass a cached function)."""

    backend: str = "x86"
    bits: int | None = None
    per_channel: bool | None = None
    quantize_output: bool | None = None
    num_batches: int | None = None
    budget: float | int = 0.6
    progress: bool = True
    target_sqnr: float | None = None  # PTQ searches for the cheapest pipeline reaching it
    recipe: bool = True  # PTQ adds the measured accuracy passes of its setting
    lower: bool = True  # PTQ lowers to torch.ao kernels; False: it ends at the reference graph (qpasses.lower)
    calibration: Callable[[], Iterable] | None = None

    def data(self, pass_name: str) -> Iterable:
        if self.calibration is None:
            raise PassOptionError(f"pass '{pass_name}' needs calibration data, and none was given")
        return self.calibration()



def _dynamic_int8(options: PassOptions) -> Pass:
    if options.bits not in (None, 8):
        raise PassOptionError(f"pass 'dynamic' quantizes to 8 bits only, not {options.bits}")
    return DynamicQuant(backend=options.backend)


@dataclass(frozen=True)
class PassEntry:
    factory: Callable[[PassOptions], Pass]
    summary: str


PASSES: dict[str, PassEntry] = {
    "fusebn": PassEntry(lambda o: FuseBN(), "fold BatchNorm into the preceding conv/linear"),
    "functional": PassEntry(lambda o: ReplaceFunctional(), "+, *, cat → FloatFunctional modules"),
    "cle": PassEntry(lambda o: CLE(), "cross-layer equalization (exact, ReLU6 as a per-channel clamp)"),
    "hba": PassEntry(lambda o: HighBiasAbsorption(), "absorb high biases into the next layer (3σ from BN statistics)"),
    "biascorrection": PassEntry(lambda o: BiasCorrection(o.data("biascorrection"), o.num_batches),
                                "correct the mean output shift quantization causes, layer by layer"),
    "biascorrection-analytical": PassEntry(lambda o: BiasCorrection(), "bias correction from BN statistics (no data)"),
    "adaround": PassEntry(lambda o: AdaRound(o.data("adaround"), o.num_batches, progress=o.progress),
                          "learned weight rounding on calibration data"),
    "observe": PassEntry(lambda o: InsertObservers(o.backend, bits=o.bits, per_channel=o.per_channel,
                                                 quantize_output=o.quantize_output),
                         "decide what runs int8 and insert observers"),
    "calibrate": PassEntry(lambda o: Calibrate(o.data("calibrate"), o.num_batches, o.progress),
                           "run calibration batches through the observers"),
    "lower": PassEntry(lambda o: Lower(o.backend), "replace observed ops by int8 kernels of the backend"),
    "reference": PassEntry(lambda o: Reference(o.backend),
                           "instead of lower: float ops between quantize/dequantize ops (convert_pt2e's dialect), "
                           "the graph the deployment targets take"),
    "ptq": PassEntry(lambda o: PTQ(o.data("ptq"), o.backend, bits=o.bits, per_channel=o.per_channel,
                                   num_batches=o.num_batches, progress=o.progress, recipe=o.recipe,
                                   target_sqnr=o.target_sqnr, quantize_output=o.quantize_output, lower=o.lower),
                     "post-training static quantization: observe → calibrate → lower, with the measured recipe of "
                     "its setting (--no-recipe: without); --target-sqnr DB: the cheapest pipeline reaching DB"),
    "qat": PassEntry(lambda o: QAT(o.backend, bits=o.bits, per_channel=o.per_channel,
                                   quantize_output=o.quantize_output),
                     "fake-quant model to train in any loop, then qpasses.convert (lowering deferred)"),
    "mixed": PassEntry(lambda o: MixedPrecision(o.budget, data=o.data("mixed"), num_batches=o.num_batches,
                                                progress=o.progress),
                       "4/6/8-bit weights per layer within --budget of the 8-bit size, for the PTQ that follows"),
    "dynamic": PassEntry(lambda o: _dynamic_int8(o),
                         "dynamic int8 Linear/LSTM/GRU (no calibration)"),
}


def pass_names() -> list[str]:
    return list(PASSES)


def parse_pipeline(text: str | Sequence[str]) -> list[str]:
    """``"fusebn, ptq"`` or ``["fusebn", "ptq"]`` → ``["fusebn", "ptq"]``; unknown names are an error."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise PassOptionError(f"no passes given; choose from: {', '.join(PASSES)}")
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise PassOptionError(f"unknown pass '{unknown[0]}'; registered passes: {', '.join(PASSES)}")
    return names


def build_pipeline(text: str | Sequence[str], options: PassOptions) -> list[Pass]:
    """The passes named by ``text``, each built from ``options``."""
    passes = []
    for name in parse_pipeline(text):
        try:
            passes.append(PASSES[name].factory(options))
        except ValueError as exc:
            raise PassOptionError(f"pass '{name}': {exc}") from exc
    return passes
