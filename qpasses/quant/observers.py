"""Observers: modules that sit on a tensor edge of the graph, record statistics of what flows through
during calibration, and turn them into a range and quantization parameters.

They are ``nn.Module``s with buffers so that a calibrated graph can be saved and loaded
(``state_dict``) and its ranges inspected. ``forward`` returns its input unchanged.

- ``MinMaxObserver``: running min and max (per tensor or per channel).
- ``MovingAverageMinMaxObserver``: exponential moving average of each batch's min and max.
- ``PercentileObserver``, ``EntropyObserver``, ``MSEObserver``: a streaming histogram in bounded memory
  (``HistogramObserver``) and three ways to choose a clipping range from it.

Every observer's state can be merged across processes (``Observer.merge_``, ``qpasses.distributed``): the
merged state is bit-identical to observing every process's batches in one process, in global batch order.
Buffers live on the device of the first batch observed.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from qpasses.errors import QPassesError
from qpasses.quant.spec import QuantSpec, compute_qparams


class CalibrationError(QPassesError):
    """An observer cannot record its input or has no range yet."""


class Observer(nn.Module):
    """Base class: records statistics of its input in ``forward`` and returns the input unchanged.

    ``name`` (the graph node the observer watches, set by whoever inserts it) appears in error messages.
    Subclasses implement ``_observe(x)`` (``x`` a detached float32 tensor with finite values) and
    ``_range()``; ``batches_seen`` counts the batches recorded.

    Merging across processes: ``shard_state()`` is what this process contributes (CPU tensors, picklable),
    ``merge_states(states)`` combines every process's contribution (in rank order) into this observer, and
    ``merge_(group)`` does both with one collective. ``batch_index``, set by distributed calibration to the
    global index of the batch being observed, lets an order-dependent observer replay batches in that order.
    """

    def __init__(self, spec: QuantSpec, name: str = ""):
        super().__init__()
        self.spec = spec
        self.name = name
        self.batch_index: int | None = None
        self.register_buffer("batches_seen", torch.tensor(0, dtype=torch.int64))

    @property
    def calibrated(self) -> bool:
        """Whether the observer has recorded at least one non-empty batch."""
        return bool(self.batches_seen > 0)

    def _label(self) -> str:
        where = f" at {self.name!r}" if self.name else ""
        return f"{type(self).__name__}{where} ({self.spec})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise CalibrationError(f"{self._label()}: can only observe floating-point tensors, got {got}")
        if x.numel() == 0:
            return x
        with torch.no_grad():
            data = x.detach().float()
            # NaN propagates into the min and max, and an infinity is one of them: one reduction, no mask.
            if not bool(torch.isfinite(torch.stack(torch.aminmax(data))).all()):
                bad = int((~torch.isfinite(data)).sum())
                raise CalibrationError(
                    f"{self._label()}: input contains {bad} NaN/Inf value(s) of {data.numel()}; "
                    "the float model already produces them on this calibration batch"
                )
            if not self.calibrated:
                self._follow(data.device)
            self._observe(data)
            self.batches_seen += 1
        return x

    def _follow(self, device: torch.device) -> None:
        """Keep the buffers on the device of the data (an observer created on CPU, fed CUDA tensors)."""
        for key, buf in self._buffers.items():
            if buf is not None and buf.device != device:
                self._buffers[key] = buf.to(device)

    def shard_state(self) -> dict[str, Any]:
        """What this process contributes to a merge: its buffers, on CPU."""
        return {key: buf.detach().cpu().clone() for key, buf in self._buffers.items() if buf is not None}

    def merge_states(self, states: list[dict[str, Any]]) -> None:
        """Combine every process's ``shard_state()`` (rank order) into this observer: afterwards it holds
        what one process observing all their batches, in global batch order, would hold."""
        self.__dict__.pop("_range_cache", None)
        calibrated = [state for state in states if int(state["batches_seen"]) > 0]
        if calibrated:
            self._merge(calibrated)
        self.batches_seen.fill_(sum(int(state["batches_seen"]) for state in states))

    def _merge(self, states: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def merge_(self, group: Any = None) -> Observer:
        """Merge this observer's state across the processes of ``group`` (default: the world): a collective,
        every process must call it. Returns the observer."""
        from qpasses.distributed import all_gather_object

        self.merge_states(all_gather_object(self.shard_state(), group))
        return self

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) range to quantize to: float32 tensors, 0-d per tensor, one entry per channel.

        Remembered until the observer records another batch or loads a state: the histogram-based
        selections (mse, entropy) cost about a second each, and lowering asks for each range repeatedly."""
        if not self.calibrated:
            raise CalibrationError(
                f"{self._label()}: no data observed yet; run calibration batches through it first"
            )
        seen = int(self.batches_seen)
        cached = self.__dict__.get("_range_cache")
        if cached is None or cached[0] != seen:
            cached = (seen, self._range())
            self.__dict__["_range_cache"] = cached
        lo, hi = cached[1]
        return lo.clone(), hi.clone()

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``compute_qparams(*self.range(), self.spec)``: (scale float32, zero_point int64)."""
        lo, hi = self.range()
        return compute_qparams(lo, hi, self.spec)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        self.__dict__.pop("_range_cache", None)
        # Buffers whose size is only known from data (per-channel ranges, histogram bins) take the saved size.
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                buf.resize_(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        text = str(self.spec)
        if self.calibrated:
            lo, hi = self.range()
            if lo.dim() == 0:
                text += f", range=[{float(lo):.4g}, {float(hi):.4g}]"
            else:
                text += f", channels={lo.numel()}"
        return text


class MinMaxObserver(Observer):
    """Running minimum and maximum: ``min_val = min over batches of min(x)``, same for max.

    Per channel (``spec.axis`` set) the min and max are taken over every dimension but ``axis``.
    """

    def __init__(self, spec: QuantSpec, name: str = ""):
        super().__init__(spec, name)
        empty = torch.empty(0) if spec.per_channel else torch.tensor(0.0)
        self.register_buffer("min_val", empty.clone())
        self.register_buffer("max_val", empty.clone())

    def _batch_min_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        axis = self.spec.axis
        if axis is None:
            return torch.aminmax(x)
        if not -x.dim() <= axis < x.dim():
            raise CalibrationError(
                f"{self._label()}: per-channel axis {axis} does not exist in a tensor of "
                f"shape {tuple(x.shape)}"
            )
        rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        return torch.aminmax(rows, dim=1)

    def _check_channels(self, batch_min: torch.Tensor) -> None:
        if batch_min.shape != self.min_val.shape:
            raise CalibrationError(
                f"{self._label()}: {batch_min.numel()} channels in this batch, "
                f"{self.min_val.numel()} in earlier ones"
            )

    def _observe(self, x: torch.Tensor) -> None:
        batch_min, batch_max = self._batch_min_max(x)
        self._update(batch_min, batch_max, first=not self.calibrated)

    def _update(self, batch_min: torch.Tensor, batch_max: torch.Tensor, first: bool) -> None:
        if first:
            # resize_ + copy_ keep the registered buffers (and their non-inference-ness) in place.
            self.min_val.resize_(batch_min.shape).copy_(batch_min)
            self.max_val.resize_(batch_max.shape).copy_(batch_max)
            return
        self._check_channels(batch_min)
        torch.minimum(self.min_val, batch_min, out=self.min_val)
        torch.maximum(self.max_val, batch_max, out=self.max_val)

    def _merge(self, states: list[dict[str, Any]]) -> None:
        # The minimum of the processes' minima is the minimum over all batches: exact in any order.
        for i, state in enumerate(states):
            self._update(state["min_val"].to(self.min_val.device), state["max_val"].to(self.max_val.device),
                         first=i == 0)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val.clone(), self.max_val.clone()


class ChannelMSEObserver(MinMaxObserver):
    """Per-channel ranges minimising each channel's squared quantize-dequantize error, for weights.

    A weight is observed once, as a whole tensor, so the search runs on the exact values rather than a
    histogram: for each channel ``c`` and each shrink factor ``r`` in ``grid`` steps over
    ``[min_ratio, 1]``, ``(scale, zp) = compute_qparams(r·min_c, r·max_c, spec)`` and the error is
    ``Σ |(clamp(round(w / scale) + zp, qmin, qmax) − zp) · scale − w|^p`` over the channel (``p =
    spec.error_power``, 2 by default: the squared error); each channel
    keeps its best ``r`` (the smallest of equal ones). Clipping a few outlier weights buys resolution for the
    rest (pretrained Lite0, x86 per-channel: 14.8 → 15.5 dB SQNR of the logits). A second batch is an error:
    the search needs every value, and keeping them all is only bounded for a weight.
    """

    min_ratio = 0.3
    grid = 71
    chunk_elements = 1 << 20

    def __init__(self, spec: QuantSpec, name: str = ""):
        if not spec.per_channel:
            raise ValueError(f"ChannelMSEObserver is per channel only; got {spec}")
        super().__init__(spec, name)
        self.register_buffer("values", torch.empty(0))

    def _observe(self, x: torch.Tensor) -> None:
        if self.calibrated:
            raise CalibrationError(f"{self._label()}: per-channel MSE ranges are searched on one tensor (a "
                                   "weight); use observer='minmax' for data seen in several batches")
        super()._observe(x)
        rows = x.movedim(self.spec.axis, 0).reshape(x.shape[self.spec.axis], -1)
        self.values.resize_(rows.shape).copy_(rows)

    def _merge(self, states: list[dict[str, Any]]) -> None:
        if len(states) > 1 or int(states[0]["batches_seen"]) > 1:
            raise CalibrationError(f"{self._label()}: per-channel MSE ranges are searched on one tensor (a "
                                   f"weight), but {len(states)} processes observed data; observe it in one")
        for key in ("min_val", "max_val", "values"):
            getattr(self, key).resize_(states[0][key].shape).copy_(states[0][key])

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        ratios = torch.linspace(self.min_ratio, 1.0, self.grid, device=self.min_val.device)
        lows, highs = ratios[:, None] * self.min_val, ratios[:, None] * self.max_val  # (grid, channels)
        errors = self._errors(lows, highs)
        # The first of equal errors wins (the smallest ratio); a channel whose every error overflows float32
        # (weights beyond 1e19) keeps its full range.
        best = torch.where(torch.isfinite(errors.min(0).values), errors.argmin(0), self.grid - 1)
        channels = torch.arange(lows.shape[1], device=lows.device)
        return lows[best, channels], highs[best, channels]

    def _errors(self, lows: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
        """The squared quantize-dequantize error of each channel (columns) at each candidate range (rows).

        Every candidate of a chunk of channels is scored at once, in place in one (candidates, channels,
        values) buffer of about ``chunk_elements``: allocating a fresh tensor per operation and candidate
        cost three times as long (page faults), and a Python loop over candidates pays dispatch on every
        small layer. The arithmetic per element and the sum over each channel's values are those of the
        formula in the class docstring."""
        scale, zero_point = compute_qparams(lows, highs, self.spec)
        scale, zero_point = scale[:, :, None], zero_point[:, :, None]
        shifted = bool(zero_point.any())  # adding a zero point of 0 changes no value: skip the two passes
        candidates, (channels, size) = lows.shape[0], self.values.shape
        step = max(1, self.chunk_elements // (candidates * size))
        errors = torch.empty(lows.shape, device=lows.device)
        buffer = torch.empty(candidates, min(step, channels), size, device=lows.device)
        for start in range(0, channels, step):
            end = min(start + step, channels)
            values, work = self.values[None, start:end], buffer[:, : end - start]
            torch.div(values, scale[:, start:end], out=work).round_()
            if shifted:
                work.add_(zero_point[:, start:end])
            work.clamp_(self.spec.quant_min, self.spec.quant_max)
            if shifted:
                work.sub_(zero_point[:, start:end])
            work.mul_(scale[:, start:end]).sub_(values)
            torch.sum(_power_(work, self.spec.error_power), dim=2, out=errors[:, start:end])
        return errors


def _power_(error: torch.Tensor, power: float) -> torch.Tensor:
    """``|error|^power`` in place (a square as one multiply)."""
    return error.mul_(error) if power == 2.0 else error.abs_().pow_(power)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max, with ``c = spec.averaging_constant``:
    ``min_val ← min_val + c · (min(x) − min_val)`` (the first batch sets it), same for max.

    The average depends on the order of the batches, so while ``batch_index`` is set (distributed
    calibration) each batch's (min, max) is also kept with its global index (two small tensors a batch), and
    a merge replays every process's batches in global order."""

    def __init__(self, spec: QuantSpec, name: str = ""):
        super().__init__(spec, name)
        self.history: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None

    def _observe(self, x: torch.Tensor) -> None:
        batch_min, batch_max = self._batch_min_max(x)
        if self.batch_index is not None:
            if self.history is None:
                if self.calibrated:
                    raise CalibrationError(f"{self._label()}: it observed batches before distributed calibration "
                                           "began; a merge could not place them in the global order")
                self.history = []
            self.history.append((self.batch_index, batch_min.clone(), batch_max.clone()))
        self._update(batch_min, batch_max, first=not self.calibrated)

    def _update(self, batch_min: torch.Tensor, batch_max: torch.Tensor, first: bool) -> None:
        if first:
            super()._update(batch_min, batch_max, first)
            return
        self._check_channels(batch_min)
        c = self.spec.averaging_constant
        self.min_val.add_(c * (batch_min - self.min_val))
        self.max_val.add_(c * (batch_max - self.max_val))

    def shard_state(self) -> dict[str, Any]:
        if self.calibrated and self.history is None:
            raise CalibrationError(f"{self._label()}: its batches were observed outside distributed calibration, "
                                   "so their global order is unknown; calibrate with torch.distributed initialised")
        history = [(index, lo.cpu(), hi.cpu()) for index, lo, hi in self.history or []]
        return {**super().shard_state(), "history": history}

    def _merge(self, states: list[dict[str, Any]]) -> None:
        # Batches are dealt to ranks, so indices never repeat across ranks; the stable sort keeps the order of
        # several observations of one batch (an observer shared by the inputs of a cat).
        replay = sorted((entry for state in states for entry in state["history"]), key=lambda entry: entry[0])
        device = self.min_val.device
        for i, (_, batch_min, batch_max) in enumerate(replay):
            self._update(batch_min.to(device), batch_max.to(device), first=i == 0)
        self.history = None


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``fp(xp)`` at ``x`` (``xp`` increasing), constant outside."""
    idx = torch.searchsorted(xp, x, right=True).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    frac = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return fp[idx - 1] + frac * (fp[idx] - fp[idx - 1])


def _inverse(q: torch.Tensor, cdf: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """The smallest ``x`` with ``cdf(x) ≥ q``, for a non-decreasing piecewise-linear ``cdf`` on ``xs``."""
    idx = torch.searchsorted(cdf, q, side="left").clamp(1, cdf.numel() - 1)
    c0, c1 = cdf[idx - 1], cdf[idx]
    frac = torch.where(c1 > c0, (q - c0) / (c1 - c0), torch.zeros_like(q)).clamp(0.0, 1.0)
    return xs[idx - 1] + frac * (xs[idx] - xs[idx - 1])


class _Histogram:
    """Counts on ``bins`` equal bins over ``[lo, hi]``, read with mass spread uniformly inside each bin;
    ``max_abs`` is the largest ``|x|`` of the data (the histogram range may extend beyond it)."""

    def __init__(self, counts: torch.Tensor, lo: float, hi: float, max_abs: float):
        self.counts = counts.double()
        self.lo, self.hi, self.max_abs = lo, hi, max_abs
        self.float64 = {"dtype": torch.float64, "device": counts.device}
        self.edges = torch.linspace(lo, hi, counts.numel() + 1, **self.float64)
        self.total = float(self.counts.sum())
        self.cdf = torch.cat([torch.zeros(1, **self.float64), self.counts.cumsum(0)]) / self.total

    def quantile(self, q: float) -> float:
        return float(_inverse(torch.tensor([q], **self.float64), self.cdf, self.edges))

    def _abs_grid(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` on ``n + 1`` points over ``[0, max|x|]`` and the mass of ``|x| ≤ t`` there."""
        t = torch.linspace(0.0, self.max_abs, n + 1, **self.float64)
        inside = _interp(t, self.edges, self.cdf) - _interp(-t, self.edges, self.cdf)
        return t, torch.cummax(inside.clamp(min=0.0), 0).values

    def abs_quantile(self, q: float) -> float:
        t, inside = self._abs_grid(8 * self.counts.numel())
        return float(_inverse(torch.tensor([q], **self.float64), inside, t))

    def abs_histogram(self, n: int) -> tuple[torch.Tensor, float]:
        """The histogram of ``|x|`` on ``n`` bins over ``[0, max|x|]`` (counts) and its bin width."""
        t, inside = self._abs_grid(n)
        return inside.diff() * self.total, float(t[1])

    def sample_points(self, per_bin: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_bin`` evenly spaced points inside each non-empty bin and their masses (sum 1)."""
        nonempty = self.counts > 0
        width = (self.hi - self.lo) / self.counts.numel()
        offsets = (torch.arange(per_bin, **self.float64) + 0.5) / per_bin
        points = (self.edges[:-1][nonempty, None] + width * offsets).reshape(-1)
        mass = (self.counts[nonempty, None] / (self.total * per_bin)).expand(-1, per_bin).reshape(-1)
        return points, mass


# Bin widths are powers of two from 2^-149 (float32's smallest spacing) up; the width is also at least
# 2^-_RELATIVE_BITS of the data's magnitude, so that bin numbers stay exact integers in float64.
_SMALLEST_EXPONENT = -149
_RELATIVE_BITS = 40


def _bin_exponent(lo: float, hi: float, bins: int) -> int:
    """The smallest ``e`` for which ``bins`` bins of width ``2^e``, starting at a multiple of ``2^e``, cover
    ``[lo, hi]`` (and ``2^e ≥ 2^-40 · max(|lo|, |hi|)``). It only grows when ``[lo, hi]`` does."""
    magnitude = max(abs(lo), abs(hi))
    e = max(_SMALLEST_EXPONENT, math.frexp(magnitude)[1] - _RELATIVE_BITS if magnitude > 0 else _SMALLEST_EXPONENT)
    if hi > lo:  # a lower bound: the window's width bins · 2^e exceeds hi − lo
        e = max(e, math.frexp((hi - lo) / bins)[1] - 1)
    while math.floor(math.ldexp(hi, -e)) - math.floor(math.ldexp(lo, -e)) > bins - 1:
        e += 1
    return e


class HistogramObserver(Observer):
    """Streaming histogram in bounded memory: ``bins`` counts over ``[hist_lo, hist_hi]``, whatever the
    number of batches. Subclasses choose the clipping range from it (``_select``).

    The bins lie on a fixed lattice: width ``w = 2^e``, ``e`` the smallest exponent for which ``bins``
    bins starting at ``hist_lo = ⌊min/w⌋ · w`` cover ``[min, max]`` of all data seen; value ``x`` is
    counted in bin ``⌊x/w⌋ − hist_lo/w``, computed exactly in float64 (scaling by a power of two is exact).
    When a batch widens ``[min, max]``, ``e`` grows by ``d`` and each old bin ``i`` moves whole into new
    bin ``⌊(hist_lo/w + i) / 2^d⌋ − new_lo/w'``, again exactly. So the histogram is a function of the
    multiset of values seen, whatever the batches and their order, and the histograms of several processes
    merge exactly (regroup each onto the lattice of the global min and max, then add the counts). The
    window is less than about twice the data's range. The exact data min and max are kept as well;
    selected ranges never exceed them. Per tensor only.
    """

    def __init__(self, spec: QuantSpec, name: str = "", bins: int = 2048):
        super().__init__(spec, name)
        if spec.per_channel:
            raise ValueError(f"{type(self).__name__} is per tensor only; got a per-channel spec ({spec})")
        if bins < 16:
            raise ValueError(f"{type(self).__name__}: bins must be >= 16, got {bins}")
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("hist_lo", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("hist_hi", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("exact_zeros", torch.tensor(0.0, dtype=torch.float64))

    @property
    def bins(self) -> int:
        return self.histogram.numel()

    @staticmethod
    def _lattice(lo: float, hi: float, bins: int) -> tuple[int, int]:
        """``(e, first)``: bins of width ``2^e`` numbered from ``first = ⌊lo / 2^e⌋`` on the lattice."""
        e = _bin_exponent(lo, hi, bins)
        return e, math.floor(math.ldexp(lo, -e))

    def _window(self, hist_lo: float, hist_hi: float) -> tuple[int, int]:
        """``(e, first)`` of a histogram's window ``[hist_lo, hist_hi]`` (both exact multiples of ``2^e``)."""
        e = math.frexp((hist_hi - hist_lo) / self.bins)[1] - 1
        first = round(math.ldexp(hist_lo, -e))
        if math.ldexp(first, e) != hist_lo or math.ldexp(first + self.bins, e) != hist_hi:
            raise CalibrationError(f"{self._label()}: its histogram window [{hist_lo}, {hist_hi}] is not on the "
                                   "power-of-two lattice (a state saved by an older qpasses); its ranges can "
                                   "be read, but to observe more data or merge it, calibrate it again")
        return e, first

    def _set_window(self, e: int, first: int) -> None:
        self.hist_lo.fill_(math.ldexp(first, e))
        self.hist_hi.fill_(math.ldexp(first + self.bins, e))

    @staticmethod
    def _regroup(counts: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
        """``counts`` on the lattice ``old = (e, first)`` moved onto the coarser lattice ``new`` (exact)."""
        (e, first), (new_e, new_first) = old, new
        # Bin numbers are below 2^53 in magnitude, so a shift by 62 or more gives the same floor as any larger one.
        shift = min(new_e - e, 62)
        bins = counts.numel()
        target = ((torch.arange(bins, device=counts.device) + first) >> shift) - new_first
        # Only empty bins can fall outside the new window (every value lies inside it).
        target = target.clamp(0, bins - 1)
        return torch.zeros_like(counts).index_add_(0, target, counts)

    def _count(self, x: torch.Tensor, e: int, first: int) -> torch.Tensor:
        """The histogram of ``x`` on the lattice ``(e, first)``, as float64 counts.

        ``⌊x / 2^e⌋`` is exact in float32 when ``−127 ≤ e ≤ 0`` (scaling up never underflows) and every bin number
        is below 2^24 in magnitude (exact float32 integers); otherwise it is computed in float64, where it is
        always exact. Both give the same counts; float32 takes about half the time."""
        magnitude = max(abs(float(self.min_val)), abs(float(self.max_val)))
        exact_in_float32 = -127 <= e <= 0 and math.ldexp(magnitude, -e) < 2.0**24  # 2^-e a float32 too
        scaled = x.mul(math.ldexp(1.0, -e)) if exact_in_float32 else x.double().mul_(math.ldexp(1.0, -e))
        index = scaled.floor_().sub_(first)
        # Bin numbers lie in [0, bins): int32 holds them, and converts in about a third of int64's time.
        return torch.bincount(index.int().flatten(), minlength=self.bins).double()

    def _observe(self, x: torch.Tensor) -> None:
        batch_min, batch_max = (float(v) for v in torch.aminmax(x))
        if self.calibrated:
            batch_min, batch_max = min(float(self.min_val), batch_min), max(float(self.max_val), batch_max)
        lattice = self._lattice(batch_min, batch_max, self.bins)
        if self.calibrated:
            old = self._window(float(self.hist_lo), float(self.hist_hi))
            if old != lattice:
                self.histogram.copy_(self._regroup(self.histogram, old, lattice))
        self._set_window(*lattice)
        self.min_val.fill_(batch_min)
        self.max_val.fill_(batch_max)
        self.histogram.add_(self._count(x, *lattice))
        self.exact_zeros.add_((x == 0).count_nonzero())  # count_nonzero: a quarter of sum's time on a mask

    def _merge(self, states: list[dict[str, Any]]) -> None:
        lo = min(float(state["min_val"]) for state in states)
        hi = max(float(state["max_val"]) for state in states)
        lattice = self._lattice(lo, hi, self.bins)
        merged = torch.zeros(self.bins, dtype=torch.float64)
        for state in states:
            if state["histogram"].numel() != self.bins:
                raise CalibrationError(f"{self._label()}: {state['histogram'].numel()} bins in another process, "
                                       f"{self.bins} here; every process must build the same observers")
            own = self._window(float(state["hist_lo"]), float(state["hist_hi"]))
            # Counts are integers below 2^53, so adding them in float64 is exact in any order.
            merged += self._regroup(state["histogram"].double(), own, lattice)
        self.histogram.copy_(merged)
        self._set_window(*lattice)
        self.min_val.fill_(lo)
        self.max_val.fill_(hi)
        self.exact_zeros.fill_(sum(float(state["exact_zeros"]) for state in states))

    def _data_range(self) -> tuple[float, float]:
        return float(self.min_val), float(self.max_val)

    def _select(self, hist: _Histogram) -> tuple[float, float]:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        data_lo, data_hi = self._data_range()
        if data_lo == data_hi:  # constant data: every method agrees on its value
            return self.min_val.clone(), self.max_val.clone()
        hist = _Histogram(
            self.histogram, float(self.hist_lo), float(self.hist_hi), max(-data_lo, data_hi, 0.0)
        )
        lo, hi = self._select(hist)
        lo, hi = max(lo, data_lo), min(hi, data_hi)
        device = self.min_val.device
        return (torch.tensor(min(lo, hi), dtype=torch.float32, device=device),
                torch.tensor(hi, dtype=torch.float32, device=device))


class PercentileObserver(HistogramObserver):
    """Clips at a percentile ``p = spec.percentile``: a symmetric spec uses ``t = p-th percentile of |x|``
    and the range ``[−t, t]``; an affine one clips each tail: ``[(100 − p)-th, p-th percentile of x]``."""

    def _select(self, hist: _Histogram) -> tuple[float, float]:
        p = self.spec.percentile / 100.0
        if self.spec.symmetric:
            t = hist.abs_quantile(p)
            return -t, t
        return hist.quantile(1.0 - p), hist.quantile(p)


class EntropyObserver(HistogramObserver):
    """Clips at the threshold ``t`` on ``|x|`` that minimises the KL divergence between the clipped
    distribution and its quantized version (TensorRT's calibration).

    On the histogram of ``|x|`` with ``B`` bins (``abs_bins``, 2048 as in TensorRT) and ``L`` quantization
    levels on the positive side (``L = qmax − qmin + 1`` for non-negative data, e.g. after ReLU, else
    half of it; a signed symmetric grid always half), for every candidate ``i ∈ [L, B]``:
    ``P = h[:i]`` with the clipped mass ``Σ h[i:]`` added to its last bin;
    ``Q``: ``h[:i]`` merged into ``L`` groups of consecutive bins, each group's mass spread evenly over
    its non-empty bins; ``KL(P‖Q) = Σ P log(P / Q)`` after normalising both. Exact zeros are taken out
    of the histogram first: every grid represents them exactly. The ``i`` with the least KL gives ``t = i · (bin width)``, and the range is ``[−t, t]`` intersected with the data range.
    """

    abs_bins = 2048

    def _levels(self) -> int:
        levels = self.spec.quant_max - self.spec.quant_min + 1
        # A signed symmetric grid, or an affine one stretched over data of both signs, gives |x| about half.
        if (self.spec.signed and self.spec.symmetric) or float(self.min_val) < 0.0:
            return levels // 2
        return levels

    def _select(self, hist: _Histogram) -> tuple[float, float]:
        # Exact zeros (what ReLU and ReLU6 emit for every negative input) lie on every grid, so they carry no
        # quantization error; left in, their spike dominates the divergence and picks ranges that clip most
        # of the signal (pretrained Lite0's ReLU6 outputs got [0, 0.375]: 0 dB SQNR for the whole model).
        # They are taken out of the bin holding 0 before it is spread over the bins of |x|.
        zero_bin = int(torch.searchsorted(hist.edges, torch.zeros(1, dtype=torch.float64, device=hist.edges.device),
                                          right=True)) - 1
        if 0 <= zero_bin < hist.counts.numel() and float(self.exact_zeros) < hist.total:
            without_zeros = hist.counts.clone()
            without_zeros[zero_bin] = (without_zeros[zero_bin] - self.exact_zeros).clamp(min=0)
            hist = _Histogram(without_zeros, hist.lo, hist.hi, hist.max_abs)
        counts, width = hist.abs_histogram(self.abs_bins)
        levels, n = self._levels(), counts.numel()
        if n <= levels:
            return -n * width, n * width
        cuts = torch.arange(levels, n + 1, device=counts.device)
        t = int(cuts[int(torch.argmin(self.kl_divergences(counts, cuts, levels)))]) * width
        return -t, t

    @staticmethod
    def kl_divergences(counts: torch.Tensor, cuts: torch.Tensor, levels: int) -> torch.Tensor:
        """``KL(P‖Q)`` for each cut ``i`` in ``cuts`` (all ``≥ levels``), in ``O(len(cuts) · levels)``.

        Bin ``j < i`` is in group ``g = ⌊j·L/i⌋``, i.e. groups span ``[⌈g·i/L⌉, ⌈(g+1)·i/L⌉)``. With prefix
        sums of ``h``, of ``[h > 0]`` and of ``h log h``, each group's mass ``M_g`` and non-empty count
        ``c_g`` are differences, ``Q`` is ``M_g / (c_g Σ_{j<i} h_j)`` on non-empty bins, and, before the
        clipped mass ``O = Σ_{j≥i} h_j`` is added to the last bin,
        ``KL = (Σ h log h − (Σ h) log Z) / Z − Σ_g (M_g / Z) log Q_g`` with ``Z = Σ_all h``;
        the last bin's term is then replaced by the one with ``h_{i−1} + O``.
        """
        h = counts.double()
        zero = torch.zeros(1, dtype=torch.float64, device=h.device)
        mass_before = torch.cat([zero, h.cumsum(0)])
        nonempty_before = torch.cat([zero, (h > 0).double().cumsum(0)])
        hlogh_before = torch.cat(
            [zero, torch.where(h > 0, h * torch.log(h.clamp(min=1e-300)), 0.0).cumsum(0)]
        )
        total = float(mass_before[-1])
        bounds = (torch.arange(levels + 1, device=h.device)[None, :] * cuts[:, None] + levels - 1) // levels  # (C, L+1)
        group_mass = mass_before[bounds].diff(dim=1)
        group_nonempty = nonempty_before[bounds].diff(dim=1)
        inside = mass_before[cuts]
        log_q = torch.log(
            (group_mass / (group_nonempty * inside[:, None]).clamp(min=1e-300)).clamp(min=1e-300)
        )
        kl = (hlogh_before[cuts] - inside * math.log(total)) / total
        kl = kl - torch.where(group_mass > 0, group_mass / total * log_q, 0.0).sum(1)
        # Where P has mass that Q cannot represent (an empty last bin receiving clipped mass), give Q a tiny
        # floor instead of an infinite divergence, as TensorRT's smoothing does.
        last = h[cuts - 1]
        log_q_last = torch.where(last > 0, log_q[:, -1], math.log(1e-12))
        clipped = total - inside
        p_old, p_new = last / total, (last + clipped) / total

        def term(p: torch.Tensor) -> torch.Tensor:
            return torch.where(p > 0, p * (torch.log(p.clamp(min=1e-300)) - log_q_last), 0.0)

        return kl - term(p_old) + term(p_new)


class MSEObserver(HistogramObserver):
    """Chooses the range minimising the expected quantize-dequantize error over the histogram: squared, or to the
    power ``p = spec.error_power``.

    Each histogram bin is represented by ``points_per_bin`` evenly spaced points carrying its mass; for a
    candidate range, ``(scale, zp) = compute_qparams(lo, hi, spec)`` and the error is
    ``Σ mass · |(clamp(round(x / scale) + zp, qmin, qmax) − zp) · scale − x|^p``: rounding inside the range
    and clipping outside it, with the grid exactly as it will be used. Symmetric specs search the
    threshold ``t`` of ``[−t, t]`` (``[0, t]`` unsigned); affine ones search the top and the bottom of
    the range in turn. Each search scores ``grid`` evenly spaced candidates, then ``grid`` more between
    the best one's neighbours.
    """

    points_per_bin = 8
    grid = 96
    rounds = 2

    def _errors(
        self, points: torch.Tensor, mass: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
    ) -> torch.Tensor:
        scale, zero_point = compute_qparams(lo, hi, self.spec)
        scale, zero_point = scale.double()[:, None], zero_point.double()[:, None]
        # One (candidates, points) buffer, updated in place: a fresh tensor per step cost twice the time.
        error = torch.div(points[None, :], scale).round_().add_(zero_point)
        error.clamp_(self.spec.quant_min, self.spec.quant_max).sub_(zero_point).mul_(scale).sub_(points)
        return _power_(error, self.spec.error_power) @ mass

    def _search(self, score, upper: float) -> float:
        """The ``t`` in ``(0, upper]`` with the least ``score(t)`` (coarse grid, then refined)."""
        ts = upper * torch.arange(1, self.grid + 1, dtype=torch.float64, device=self.histogram.device) / self.grid
        best = int(torch.argmin(score(ts)))
        step = upper / self.grid
        fine = torch.linspace(
            max(float(ts[best]) - step, step / self.grid),
            min(float(ts[best]) + step, upper),
            self.grid,
            dtype=torch.float64,
            device=self.histogram.device,
        )
        return float(fine[int(torch.argmin(score(fine)))])

    def _select(self, hist: _Histogram) -> tuple[float, float]:
        points, mass = hist.sample_points(self.points_per_bin)
        data_lo, data_hi = self._data_range()
        lo, hi = min(data_lo, 0.0), max(data_hi, 0.0)

        def err(lows: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
            return self._errors(points, mass, lows, highs)

        if self.spec.symmetric:
            top = hi if not self.spec.signed else max(-lo, hi)
            if top <= 0.0:
                return lo, hi
            sign = -1.0 if self.spec.signed else 0.0
            t = self._search(lambda ts: err(sign * ts, ts), top)
            return sign * t, t

        # Each search depends only on the other end of the range: remembered, a round that would repeat one is
        # free (non-negative data, e.g. after ReLU, never moves the bottom, so every round after the first).
        @functools.cache
        def best_top(lo: float) -> float:
            return self._search(lambda ts: err(torch.full_like(ts, lo), ts), data_hi)

        @functools.cache
        def best_bottom(hi: float) -> float:
            return -self._search(lambda ts: err(-ts, torch.full_like(ts, hi)), -data_lo)

        for _ in range(self.rounds):
            if data_hi > 0.0:
                hi = best_top(lo)
            if data_lo < 0.0:
                lo = best_bottom(hi)
        return lo, hi


_OBSERVER_CLASSES: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(spec: QuantSpec, name: str = "") -> Observer:
    """A fresh observer of the kind ``spec.observer`` names (``"mse"`` per channel: :class:`ChannelMSEObserver`)."""
    if spec.observer == "mse" and spec.per_channel:
        return ChannelMSEObserver(spec, name)
    return _OBSERVER_CLASSES[spec.observer](spec, name)
