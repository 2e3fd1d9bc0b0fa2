"""QAT versions of the weighted layers: the layer, an optional BatchNorm it absorbs, and a weight fake-quant.

Each class subclasses its float layer (``QATConv2d`` is an ``nn.Conv2d``), so the op table and the
annotation treat it as the layer it stands for, and it keeps that layer's parameters and names.

BatchNorm (conv/linear → BN merged into one block, Jacob et al. 2018, as torch.ao's ConvBn):
with ``σ`` the running standard deviation ``sqrt(running_var + ε)`` and ``s = γ / σ`` per output channel,

- training, BN statistics live: ``y = BN_batch(conv(x, fq(s ⊙ W)) / s + b)``: the weight the
  deployed model will use, fake-quantized, while BN normalises with (and updates) batch statistics;
- eval, or after ``freeze_bn_stats()``: the folded layer itself,
  ``y = conv(x, fq(s ⊙ W), fq_b(s (b − μ) + β))``, exactly what ``float_module()`` hands to lowering.

``fq_b`` is the identity unless ``quantize_bias_with(input_fake_quant)`` was called, for kernels that round
the bias to int32 before adding it to the accumulator (qnnpack):
``fq_b(b) = round(b / g)·g`` with ``g = s_in·s_w`` per output channel (straight-through gradient to ``b``;
``s_in`` is the input fake-quant's scale, ``s_w`` the weight's). At 4–5 bits ``g/s_out`` is a large fraction
of an output step (0.08 measured on a first layer), so a float bias moves outputs across rounding
boundaries the kernel does not (4.5% of that layer's codes differed).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qpasses.errors import QPassesError
from qpasses.quant.fake_quant import FakeQuantize, bias_on_grid


def _per_output_channel(values: torch.Tensor, dim: int, like: torch.Tensor) -> torch.Tensor:
    """``values`` shaped to broadcast along dimension ``dim`` of ``like``."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return values.reshape(shape)


class QATModule:
    """Mixin of the QAT layers, placed before the float layer class in the bases.

    ``bn``: the absorbed BatchNorm or None; ``weight_fake_quant``: the weight's fake-quant or None
    (then the float weight is used); ``bn_frozen``: BN normalises with running statistics even in
    training mode (``freeze_bn_stats``), and ``train()`` leaves it in eval mode.
    """

    float_type: type[nn.Module]

    def _setup_qat(self, bn: _BatchNorm | None) -> None:
        self.bn = bn
        self.weight_fake_quant = None
        self.bn_frozen = False
        # The graph's fake-quant of this layer's input, in a tuple to keep it out of this module's children
        # (it belongs to the graph, which calls it; a child would appear twice in state_dict).
        self._bias_input_fake_quant: tuple[FakeQuantize, ...] = ()

    def _compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias with BN folded in with its running statistics (the layer's own without BN)."""
        if self.bn is None:
            return self.weight, self.bias
        bn = self.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        scale = gamma / std
        bias = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        return self.weight * _per_output_channel(scale, 0, self.weight), (bias - bn.running_mean) * scale + beta

    def _fake_quantized(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.weight_fake_quant is None else self.weight_fake_quant(weight)

    def _fake_quantized_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``bias`` on the int32 grid ``s_in·s_w`` (see the module docstring); call after the weight's fake-quant,
        whose scale it reads."""
        if bias is None or not self._bias_input_fake_quant or self.weight_fake_quant is None:
            return bias
        input_scale = self._bias_input_fake_quant[0].qparams()[0]
        step = (input_scale * self.weight_fake_quant.qparams()[0]).to(bias.dtype)
        return bias_on_grid(bias, step)

    def quantize_bias_with(self, input_fake_quant: FakeQuantize) -> None:
        """Fake-quantize the deployed bias to int32 at ``input_fake_quant``'s scale times the weight's."""
        self._bias_input_fake_quant = (input_fake_quant,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None and self.bn.training:
            return self._forward_with_batch_statistics(x)
        weight, bias = self.folded_weight_and_bias()
        weight = self._fake_quantized(weight)
        return self._compute(x, weight, self._fake_quantized_bias(bias))

    def _forward_with_batch_statistics(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        scale = (bn.weight if bn.affine else torch.ones_like(std)) / std
        weight = self._fake_quantized(self.weight * _per_output_channel(scale, 0, self.weight))
        y = self._compute(x, weight, None)
        y = y / _per_output_channel(scale, 1, y)
        if self.bias is not None:
            y = y + _per_output_channel(self.bias, 1, y)
        return bn(y)

    def attach_weight_fake_quant(self, fake_quant: FakeQuantize) -> None:
        """Fake-quantize the (folded) weight from now on; its range starts from the current weight."""
        self.weight_fake_quant = fake_quant
        with torch.no_grad():
            fake_quant(self.folded_weight_and_bias()[0])

    def freeze_bn_stats(self) -> None:
        """Stop updating BN statistics; normalise with the running ones (the deployed folding) from now on."""
        if self.bn is not None:
            self.bn_frozen = True
            self.bn.eval()

    def train(self, mode: bool = True):
        self.training = mode
        for child in self.children():
            if not (child is self.bn and self.bn_frozen):
                child.train(mode)
        return self

    def float_module(self) -> nn.Module:
        """The plain float layer the eval forward computes, as lowering expects it: BN folded, weight and
        bias fake-quantized. They then lie on their grids, so lowering recovers exactly the trained codes;
        rounding the float weight again could decide a tie the other way (symmetric ranges put the
        largest negative weight of each channel exactly at ``qmin + ½``: ``max|w| / s = (qmax − qmin) / 2``)."""
        with torch.no_grad():
            weight, bias = self.folded_weight_and_bias()
            weight = self._fake_quantized(weight)
            bias = self._fake_quantized_bias(bias)
            plain = copy.deepcopy(self)
            del plain.bn, plain.weight_fake_quant, plain.bn_frozen, plain._bias_input_fake_quant
            plain.__class__ = self.float_type
            plain.weight = nn.Parameter(weight.detach().clone())
            plain.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        return plain


class QATConv1d(QATModule, nn.Conv1d):
    float_type = nn.Conv1d


class QATConv2d(QATModule, nn.Conv2d):
    float_type = nn.Conv2d


class QATConv3d(QATModule, nn.Conv3d):
    float_type = nn.Conv3d


class QATLinear(QATModule, nn.Linear):
    float_type = nn.Linear

    def _compute(self, x, weight, bias):
        return F.linear(x, weight, bias)


class QATConvTranspose1d(QATModule, nn.ConvTranspose1d):
    float_type = nn.ConvTranspose1d

    def _compute(self, x, weight, bias):
        return F.conv_transpose1d(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)


class QATConvTranspose2d(QATModule, nn.ConvTranspose2d):
    float_type = nn.ConvTranspose2d

    def _compute(self, x, weight, bias):
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)


# A transposed conv keeps output channels on weight dim 1, where the folding above does not scale them.
BN_ABSORBING_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def to_qat(module: nn.Module, name: str, bn: _BatchNorm | None = None) -> QATModule:
    """``module`` turned into its QAT class in place (same parameters), absorbing ``bn`` if given.

    The class is swapped rather than the module rebuilt (as ``torch.nn.utils.parametrize`` does), so
    parameters, their names and anything holding them (an optimizer) stay the same.
    """
    if isinstance(module, QATModule):
        return module
    from qpasses.quant.ops import OPS, computing_op  # the op table names this module's classes

    op = computing_op(module)
    if op is None or op.qat is None:
        supported = ", ".join(op.modules[0].__name__ for op in OPS if op.qat is not None)
        raise QPassesError(f"'{name}': no QAT version of {type(module).__name__} (supported: {supported}); keep it "
                           f"float with QuantConfig(keep_float={{'{name}'}})")
    cls = op.qat
    if bn is not None and not isinstance(module, BN_ABSORBING_TYPES):
        raise QPassesError(f"'{name}': a {type(module).__name__} cannot absorb a BatchNorm during QAT")
    module.__class__ = cls
    module._setup_qat(bn)
    return module
