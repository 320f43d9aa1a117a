"""Rolling convolution modules with torch's nn.Conv signatures.

The constructors take torch's arguments in torch's order, so a call written for nn.Conv2d/3d or
nn.ConvTranspose2d/3d works unchanged (positional or by keyword):

    RollingConv2d/3d(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                     bias=True, padding_mode='zeros', device=None, dtype=None, *, backend='auto')
    RollingConvTranspose2d/3d(in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                              groups=1, bias=True, dilation=1, padding_mode='zeros', device=None, dtype=None,
                              *, backend='auto')

groups=1 only (a rolled bank mixes every input channel into every output channel); `backend` is
keyword-only. n_base and n_rolls follow from in_channels and out_channels (rolling_layout).

Drop-in options as nn.Conv2d/3d and nn.ConvTranspose2d/3d: the `device=`/`dtype=` factory keywords,
padding='same'/'valid' (convolutions; 'same' only with stride 1, the extra voxel of an odd total
padding on the right, as torch), padding_mode 'zeros'/'reflect'/'replicate'/'circular' (convolutions;
as torch: F.pad with that mode, then a convolution without padding; transposed layers accept 'zeros'
only, as torch), unbatched input (C, H, W) / (C, D, H, W), and `output_size=` of the transposed forward.
"""
import math
from typing import List, Optional

import torch
import torch.nn.functional as TF
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


_PADDING_STRINGS = ("same", "valid")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class _RollingConvNd(nn.Module):
    _dims = 2
    _transposed = False

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                 output_padding, padding_mode, device, dtype, backend):
        super().__init__()
        cls = type(self).__name__
        d = self._dims
        if isinstance(groups, bool) or not isinstance(groups, int) or groups != 1:
            raise ValueError("%s: groups=%r is not supported: rolling convolution supports groups=1 only (every "
                             "rolled filter spans all input channels); for grouped or depthwise convolutions use "
                             "torch.nn.%s" % (cls, groups, ("ConvTranspose%dd" if self._transposed else "Conv%dd") % d))
        if isinstance(bias, str):
            raise TypeError("%s: bias must be a bool, got %r (the backend is keyword-only: backend=%r)"
                            % (cls, bias, bias))
        if not isinstance(backend, str):
            raise TypeError("%s: backend must be a string, got %r" % (cls, backend))
        self.groups = 1
        self.transposed = self._transposed
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(ntuple(kernel_size, d, "kernel_size", cls))
        self.stride = tuple(ntuple(stride, d, "stride", cls))
        self.dilation = tuple(ntuple(dilation, d, "dilation", cls))
        self.output_padding = tuple(ntuple(output_padding, d, "output_padding", cls))
        if padding_mode not in _PADDING_MODES:
            raise ValueError("%s: padding_mode must be one of %s, but got padding_mode=%r"
                             % (cls, ", ".join(map(repr, _PADDING_MODES)), padding_mode))
        if self._transposed and padding_mode != "zeros":
            raise ValueError('%s: only "zeros" padding mode is supported (as in torch.nn.ConvTranspose%dd), got %r'
                             % (cls, d, padding_mode))
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if self._transposed:
                raise ValueError("%s: padding must be an int or a tuple of ints; the strings 'same' and 'valid' "
                                 "are for convolutions, got %r" % (cls, padding))
            if padding not in _PADDING_STRINGS:
                raise ValueError("%s: invalid padding string %r, should be one of %s"
                                 % (cls, padding, _PADDING_STRINGS))
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("%s: padding='same' is not supported for strided convolutions, got stride=%s"
                                 % (cls, self.stride))
            self.padding = padding
            # per axis (left, right): 'same' puts the extra voxel of an odd total on the right, as torch
            sides = []
            for k, dl in zip(self.kernel_size, self.dilation):
                total = dl * (k - 1) if padding == "same" else 0
                sides.append((total // 2, total - total // 2))
        else:
            self.padding = tuple(ntuple(padding, d, "padding", cls))
            sides = [(p, p) for p in self.padding]
        self._pad_sides = tuple(sides)
        # the symmetric zero padding handed to the op as is (None: F.pad first); tuple: hashable for the op's memo
        self._sym_padding = (tuple(lft for lft, _ in sides) if all(lft == rgt for lft, rgt in sides) else None)
        # the F.pad argument (last axis first), as torch's nn.Conv
        self._reversed_padding_repeated_twice = [v for lr in reversed(sides) for v in lr]
        self.n_base, self.n_rolls = rolling_layout(in_channels, out_channels, cls)
        self.backend = backend
        if self._transposed:
            shape = (in_channels, self.n_base, *self.kernel_size)
        else:
            shape = (self.n_base, in_channels, *self.kernel_size)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None  # truthy, as torch
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

    # ---- input handling shared by the forwards (torch.nn.Conv semantics) ----
    def _batched(self, x):
        """(x with a batch axis, whether one was added): (C, *S) input is unbatched, as in torch."""
        if isinstance(x, torch.Tensor) and x.dim() == self._dims + 1:
            return x.unsqueeze(0), True
        return x, False

    def _conv_input(self, x):
        """(input, padding) for the padding-free or symmetric rolling op: torch's rule, F.pad with
        padding_mode (and for an asymmetric 'same') then no padding, else the symmetric padding."""
        sym = self.__dict__.get("_sym_padding")
        if sym is not None and self.padding_mode == "zeros":  # the common case, per call: no F.pad
            return x, sym
        sides = self._pad_sides
        if self.padding_mode != "zeros":
            return TF.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), [0] * self._dims
        if any(lft != rgt for lft, rgt in sides):
            return TF.pad(x, self._reversed_padding_repeated_twice), [0] * self._dims
        return x, tuple(lft for lft, _ in sides)

    def __setstate__(self, state):
        # modules pickled before padding_mode / 'same' existed: zeros, symmetric numeric padding
        super().__setstate__(state)
        if "padding_mode" not in self.__dict__:
            self.padding_mode = "zeros"
        if "groups" not in self.__dict__:
            self.groups = 1
            self.transposed = self._transposed
        if "_pad_sides" not in self.__dict__:
            self._pad_sides = tuple((p, p) for p in self.padding)
            self._reversed_padding_repeated_twice = [p for p in reversed(self.padding) for _ in range(2)]

    def _transpose_output_padding(self, x, output_size, unbatched) -> List[int]:
        """output_padding giving the requested output_size (as torch.nn.ConvTranspose); x is batched."""
        d = self._dims
        cls = type(self).__name__
        output_size = [int(v) for v in output_size]
        non_spatial = 1 if unbatched else 2
        if len(output_size) == d + non_spatial:
            output_size = output_size[non_spatial:]
        if len(output_size) != d:
            raise ValueError("%s: for %dD input, output_size must have %d or %d elements, got %s"
                             % (cls, x.dim() - (1 if unbatched else 0), d, d + non_spatial, output_size))
        res = []
        for i in range(d):
            lo = ((x.shape[2 + i] - 1) * self.stride[i] - 2 * self.padding[i]
                  + self.dilation[i] * (self.kernel_size[i] - 1) + 1)
            hi = lo + self.stride[i] - 1
            if not lo <= output_size[i] <= hi:
                raise ValueError("%s: requested an output size of %s, but valid sizes range from %s to %s along "
                                 "spatial dim %d (for an input of %s)"
                                 % (cls, output_size, lo, hi, i, tuple(x.shape[2:])))
            res.append(output_size[i] - lo)
        return res

    def extra_repr(self):
        s = "%d, %d, kernel_size=%s, stride=%s" % (self.in_channels, self.out_channels, self.kernel_size, self.stride)
        if isinstance(self.padding, str):
            s += ", padding=%s" % self.padding
        elif any(self.padding):
            s += ", padding=%s" % (self.padding,)
        if self.padding_mode != "zeros":
            s += ", padding_mode=%s" % self.padding_mode
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
    """Conv2d whose out_channels filters are rolls of n_base = ceil(out / in) base filters.
    Input (N, C_in, H, W) or unbatched (C_in, H, W)."""
    _dims = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", device=None, dtype=None, *, backend="auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         output_padding=0, padding_mode=padding_mode, device=device, dtype=dtype, backend=backend)

    def _op(self):
        return F.rolling_conv2d

    def forward(self, x):
        x, unbatched = self._batched(x)
        x, padding = self._conv_input(x)
        out = self._op()(x, self.weight, self.bias, self.stride, padding, self.dilation, self.n_rolls,
                         backend=self.backend)
        return out.squeeze(0) if unbatched else out


class RollingConv3d(RollingConv2d):
    """Conv3d whose out_channels filters are rolls of n_base = ceil(out / in) base filters.
    Input (N, C_in, D, H, W) or unbatched (C_in, D, H, W)."""
    _dims = 3

    def _op(self):
        return F.rolling_conv3d


class RollingConvTranspose2d(_RollingConvNd):
    """ConvTranspose2d with a rolled bank: base (in, n_base, *k), W_t[c, r*n_base+b] = base[(c-r) mod in, b].
    Input (N, C_in, H, W) or unbatched (C_in, H, W); forward(x, output_size=None) as torch."""
    _dims = 2
    _transposed = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None, *, backend="auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         output_padding=output_padding, padding_mode=padding_mode, device=device, dtype=dtype,
                         backend=backend)

    def _op(self):
        return F.rolling_conv_transpose2d

    def forward(self, x, output_size: Optional[List[int]] = None):
        x, unbatched = self._batched(x)
        output_padding = self.output_padding
        if output_size is not None:
            output_padding = self._transpose_output_padding(x, output_size, unbatched)
        out = self._op()(x, self.weight, self.bias, self.stride, self.padding, output_padding, self.n_rolls,
                         backend=self.backend, dilation=self.dilation)
        return out.squeeze(0) if unbatched else out


class RollingConvTranspose3d(RollingConvTranspose2d):
    """ConvTranspose3d with a rolled bank (see RollingConvTranspose2d). Input (N, C_in, D, H, W) or
    unbatched (C_in, D, H, W)."""
    _dims = 3

    def _op(self):
        return F.rolling_conv_transpose3d
