"""3D segmentation U-Nets for `python -m medconv_ext.train seg --data` (3x3x3 convs, BatchNorm,
ReLU, depth 3 by default so that patches and volumes need multiples of 8): the rolling one (the
default), its dense counterpart and the depthwise-separable one, built like the 2D segmentation
models of medconv_ext.models (rolling_unet, unet, depthwise_unet) but in 3D. Each has a
`builder_spec` so that a trained model can be saved as a tiling checkpoint."""
from ..models.unet import UNet

_SPEC_MODULE = "medconv_ext.train.seg_models"


def _spec(net, name, **kw):
    net.builder_spec = ("%s:%s" % (_SPEC_MODULE, name), kw)
    return net


def rolling_unet3d(in_channels: int = 1, num_classes: int = 3, features: int = 8, depth: int = 3) -> UNet:
    """3D Rolling UNet: a dense 3x3x3 input conv, then rolling 3x3x3 convs (level 1 has three
    convs, as the published 2D Rolling UNet), rolling 2x2x2 transposed convs, dense 1x1x1 output."""
    net = UNet(3, in_channels, num_classes, features, 3, kind="rolling", first_kind="dense", first_level_convs=3,
               depth=depth)
    return _spec(net, "rolling_unet3d", in_channels=in_channels, num_classes=num_classes, features=features,
                 depth=depth)


def unet3d(in_channels: int = 1, num_classes: int = 3, features: int = 8, depth: int = 3) -> UNet:
    """Dense 3D UNet of the same layout (3x3x3 convs with bias, dense transposed convs)."""
    net = UNet(3, in_channels, num_classes, features, 3, kind="dense", depth=depth)
    return _spec(net, "unet3d", in_channels=in_channels, num_classes=num_classes, features=features, depth=depth)


def depthwise_unet3d(in_channels: int = 1, num_classes: int = 3, features: int = 8, depth: int = 3) -> UNet:
    """3D UNet with every 3x3x3 conv replaced by depthwise 3x3x3 + pointwise 1x1x1 (no bias)."""
    net = UNet(3, in_channels, num_classes, features, 3, kind="depthwise", depth=depth)
    return _spec(net, "depthwise_unet3d", in_channels=in_channels, num_classes=num_classes, features=features,
                 depth=depth)


BUILDERS = {"rolling_unet3d": rolling_unet3d, "unet3d": unet3d, "depthwise_unet3d": depthwise_unet3d}
