"""The crop-equivariant super-resolution network (valid convolutions only) and its padded twin.

`valid_srnet` is 16 unpadded ("valid") 3x3 (3x3x3) convolutions: a head, `blocks` residual blocks
of two convolutions (conv, ReLU, conv) whose skip branch is cropped by 2 per side before the sum,
and a tail back to `in_channels`. The input, cropped by the total margin, is added to the tail's
output (global residual). Without padding or resampling every output voxel sees only real input,
so tiled inference with a pre-padded input equals full-image inference (medconv_ext.tiling).
The margin is (2 * blocks + 2) per side: 16 for the default 7 blocks.
"""
from typing import Dict, Tuple

import torch
from torch import nn

__all__ = ["SRNet", "valid_srnet"]


def _crop(x: torch.Tensor, c: int) -> torch.Tensor:
    if c == 0:
        return x
    idx = (slice(None), slice(None)) + (slice(c, -c),) * (x.dim() - 2)
    return x[idx]


class _ResBlock(nn.Module):
    def __init__(self, features: int, conv, padding: int):
        super().__init__()
        self.conv1 = conv(features, features, 3, padding=padding)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = conv(features, features, 3, padding=padding)
        self.crop = 0 if padding else 2  # two valid 3x3 convs shrink by 2 per side

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x))) + _crop(x, self.crop)


class SRNet(nn.Module):
    """Residual super-resolution CNN. padding=0: the valid (crop-equivariant) network, output
    smaller than the input by `margin` per side; padding=1: the same layers zero-padded
    ("same" size output), a padded network for halo tiling and for comparisons."""

    def __init__(self, in_channels: int = 1, features: int = 64, blocks: int = 7, dims: int = 2,
                 padding: int = 0):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("features", features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError("SRNet: %s must be a positive int, got %r" % (name, v))
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise ValueError("SRNet: blocks must be an int >= 0, got %r" % (blocks,))
        if dims not in (2, 3) or isinstance(dims, bool):
            raise ValueError("SRNet: dims must be 2 or 3, got %r" % (dims,))
        if padding not in (0, 1) or isinstance(padding, bool):
            raise ValueError("SRNet: padding must be 0 (valid) or 1 (same), got %r" % (padding,))
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.dims = dims
        self.padding = padding
        self.head = conv(in_channels, features, 3, padding=padding)
        self.head_act = nn.ReLU(inplace=True)
        self.body = nn.Sequential(*[_ResBlock(features, conv, padding) for _ in range(blocks)])
        self.tail = conv(features, in_channels, 3, padding=padding)
        self.margin = 0 if padding else 2 * blocks + 2
        # Read by medconv_ext.tiling.save_tiling_checkpoint to rebuild the model from a state dict.
        self.builder_spec: Tuple[str, Dict] = (
            "valid_srnet" if padding == 0 else "srnet",
            dict(in_channels=in_channels, features=features, blocks=blocks, dims=dims)
            | ({} if padding == 0 else {"padding": padding}))

    def forward(self, x):
        if x.dim() != self.dims + 2:
            raise ValueError("SRNet (dims=%d): input must have %d dims (N, C, %s), got shape %s"
                             % (self.dims, self.dims + 2, ", ".join("DHW"[3 - self.dims:]), tuple(x.shape)))
        small = [n for n in x.shape[2:] if n <= 2 * self.margin]
        if small:
            raise ValueError("SRNet: the valid network needs every spatial size > 2*margin = %d, got %s"
                             % (2 * self.margin, tuple(x.shape[2:])))
        y = self.tail(self.body(self.head_act(self.head(x))))
        return y + _crop(x, self.margin)


def valid_srnet(in_channels: int = 1, features: int = 64, blocks: int = 7, dims: int = 2) -> SRNet:
    """The crop-equivariant super-resolution network: 2*blocks + 2 valid 3x3 (dims=2) or 3x3x3
    (dims=3) convolutions, margin 2*blocks + 2 per side (16 for the default 7 blocks)."""
    return SRNet(in_channels, features, blocks, dims, padding=0)
