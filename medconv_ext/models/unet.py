"""U-Net family of the rolling-filters paper: the 2D segmentation UNet and the 3D QSMnet,
each as dense, rolling, depthwise-separable and flattened variants.

All variants share one module layout (`UNet`), so their parameter counts differ only by the
convolution that fills each slot:

    encoders[0..depth-1]  blocks of (conv -> BatchNorm -> ReLU) units, max-pool 2 after each
    middle                block at the widest level
    ups[j]                transposed conv, kernel 2, stride 2, C -> C/2 (no BatchNorm, no ReLU)
    decoders[j]           block on cat([up, skip]) (up first, as published)
    out                   dense 1x1 conv to the classes / output maps (logits, never argmax); on a
                          channels-last input it runs as one GEMM over the channel axis (PointwiseConv)

Widths are features * 2**level (level 0..depth); "same" padding (k // 2).
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import RollingConv2d, RollingConv3d, RollingConvTranspose2d, RollingConvTranspose3d
from ..nn.fuse import can_fold, conv_cat, rolling_conv_bn_relu
from ._util import record_builder_spec

KINDS = ("dense", "rolling", "depthwise", "flattened")

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_RCONV = {2: RollingConv2d, 3: RollingConv3d}
_RCONV_T = {2: RollingConvTranspose2d, 3: RollingConvTranspose3d}


class SeparableConv(nn.Sequential):
    """Depthwise-separable conv: depthwise k^d conv (groups = C_in) then pointwise 1x1 C_in -> C_out.
    No biases: a BatchNorm follows and its shift makes them redundant."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size: int):
        conv = _CONV[dims]
        super().__init__()
        self.depthwise = conv(in_channels, in_channels, kernel_size, padding=kernel_size // 2,
                              groups=in_channels, bias=False)
        self.pointwise = conv(in_channels, out_channels, 1, bias=False)


class FlattenedConv(nn.Sequential):
    """Flattened conv (Jin et al. 2014, "Flattened convolutional neural networks for feedforward
    acceleration"): a 1x1 "lateral" conv C_in -> C_out across channels, then one 1-D depthwise conv
    per spatial axis (k x 1 and 1 x k in 2D; k x 1 x 1, 1 x k x 1, 1 x 1 x k in 3D). No biases
    (a BatchNorm follows)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size: int):
        conv = _CONV[dims]
        super().__init__()
        self.lateral = conv(in_channels, out_channels, 1, bias=False)
        for axis in range(dims):
            k = [1] * dims
            p = [0] * dims
            k[axis] = kernel_size
            p[axis] = kernel_size // 2
            self.add_module("axis%d" % axis, conv(out_channels, out_channels, tuple(k), padding=tuple(p),
                                                  groups=out_channels, bias=False))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels-last where t is laid out so (and not also NC(D)HW-contiguous), else contiguous."""
    cl = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return cl if t.is_contiguous(memory_format=cl) and not t.is_contiguous() else torch.contiguous_format


class _PointwiseMixin:
    """A 1x1 conv (nn.Conv2d/nn.Conv3d, kernel 1, stride 1, no padding, groups 1) that, given a
    channels-last input, runs as F.linear over the contiguous channel axis: one GEMM, output in
    channels-last memory, no layout copy. torch's conv3d takes its slow path for 1x1x1 kernels,
    which copies a channels-last input (and its gradient) to NCDHW: 5.2 ms against 1.0 ms for
    forward + backward of 16 -> 1 channels at batch 2 of 32^3 (1 thread). Same module, parameters
    and state dict as the torch conv; other inputs (NC(D)HW, ambiguous strides) run the conv."""

    def forward(self, x):
        if x.dim() == self.weight.dim() and _memory_format(x) != torch.contiguous_format:
            return F.linear(x.movedim(1, -1), self.weight.flatten(1), self.bias).movedim(-1, 1)
        return super().forward(x)


class PointwiseConv2d(_PointwiseMixin, nn.Conv2d):
    """nn.Conv2d(in_channels, out_channels, 1) that keeps a channels-last input's layout (see _PointwiseMixin)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)


class PointwiseConv3d(_PointwiseMixin, nn.Conv3d):
    """nn.Conv3d(in_channels, out_channels, 1) that keeps a channels-last input's layout (see _PointwiseMixin)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)


_POINTWISE = {2: PointwiseConv2d, 3: PointwiseConv3d}


def _make_conv(kind: str, dims: int, cin: int, cout: int, k: int) -> nn.Module:
    if kind == "dense":
        return _CONV[dims](cin, cout, k, padding=k // 2)
    if kind == "rolling":
        return _RCONV[dims](cin, cout, k, padding=k // 2)
    if kind == "depthwise":
        return SeparableConv(dims, cin, cout, k)
    if kind == "flattened":
        return FlattenedConv(dims, cin, cout, k)
    raise ValueError("unknown conv kind %r; choose one of %s" % (kind, ", ".join(KINDS)))


class ConvUnit(nn.Sequential):
    """conv -> BatchNorm -> ReLU (the published order)."""

    def __init__(self, kind: str, dims: int, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = _make_conv(kind, dims, cin, cout, k)
        self.bn = _BN[dims](cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        # eval mode: a rolling conv folds BatchNorm + ReLU into its epilogue (exact; see nn/fuse.py)
        if not self.training and can_fold(self.conv, self.bn):
            return rolling_conv_bn_relu(self.conv, self.bn, True, x)
        return super().forward(x)

    def forward_cat(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """self(torch.cat([a, b], 1)): a rolling conv reads a and b in place (no concatenated copy where its
        fused CPU kernel runs the layer, forward and backward), with BatchNorm + ReLU folded in eval mode."""
        if not self.training and can_fold(self.conv, self.bn):
            return rolling_conv_bn_relu(self.conv, self.bn, True, a, b)
        return self.act(self.bn(conv_cat(self.conv, a, b)))


def _block(kinds: Sequence[str], dims: int, cin: int, cout: int, k: int) -> nn.Sequential:
    units = []
    for kind in kinds:
        units.append(ConvUnit(kind, dims, cin, cout, k))
        cin = cout
    return nn.Sequential(*units)


def _check_pos_int(name, v, who):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError("%s: %s must be a positive int, got %r" % (who, name, v))


class UNet(nn.Module):
    """Configurable 2D/3D U-Net (see the module docstring for the layout).

    kind: "dense", "rolling", "depthwise" or "flattened" (the convs of every block).
    first_kind: kind of the very first conv (the input layer); None means the same as `kind`.
    first_level_convs: convs in the first encoder block (published Rolling UNet: 3; others 2).
    """

    def __init__(self, dims: int = 2, in_channels: int = 1, out_channels: int = 3, features: int = 64,
                 kernel_size: int = 3, kind: str = "dense", first_kind: Optional[str] = None,
                 first_level_convs: int = 2, depth: int = 4, up_kind: Optional[str] = None):
        super().__init__()
        who = type(self).__name__
        if dims not in (2, 3):
            raise ValueError("%s: dims must be 2 or 3, got %r" % (who, dims))
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("features", features),
                        ("kernel_size", kernel_size), ("first_level_convs", first_level_convs), ("depth", depth)):
            _check_pos_int(name, v, who)
        if kind not in KINDS:
            raise ValueError("%s: unknown kind %r; choose one of %s" % (who, kind, ", ".join(KINDS)))
        first_kind = kind if first_kind is None else first_kind
        if up_kind is None:
            up_kind = "rolling" if kind == "rolling" else "dense"
        self.dims, self.depth, self.kind = dims, depth, kind
        self.in_channels, self.out_channels = in_channels, out_channels
        widths = [features * 2 ** i for i in range(depth + 1)]
        self.widths = widths
        k = kernel_size

        self.encoders = nn.ModuleList()
        cin = in_channels
        for i, w in enumerate(widths[:-1]):
            n = first_level_convs if i == 0 else 2
            kinds = [first_kind] + [kind] * (n - 1) if i == 0 else [kind] * n
            self.encoders.append(_block(kinds, dims, cin, w, k))
            cin = w
        self.pool = _POOL[dims](2)
        self.middle = _block([kind, kind], dims, cin, widths[-1], k)
        cin = widths[-1]
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        up_cls = _RCONV_T[dims] if up_kind == "rolling" else _CONV_T[dims]
        for w in reversed(widths[:-1]):
            self.ups.append(up_cls(cin, w, 2, stride=2))
            self.decoders.append(_block([kind, kind], dims, 2 * w, w, k))
            cin = w
        self.out = _POINTWISE[dims](cin, out_channels)
        # rebuilding (tiling checkpoints) and tile-origin alignment (exact tiled inference)
        self.tiling_align = 2 ** depth
        record_builder_spec(self, "medconv_ext.models:UNet", dims=dims, in_channels=in_channels,
                            out_channels=out_channels, features=features, kernel_size=kernel_size, kind=kind,
                            first_kind=first_kind, first_level_convs=first_level_convs, depth=depth, up_kind=up_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        who = type(self).__name__
        layout = "(N, C, H, W)" if self.dims == 2 else "(N, C, D, H, W)"
        if not isinstance(x, torch.Tensor) or x.dim() != self.dims + 2:
            raise ValueError("%s: expected a %dD input %s, got %s" % (
                who, self.dims + 2, layout, tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__))
        if x.shape[1] != self.in_channels:
            raise ValueError("%s: expected %d input channels, got input of shape %s"
                             % (who, self.in_channels, tuple(x.shape)))
        f = 2 ** self.depth
        if any(s % f for s in x.shape[2:]):
            raise ValueError("%s: every spatial size must be a multiple of 2**depth = %d (it is max-pooled %d "
                             "times and the skips are concatenated), got spatial size %s; pad the input"
                             % (who, f, self.depth, tuple(x.shape[2:])))
        skips: List[torch.Tensor] = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.middle(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            # dec(torch.cat([up(x), skip], 1)), the first unit reading the pair in place where it can
            units = list(dec)
            x = units[0].forward_cat(up(x), skip)
            for unit in units[1:]:
                x = unit(x)
        # The output in the layout of the first layer's output (torch's conv picks it from the input and
        # its weights; a one-channel input alone does not tell): a deeper layer may hand the next one
        # channels-last memory (the C_in > 256 composition does for NC(D)HW input), which the output
        # conv keeps; converting the few output maps back is cheap.
        return self.out(x).contiguous(memory_format=_memory_format(skips[0]))


# ------------------------------------------------------------------ 2D segmentation UNet
def unet(in_channels: int = 1, num_classes: int = 3, features: int = 64) -> UNet:
    """Dense 2D UNet (3x3 convs with bias, BatchNorm, ReLU; widths 64..1024; dense 2x2 transposed
    convs; 1x1 output). 31,042,499 parameters at the defaults."""
    return record_builder_spec(UNet(2, in_channels, num_classes, features, 3, kind="dense"),
                               "unet", in_channels=in_channels, num_classes=num_classes, features=features)


def rolling_unet(in_channels: int = 1, num_classes: int = 3, features: int = 64) -> UNet:
    """The published Rolling UNet (segment.pth): 88,899 parameters at the defaults.

    Level 1: a dense 3x3 conv then two single rolls; levels 2-4 and the middle: a double roll
    (C -> 2C) then a single roll; decoder levels: a rolling 2x2 transposed conv (C -> C/2), then a
    half roll (2C -> C on cat([up, skip])) and a single roll; dense 1x1 output. Every rolling layer
    has a full per-output-channel bias; every conv is followed by BatchNorm and ReLU."""
    net = UNet(2, in_channels, num_classes, features, 3, kind="rolling", first_kind="dense", first_level_convs=3)
    return record_builder_spec(net, "rolling_unet", in_channels=in_channels, num_classes=num_classes, features=features)


def depthwise_unet(in_channels: int = 1, num_classes: int = 3, features: int = 64) -> UNet:
    """UNet with every 3x3 conv (the input conv included) replaced by a depthwise-separable conv:
    depthwise 3x3 (groups = C_in) then pointwise 1x1, both without bias (BatchNorm follows).
    The 2x2 transposed convs and the 1x1 output stay dense. 5,988,236 parameters at the defaults
    (paper: about 6.01M; -0.4%)."""
    return record_builder_spec(UNet(2, in_channels, num_classes, features, 3, kind="depthwise"),
                               "depthwise_unet", in_channels=in_channels, num_classes=num_classes, features=features)


def flattened_unet(in_channels: int = 1, num_classes: int = 3, features: int = 64) -> UNet:
    """UNet with every 3x3 conv (the input conv included) replaced by a flattened conv (Jin et al.):
    a 1x1 conv C_in -> C_out, then depthwise 3x1 and 1x3 convs, all without bias (BatchNorm
    follows). Transposed convs and the output stay dense. 5,971,139 parameters at the defaults
    (paper: about 6.01M; -0.6%)."""
    return record_builder_spec(UNet(2, in_channels, num_classes, features, 3, kind="flattened"),
                               "flattened_unet", in_channels=in_channels, num_classes=num_classes, features=features)


# ------------------------------------------------------------------ 3D QSMnet (5x5x5)
def qsmnet(in_channels: int = 1, out_channels: int = 1, features: int = 32) -> UNet:
    """Dense 3D QSMnet: 5x5x5 convs with bias, BatchNorm, ReLU, widths 32..512, dense 2x2x2 transposed
    convs, 1x1x1 output. 99,453,985 parameters at the defaults."""
    return record_builder_spec(UNet(3, in_channels, out_channels, features, 5, kind="dense"),
                               "qsmnet", in_channels=in_channels, out_channels=out_channels, features=features)


def rolling_qsmnet(in_channels: int = 1, out_channels: int = 1, features: int = 32) -> UNet:
    """The published Rolling QSMnet (recon.pth), 5x5x5: 445,025 parameters at the defaults.

    As rolling_unet but in 3D with two convs in level 1 (dense, then a single roll)."""
    net = UNet(3, in_channels, out_channels, features, 5, kind="rolling", first_kind="dense", first_level_convs=2)
    return record_builder_spec(net, "rolling_qsmnet", in_channels=in_channels, out_channels=out_channels,
                               features=features)


def depthwise_qsmnet(in_channels: int = 1, out_channels: int = 1, features: int = 32) -> UNet:
    """QSMnet with every 5x5x5 conv (the input conv included) replaced by depthwise 5x5x5 (groups =
    C_in) + pointwise 1x1x1, without bias (BatchNorm follows); transposed convs and the output stay
    dense. 2,547,582 parameters at the defaults (paper: about 2.5M; +1.9%). Keeping the input conv
    dense would give 2,551,457 (+2.06%), keeping the biases as well 2,554,369 (+2.17%)."""
    return record_builder_spec(UNet(3, in_channels, out_channels, features, 5, kind="depthwise"), "depthwise_qsmnet",
                               in_channels=in_channels, out_channels=out_channels, features=features)


def flattened_qsmnet(in_channels: int = 1, out_channels: int = 1, features: int = 32) -> UNet:
    """QSMnet with every 5x5x5 conv (the input conv included) replaced by a flattened conv (Jin et al.):
    1x1x1 conv C_in -> C_out, then depthwise 5x1x1, 1x5x1 and 1x1x5 convs, without bias (BatchNorm
    follows); transposed convs and the output stay dense. 2,227,617 parameters at the defaults
    (paper: about 2.2M; +1.3%)."""
    return record_builder_spec(UNet(3, in_channels, out_channels, features, 5, kind="flattened"), "flattened_qsmnet",
                               in_channels=in_channels, out_channels=out_channels, features=features)
