"""Reference models of medconv_ext: the rolling-filters paper's UNet / QSMnet / ResNet18 families,
Med-IC (involution + CNN), the rollify converter and the published checkpoints.

Every builder returns an nn.Module whose forward returns logits / maps (never argmax) and takes a
width argument (`features`, the published value by default) for small versions. Every model
records how to rebuild it, `model.builder_spec = (builder name, kwargs)` (the builder's name from
BUILDERS, or "medconv_ext.models:<Class>" for a class built directly), so that
medconv_ext.tiling.save_tiling_checkpoint(model, path) needs no further arguments; U-Nets also
carry `tiling_align`, the multiple of their down-sampling that tile origins must keep.
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
from ._util import record_builder_spec, set_backend  # noqa: F401
from .medic import MedICClassifier, MedICSegmenter, medic_cls, medic_seg  # noqa: F401

from .valid_srnet import SRNet, valid_srnet  # noqa: F401

# The builders, by the name their models record in builder_spec (tiling checkpoints load them by it).
BUILDERS = ("unet", "rolling_unet", "depthwise_unet", "flattened_unet", "qsmnet", "rolling_qsmnet",
            "depthwise_qsmnet", "flattened_qsmnet", "resnet18", "rolling_resnet18", "medic_cls", "medic_seg",
            "valid_srnet")
