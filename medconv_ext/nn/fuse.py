"""Eval-mode folding of BatchNorm (+ ReLU) into the epilogue of a rolling convolution.

In eval mode BatchNorm is a per-channel affine map with its running statistics,
    bn(z) = (z - mean) / sqrt(var + eps) * gamma + beta = z * scale + shift,
so conv -> BatchNorm -> ReLU equals rolling_conv(..., scale=scale, shift=shift, relu=True), which
the fused spectral CPU kernel applies to its accumulators before the store (no extra pass over the
activations). Folding BN into the weights instead would break the rolled structure (one scale per
output channel, but the channels of a roll share one base), a post-scale does not. Training mode
(batch statistics, running-stat updates) is never folded.
"""
from typing import Optional

import torch
from torch import nn

from .. import ops as F
from ..ops.rolling_conv_cat import rolling_conv_cat
from .rolling_conv import RollingConv2d, RollingConv3d

_BN = (nn.BatchNorm2d, nn.BatchNorm3d)


def bn_scale_shift(bn: nn.Module):
    """(scale, shift) of an eval-mode BatchNorm with running statistics."""
    inv = torch.rsqrt(bn.running_var + bn.eps)
    scale = inv if bn.weight is None else bn.weight * inv
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def is_plain_rolling_conv(conv: nn.Module) -> bool:
    """True when calling conv is exactly the functional rolling_conv2d/3d with its attributes (a RollingConv2d/3d,
    forward not overridden, zero padding given as numbers, no forward hooks: e.g. torch.nn.utils.prune recomputes
    the weight in a pre-hook), so a fused call may stand in for the module call."""
    if not isinstance(conv, (RollingConv2d, RollingConv3d)) or type(conv).forward not in (
            RollingConv2d.forward, RollingConv3d.forward):
        return False
    if conv._forward_hooks or conv._forward_pre_hooks:
        return False
    return getattr(conv, "padding_mode", "zeros") == "zeros" and not isinstance(conv.padding, str)


def conv_cat(conv: nn.Module, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """conv(torch.cat([x, x2], 1)); a plain rolling conv reads x and x2 in place (rolling_conv_cat: no
    concatenated copy where its fused CPU kernel runs the layer, in training too)."""
    if not is_plain_rolling_conv(conv) or x.dim() != conv._dims + 2:
        return conv(torch.cat([x, x2], 1))
    return rolling_conv_cat(x, x2, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.n_rolls,
                            backend=conv.backend)


def can_fold(conv: nn.Module, bn: Optional[nn.Module]) -> bool:
    """True when conv -> bn (-> ReLU) is exactly rolling_conv with an epilogue right now (eval mode)."""
    if not is_plain_rolling_conv(conv):
        return False
    if bn is not None:
        if not isinstance(bn, _BN) or bn.training or bn.running_mean is None or bn.running_var is None:
            return False
        if bn.num_features != conv.out_channels:
            return False
    return not conv.training


def rolling_conv_bn_relu(conv: nn.Module, bn: Optional[nn.Module], relu: bool, x: torch.Tensor,
                         x2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """conv -> [bn] -> [ReLU] in one fused call where can_fold(conv, bn), else module by module. With x2 the
    input is torch.cat([x, x2], 1); the fused call reads x and x2 in place (rolling_conv_cat: no
    concatenated copy where the fused CPU kernel runs the layer)."""
    if not can_fold(conv, bn):
        y = conv(x if x2 is None else torch.cat([x, x2], 1))
        if bn is not None:
            y = bn(y)
        return torch.relu(y) if relu else y
    scale = shift = None
    if bn is not None:
        scale, shift = bn_scale_shift(bn)
        scale, shift = scale.to(x.dtype), shift.to(x.dtype)
    if x2 is not None:
        return rolling_conv_cat(x, x2, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.n_rolls,
                                backend=conv.backend, scale=scale, shift=shift, relu=relu)
    fn = F.rolling_conv3d if isinstance(conv, RollingConv3d) else F.rolling_conv2d
    return fn(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.n_rolls,
              backend=conv.backend, scale=scale, shift=shift, relu=relu)
