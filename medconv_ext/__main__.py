"""`python -m medconv_ext`: the installed version, what its compiled library was built with, and
which backends run on this machine (with the reason for each one that does not)."""
import sys

import torch

import medconv_ext
from medconv_ext import _ext


def main() -> int:
    print("medconv_ext %s  (%s)" % (medconv_ext.__version__, medconv_ext.__file__))
    print("torch %s (CUDA %s), Python %s" % (torch.__version__, torch.version.cuda, sys.version.split()[0]))
    info = _ext.build_info()
    if info:
        cuda = ("yes, arch %s" % info.get("cuda_arch_list")) if info.get("with_cuda") else \
            "no (%s)" % info.get("cuda_reason")
        print("compiled library built with torch %s; CUDA kernels: %s" % (info.get("torch_version"), cuda))
    elif _ext.has_compiled_ops():
        print("compiled library loaded (built without a build record)")
    print("backends:")
    for name, (ok, why) in medconv_ext.available_backends().items():
        print("  %-17s %-4s %s" % (name, "yes" if ok else "no", why))
    return 0


if __name__ == "__main__":
    sys.exit(main())
