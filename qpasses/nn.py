"""Small modules qpasses puts into graphs. They are leaves for the tracer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _pad_codes(x: torch.Tensor, pads: list[int], value: float) -> torch.Tensor:
    """Constant padding of a per-tensor quantized tensor done on its integer codes.

    ``F.pad`` on quantized tensors takes a generic fill-and-copy path about 7× slower than padding the
    uint8 codes; the result is identical and keeps the channels-last layout the int8 convs produce.
    """
    scale, zero_point = x.q_scale(), x.q_zero_point()
    info = torch.iinfo(x.int_repr().dtype)
    code = zero_point + value / scale if math.isfinite(value) else (info.min if value < 0 else info.max)
    code = int(min(max(round(code), info.min), info.max))
    return torch._make_per_tensor_quantized_tensor(F.pad(x.int_repr(), pads, value=code), scale, zero_point)


def _pad(x: torch.Tensor, pads: list[tuple[int, int]], value: float) -> torch.Tensor:
    (top, bottom), (left, right) = pads
    if top == bottom == left == right == 0:
        return x
    if x.is_quantized:
        return _pad_codes(x, [left, right, top, bottom], value)
    return F.pad(x, [left, right, top, bottom], value=value)


class SamePad2d(nn.Module):
    """TensorFlow 'SAME' padding computed from the input size at run time.

    For input size ``i``, kernel ``k``, stride ``s``, dilation ``d`` the total padding is
    ``max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)``, split with the extra pixel at the end.
    It is a module of its own so that the convolution after it is a plain ``nn.Conv2d`` and the
    shape-dependent arithmetic stays out of the traced graph.
    """

    def __init__(self, kernel_size, stride=1, dilation=1, value: float = 0.0):
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.value = value

    def same_pads(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """(low, high) padding of the last two dimensions of ``x``."""
        pads = []
        for i, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True):
            total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads.append((total // 2, total - total // 2))
        return pads

    def pads(self, x: torch.Tensor) -> list[tuple[int, int]]:
        """(low, high) padding this module applies to the last two dimensions of ``x`` (its shape is all
        that is read: a meta tensor will do)."""
        return self.same_pads(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pad(x, self.pads(x), self.value)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, value={self.value}"


class ShiftedSamePad2d(SamePad2d):
    """'SAME' padding for a stride-``s`` convolution that pads ``p = (k − 1) / 2`` on every side itself.

    'SAME' pads ``(lo, hi)`` with ``hi = p`` for odd ``k`` and ``s = 2``, while ``lo`` is ``p`` or ``p − 1``
    depending on the input size. Padding ``(lo + s − p, hi − p)`` here moves every window of the padded
    convolution exactly one stride later, so dropping its first output row and column
    (:class:`CropStart2d`) gives the 'SAME' result. The int8 lowering uses this because fbgemm's fast
    depthwise kernels need symmetric padding: a 5×5 stride-2 depthwise conv with padding 0 ran about
    25× slower than with padding 2.
    """

    def __init__(self, kernel_size, stride=2, value: float = 0.0):
        super().__init__(kernel_size, stride, 1, value)
        if not self.applies(self.kernel_size, self.stride, self.dilation):
            raise ValueError(f"ShiftedSamePad2d needs odd kernels and stride 2, got {self.kernel_size}, {self.stride}")

    @staticmethod
    def applies(kernel_size, stride, dilation) -> bool:
        return all(k % 2 == 1 and s == 2 and d == 1
                   for k, s, d in zip(_pair(kernel_size), _pair(stride), _pair(dilation), strict=True))

    def pads(self, x: torch.Tensor) -> list[tuple[int, int]]:
        return [(lo + s - (k - 1) // 2, hi - (k - 1) // 2)
               for (lo, hi), k, s in zip(self.same_pads(x), self.kernel_size, self.stride, strict=True)]


class CropStart2d(nn.Module):
    """Drops the first ``rows`` rows and ``cols`` columns of an NCHW tensor."""

    def __init__(self, rows: int = 1, cols: int = 1):
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.rows:, self.cols:]

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}"
class ChannelClamp(nn.Module):
    """``clamp(x, lower[c], upper[c])`` with bounds per channel (dim 1).

    Cross-layer equalization divides a layer's output channel ``c`` by ``s[c]``; a ReLU6 after it then
    becomes ``s[c] · clamp(x, 0, 6 / s[c])``, this module with ``upper = 6 / s``, so the model computes
    exactly what it did. On a per-tensor quantized input it clamps the integer codes at
    ``round(bound / scale) + zero_point``, which equals dequantize → clamp → quantize code for code
    and keeps the input's qparams; measured 3.4 ms against 7.3 ms for dequantize → clamp → quantize on a
    channels-last 8×96×56×56 tensor, one thread.
    """

    def __init__(self, lower: torch.Tensor, upper: torch.Tensor):
        super().__init__()
        if lower.shape != upper.shape or lower.dim() != 1:
            raise ValueError(f"ChannelClamp needs 1-D bounds of one shape, got {tuple(lower.shape)} and {tuple(upper.shape)}")
        if bool((lower > upper).any()):
            raise ValueError("ChannelClamp: a lower bound exceeds its upper bound")
        self.register_buffer("lower", lower.detach().clone().float())
        self.register_buffer("upper", upper.detach().clone().float())

    @property
    def uniform(self) -> bool:
        """Whether every channel has the same bounds (then it is an ordinary clamp)."""
        return bool((self.lower == self.lower[0]).all() and (self.upper == self.upper[0]).all())

    def _per_channel(self, bound: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return bound.reshape(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_quantized:
            return self._clamp_codes(x)
        return torch.clamp(x, self._per_channel(self.lower, x), self._per_channel(self.upper, x))

    def _clamp_codes(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = x.q_scale(), x.q_zero_point()
        codes = x.int_repr()
        info = torch.iinfo(codes.dtype)

        def code(bound: torch.Tensor) -> torch.Tensor:
            value = torch.round(bound.clamp(-1e30, 1e30) / scale) + zero_point
            return self._per_channel(value.clamp(info.min, info.max).to(codes.dtype), x)

        clamped = torch.minimum(torch.maximum(codes, code(self.lower)), code(self.upper))
        return torch._make_per_tensor_quantized_tensor(clamped, scale, zero_point)

    def extra_repr(self) -> str:
        return f"channels={self.lower.numel()}, upper=[{float(self.upper.min()):.3g}, {float(self.upper.max()):.3g}]"
