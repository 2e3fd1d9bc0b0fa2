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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for i, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True):
            total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top == bottom == left == right == 0:
            return x
        if x.is_quantized:
            return _pad_codes(x, [left, right, top, bottom], self.value)
        return F.pad(x, [left, right, top, bottom], value=self.value)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, value={self.value}"
