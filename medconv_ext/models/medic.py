"""Med-IC (Islam et al. 2024, "Med-IC: Fusing a single layer involution with convolutions for
enhanced medical image classification and segmentation"): one involution layer in front of a
small CNN classifier or a U-Net.

The involution (medconv_ext.nn.Involution2d, published RedNet kernel generation) has K=3, one
group (group_channels = in_channels) and its kernel generator reduces the input to one channel
(reduction_ratio = in_channels), so it keeps C channels and adds only C + 2 + 18 parameters
(23 for RGB: reduce conv C -> 1 without bias, BatchNorm(1), span conv 1 -> 9 with bias).

Parameter counts at the defaults (trainable, as torch counts them):
  medic_cls(3, 7)   1,756,478  (+386 BatchNorm running statistics = 1,756,864 in a Keras count)
  medic_seg(3, 1)  11,716,776  (+9,026 running statistics = 11,725,802) -- the issue's description:
                   three convs with BatchNorm in every one of the six levels.
The paper reports 6,988,139 for the segmentation model. medic_seg(batch_norm=False, bottleneck_convs=1)
has 6,988,136 trainable parameters; adding the involution generator's 2 BatchNorm running statistics
and the bias its Keras 1x1 reduce conv has by default gives exactly 6,988,139, so the published
segmentation U-Net most likely had no BatchNorm in its conv blocks and a single conv at the 512 level.
"""
from typing import List, Sequence

import torch
from torch import nn

from ._util import record_builder_spec


def _involution(channels: int, kernel_size: int = 3) -> nn.Module:
    try:
        from ..nn import Involution2d
    except ImportError:
        Involution2d = None
    if Involution2d is None:
        raise ImportError("Med-IC models need medconv_ext.nn.Involution2d (the involution work), "
                          "which this installation of medconv_ext does not have")
    # one group (G = channels // group_channels = 1); the generator's reduce conv outputs
    # channels // reduction_ratio = 1 channel
    return Involution2d(channels, kernel_size, stride=1, dilation=1, group_channels=channels,
                        reduction_ratio=channels)


def _pos_int(name, v, who):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError("%s: %s must be a positive int, got %r" % (who, name, v))


class MedICClassifier(nn.Module):
    """Involution (K=3) -> [conv3x3 features -> ReLU -> max-pool 2 -> BatchNorm] -> [conv3x3 2*features
    -> ReLU -> max-pool 2 -> BatchNorm] -> dropout 0.1 -> dense 256-192-96-64 (ReLU) -> classifier.
    Convs use padding 1, so a 28x28 image reaches the dense layers as 2*features x 7 x 7."""

    def __init__(self, in_channels: int = 3, num_classes: int = 7, features: int = 64, image_size: int = 28,
                 hidden: Sequence[int] = (256, 192, 96, 64), dropout: float = 0.1):
        super().__init__()
        who = type(self).__name__
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes), ("features", features),
                        ("image_size", image_size)):
            _pos_int(name, v, who)
        if image_size % 4:
            raise ValueError("%s: image_size must be a multiple of 4 (two 2x max-pools), got %d" % (who, image_size))
        self.in_channels, self.image_size = in_channels, image_size
        self.involution = _involution(in_channels, 3)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, features, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.BatchNorm2d(features),
            nn.Conv2d(features, 2 * features, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.BatchNorm2d(2 * features),
            nn.Dropout(dropout),
        )
        layers: List[nn.Module] = [nn.Flatten()]
        n = 2 * features * (image_size // 4) ** 2
        for h in hidden:
            layers += [nn.Linear(n, h), nn.ReLU(inplace=True)]
            n = h
        layers.append(nn.Linear(n, num_classes))
        self.classifier = nn.Sequential(*layers)
        record_builder_spec(self, "medconv_ext.models:MedICClassifier", in_channels=in_channels,
                            num_classes=num_classes, features=features, image_size=image_size, hidden=list(hidden),
                            dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        want = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError("%s: expected input (N, %d, %d, %d), got %s"
                             % (type(self).__name__, *want, tuple(x.shape)))
        return self.classifier(self.features(self.involution(x)))


class MedICSegmenter(nn.Module):
    """Involution (K=3) -> six-level U-Net: widths features * 1, 2, 4, 8, 16, 32 (16..512), each block
    `convs_per_block` x (conv3x3 -> [BatchNorm] -> ReLU) then dropout 0.1, max-pool 2 between encoder
    levels; decoder: 2x2 stride-2 transposed conv (C -> C/2), cat([up, skip]), block; 1x1 output conv
    (logits). `bottleneck_convs` sets the convs of the sixth (widest) level separately."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1, features: int = 16, levels: int = 6,
                 convs_per_block: int = 3, bottleneck_convs: int = None, batch_norm: bool = True,
                 dropout: float = 0.1):
        super().__init__()
        who = type(self).__name__
        bottleneck_convs = convs_per_block if bottleneck_convs is None else bottleneck_convs
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes), ("features", features),
                        ("levels", levels), ("convs_per_block", convs_per_block),
                        ("bottleneck_convs", bottleneck_convs)):
            _pos_int(name, v, who)
        self.in_channels, self.levels = in_channels, levels
        self.involution = _involution(in_channels, 3)
        widths = [features * 2 ** i for i in range(levels)]

        def block(cin, cout, n):
            layers: List[nn.Module] = []
            for _ in range(n):
                layers.append(nn.Conv2d(cin, cout, 3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(cout))
                layers.append(nn.ReLU(inplace=True))
                cin = cout
            layers.append(nn.Dropout(dropout))
            return nn.Sequential(*layers)

        self.encoders = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.encoders.append(block(cin, w, convs_per_block))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = block(cin, widths[-1], bottleneck_convs)
        cin = widths[-1]
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.ups.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.decoders.append(block(2 * w, w, convs_per_block))
            cin = w
        self.out = nn.Conv2d(cin, num_classes, 1)
        # rebuilding (tiling checkpoints) and tile-origin alignment (exact tiled inference)
        self.tiling_align = 2 ** (levels - 1)
        record_builder_spec(self, "medconv_ext.models:MedICSegmenter", in_channels=in_channels,
                            num_classes=num_classes, features=features, levels=levels, convs_per_block=convs_per_block,
                            bottleneck_convs=bottleneck_convs, batch_norm=batch_norm, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        who = type(self).__name__
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError("%s: expected input (N, %d, H, W), got %s" % (who, self.in_channels, tuple(x.shape)))
        f = 2 ** (self.levels - 1)
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError("%s: H and W must be multiples of %d (%d max-pools), got %s"
                             % (who, f, self.levels - 1, tuple(x.shape[2:])))
        x = self.involution(x)
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.out(x)


def medic_cls(in_channels: int = 3, num_classes: int = 7, features: int = 64, image_size: int = 28) -> MedICClassifier:
    """Med-IC classifier for 28x28 images (MedMNIST): see MedICClassifier. Returns logits."""
    return record_builder_spec(MedICClassifier(in_channels, num_classes, features, image_size), "medic_cls",
                               in_channels=in_channels, num_classes=num_classes, features=features,
                               image_size=image_size)


def medic_seg(in_channels: int = 3, num_classes: int = 1, features: int = 16, *, convs_per_block: int = 3,
              bottleneck_convs: int = None, batch_norm: bool = True) -> MedICSegmenter:
    """Med-IC segmentation model: see MedICSegmenter. Returns logit maps. H, W multiples of 32.
    medic_seg(batch_norm=False, bottleneck_convs=1) is the variant whose count matches the paper's
    (see the module docstring)."""
    net = MedICSegmenter(in_channels, num_classes, features, convs_per_block=convs_per_block,
                         bottleneck_convs=bottleneck_convs, batch_norm=batch_norm)
    return record_builder_spec(net, "medic_seg", in_channels=in_channels, num_classes=num_classes, features=features,
                               convs_per_block=convs_per_block, bottleneck_convs=bottleneck_convs,
                               batch_norm=batch_norm)
