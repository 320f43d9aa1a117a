"""Reference models of medconv_ext."""
from .valid_srnet import SRNet, valid_srnet  # noqa: F401
