"""Construction of ``torch.ao.nn.quantized`` modules: the one place that touches the quantized tensor dtypes.

Those dtypes and modules are deprecated upstream, so everything that builds them lives here; a future
target (ONNX QDQ, reference int8, inductor) replaces this module, not the passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from qpasses.errors import QPassesError
from qpasses.quant.observers import make_observer
from qpasses.quant.spec import QuantSpec


def _rebuild_quantized_conv(cls: type, state: tuple) -> nn.Module:
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.__setstate__(state)
    return module


class _PicklableConv:
    """Upstream quantized convs unpickle without ``Module.__init__`` (no ``_modules``), so a saved whole
    model cannot be loaded; these subclasses pickle the way their own ``__deepcopy__`` copies."""

    def __reduce_ex__(self, protocol):
        return _rebuild_quantized_conv, (type(self), self.__getstate__())


class QuantizedConv1d(_PicklableConv, nnq.Conv1d):
    pass


class QuantizedConv2d(_PicklableConv, nnq.Conv2d):
    pass


class QuantizedConv3d(_PicklableConv, nnq.Conv3d):
    pass


class QuantizedConvTranspose1d(_PicklableConv, nnq.ConvTranspose1d):
    pass


class QuantizedConvTranspose2d(_PicklableConv, nnq.ConvTranspose2d):
    pass


_QUANTIZED_COMPUTE = {
    nn.Conv1d: QuantizedConv1d,
    nn.Conv2d: QuantizedConv2d,
    nn.Conv3d: QuantizedConv3d,
    nn.ConvTranspose1d: QuantizedConvTranspose1d,
    nn.ConvTranspose2d: QuantizedConvTranspose2d,
    nn.Linear: nnq.Linear,
}


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Pack weights for ``engine``: the packed format is chosen by the engine active at packing time."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def use_engine(engine: str, module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of lowered models: run with the engine they were lowered for."""
    if torch.backends.quantized.engine != engine:
        torch.backends.quantized.engine = engine


def on_grid(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize onto the n-bit grid ``[quant_min, quant_max]`` (per channel along ``spec.axis``)."""
    if spec.per_channel:
        shape = [1] * x.dim()
        shape[spec.axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    codes = torch.clamp(torch.round(x / scale) + zero_point, spec.quant_min, spec.quant_max)
    return (codes - zero_point) * scale


def weight_spec(module: nn.Module, spec: QuantSpec) -> QuantSpec:
    """The spec ``module``'s weight is quantized with: per-channel axes follow output channels, which a
    transposed conv holds on dim 1."""
    if spec.per_channel and isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d):
        return spec.replace(axis=1)
    return spec


def weight_qparams(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero point lowering gives ``weight`` (from its own range, observed with ``spec``)."""
    observer = make_observer(spec, name="weight")
    observer(weight.detach())
    return observer.qparams()


def fake_quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``weight`` rounded to the grid lowering will put it on, as float (for simulating the int8 model)."""
    return on_grid(weight.detach().float(), *weight_qparams(weight, spec), spec)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec,
                    qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``weight`` as a quantized tensor whose codes lie in the spec's (possibly sub-8-bit) range, at
    ``qparams`` (scale, zero point) if given (e.g. trained by QAT), else at the range observed on it."""
    scale, zero_point = qparams if qparams is not None else weight_qparams(weight, spec)
    snapped = on_grid(weight.detach().float(), scale, zero_point, spec)
    if spec.per_channel:
        return torch.quantize_per_channel(snapped, scale.double(), zero_point.long(), spec.axis, spec.dtype)
    return torch.quantize_per_tensor(snapped, float(scale), int(zero_point), spec.dtype)


def quantized_compute(module: nn.Module, spec: QuantSpec, scale: float, zero_point: int,
                      trained_qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """The int8 version of a conv or linear layer, writing its output at (``scale``, ``zero_point``), its
    weight at ``trained_qparams`` if given (e.g. by QAT), else at the weight's observed range."""
    cls = _QUANTIZED_COMPUTE.get(type(module))
    if cls is None:
        raise QPassesError(f"no int8 kernel for {type(module).__name__}")
    qweight = quantize_weight(module.weight, weight_spec(module, spec), trained_qparams)
    bias = module.bias.detach() if module.bias is not None else None
    if isinstance(module, nn.Linear):
        qmodule = cls(module.in_features, module.out_features, bias_=bias is not None)
    elif isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d):
        qmodule = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                      module.output_padding, module.groups, bias is not None, module.dilation)
    else:
        qmodule = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                      module.dilation, module.groups, bias is not None, module.padding_mode)
    qmodule.set_weight_bias(qweight, bias)
    qmodule.scale, qmodule.zero_point = float(scale), int(zero_point)
    return qmodule


def quantized_unary(module: nn.Module, scale: float, zero_point: int) -> nn.Module:
    """Hardswish, LeakyReLU, ELU with output (``scale``, ``zero_point``)."""
    if isinstance(module, nn.Hardswish):
        return nnq.Hardswish(scale, zero_point)
    if isinstance(module, nn.LeakyReLU):
        return nnq.LeakyReLU(scale, zero_point, module.negative_slope)
    if isinstance(module, nn.ELU):
        return nnq.ELU(scale, zero_point, module.alpha)
    raise QPassesError(f"no int8 kernel for {type(module).__name__}")


def quantized_functional(scale: float, zero_point: int) -> nnq.QFunctional:
    functional = nnq.QFunctional()
    functional.scale, functional.zero_point = float(scale), int(zero_point)
    return functional


def quantize_stub(scale: float, zero_point: int, spec: QuantSpec) -> nnq.Quantize:
    return nnq.Quantize(scale, zero_point, spec.dtype)


def code_range(scale: float, zero_point: int, spec: QuantSpec) -> tuple[float, float] | None:
    """The real (min, max) of the spec's codes when they are narrower than the 8-bit container, else None.

    Clamping a quantized tensor to it executes n-bit (or reduce_range 7-bit) quantization exactly
    with 8-bit kernels.
    """
    info = torch.iinfo(torch.uint8 if spec.dtype == torch.quint8 else torch.int8)
    if spec.quant_min <= info.min and spec.quant_max >= info.max:
        return None
    return (spec.quant_min - zero_point) * scale, (spec.quant_max - zero_point) * scale
