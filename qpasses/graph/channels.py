"""Per-channel views of conv, transposed-conv and linear weights, and the output statistics passes share.

Weight layouts (torch): ``Conv*d`` ``[out, in / groups, *k]``; ``ConvTranspose*d`` ``[in, out / groups, *k]``;
``Linear`` ``[out, in]``. A group ``g`` of a conv maps input channels ``g·(in/groups) … (g+1)·(in/groups) − 1``
to output channels ``g·(out/groups) …``; getting that mapping right is what makes per-channel ranges and
scales correct for grouped and depthwise convs.

Output statistics: FuseBN records, for each layer whose BatchNorm it folded, the per-channel mean ``β``
and standard deviation ``|γ|`` of the layer's (pre-activation) output that the BN implies. Passes that
rescale or shift a layer's output channels (CLE, bias absorption) update them, so later data-free passes
(HighBiasAbsorption, analytical BiasCorrection) read statistics of the model as it is now.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from qpasses.quant.state import state_of

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def _groups(module: nn.Module) -> int:
    return module.groups if isinstance(module, _ConvNd) else 1


def out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def is_depthwise(module: nn.Module) -> bool:
    """A conv where each output channel reads exactly its own input channel (groups == in == out)."""
    return (isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd)
            and module.groups == module.in_channels == module.out_channels)


def _by_output_channel(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``weight`` as ``[out, fan_in]``: row ``o`` holds every weight producing output channel ``o``."""
    if isinstance(module, _ConvTransposeNd):
        groups = module.groups
        per_group_in, per_group_out = weight.shape[0] // groups, weight.shape[1]
        blocks = weight.reshape(groups, per_group_in, per_group_out, -1)
        return blocks.permute(0, 2, 1, 3).reshape(groups * per_group_out, -1)
    return weight.reshape(weight.shape[0], -1)


def _by_input_channel(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``weight`` as ``[in, fan_out]``: row ``c`` holds every weight that reads input channel ``c``."""
    if isinstance(module, _ConvTransposeNd):
        return weight.reshape(weight.shape[0], -1)
    groups = _groups(module)
    per_group_out, per_group_in = weight.shape[0] // groups, weight.shape[1]
    blocks = weight.reshape(groups, per_group_out, per_group_in, -1)
    return blocks.permute(0, 2, 1, 3).reshape(groups * per_group_in, -1)


def output_channel_ranges(module: nn.Module) -> torch.Tensor:
    """``max |w|`` over the weights of each output channel."""
    return _by_output_channel(module.weight.detach(), module).abs().amax(dim=1)


def input_channel_ranges(module: nn.Module) -> torch.Tensor:
    """``max |w|`` over the weights that read each input channel."""
    return _by_input_channel(module.weight.detach(), module).abs().amax(dim=1)


def scale_output_channels(weight: torch.Tensor, scale: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``weight`` with output channel ``o`` multiplied by ``scale[o]``.

    Conv and Linear weights hold output channels on dim 0. A transposed conv's weight is
    ``[in, out / groups, *k]``: output channel ``o = g · (out / groups) + j`` lives at ``[g-th block of in, j]``.
    """
    if isinstance(module, _ConvTransposeNd):
        groups = module.groups
        blocks = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        factors = scale.reshape(groups, 1, weight.shape[1], *([1] * (weight.dim() - 2)))
        return (blocks * factors).reshape(weight.shape)
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))


def scale_input_channels(weight: torch.Tensor, scale: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``weight`` with every weight reading input channel ``c`` multiplied by ``scale[c]``.

    A grouped conv's weight ``[out, in / groups, *k]`` holds input channel ``c = g · (in / groups) + j`` at
    ``[g-th block of out, j]``; a transposed conv holds it on dim 0.
    """
    if isinstance(module, _ConvTransposeNd):
        return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    groups = _groups(module)
    blocks = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
    factors = scale.reshape(groups, 1, weight.shape[1], *([1] * (weight.dim() - 2)))
    return (blocks * factors).reshape(weight.shape)


def divide_output_channels(module: nn.Module, scale: torch.Tensor) -> None:
    """In place: output channel ``o`` of ``module`` (weights and bias) divided by ``scale[o]``."""
    with torch.no_grad():
        module.weight.copy_(scale_output_channels(module.weight, 1.0 / scale, module))
        if module.bias is not None:
            module.bias.div_(scale)


def multiply_input_channels(module: nn.Module, scale: torch.Tensor) -> None:
    """In place: every weight of ``module`` reading input channel ``c`` multiplied by ``scale[c]``."""
    with torch.no_grad():
        module.weight.copy_(scale_input_channels(module.weight, scale, module))


def constant_input_response(module: nn.Module, value: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """What ``module`` adds to each output channel when input channel ``c`` is the constant ``value[c]``
    everywhere in its receptive field (no zero padding reached): ``Σ_{c, k} w[o, c, k] · value[c]``, with
    ``weight`` (same layout) in place of the module's own if given."""
    weight = (module.weight if weight is None else weight).detach()
    if isinstance(module, _ConvTransposeNd):
        raise ValueError("a transposed conv's response to a constant input varies with the output position")
    groups = _groups(module)
    per_group_out, per_group_in = weight.shape[0] // groups, weight.shape[1]
    summed = weight.reshape(groups, per_group_out, per_group_in, -1).sum(dim=3)
    return torch.einsum("goi,gi->go", summed, value.reshape(groups, per_group_in)).reshape(-1)


def reaches_padding(module: nn.Module) -> bool:
    """Whether ``module`` reads zero padding (so a constant input does not give a constant output)."""
    if isinstance(module, nn.Linear):
        return False
    padding = module.padding
    if isinstance(padding, str):
        return padding != "valid"
    return any(p != 0 for p in padding)


# --------------------------------------------------------------------------------------- output statistics


@dataclass
class ChannelStats:
    """Per output channel of one layer: mean and standard deviation of its pre-activation output."""

    mean: torch.Tensor
    std: torch.Tensor


def output_stats(gm: fx.GraphModule) -> dict[str, ChannelStats]:
    """The recorded statistics, by the layer's module name (an empty dict to fill if none yet)."""
    return state_of(gm).output_stats


def record_output_stats(gm: fx.GraphModule, target: str, mean: torch.Tensor, std: torch.Tensor) -> None:
    output_stats(gm)[target] = ChannelStats(mean.detach().clone(), std.detach().abs().clone())


def divide_output_stats(gm: fx.GraphModule, target: str, scale: torch.Tensor) -> None:
    """The layer's output channels were divided by ``scale``: so are their mean and deviation."""
    stats = output_stats(gm).get(target)
    if stats is not None:
        stats.mean, stats.std = stats.mean / scale, stats.std / scale


def shift_output_stats(gm: fx.GraphModule, target: str, shift: torch.Tensor) -> None:
    """The layer's bias was lowered by ``shift``: so is its output mean."""
    stats = output_stats(gm).get(target)
    if stats is not None:
        stats.mean = stats.mean - shift
