"""Fake quantization for quantization-aware training (QAT).

A fake-quant module rounds its input onto the integer grid of a ``QuantSpec`` and returns it in float:
``y = (clamp(round(x / s) + z, qmin, qmax) − z) · s`` with ``qmin, qmax = spec.quant_min, spec.quant_max``,
so sub-8-bit grids and ``reduce_range`` are simulated exactly as the lowered kernels run them.
Gradients use the straight-through estimator: ``∂y/∂x = 1`` where ``qmin ≤ round(x / s) + z ≤ qmax``,
0 where the value is clipped.

Two ways to choose ``(s, z)``:

- ``FakeQuantize``: ranges tracked from the data, ``(s, z) = compute_qparams(min, max, spec)``.
  Activations: exponential moving average of each training batch's min and max (weight
  ``spec.averaging_constant``), all-reduced across processes under ``torch.distributed`` so replicas
  keep identical ranges. Weights: the current weight's min and max at every call.
- ``LearnableFakeQuantize`` (LSQ, Esser et al. 2020): ``s`` is a parameter trained by backpropagation,
  with ``∂y/∂s = round(x/s) − x/s`` where ``qmin ≤ x/s + z ≤ qmax`` and ``qmin − z`` / ``qmax − z`` where
  clipped (its ``∂y/∂x`` is 1 on that unrounded range),
  scaled by ``g = 1 / sqrt(n · qmax)`` (``n`` elements per scale); optionally ``z`` too (affine specs),
  rounded with a straight-through estimator. Both start from the first observed range.

Fake-quant modules are ``Observer``s: ``qparams()`` is what ``Lower`` quantizes to, so a trained model
lowers exactly as it was trained. Calibration (PTQ before QAT) fills them like any observer.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from qpasses.quant.observers import MovingAverageMinMaxObserver, Observer
from qpasses.quant.spec import QuantSpec, compute_qparams

Kind = Literal["weight", "activation"]
_EPS = torch.finfo(torch.float32).eps


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def bias_on_grid(bias: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``bias`` rounded to the int32 grid of step ``step`` (``s_in·s_w``, per output channel), as the kernels that
    quantize their bias add it (qnnpack); gradients pass straight through."""
    return round_ste(bias / step) * step


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``factor`` backward."""
    return x * factor + (x - x * factor).detach()


def _broadcast(values: torch.Tensor, like: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-tensor ``values`` as they are; per-channel ones shaped along ``spec.axis`` of ``like``."""
    if not spec.per_channel:
        return values
    shape = [1] * like.dim()
    shape[spec.axis] = -1
    return values.reshape(shape)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FakeQuantize(MovingAverageMinMaxObserver):
    """Fake quantization onto ``spec``'s grid with ranges tracked as min/max (see the module docstring).

    ``kind='activation'`` observes in training mode only (and once before any data, so an untrained model
    has ranges); ``kind='weight'`` observes every call (the range of a parameter, not of data).
    ``observer_enabled`` / ``fake_quant_enabled`` are buffers (saved in checkpoints) switched by
    ``qpasses.freeze_observers`` and ``qpasses.enable_fake_quant``/``disable_fake_quant``.
    """

    def __init__(self, spec: QuantSpec, name: str = "", kind: Kind = "activation"):
        if kind not in ("weight", "activation"):
            raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
        # Weights follow the current tensor (an average of 1); activations average batches.
        tracking = {"observer": "moving_average"} | ({"averaging_constant": 1.0} if kind == "weight" else {})
        super().__init__(spec.replace(**tracking), name)
        self.kind = kind
        self.register_buffer("observer_enabled", torch.tensor(1, dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.tensor(1, dtype=torch.uint8))

    def _wants_observation(self) -> bool:
        if not self.calibrated:
            return True
        return bool(self.observer_enabled) and (self.training or self.kind == "weight")

    def forward(self, x: torch.Tensor, member: bool = False) -> torch.Tensor:
        """``member``: this call site is a value inside a cat group (``InsertFakeQuant``) that the group's
        owner, a later call of this module on the outermost cat's output, contains: returned unchanged. The
        owner's call observes the concatenation, whose min/max is the union of its members', and fake-quantizes
        it elementwise, which rounds every member exactly as fake-quantizing it here would; so one forward is
        one observation of the group (a moving average of each member's narrower range would clip the cat)."""
        if member:
            return x
        if self._wants_observation():
            super().forward(x)
        if not self.fake_quant_enabled:
            return x
        return self.fake_quantize(x.float()).to(x.dtype)

    def to_steps(self, x: torch.Tensor) -> torch.Tensor:
        """A value on this grid as its integer codes relative to the zero point, ``round(x / s)``, in float32
        (gradient ``1 / s`` to ``x``). With ``from_steps``, QAT runs an averaging op (average pooling, bilinear
        interpolation, mean) on the codes as its int8 kernel does: ``from_steps(op(to_steps(x)))``. The
        kernel averages integers exactly, so an average ``k + ½`` is a true tie that it rounds to even;
        averaging the float values ``(q − z)·s`` instead lands ~1e-7 off such ties, a random side of them
        (measured: 4% of the outputs of a 4×4 global pooling are ties). Identity when fake quantization is off."""
        if not self.fake_quant_enabled:
            return x
        scale, _ = self._grid(x)
        return round_ste(x.float() / scale)

    def from_steps(self, steps: torch.Tensor) -> torch.Tensor:
        """An averaging op's output in steps (see ``to_steps``) rounded onto this grid, ties to even as the int8
        kernels round, clamped to its range, in real units. Gradients are this fake-quant's own (straight
        through, or LSQ's for the scale) at the real value ``steps·s``."""
        if not self.fake_quant_enabled:
            return steps
        scale, zero_point = self._grid(steps)
        exact = (torch.clamp(torch.round(steps) + zero_point, self.spec.code_min, self.spec.code_max)
                 - zero_point) * scale
        simulated = self.fake_quantize(steps * scale)
        return simulated + (exact - simulated).detach()

    def _grid(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point (float, without gradient) shaped to broadcast against ``like``."""
        scale, zero_point = self.qparams()
        return _broadcast(scale.float(), like, self.spec), _broadcast(zero_point.float(), like, self.spec)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.qparams()
        qmin, qmax = self.spec.code_min, self.spec.code_max
        if self.spec.per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, scale, zero_point.to(torch.int32), self.spec.axis, qmin, qmax
            )
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point.to(torch.int32), qmin, qmax)

    def _batch_min_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_min, batch_max = super()._batch_min_max(x)
        if self.kind == "activation" and self.training and _distributed():
            # Every replica sees its own shard: reduce to the global batch's range so ranges stay identical.
            batch_min, batch_max = batch_min.clone(), batch_max.clone()
            dist.all_reduce(batch_min, op=dist.ReduceOp.MIN)
            dist.all_reduce(batch_max, op=dist.ReduceOp.MAX)
        return batch_min, batch_max

    def shard_state(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen.detach().cpu().clone()}

    def merge_states(self, states: list[dict[str, Any]]) -> None:
        """Nothing to merge: under torch.distributed every training batch's range is already reduced over the
        replicas (``_batch_min_max``), so every replica holds the same state."""

    def initialize_from(self, observer: Observer) -> None:
        """Start from a calibrated observer's range (PTQ before QAT)."""
        lo, hi = observer.range()
        self.min_val.resize_(lo.shape).copy_(lo)
        self.max_val.resize_(hi.shape).copy_(hi)
        self.batches_seen.copy_(observer.batches_seen)
        self.__dict__.pop("_range_cache", None)  # keyed by batches_seen, which may equal this module's own count

    def extra_repr(self) -> str:
        return f"{self.kind}, {super().extra_repr()}"


class LearnableFakeQuantize(FakeQuantize):
    """LSQ: the scale (and, with ``learn_zero_point`` on an affine spec, the zero point) are parameters.

    The first observed range (or a calibrated observer's, via ``initialize_from``) sets their initial
    values; after that only gradients move them. ``qparams()`` returns ``(|s|, round(clamp(z)))``.
    """

    def __init__(self, spec: QuantSpec, name: str = "", kind: Kind = "activation", learn_zero_point: bool = False):
        super().__init__(spec, name, kind)
        self.learn_zero_point = learn_zero_point and not spec.symmetric
        shape = (0,) if spec.per_channel else ()
        self.scale = nn.Parameter(torch.ones(shape))
        self.zero_point = nn.Parameter(torch.zeros(shape), requires_grad=self.learn_zero_point)

    def _wants_observation(self) -> bool:
        return not self.calibrated

    def _observe(self, x: torch.Tensor) -> None:
        super()._observe(x)
        self._set_qparams(*compute_qparams(self.min_val, self.max_val, self.spec))

    def _set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        # In place, so that optimizers and DDP created before the first batch keep the same parameters.
        self.scale.data = scale.detach().float().clone()
        self.zero_point.data = zero_point.detach().float().clone()

    def initialize_from(self, observer: Observer) -> None:
        super().initialize_from(observer)
        self._set_qparams(*observer.qparams())

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale.detach().abs().clamp(min=_EPS)
        zero_point = self.zero_point.detach().clamp(self.spec.quant_min, self.spec.quant_max).round().long()
        return scale, zero_point

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.spec.quant_min, self.spec.quant_max
        per_scale = x.numel() // max(self.scale.numel(), 1)
        scale = _scale_gradient(self.scale.abs().clamp(min=_EPS), 1.0 / math.sqrt(per_scale * max(qmax, 1)))
        scale = _broadcast(scale, x, self.spec)
        zero_point = _broadcast(round_ste(self.zero_point.clamp(qmin, qmax)), x, self.spec)
        # Clamping before rounding decides clipping on x / s + z, as LSQ does (round∘clamp = clamp∘round).
        codes = round_ste(torch.clamp(x / scale + zero_point, self.spec.code_min, self.spec.code_max))
        return (codes - zero_point) * scale

    def extra_repr(self) -> str:
        learned = "scale, zero point" if self.learn_zero_point else "scale"
        return f"{self.kind}, {self.spec}, learned {learned}"



def make_fake_quant(
    spec: QuantSpec, name: str = "", kind: Kind = "activation", learnable: bool = False,
    learn_zero_point: bool = False,
) -> FakeQuantize:
    """A fresh fake-quant module for ``spec``: LSQ when ``learnable``, min/max-tracking otherwise."""
    if learnable:
        return LearnableFakeQuantize(spec, name, kind, learn_zero_point)
    return FakeQuantize(spec, name, kind)
