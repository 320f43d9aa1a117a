"""Rolling convolution modules with nn.Conv-like signatures."""
import math

import torch
from torch import nn

from ..ops import rolling_conv as F
from ..reference.rolling_conv import expand_rolling_weight, expand_rolling_weight_transpose
from ..ops._common import ntuple


def rolling_layout(in_channels: int, out_channels: int, cls: str = "RollingConv"):
    """(n_base, n_rolls) for a layer: n_base = ceil(out / in), n_rolls = out / n_base.
    Raises a ValueError listing valid out_channels when `out_channels` has no such layout."""
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError("%s: %s must be a positive int, got %r" % (cls, name, v))
    n_base = -(-out_channels // in_channels)
    if out_channels % n_base == 0:
        return n_base, out_channels // n_base
    valid = [o for o in range(1, 4 * in_channels + 1) if o % (-(-o // in_channels)) == 0]
    below = [o for o in valid if o < out_channels][-3:]
    above = [o for o in valid if o > out_channels][:3]
    raise ValueError(
        "%s: out_channels=%d has no rolling layout for in_channels=%d: out_channels must be n_base * n_rolls "
        "with n_base = ceil(out_channels / in_channels) and 1 <= n_rolls <= in_channels, i.e. any value up to %d, "
        "or a multiple of n_base above that (nearest valid: %s)"
        % (cls, out_channels, in_channels, in_channels, ", ".join(str(o) for o in below + above)))


class _RollingConvNd(nn.Module):
    _dims = 2
    _transposed = False

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 output_padding=0, backend="auto"):
        super().__init__()
        cls = type(self).__name__
        d = self._dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(ntuple(kernel_size, d, "kernel_size", cls))
        self.stride = tuple(ntuple(stride, d, "stride", cls))
        self.padding = tuple(ntuple(padding, d, "padding", cls))
        self.dilation = tuple(ntuple(dilation, d, "dilation", cls))
        self.output_padding = tuple(ntuple(output_padding, d, "output_padding", cls))
        self.n_base, self.n_rolls = rolling_layout(in_channels, out_channels, cls)
        self.backend = backend
        if self._transposed:
            shape = (in_channels, self.n_base, *self.kernel_size)
        else:
            shape = (self.n_base, in_channels, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # As published: Kaiming-normal (fan-in) on the base, bias uniform in +-1/sqrt(fan_in).
        nn.init.kaiming_normal_(self.weight)
        if self.bias is not None:
            fan_in = self.weight.shape[1] * math.prod(self.kernel_size)
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def expanded_weight(self) -> torch.Tensor:
        """The equivalent dense weight: (out, in, *k) for a conv, (in, out, *k) for a transposed conv."""
        if self._transposed:
            return expand_rolling_weight_transpose(self.weight, self.n_rolls)
        return expand_rolling_weight(self.weight, self.n_rolls)

    def extra_repr(self):
        s = "%d, %d, kernel_size=%s, stride=%s" % (self.in_channels, self.out_channels, self.kernel_size, self.stride)
        if any(self.padding):
            s += ", padding=%s" % (self.padding,)
        if any(d != 1 for d in self.dilation):
            s += ", dilation=%s" % (self.dilation,)
        if self._transposed and any(self.output_padding):
            s += ", output_padding=%s" % (self.output_padding,)
        if self.bias is None:
            s += ", bias=False"
        s += ", n_base=%d, n_rolls=%d" % (self.n_base, self.n_rolls)
        if self.backend != "auto":
            s += ", backend=%r" % self.backend
        return s


class RollingConv2d(_RollingConvNd):
    """Conv2d whose out_channels filters are rolls of n_base = ceil(out / in) base filters."""
    _dims = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 backend="auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, backend=backend)

    def forward(self, x):
        return F.rolling_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                self.n_rolls, backend=self.backend)


class RollingConv3d(RollingConv2d):
    """Conv3d whose out_channels filters are rolls of n_base = ceil(out / in) base filters."""
    _dims = 3

    def forward(self, x):
        return F.rolling_conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                self.n_rolls, backend=self.backend)


class RollingConvTranspose2d(_RollingConvNd):
    """ConvTranspose2d with a rolled bank: base (in, n_base, *k), W_t[c, r*n_base+b] = base[(c-r) mod in, b]."""
    _dims = 2
    _transposed = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, dilation=1,
                 bias=True, backend="auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
                         output_padding=output_padding, backend=backend)

    def forward(self, x):
        return F.rolling_conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                          self.n_rolls, backend=self.backend, dilation=self.dilation)


class RollingConvTranspose3d(RollingConvTranspose2d):
    """ConvTranspose3d with a rolled bank (see RollingConvTranspose2d)."""
    _dims = 3

    def forward(self, x):
        return F.rolling_conv_transpose3d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                          self.n_rolls, backend=self.backend, dilation=self.dilation)
