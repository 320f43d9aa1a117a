"""Functional operators (argument checks, backend choice, torch.library registrations)."""
from .rolling_conv import (  # noqa: F401
    rolling_conv2d,
    rolling_conv3d,
    rolling_conv_transpose2d,
    rolling_conv_transpose3d,
)
from . import rolling_conv_spectral  # noqa: F401,E402  (registers backend "spectral")
from . import rolling_conv_triton  # noqa: F401,E402  (registers backend "triton")
