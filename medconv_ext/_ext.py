"""Loads the compiled extension medconv_ext._C (which registers torch.ops.medconv.*).

The compiled library links against the C++ ABI of the torch it was built with and works only
with that torch release. setup.py records the build (torch version, CUDA kernels or why not) in
medconv_ext/_build_info.py; when the running torch is another release, importing medconv_ext
raises one ImportError that names both versions and says how to fix it (install the recorded
torch, or rebuild). Otherwise the package always imports: when the extension is missing or
broken, the compiled backends ("cpu", "cuda") report themselves unavailable with the reason, and
one warning says why.
"""
import glob
import os
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from . import _build_info as BUILD_INFO
except ImportError:  # no build yet, or a _C copied without its record
    BUILD_INFO = None

_REBUILD = ("rebuild medconv_ext against the installed torch: `pip install --no-build-isolation "
            "--force-reinstall .` in the source folder (or `make build` / `python setup.py build_ext "
            "--inplace` in a source checkout)")


def _release(version: str) -> str:
    return str(version).split("+")[0]


def torch_mismatch(info=BUILD_INFO, running: str = torch.__version__, running_cuda=torch.version.cuda):
    """The error message when the recorded build does not match the running torch, else None."""
    if info is None:
        return None
    built = getattr(info, "TORCH_VERSION", None)
    if built is None:
        return None
    if _release(built) != _release(running):
        return ("medconv_ext %s was built against torch %s, but torch %s is installed. Its compiled "
                "kernels (medconv_ext._C) work only with the torch release they were built with: install "
                "torch==%s, or %s."
                % (getattr(info, "VERSION", "?"), built, running, _release(built), _REBUILD))
    if getattr(info, "WITH_CUDA", False) and running_cuda is None:
        return ("medconv_ext was built with CUDA kernels against torch %s (CUDA %s), but the installed torch "
                "%s is a CPU-only build. Install a CUDA build of torch %s, or %s (a CPU-only build: "
                "MEDCONV_CPU_ONLY=1)." % (built, getattr(info, "TORCH_CUDA", "?"), running, _release(built), _REBUILD))
    return None


_MISMATCH = torch_mismatch()
if _MISMATCH is not None:
    raise ImportError(_MISMATCH)

try:
    from . import _C  # noqa: F401  (loading it registers the operators)

    EXT_ERROR = None
except Exception as e:  # ImportError, or an undefined symbol from a stale build
    _C = None
    where = os.path.dirname(os.path.abspath(__file__))
    if glob.glob(os.path.join(where, "_C*.so")) or glob.glob(os.path.join(where, "_C*.pyd")):
        why = "could not be loaded from %s (%s: %s)" % (where, type(e).__name__, e)
    else:
        why = "is not built (no _C*.so in %s)" % where
    EXT_ERROR = (
        "the compiled extension medconv_ext._C %s; build it with `make build` or `python setup.py "
        "build_ext --inplace` in a source checkout, or install the package with "
        "`pip install --no-build-isolation .`" % why
    )
    warnings.warn("medconv_ext: " + EXT_ERROR + ". Only the pure-PyTorch backends are available.",
                  RuntimeWarning, stacklevel=2)


def has_compiled_ops() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def no_cuda_kernels_reason() -> str:
    """Why the loaded _C has no CUDA kernels, as recorded at build time."""
    why = getattr(BUILD_INFO, "CUDA_REASON", None) if BUILD_INFO is not None else None
    if why:
        return "medconv_ext._C was built without CUDA kernels (%s at build time)" % why
    return ("medconv_ext._C was built without CUDA kernels (at build time: MEDCONV_CPU_ONLY=1, FORCE_CUDA=0, "
            "no nvcc, or a CPU-only torch)")


def build_info() -> dict:
    """What the compiled extension was built with ({} when it was built without a record)."""
    if BUILD_INFO is None:
        return {}
    return {k.lower(): v for k, v in vars(BUILD_INFO).items() if k.isupper()}
