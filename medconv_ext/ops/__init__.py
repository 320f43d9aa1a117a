"""Functional operators (argument checks, backend choice, torch.library registrations)."""
from .rolling_conv import (  # noqa: F401
    rolling_conv2d,
    rolling_conv3d,
    rolling_conv_transpose2d,
    rolling_conv_transpose3d,
)
from .involution import involution2d, involution3d  # noqa: F401,E402
from . import rolling_conv_spectral  # noqa: F401,E402  (registers backend "spectral")
from . import rolling_conv_spectral_cpu  # noqa: F401,E402  (its fused CPU kernel)
from . import rolling_conv_cat  # noqa: F401,E402  (rolling_conv_cat: a channel concatenation read in place)
from . import rolling_conv_triton  # noqa: F401,E402  (registers backend "triton")
from . import rolling_conv_spectral_triton  # noqa: F401,E402  (fused "spectral" kernel on CUDA)
from . import involution_triton  # noqa: F401,E402  (registers backend "triton" of involution)
