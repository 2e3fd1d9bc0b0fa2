"""Fidelity metrics (SQNR, MSE, top-k agreement, SSIM), model size, peak memory and latency."""

from __future__ import annotations

import io
import math
import statistics
import time
from typing import Any

import torch
from torch.utils._pytree import tree_flatten


def _float_leaves(value: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.dequantize() if leaf.is_quantized else leaf
            if leaf.is_floating_point():
                out.append(leaf.detach().double())
    return out


def sqnr(reference: Any, test: Any) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(Σ ref² / Σ (ref − test)²)``.

    Nested outputs (tuples, lists, dicts) are compared leaf by leaf and the worst leaf is returned;
    identical outputs give ``inf``. ``test`` may be on another device (a model lowered to the CPU).
    """
    refs, tests = _float_leaves(reference), _float_leaves(test)
    if len(refs) != len(tests):
        raise ValueError(f"outputs differ in structure: {len(refs)} vs {len(tests)} floating tensors")
    worst = math.inf
    for r, t in zip(refs, tests, strict=True):
        if r.shape != t.shape:
            raise ValueError(f"output shapes differ: {tuple(r.shape)} vs {tuple(t.shape)}")
        noise = float(((r - t.to(r.device)) ** 2).sum())
        signal = float((r**2).sum())
        if noise == 0.0:
            continue
        worst = min(worst, 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf)
    return worst


def _as_float(value: torch.Tensor) -> torch.Tensor:
    value = value.dequantize() if value.is_quantized else value
    return value.detach().double()


def mse(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Mean squared error ``mean((ref − test)²)`` (quantized tensors are dequantized first)."""
    ref, out = _as_float(reference), _as_float(test)
    if ref.shape != out.shape:
        raise ValueError(f"mse: shapes differ: {tuple(ref.shape)} vs {tuple(out.shape)}")
    return float(((ref - out) ** 2).mean())


def topk_agreement(reference_logits: torch.Tensor, test_logits: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose reference top-1 class is among the test's top ``k`` classes.

    Classes are along dim 1 (``(N, C)`` logits, or ``(N, C, ...)`` for dense predictions, where every
    position counts as a sample); a 1-D input is a single sample. ``k = 1`` is top-1 agreement.
    """
    ref, out = _as_float(reference_logits), _as_float(test_logits)
    if ref.shape != out.shape:
        raise ValueError(f"topk_agreement: shapes differ: {tuple(ref.shape)} vs {tuple(out.shape)}")
    if ref.dim() == 1:
        ref, out = ref[None], out[None]
    classes = ref.shape[1]
    if not 1 <= k <= classes:
        raise ValueError(f"topk_agreement: k must be in [1, {classes}], got {k}")
    ref = ref.movedim(1, -1).reshape(-1, classes)
    out = out.movedim(1, -1).reshape(-1, classes)
    hits = (out.topk(k, dim=1).indices == ref.argmax(dim=1, keepdim=True)).any(dim=1)
    return float(hits.double().mean())


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(
    reference: torch.Tensor,
    test: torch.Tensor,
    data_range: float,
    window_size: int = 11,
    sigma: float = 1.5,
) -> float:
    """Mean structural similarity of two ``(B, C, H, W)`` images (e.g. depth maps, ``C = 1``).

    With local means ``μ``, variances ``σ²`` and covariance ``σxy`` under a ``window_size`` Gaussian
    window of std ``sigma`` (valid positions only), ``C1 = (0.01 L)²``, ``C2 = (0.03 L)²``,
    ``L = data_range``: ``SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))``,
    averaged over positions, channels and batch (Wang et al. 2004). Identical images give 1.
    """
    x, y = _as_float(reference), _as_float(test)
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"ssim: needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if min(x.shape[-2:]) < window_size:
        raise ValueError(
            f"ssim: images of {tuple(x.shape[-2:])} are smaller than the {window_size}-pixel window"
        )
    if data_range <= 0:
        raise ValueError(f"ssim: data_range must be > 0, got {data_range}")
    window = _gaussian_window(window_size, sigma, x.shape[1])

    def blur(v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(v, window, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def _state_tensors(value: Any, name: str) -> list[tuple[str, torch.Tensor]]:
    """Tensors in a state-dict value; quantized linears keep theirs in a (weight, bias) tuple."""
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, (tuple, list)):
        return [item for i, v in enumerate(value) for item in _state_tensors(v, f"{name}.{i}")]
    return []


def _bits_used(q: torch.Tensor) -> int:
    """The fewest bits of the quantized tensor's integer kind (signed for qint8) that hold its values."""
    ints = q.int_repr()
    lo, hi = int(ints.min()), int(ints.max())
    for bits in range(1, 9):
        if q.dtype == torch.qint8 and -(2 ** (bits - 1)) <= lo and hi <= 2 ** (bits - 1) - 1:
            return bits
        if q.dtype != torch.qint8 and lo >= 0 and hi <= 2**bits - 1:
            return bits
    return 8


def model_size(model: torch.nn.Module, bits: int | None = None) -> dict[str, Any]:
    """Model size in bytes.

    ``serialized_bytes``: ``torch.save`` of the ``state_dict`` (what a checkpoint file takes).
    ``packed_bytes``: the size with weights packed at n bits, reported when ``bits`` is given or some
    quantized weight uses fewer than 8 bits: ``Σ_weights ceil(numel · n / 8)`` plus, per quantized
    weight, 4 bytes (float32 scale) + 1 byte (zero point) per tensor or per channel, plus every other
    tensor at its own element size. Weights are the quantized tensors (``n`` = ``bits`` if given, else
    the fewest bits their integer values need) and, given ``bits``, the float parameters with
    ``ndim ≥ 2`` (conv and linear weights of a float model). ``weight_bits`` maps weight names to ``n``.
    """
    buffer = io.BytesIO()
    state = model.state_dict()
    torch.save(state, buffer)
    result: dict[str, Any] = {
        "serialized_bytes": buffer.getbuffer().nbytes,
        "packed_bytes": None,
        "weight_bits": {},
    }
    packed, weight_bits = 0, {}
    for key, value in state.items():
        for name, tensor in _state_tensors(value, key):
            if tensor.is_quantized:
                n = bits if bits is not None else _bits_used(tensor)
                per = tensor.q_per_channel_scales().numel() if tensor.qscheme() in (
                    torch.per_channel_affine, torch.per_channel_symmetric) else 1
                packed += -(-tensor.numel() * n // 8) + 5 * per
                weight_bits[name] = n
            elif bits is not None and tensor.is_floating_point() and tensor.dim() >= 2:
                packed += -(-tensor.numel() * bits // 8)
                weight_bits[name] = bits
            else:
                packed += tensor.numel() * tensor.element_size()
    if bits is not None or any(n < 8 for n in weight_bits.values()):
        result["packed_bytes"] = packed
        result["weight_bits"] = weight_bits
    return result


def peak_memory(model: torch.nn.Module, example_inputs: tuple | torch.Tensor) -> int:
    """Peak bytes allocated on the CPU during one ``model(*example_inputs)`` under ``torch.inference_mode``,
    over what was allocated before the call (so weights do not count, activations and workspaces do).

    Read from the profiler's allocator events (``profile_memory=True``): the running sum of allocations
    (positive) and frees (negative) in time order, and its maximum.
    """
    from torch.profiler import ProfilerActivity, profile

    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(*inputs)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def latency(
    model: torch.nn.Module,
    example_inputs: tuple | torch.Tensor,
    warmup: int = 5,
    iters: int = 30,
    threads: int = 2,
) -> dict[str, float]:
    """Wall-clock time of ``model(*example_inputs)`` under ``torch.inference_mode`` with ``threads``
    intra-op threads (restored afterwards): ``warmup`` untimed calls, then ``iters`` timed ones;
    returns ``median_ms``, ``p90_ms`` and ``mean_ms``."""
    if iters < 1:
        raise ValueError(f"latency: iters must be >= 1, got {iters}")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(*inputs)
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                model(*inputs)
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered),
        "p90_ms": ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))],
        "mean_ms": statistics.fmean(ordered),
    }
