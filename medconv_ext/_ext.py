"""Loads the compiled extension medconv_ext._C (which registers torch.ops.medconv.*).

The package always imports: when the extension is missing or broken, the compiled backends
("cpu", "cuda") report themselves unavailable with the reason, and one warning says why.
"""
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from . import _C  # noqa: F401  (loading it registers the operators)

    EXT_ERROR = None
except Exception as e:  # ImportError, or an undefined symbol from a stale build
    _C = None
    EXT_ERROR = (
        "the compiled extension medconv_ext._C could not be loaded (%s: %s); build it with "
        "`make build` or `python setup.py build_ext --inplace`" % (type(e).__name__, e)
    )
    warnings.warn("medconv_ext: " + EXT_ERROR + ". Only the pure-PyTorch backends are available.",
                  RuntimeWarning, stacklevel=2)


def has_compiled_ops() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))
