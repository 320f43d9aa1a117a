"""Reference models of medconv_ext: the rolling-filters paper's UNet / QSMnet / ResNet18 families,
Med-IC (involution + CNN), the rollify converter and the published checkpoints.

Every builder returns an nn.Module whose forward returns logits / maps (never argmax) and takes a
width argument (`features`, the published value by default) for small versions.
"""
from .unet import (  # noqa: F401
    UNet,
    depthwise_qsmnet,
    depthwise_unet,
    flattened_qsmnet,
    flattened_unet,
    qsmnet,
    rolling_qsmnet,
    rolling_unet,
    unet,
)
from .resnet import ResNet, resnet18, rolling_resnet18  # noqa: F401
from .rollify import RollifyReport, RollifyRow, project_to_rolling, rollify  # noqa: F401
from .published import from_published, to_roll_loop  # noqa: F401
from ._util import set_backend  # noqa: F401
from .medic import MedICClassifier, MedICSegmenter, medic_cls, medic_seg  # noqa: F401

from .valid_srnet import SRNet, valid_srnet  # noqa: F401
