"""Involution modules (Li et al. 2021) with the published kernel generation.

Kernel generation, as in the published RedNet code:
    src    = x                                   if stride == 1
           = AvgPool(stride, stride)(x)          if stride > 1   (ceil mode here, see below)
    weight = conv2(conv1(src))                   conv1: 1x1 C -> C/r, no bias, BatchNorm, ReLU
                                                 conv2: 1x1 C/r -> K^d * G, with bias
    out    = involution(x, weight.view(N, G, *K, *S_out), K, stride, padding=dilation*(K-1)//2, dilation)

Sizes not divisible by the stride: with padding dilation*(K-1)/2 the involution has
S_out = floor((S - 1) / stride) + 1 = ceil(S / stride) outputs per axis, while the published
floor-mode pooling yields floor(S / stride) kernels (its CUDA path then reads past the
weight buffer). Here the pooling uses ceil_mode=True: the last, partial window averages the
input values it covers (padding 0, so it never counts positions outside the input), giving
exactly one kernel per output position. For sizes divisible by the stride this is identical
to the published module, so published state dicts give the same results.

Parameter and buffer names follow mmcv's ConvModule as used by RedNet:
conv1.conv.weight, conv1.bn.{weight,bias,running_mean,running_var,num_batches_tracked},
conv2.conv.weight, conv2.conv.bias.
"""
import math

import torch
from torch import nn

from ..ops import involution as F
from ..ops._common import ntuple

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}


class _ConvModule(nn.Module):
    """1x1 conv [+ BatchNorm + ReLU], with mmcv ConvModule's child names (conv, bn, activate)."""

    def __init__(self, dims, c_in, c_out, norm_act, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.conv = _CONV[dims](c_in, c_out, 1, bias=not norm_act, **factory)
        if norm_act:
            self.bn = _BN[dims](c_out, **factory)
            self.activate = nn.ReLU(inplace=False)
        self.norm_act = norm_act

    def forward(self, x):
        x = self.conv(x)
        if self.norm_act:
            x = self.activate(self.bn(x))
        return x


def _pos_int(v, name, cls):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError("%s: %s must be a positive int, got %r" % (cls, name, v))
    return v


class _InvolutionNd(nn.Module):
    _dims = 2

    def __init__(self, channels, kernel_size, stride=1, dilation=1, group_channels=16, reduction_ratio=4,
                 backend="auto", *, device=None, dtype=None):
        super().__init__()
        cls = type(self).__name__
        d = self._dims
        _pos_int(channels, "channels", cls)
        _pos_int(group_channels, "group_channels", cls)
        _pos_int(reduction_ratio, "reduction_ratio", cls)
        self.kernel_size = tuple(ntuple(kernel_size, d, "kernel_size", cls))
        self.stride = tuple(ntuple(stride, d, "stride", cls))
        self.dilation = tuple(ntuple(dilation, d, "dilation", cls))
        if any(k < 1 or k % 2 == 0 for k in self.kernel_size):
            raise ValueError("%s: kernel_size must be odd and positive (1, 3, 5, ...), got %s" % (cls, self.kernel_size))
        if any(s < 1 for s in self.stride) or any(v < 1 for v in self.dilation):
            raise ValueError("%s: stride and dilation must be >= 1, got stride=%s, dilation=%s"
                             % (cls, self.stride, self.dilation))
        if channels % group_channels != 0:
            # G = channels / group_channels groups; a silent G = 0 or a rounded G would change the layer.
            divisors = [v for v in range(1, channels + 1) if channels % v == 0]
            raise ValueError("%s: channels=%d must be a multiple of group_channels=%d (the layer has "
                             "G = channels / group_channels kernel groups); valid group_channels: %s "
                             "(group_channels=%d gives one group)" % (cls, channels, group_channels, divisors, channels))
        if channels // reduction_ratio < 1:
            raise ValueError("%s: channels // reduction_ratio must be >= 1 (the reduce conv has that many "
                             "channels), got channels=%d, reduction_ratio=%d" % (cls, channels, reduction_ratio))
        self.channels = channels
        self.group_channels = group_channels
        self.reduction_ratio = reduction_ratio
        self.groups = channels // group_channels
        self.padding = tuple(dl * (k - 1) // 2 for k, dl in zip(self.kernel_size, self.dilation))
        self.backend = backend
        taps = math.prod(self.kernel_size)
        factory = {"device": device, "dtype": dtype}
        self.conv1 = _ConvModule(d, channels, channels // reduction_ratio, norm_act=True, **factory)
        self.conv2 = _ConvModule(d, channels // reduction_ratio, taps * self.groups, norm_act=False, **factory)
        if any(s > 1 for s in self.stride):
            self.avgpool = _POOL[d](self.stride, self.stride, ceil_mode=True)
        else:
            self.avgpool = None

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The generated involution weight (N, G, *K, *S_out) for input x."""
        src = x if self.avgpool is None else self.avgpool(x)
        w = self.conv2(self.conv1(src))
        return w.view(w.shape[0], self.groups, *self.kernel_size, *w.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = type(self).__name__
        d = self._dims
        if not isinstance(x, torch.Tensor):
            raise TypeError("%s: input must be a torch.Tensor, got %s" % (cls, type(x).__name__))
        if x.dim() != d + 2:
            raise ValueError("%s: input must have %d dims %s, got shape %s"
                             % (cls, d + 2, F._LAYOUT[d], tuple(x.shape)))
        if x.shape[1] != self.channels:
            raise ValueError("%s: input has %d channels, the module was built for channels=%d"
                             % (cls, x.shape[1], self.channels))
        fn = F.involution2d if d == 2 else F.involution3d
        return fn(x, self.kernel(x), self.kernel_size, self.stride, self.padding, self.dilation, backend=self.backend)

    def extra_repr(self):
        s = "%d, kernel_size=%s, stride=%s" % (self.channels, self.kernel_size, self.stride)
        if any(v != 1 for v in self.dilation):
            s += ", dilation=%s" % (self.dilation,)
        s += ", group_channels=%d, reduction_ratio=%d" % (self.group_channels, self.reduction_ratio)
        if self.backend != "auto":
            s += ", backend=%r" % self.backend
        return s


class Involution2d(_InvolutionNd):
    """2D involution with the published kernel generation. Input (N, channels, H, W), output
    (N, channels, ceil(H / stride), ceil(W / stride)); G = channels / group_channels.
    device=/dtype= create the parameters and buffers there, as torch's factory keywords."""
    _dims = 2


class Involution3d(_InvolutionNd):
    """3D involution; as Involution2d with input (N, channels, D, H, W)."""
    _dims = 3
