"""Shared helpers of the involution tests: an independent literal reference (a loop over
taps on the padded input, no unfold), random cases, and a copy of the published RedNet
involution module (mmcv-free, same parameter names) for state-dict round trips."""
import itertools

import torch
import torch.nn.functional as F
from torch import nn


def out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def involution_loop(x, weight, kernel_size, stride, padding, dilation):
    """out[n, c, p] = sum_t weight[n, c // (C // G), t, p] * x[n, c, p*s + t*d - pad], literally."""
    dims = x.dim() - 2
    n, c = x.shape[:2]
    g = weight.shape[1]
    outs = list(weight.shape[2 + dims:])
    pad = []
    for p in reversed(padding):
        pad += [p, p]
    xp = F.pad(x, pad)
    w = weight.repeat_interleave(c // g, dim=1)  # (N, C, *K, *S_out)
    out = x.new_zeros((n, c, *outs))
    for t in itertools.product(*[range(k) for k in kernel_size]):
        sl = tuple(slice(ti * d, ti * d + (o - 1) * s + 1, s) for ti, d, o, s in zip(t, dilation, outs, stride))
        out = out + w[(slice(None), slice(None)) + t] * xp[(slice(None), slice(None)) + sl]
    return out


def make_case(n, c, spatial, k, s, p, d, g, dtype=torch.float64, requires_grad=False):
    """Random x (N, C, *spatial) and weight (N, G, *K, *S_out); k, s, p, d ints or tuples."""
    dims = len(spatial)
    tup = lambda v: list(v) if isinstance(v, (tuple, list)) else [v] * dims  # noqa: E731
    k, s, p, d = tup(k), tup(s), tup(p), tup(d)
    outs = [out_size(*a) for a in zip(spatial, k, s, p, d)]
    x = torch.randn(n, c, *spatial, dtype=dtype, requires_grad=requires_grad)
    w = torch.randn(n, g, *k, *outs, dtype=dtype, requires_grad=requires_grad)
    return x, w, k, s, p, d


def poison_heap(nbytes, count=4):
    """Best effort: fill and free a few NaN blocks of the size the kernel is about to allocate,
    so an output element the kernel forgets to write likely reads NaN instead of a lucky 0."""
    blocks = [torch.full((max(1, nbytes // 8),), float("nan"), dtype=torch.float64) for _ in range(count)]
    del blocks


# ---------------------------------------------------------------- published RedNet involution
class _PubConvModule(nn.Module):
    def __init__(self, c_in, c_out, norm_act):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=not norm_act)
        self.norm_act = norm_act
        if norm_act:
            self.bn = nn.BatchNorm2d(c_out)
            self.activate = nn.ReLU()

    def forward(self, x):
        x = self.conv(x)
        return self.activate(self.bn(x)) if self.norm_act else x


class PublishedInvolution(nn.Module):
    """The published RedNet `involution` (mmcls rednet.py), ConvModule inlined."""

    def __init__(self, channels, kernel_size, stride):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.channels = channels
        reduction_ratio = 4
        self.group_channels = 16
        self.groups = self.channels // self.group_channels
        self.conv1 = _PubConvModule(channels, channels // reduction_ratio, True)
        self.conv2 = _PubConvModule(channels // reduction_ratio, kernel_size ** 2 * self.groups, False)
        if stride > 1:
            self.avgpool = nn.AvgPool2d(stride, stride)
        self.unfold = nn.Unfold(kernel_size, 1, (kernel_size - 1) // 2, stride)

    def forward(self, x):
        weight = self.conv2(self.conv1(x if self.stride == 1 else self.avgpool(x)))
        b, c, h, w = weight.shape
        weight = weight.view(b, self.groups, self.kernel_size ** 2, h, w).unsqueeze(2)
        out = self.unfold(x).view(b, self.groups, self.group_channels, self.kernel_size ** 2, h, w)
        out = (weight * out).sum(dim=3).view(b, self.channels, h, w)
        return out
