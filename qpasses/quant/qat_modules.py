"""QAT versions of the weighted layers: the layer, an optional BatchNorm it absorbs, and a weight fake-quant.

Each class subclasses its float layer (``QATConv2d`` is an ``nn.Conv2d``), so the op table and the
annotation treat it as the layer it stands for, and it keeps that layer's parameters and names.

BatchNorm (conv/linear → BN merged into one block, Jacob et al. 2018, as torch.ao's ConvBn):
with ``σ`` the running standard deviation ``sqrt(running_var + ε)`` and ``s = γ / σ`` per output channel,

- training, BN statistics live: ``y = BN_batch(conv(x, fq(s ⊙ W)) / s + b)``: the weight the
  deployed model will use, fake-quantized, while BN normalises with (and updates) batch statistics;
- eval, or after ``freeze_bn_stats()``: the folded layer itself,
  ``y = conv(x, fq(s ⊙ W), s (b − μ) + β)``, exactly what ``float_module()`` hands to lowering.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qpasses.errors import QPassesError
from qpasses.quant.fake_quant import FakeQuantize


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None and self.bn.training:
            return self._forward_with_batch_statistics(x)
        weight, bias = self.folded_weight_and_bias()
        return self._compute(x, self._fake_quantized(weight), bias)

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
        """The plain float layer with the folded weight and bias, as lowering expects it."""
        with torch.no_grad():
            weight, bias = self.folded_weight_and_bias()
            plain = copy.deepcopy(self)
            del plain.bn, plain.weight_fake_quant, plain.bn_frozen
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


_QAT_TYPES: dict[type[nn.Module], type[QATModule]] = {
    cls.float_type: cls for cls in (QATConv1d, QATConv2d, QATConv3d, QATLinear, QATConvTranspose1d, QATConvTranspose2d)
}
# A transposed conv keeps output channels on weight dim 1, where the folding above does not scale them.
BN_ABSORBING_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def to_qat(module: nn.Module, name: str, bn: _BatchNorm | None = None) -> QATModule:
    """``module`` turned into its QAT class in place (same parameters), absorbing ``bn`` if given.

    The class is swapped rather than the module rebuilt (as ``torch.nn.utils.parametrize`` does), so
    parameters, their names and anything holding them (an optimizer) stay the same.
    """
    if isinstance(module, QATModule):
        return module
    cls = _QAT_TYPES.get(type(module))
    if cls is None:
        raise QPassesError(f"'{name}': no QAT version of {type(module).__name__} "
                           f"(supported: {', '.join(t.__name__ for t in _QAT_TYPES)}); keep it float with "
                           f"QuantConfig(keep_float={{'{name}'}})")
    if bn is not None and not isinstance(module, BN_ABSORBING_TYPES):
        raise QPassesError(f"'{name}': a {type(module).__name__} cannot absorb a BatchNorm during QAT")
    module.__class__ = cls
    module._setup_qat(bn)
    return module
