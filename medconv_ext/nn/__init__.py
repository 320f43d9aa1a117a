"""Modules of medconv_ext."""
from .rolling_conv import (  # noqa: F401
    RollingConv2d,
    RollingConv3d,
    RollingConvTranspose2d,
    RollingConvTranspose3d,
    rolling_layout,
)
from .involution import Involution2d, Involution3d  # noqa: F401,E402
