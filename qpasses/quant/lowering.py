"""Construction of ``torch.ao.nn.quantized`` modules: the one place that touches the quantized tensor dtypes.

Those dtypes and modules are deprecated upstream, so everything that builds them lives here: the op table's
records (``qpasses.quant.ops``) name these builders as their torch.ao int8 form, and ``Lower``'s patterns call
them on the reference graph. The other runtimes (``qpasses.lower``) need nothing from this module but the
weight rounding (``weight_codes``) the reference graph is built with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.ao.nn.quantized as nnq
import torch.fx as fx
from torch import nn

from qpasses.errors import QPassesError
from qpasses.graph.modules import unique_name
from qpasses.quant.observers import make_observer
from qpasses.quant.spec import QuantSpec
from qpasses.quant.state import FLOAT_WEIGHT_KEY

if TYPE_CHECKING:
    from qpasses.quant.grids import Grid


def float_weight(node: fx.Node, module: nn.Module) -> torch.Tensor:
    """``module``'s (the module ``node`` calls) float weight: as the model had it before any rounding."""
    return node.meta.get(FLOAT_WEIGHT_KEY, module.weight.detach())


def _rebuild_packed(cls: type, engine: str, args: tuple) -> nn.Module:
    with quantized_engine(engine):
        module = cls.from_packing_args(args)
    module.packed_for = engine
    return module


class _EnginePacked:
    """Packed weights are laid out for the engine active when they were packed, and torch's quantized
    modules repack them under whatever engine is active when they are unpickled or deep-copied: a
    qnnpack model loaded while the x86 engine is selected computes wrong results. These subclasses
    remember their engine (``packed_for``, set by ``quantized_compute``) and repack under it.
    """

    # ``packed_for`` is a plain instance attribute: a class annotation here would reach TorchScript as
    # the string 'str' (postponed annotations), which it cannot resolve.

    def packing_args(self) -> tuple:
        raise NotImplementedError

    def __reduce_ex__(self, protocol):
        return _rebuild_packed, (type(self), self.packed_for, self.packing_args())

    def __deepcopy__(self, memo):
        rebuild, args = self.__reduce_ex__(2)
        return rebuild(*args)


class _PackedConv(_EnginePacked):
    """Also: upstream quantized convs unpickle without ``Module.__init__`` (no ``_modules``), so a saved
    whole model could not be loaded; these rebuild the way upstream ``__deepcopy__`` does."""

    def packing_args(self) -> tuple:
        return self.__getstate__()

    @classmethod
    def from_packing_args(cls, state: tuple) -> nn.Module:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.__setstate__(state)
        return module


class QuantizedConv1d(_PackedConv, nnq.Conv1d):
    pass


class QuantizedConv2d(_PackedConv, nnq.Conv2d):
    pass


class QuantizedConv3d(_PackedConv, nnq.Conv3d):
    pass


class QuantizedConvTranspose1d(_PackedConv, nnq.ConvTranspose1d):
    pass


class QuantizedConvTranspose2d(_PackedConv, nnq.ConvTranspose2d):
    pass


class QuantizedLinear(_EnginePacked, nnq.Linear):
    def packing_args(self) -> tuple:
        weight, bias = self._weight_bias()
        return self.in_features, self.out_features, weight, bias, self.scale, self.zero_point, self.training

    @classmethod
    def from_packing_args(cls, args: tuple) -> nn.Module:
        in_features, out_features, weight, bias, scale, zero_point, training = args
        module = cls(in_features, out_features, bias_=bias is not None)
        module.set_weight_bias(weight, bias)
        module.scale, module.zero_point, module.training = scale, zero_point, training
        return module


class FloatOutputLinear(QuantizedLinear):
    """An int8 linear that writes float: fbgemm's ``linear_with_input_q_dq_qweight_dq_output_fp32`` computes the
    int32 accumulator of the input's codes and the int8 weight and returns ``s_in·s_w·acc + b`` instead of
    requantizing it (the qlinear with fp32 output that inductor runs for PT2E's float logits). It reads the
    quantized input like ``nnq.Linear``; the kernel re-quantizes its dequantization at the same qparams, which
    gives back the same codes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x.dequantize(), x.q_scale(), x.q_zero_point(), self._packed_params._packed_params)

    def _get_name(self) -> str:
        return "QuantizedLinear(float output)"


# Engines whose packed linear weights implement the float-output kernel (torch 2.14.1, measured: qnnpack and
# onednn raise "not implemented for this packed parameter type").
_FLOAT_OUTPUT_LINEAR_ENGINES = ("x86", "fbgemm")


@contextlib.contextmanager
def quantized_engine(engine: str | None) -> Iterator[None]:
    """Pack weights for ``engine``: the packed format is chosen by the engine active at packing time (None: a
    backend without torch.ao kernels, whose grids are read from whichever engine is active)."""
    if engine is None:
        yield
        return
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@torch.jit.unused
def select_engine(engine: str) -> None:
    if torch.backends.quantized.engine != engine:
        torch.backends.quantized.engine = engine


class QuantizedEngine(nn.Module):
    """Selects the quantized engine a lowered model was packed for, as the first op of its forward.

    A module called from the graph, not a forward pre-hook: ``torch.save``/``torch.load`` rebuild a
    GraphModule from its code and submodules (dropping hooks and ``gm.meta``), and ``copy.deepcopy``
    drops forward hooks, so only state that is part of the graph survives both. TorchScript skips it.
    """

    _is_impure = True  # no user reads its output; keeps fx's dead-code elimination from dropping it

    def __init__(self, engine: str):
        super().__init__()
        self.engine = engine

    def forward(self) -> None:
        if not torch.jit.is_scripting():
            select_engine(self.engine)

    def extra_repr(self) -> str:
        return repr(self.engine)


def select_engine_first(gm: fx.GraphModule, engine: str) -> None:
    """Make a :class:`QuantizedEngine` for ``engine`` the first op of ``gm``'s forward."""
    target = unique_name(gm, "quantized_engine")
    gm.add_submodule(target, QuantizedEngine(engine))
    first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first_op):
        gm.graph.call_module(target, ())


def on_grid(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize onto the n-bit grid, codes clipped to ``[code_min, code_max]`` (per channel along
    ``spec.axis``)."""
    if spec.per_channel:
        shape = [1] * x.dim()
        shape[spec.axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    codes = torch.clamp(torch.round(x / scale) + zero_point, spec.code_min, spec.code_max)
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


def fake_quantize_weight(weight: torch.Tensor, spec: QuantSpec,
                         qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``weight`` rounded to the grid lowering will put it on (``qparams`` if given, as for ``weight_codes``),
    as float (for simulating the int8 model)."""
    scale, zero_point = qparams if qparams is not None else weight_qparams(weight, spec)
    return on_grid(weight.detach().float(), scale, zero_point, spec)


def weight_codes(weight: torch.Tensor, spec: QuantSpec, qparams: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight``'s integer codes (``torch.int8``/``torch.uint8``, in the spec's possibly sub-8-bit range) with
    their scale (float32) and zero point (int64), per channel along ``spec.axis`` or 0-d: at ``qparams`` if given
    (e.g. trained by QAT, or AdaRound's grid), else at the range observed on the weight."""
    scale, zero_point = qparams if qparams is not None else weight_qparams(weight, spec)
    scale, zero_point = torch.as_tensor(scale).detach().float(), torch.as_tensor(zero_point).detach().long()
    snapped = on_grid(weight.detach().float(), scale, zero_point, spec)
    if spec.per_channel:
        shape = [1] * weight.dim()
        shape[spec.axis] = -1
        codes = torch.round(snapped / scale.reshape(shape)) + zero_point.reshape(shape)
    else:
        codes = torch.round(snapped / scale) + zero_point
    dtype = torch.int8 if spec.dtype == torch.qint8 else torch.uint8
    return codes.clamp(spec.code_min, spec.code_max).to(dtype), scale, zero_point


def quantized_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     axis: int | None) -> torch.Tensor:
    """The quantized tensor of int8 weight ``codes`` (``torch.int8``/``torch.uint8``) at per-channel (along
    ``axis``) or, where ``axis`` is None, per-tensor ``scale`` and ``zero_point``."""
    if axis is not None:
        return torch._make_per_channel_quantized_tensor(codes, scale.double(), zero_point.long(), axis)
    return torch._make_per_tensor_quantized_tensor(codes, float(scale), int(zero_point))


def quantized_compute(cls: type[nn.Module], weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
                      zero_point: int, stride: tuple = (), padding: tuple = (), dilation: tuple = (),
                      groups: int = 1, output_padding: tuple = (), padding_mode: str = "zeros") -> nn.Module:
    """The int8 conv or linear ``cls`` (a :class:`QuantizedLinear`, ``QuantizedConv*`` or
    ``QuantizedConvTranspose*``) packing the quantized ``weight`` with the float ``bias``, writing its output at
    (``scale``, ``zero_point``); the conv's geometry as ``F.conv*``/``F.conv_transpose*`` take it."""
    kernel_size = tuple(int(k) for k in weight.shape[2:])
    if issubclass(cls, QuantizedLinear):
        qmodule = cls(weight.shape[1], weight.shape[0], bias_=bias is not None)
    elif issubclass(cls, nnq.ConvTranspose1d | nnq.ConvTranspose2d):
        qmodule = cls(weight.shape[0], weight.shape[1] * groups, kernel_size, stride, padding, output_padding,
                      groups, bias is not None, dilation)
    else:
        qmodule = cls(weight.shape[1] * groups, weight.shape[0], kernel_size, stride, padding, dilation, groups,
                      bias is not None, padding_mode)
    qmodule.set_weight_bias(weight, bias)
    qmodule.scale, qmodule.zero_point = float(scale), int(zero_point)
    qmodule.packed_for = torch.backends.quantized.engine
    return qmodule


def quantized_hardswish(module: nn.Hardswish, scale: float, zero_point: int) -> nn.Module:
    return nnq.Hardswish(scale, zero_point)


def quantized_leaky_relu(module: nn.LeakyReLU, scale: float, zero_point: int) -> nn.Module:
    return nnq.LeakyReLU(scale, zero_point, module.negative_slope)


def quantized_elu(module: nn.ELU, scale: float, zero_point: int) -> nn.Module:
    return nnq.ELU(scale, zero_point, module.alpha)


def has_float_output_kernel(module: nn.Module, engine: str) -> bool:
    """Whether ``engine`` has an int8 kernel for ``module`` that writes float (a linear on x86/fbgemm; no
    engine's quantized convs do)."""
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and engine in _FLOAT_OUTPUT_LINEAR_ENGINES)


def float_output_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The int8 linear of the quantized ``weight`` and float ``bias`` writing float (:class:`FloatOutputLinear`;
    see ``has_float_output_kernel``)."""
    if torch.backends.quantized.engine not in _FLOAT_OUTPUT_LINEAR_ENGINES:
        raise QPassesError(f"internal: the {torch.backends.quantized.engine} engine has no int8 kernel for "
                           "Linear that writes float")
    plain = quantized_compute(QuantizedLinear, weight, bias, 1.0, 0)
    lowered = FloatOutputLinear.from_packing_args(plain.packing_args())
    lowered.packed_for = plain.packed_for
    return lowered


def quantize_call(grid: Grid) -> tuple[object, tuple]:
    """The function and trailing arguments of a graph call that quantizes a float value to ``grid``."""
    return torch.quantize_per_tensor, (grid.scale, grid.zero_point, grid.quantized_dtype)


def code_range(grid: Grid) -> tuple[float, float] | None:
    """The real (min, max) of ``grid``'s codes when they are narrower than the 8-bit container, else None.

    Clamping a quantized tensor to it executes n-bit (or reduce_range 7-bit) quantization exactly
    with 8-bit kernels; a ``headroom`` reduce_range grid clips at the container and needs no clamp.
    """
    if not grid.narrowed:
        return None
    return (grid.qmin - grid.zero_point) * grid.scale, (grid.qmax - grid.zero_point) * grid.scale
