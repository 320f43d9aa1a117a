"""medconv_ext: fast, exact operators for lightweight medical-imaging CNNs.

Rolling convolution and involution (C++/CUDA/Triton kernels and an exact spectral
algorithm), reference models, exact tiled inference and learned-filter analysis.
"""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _map_source_triton_kernels():
    # setup.py installs the top-level folder triton_kernels/ as medconv_ext.triton_kernels.
    # In a source checkout (build_ext --inplace) map the subpackage onto that folder.
    name = __name__ + ".triton_kernels"
    here = _os.path.dirname(_os.path.abspath(__file__))
    if name in _sys.modules or _os.path.isdir(_os.path.join(here, "triton_kernels")):
        return
    src = _os.path.join(_os.path.dirname(here), "triton_kernels")
    init = _os.path.join(src, "__init__.py")
    if _os.path.isfile(init):
        spec = _ilu.spec_from_file_location(name, init, submodule_search_locations=[src])
        mod = _ilu.module_from_spec(spec)
        _sys.modules[name] = mod
        spec.loader.exec_module(mod)


_map_source_triton_kernels()

from ._version import __version__  # noqa: E402,F401
from . import _ext  # noqa: E402,F401  (loads the compiled ops, or records why not)
from .backends import available_backends  # noqa: E402,F401
from .ops.rolling_conv import (  # noqa: E402,F401
    rolling_conv2d,
    rolling_conv3d,
    rolling_conv_transpose2d,
    rolling_conv_transpose3d,
)
from .ops.involution import involution2d, involution3d  # noqa: E402,F401
from .ops.rolling_conv_cat import rolling_conv_cat  # noqa: E402,F401
from . import nn  # noqa: E402,F401
from . import export  # noqa: E402,F401  (registers the decompositions plain torch.onnx.export uses)
