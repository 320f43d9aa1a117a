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

try:  # provided by the exact-tiling work (medconv_ext/models/valid_srnet.py); absent until it is merged
    from .valid_srnet import valid_srnet  # noqa: F401
except ModuleNotFoundError as _e:  # only "the file is not there yet"; a broken valid_srnet still raises
    if _e.name != __name__ + ".valid_srnet":
        raise
