"""What to quantize to: ``QuantSpec`` (one tensor's integer grid), ``QuantPair`` and ``QuantConfig`` (which
spec each node gets), and ``compute_qparams`` (scale and zero point from an observed range).

A spec with ``bits`` b < 8 still lives in an 8-bit container (``torch.quint8``/``torch.qint8``): only its
integer range shrinks, so the int8 kernels run it unchanged and the packed size is what shrinks.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch

OBSERVERS = ("minmax", "moving_average", "percentile", "entropy", "mse")
# "histogram" is accepted as another name for "percentile" (a histogram observer clipping at a percentile).
_OBSERVER_ALIASES = {"histogram": "percentile"}
_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """The integer grid of one tensor and how its range is observed.

    Range, with ``e = bits − 1`` if ``reduce_range`` else ``bits``:
      unsigned: ``[0, 2^e − 1]``; signed: ``[−2^(e−1), 2^(e−1) − 1]``;
      ``narrow_range`` (signed symmetric only) drops the most negative value: ``[−2^(e−1) + 1, 2^(e−1) − 1]``.
    ``reduce_range`` exists for the u8×s8 kernels that add two u8·s8 products into a saturating int16
    (``vpmaddubsw``: fbgemm's and oneDNN's on CPUs without AVX-512 VNNI, fbgemm's depthwise ones on every CPU):
    ``2·255·128 > 32767``, ``2·127·128 ≤ 32767``. Annotation keeps it only on values such a kernel reads
    (``Backend.saturates``).

    ``headroom`` (with ``reduce_range`` only) keeps the reduced grid's step but lets codes past the observed
    range run on to the full ``bits``-bit range (``[0, 255]`` for u8), as torch.ao's x86 default does: values
    within the observed range are exactly as with ``reduce_range`` alone, values past it are clipped later,
    and the int8 kernels need no clamp of the codes (the container clips). The price: on CPUs without VNNI
    the codes past 127 can saturate fbgemm's int16 pair sums. ``quant_min``/``quant_max`` is the grid the
    range is observed and the scale computed on; ``code_min``/``code_max`` is where codes are clipped.

    ``axis`` None quantizes per tensor, else per channel along ``axis``. ``observer`` picks how the
    range is measured (``minmax``, ``moving_average``, ``percentile``/``histogram``, ``entropy``, ``mse``);
    ``percentile`` is the clipping percentile of the percentile observer, ``averaging_constant`` the EMA
    weight of the moving-average one. ``error_power`` ``p`` is what the ``mse`` observer's range search
    minimises: ``Σ |q(x) − x|^p`` over the values (2: the squared error; the other observers minimise nothing, and
    their specs hold 2). A larger ``p`` weighs the few large
    errors of clipped values more than the many small roundings, so it clips less: a rounding error is zero-mean
    and averages out in the sum a conv or linear takes over its inputs, where the clipped values' errors all have
    one sign and add up (``BENCHMARKS.md``, coverage: the range search).
    """

    signed: bool
    symmetric: bool
    bits: int = 8
    axis: int | None = None
    observer: str = "minmax"
    percentile: float = 99.99
    averaging_constant: float = 0.01
    error_power: float = 2.0
    reduce_range: bool = False
    headroom: bool = False
    narrow_range: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(
                f"QuantSpec.bits must be an int in [2, 8] (an 8-bit container), got {self.bits!r}"
            )
        if self.reduce_range and self.bits < 3:
            raise ValueError(f"QuantSpec.reduce_range leaves {self.bits - 1} bit; it needs bits >= 3")
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, int)):
            raise ValueError(
                f"QuantSpec.axis must be None (per tensor) or an int (per channel), got {self.axis!r}"
            )
        observer = _OBSERVER_ALIASES.get(self.observer, self.observer)
        if observer not in OBSERVERS:
            known = ", ".join((*OBSERVERS, *_OBSERVER_ALIASES))
            raise ValueError(f"QuantSpec.observer {self.observer!r} is unknown; choose one of: {known}")
        object.__setattr__(self, "observer", observer)
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"QuantSpec.percentile must be in (0, 100], got {self.percentile!r}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(
                f"QuantSpec.averaging_constant must be in (0, 1], got {self.averaging_constant!r}"
            )
        if isinstance(self.error_power, bool) or not isinstance(self.error_power, int | float) \
                or not 1.0 <= self.error_power <= 16.0:
            raise ValueError(f"QuantSpec.error_power must be a number in [1, 16], got {self.error_power!r}")
        if self.observer != "mse":  # no error to weigh: equal grids stay equal specs (``replace(observer=...)``)
            object.__setattr__(self, "error_power", 2.0)
        if self.narrow_range and not (self.signed and self.symmetric):
            raise ValueError(
                "QuantSpec.narrow_range drops the most negative value of a symmetric signed grid; "
                "it needs signed=True and symmetric=True"
            )
        if self.axis is not None and self.observer not in ("minmax", "moving_average", "mse"):
            raise ValueError(
                f"QuantSpec: the {self.observer!r} observer is per tensor only; "
                "per-channel (axis is not None) needs observer='minmax', 'moving_average' or 'mse' (weights)"
            )

    def _range(self, bits: int) -> tuple[int, int]:
        if not self.signed:
            return 0, 2**bits - 1
        return -(2 ** (bits - 1)) + (1 if self.narrow_range else 0), 2 ** (bits - 1) - 1

    @property
    def quant_min(self) -> int:
        return self._range(self.bits - 1 if self.reduce_range else self.bits)[0]

    @property
    def quant_max(self) -> int:
        return self._range(self.bits - 1 if self.reduce_range else self.bits)[1]

    @property
    def code_min(self) -> int:
        return self._range(self.bits)[0] if self.reduce_range and self.headroom else self.quant_min

    @property
    def code_max(self) -> int:
        return self._range(self.bits)[1] if self.reduce_range and self.headroom else self.quant_max

    @property
    def dtype(self) -> torch.dtype:
        return torch.qint8 if self.signed else torch.quint8

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def qscheme(self) -> torch.qscheme:
        if self.per_channel:
            return torch.per_channel_symmetric if self.symmetric else torch.per_channel_affine
        return torch.per_tensor_symmetric if self.symmetric else torch.per_tensor_affine

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        kind = ("s" if self.signed else "u") + str(self.bits)
        grid = "sym" if self.symmetric else "affine"
        where = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        flags = "".join(f" {f}" for f in ("reduce_range", "narrow_range") if getattr(self, f))
        codes = f" codes [{self.code_min}, {self.code_max}]" if self.reduce_range and self.headroom else ""
        observer = self.observer if self.error_power == 2.0 else f"{self.observer}(p={self.error_power:g})"
        return f"{kind} {grid} {where} [{self.quant_min}, {self.quant_max}]{codes} {observer}{flags}"


def compute_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int64) of ``spec``'s grid for the observed range, elementwise
    (0-d tensors for per tensor, one entry per channel for per channel).

    With ``qmin, qmax = spec.quant_min, spec.quant_max``, the range first widened to contain 0,
    ``lo = min(min_val, 0)``, ``hi = max(max_val, 0)``, and ``eps`` = float32 machine epsilon:

    - affine: ``scale = max((hi − lo) / (qmax − qmin), eps)``,
      ``zero_point = clamp(qmin − round(lo / scale), qmin, qmax)``;
    - symmetric, signed: ``scale = max(max(−lo, hi) / ((qmax − qmin) / 2), eps)``, ``zero_point = 0``;
    - symmetric, unsigned (non-negative data, e.g. after ReLU): ``scale = max(hi / (qmax − qmin), eps)``,
      ``zero_point = qmin``: the whole grid covers ``[0, hi]``. (torch.ao instead puts the zero point
      of a symmetric quint8 grid at the midpoint 128, spending half the grid on negatives.)

    ``round`` is round-half-to-even, as in torch. Affine and symmetric signed agree with
    ``torch.ao.quantization.observer.MinMaxObserver.calculate_qparams`` for the same dtype and range.
    """
    lo = torch.clamp(torch.as_tensor(min_val, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(max_val, dtype=torch.float32), min=0.0)
    if lo.shape != hi.shape:
        raise ValueError(
            f"compute_qparams: min_val shape {tuple(lo.shape)} != max_val shape {tuple(hi.shape)}"
        )
    qmin, qmax = spec.quant_min, spec.quant_max
    eps = torch.tensor(_EPS, dtype=torch.float32, device=lo.device)
    if spec.symmetric and spec.signed:
        scale = torch.maximum(torch.maximum(-lo, hi) / (float(qmax - qmin) / 2), eps)
        zero_point = torch.zeros(lo.shape, dtype=torch.int64, device=lo.device)
    elif spec.symmetric:
        scale = torch.maximum(hi / float(qmax - qmin), eps)
        zero_point = torch.full(lo.shape, qmin, dtype=torch.int64, device=lo.device)
    else:
        scale = torch.maximum((hi - lo) / float(qmax - qmin), eps)
        zero_point = torch.clamp(qmin - torch.round(lo / scale).to(torch.int64), qmin, qmax)
    return scale, zero_point


def int16_pair_sum_overflows(activation: QuantSpec, weight: QuantSpec) -> bool:
    """Whether two activation×weight products can overflow int16: ``2·max|a|·max|w| > 32767``.

    That is the condition under which the u8×s8 ``vpmaddubsw`` kernels (fbgemm without VNNI) saturate
    and activations need ``reduce_range``; sub-8-bit grids never reach it.
    """
    a = max(abs(activation.quant_min), abs(activation.quant_max))
    w = max(abs(weight.quant_min), abs(weight.quant_max))
    return 2 * a * w > 32767


@dataclass(frozen=True)
class QuantPair:
    """The specs of one quantized node: its weight (if it has one) and its output activation."""

    weight: QuantSpec
    activation: QuantSpec


@dataclass
class QuantConfig:
    """Which spec each node gets.

    ``for_node(name, module_type)`` resolves, first rule wins:
    ``keep_float`` (fnmatch patterns on the node/module qualified name) → None (stays float);
    ``by_name`` (pattern → pair or None; first matching pattern in insertion order);
    ``by_module_type`` (type → pair or None; the most specific base class of ``module_type`` listed);
    the global ``QuantPair(weight, activation)``.

    ``quantize_output``: whether a conv/linear whose value only the model's outputs read (through reshapes,
    pooling or clamp-like activations: the logits) writes it on an 8-bit grid. False (default, as PT2E's
    X86InductorQuantizer): where the engine has an int8 kernel for it that writes float (linears on x86 and
    fbgemm), it computes from int8 inputs and weights and writes float, so the output is not rounded to 256
    levels.
    """

    weight: QuantSpec
    activation: QuantSpec
    by_module_type: dict[type, QuantPair | None] = field(default_factory=dict)
    by_name: dict[str, QuantPair | None] = field(default_factory=dict)
    keep_float: set[str] = field(default_factory=set)
    quantize_output: bool = False

    @property
    def default_pair(self) -> QuantPair:
        return QuantPair(self.weight, self.activation)

    def for_node(self, name: str, module_type: type | None = None) -> QuantPair | None:
        """The pair for the node or module called ``name`` (of class ``module_type``, if a module), or None
        if it stays float."""
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.keep_float):
            return None
        for pattern, pair in self.by_name.items():
            if fnmatch.fnmatchcase(name, pattern):
                return pair
        if module_type is not None:
            # The earliest class in the MRO that has an entry is the most specific one.
            for cls in module_type.__mro__:
                if cls in self.by_module_type:
                    return self.by_module_type[cls]
        return self.default_pair

    def with_bits(self, bits: int) -> QuantConfig:
        """The same config with the global weight and activation specs at ``bits`` bits.

        Explicit ``by_name``/``by_module_type`` overrides are kept as written (e.g. an 8-bit first layer).
        An activation's ``reduce_range`` is kept only while the new grids could still overflow an int16
        pair sum (``int16_pair_sum_overflows``): below 8 bits it would only throw away a bit.
        """
        return self._regridded(self.weight.replace(bits=bits), self.activation.replace(bits=bits))

    def with_weight_bits(self, bits: int) -> QuantConfig:
        """The same config with the global weight spec at ``bits`` bits and activations as they are (W4A8 from
        W8A8); overrides and ``reduce_range`` as in ``with_bits``, so 4-bit weights give x86 back its 8th
        activation bit."""
        return self._regridded(self.weight.replace(bits=bits), self.activation)

    def _regridded(self, weight: QuantSpec, activation: QuantSpec) -> QuantConfig:
        activation = activation.replace(reduce_range=False)
        if self.activation.reduce_range and int16_pair_sum_overflows(activation, weight):
            activation = activation.replace(reduce_range=True)
        return dataclasses.replace(
            self,
            weight=weight,
            activation=activation,
            by_module_type=dict(self.by_module_type),
            by_name=dict(self.by_name),
            keep_float=set(self.keep_float),
        )

    def pairs(self) -> list[tuple[str, QuantPair]]:
        """Every pair the config can hand out, with where it comes from (for checks and reports)."""
        found = [("global", self.default_pair)]
        found += [(f"by_name[{k!r}]", p) for k, p in self.by_name.items() if p is not None]
        found += [
            (f"by_module_type[{k.__name__}]", p) for k, p in self.by_module_type.items() if p is not None
        ]
        return found
