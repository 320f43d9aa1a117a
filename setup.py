"""Build medconv_ext._C: C++ CPU kernels always, CUDA kernels when they can be built.

The CUDA kernels are built whenever a CUDA toolkit (nvcc) and a CUDA build of torch are present,
with or without a visible GPU: the same rule for `make`, `pip install .` and `pip wheel .`.
Build switches (environment variables, printed at build time; `pip install -v` shows them):
  MEDCONV_CPU_ONLY=1     never build the CUDA sources
  FORCE_CUDA=1           require the CUDA sources (an error when nvcc or a CUDA torch is missing)
  FORCE_CUDA=0           do not build the CUDA sources
  CUDA_HOME              CUDA toolkit root (the folder whose bin/ has nvcc and lib64/ libcudart);
                         found automatically when unset, even behind an nvcc wrapper script
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default: "8.0;9.0+PTX", plus "12.0" where nvcc knows
                         sm_120, plus any visible GPU older than sm_80: runs on Ampere, Hopper, Blackwell;
                         bench/gpu_check.sh sets it to the visible GPU's capability alone, a faster build)
  MEDCONV_DEBUG=1        -O0 -g, no -DNDEBUG
  MAX_JOBS               parallel compile jobs (ninja)

Package data: medconv_ext/data/cuda_auto_table.json, the measured CUDA `auto` table of rolling
convolution (bench/make_cuda_auto_table.py).

What was built (torch version, CUDA kernels or why not) is recorded next to the compiled library
in medconv_ext/_build_info.py: the package checks at import that it runs with the same torch, and
`python -m medconv_ext` prints it. The wheel requires exactly the torch release it was built with.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup


def _env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _is_cuda_root(path):
    if not path or not os.path.isfile(os.path.join(path, "bin", "nvcc")):
        return False
    libs = glob.glob(os.path.join(path, "lib64", "libcudart.so*")) + glob.glob(
        os.path.join(path, "targets", "*", "lib", "libcudart.so*")
    )
    return bool(libs)


def _find_cuda_home():
    """The real toolkit root. The first `nvcc` on PATH may be a wrapper script whose
    parent folder has no lib64/libcudart, which makes the link fail with -lcudart missing."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_cuda_root(os.environ.get(var)):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script: look for the path it execs
            with open(real, "r", errors="ignore") as f:
                head = f.read(4096)
            for tok in head.replace('"', " ").split():
                if tok.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_cuda_root(c):
            return c
    return None


CPU_ONLY = _env_flag("MEDCONV_CPU_ONLY")
_FORCE_CUDA_RAW = os.environ.get("FORCE_CUDA", "").strip()
FORCE_CUDA = _env_flag("FORCE_CUDA")           # FORCE_CUDA=1: CUDA kernels required
NO_CUDA = _FORCE_CUDA_RAW != "" and not FORCE_CUDA  # FORCE_CUDA=0 (or false/no/off): none
DEBUG = _env_flag("MEDCONV_DEBUG")
if not CPU_ONLY:
    _cuda_home = _find_cuda_home()
    if _cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvidia_include_dirs():
    """Torch's CUDA headers include cusparse.h / cublas*.h; pip's CUDA builds of torch ship
    them in site-packages/nvidia/cu*/include rather than in the toolkit."""
    dirs = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        for base in list(nvidia.__path__):
            for inc in sorted(glob.glob(os.path.join(base, "cu*", "include"))):
                if os.path.isfile(os.path.join(inc, "cusparse.h")):
                    dirs.append(inc)
    except ImportError:
        pass
    return dirs


def _decide_cuda():
    """(build the CUDA kernels?, why): nvcc and a CUDA torch present, unless a switch says otherwise."""
    if CPU_ONLY:
        return False, "MEDCONV_CPU_ONLY=1"
    if NO_CUDA:
        return False, "FORCE_CUDA=%s" % _FORCE_CUDA_RAW
    missing = None
    if torch.version.cuda is None:
        missing = "torch %s is not a CUDA build" % torch.__version__
    elif CUDA_HOME is None or not _is_cuda_root(CUDA_HOME):
        missing = "no nvcc / CUDA toolkit found (set CUDA_HOME to the folder with bin/nvcc)"
    if missing:
        if FORCE_CUDA:
            sys.exit("medconv_ext: FORCE_CUDA=1, but the CUDA kernels cannot be built: %s. "
                     "Unset FORCE_CUDA (or set MEDCONV_CPU_ONLY=1) for a CPU-only build." % missing)
        return False, missing
    gpu = "GPU visible" if torch.cuda.is_available() else "no GPU visible"
    return True, "nvcc and CUDA torch found, %s%s" % (gpu, ", FORCE_CUDA=1" if FORCE_CUDA else "")


def _default_arch_list():
    """sm_80 and sm_90 code plus compute_90 PTX (JIT-compiled on newer GPUs), sm_120 where this nvcc
    supports it, and any visible GPU older than sm_80: a wheel built here runs beyond the build machine."""
    import subprocess

    archs = ["8.0", "9.0+PTX"]
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                             text=True, timeout=120).stdout
    except Exception:  # an nvcc too old for --list-gpu-arch has no sm_120 either
        out = ""
    if "compute_120" in out.split():
        archs.append("12.0")
    if torch.cuda.is_available():
        for cap in sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}):
            if cap < (8, 0):
                archs.insert(0, "%d.%d" % cap)
    return ";".join(archs)


WITH_CUDA, CUDA_REASON = _decide_cuda()
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list()

cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))

opt = ["-O0", "-g"] if DEBUG else ["-O3"]
cxx_flags = opt + ["-fopenmp"]  # the C++ standard is the one torch's BuildExtension sets
nvcc_flags = opt + ["-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-fopenmp"]
define_macros = []
if not DEBUG:
    define_macros.append(("NDEBUG", None))
include_dirs = [os.path.join(ROOT, "csrc")]

if WITH_CUDA:
    include_dirs += _nvidia_include_dirs()
    define_macros.append(("MEDCONV_WITH_CUDA", None))
    ext = CUDAExtension(
        "medconv_ext._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "medconv_ext._C",
        cpp_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

def _read_version():
    with open(os.path.join(ROOT, "medconv_ext", "_version.py")) as f:
        m = re.search(r'^__version__\s*=\s*"([^"]+)"', f.read(), re.M)
    if not m:
        sys.exit("medconv_ext: no __version__ in medconv_ext/_version.py")
    return m.group(1)


_EXTRAS = {
    "io": ["zarr>=3", "tifffile>=2024.8", "nibabel>=5"],
    "analysis": ["matplotlib>=3.5"],
    "onnx": ["onnx>=1.16", "onnxscript>=0.1", "onnxruntime>=1.18"],
    "monai": ["monai>=1.4"],
}
_EXTRAS["all"] = sorted({req for reqs in _EXTRAS.values() for req in reqs})

VERSION = _read_version()
# The compiled library links against this torch's C++ ABI: the wheel requires the same release
# (a local label such as +cu130 is left out; PEP 440 `==` matches every local variant).
TORCH_RELEASE = torch.__version__.split("+")[0]

BUILD_INFO = {
    "version": VERSION,
    "torch_version": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "with_cuda": WITH_CUDA,
    "cuda_reason": CUDA_REASON,
    "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if WITH_CUDA else None,
}


def _build_info_text():
    lines = ['"""Written by setup.py when medconv_ext._C was built (not tracked by git): what was built,',
             'against which torch. medconv_ext/_ext.py checks it before loading the library."""']
    for k in ("version", "torch_version", "torch_cuda", "with_cuda", "cuda_reason", "cuda_arch_list"):
        lines.append("%s = %r" % (k.upper(), BUILD_INFO[k]))
    return "\n".join(lines) + "\n"


def _read_build_info(path):
    info = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), {}, info)
    except (OSError, SyntaxError):
        return None
    return info


class BuildExt(BuildExtension):
    """torch's BuildExtension, plus: rebuild when the recorded torch or CUDA choice differs from
    this build's (setuptools only compares file times), and write _build_info.py beside _C."""

    def run(self):
        info_path = os.path.join(os.path.dirname(self.get_ext_fullpath("medconv_ext._C")), "_build_info.py")
        old = _read_build_info(info_path)
        if old is None or old.get("TORCH_VERSION") != torch.__version__ or old.get("WITH_CUDA") != WITH_CUDA:
            self.force = True
        super().run()
        os.makedirs(os.path.dirname(info_path), exist_ok=True)
        with open(info_path, "w") as f:
            f.write(_build_info_text())
        print("medconv_ext: built %s with torch %s: %s" % (
            os.path.basename(self.get_ext_fullpath("medconv_ext._C")), torch.__version__,
            "C++ CPU kernels and CUDA kernels (arch %s)" % BUILD_INFO["cuda_arch_list"] if WITH_CUDA
            else "C++ CPU kernels only (no CUDA kernels: %s)" % CUDA_REASON), file=sys.stderr)


def _print_config():
    print("medconv_ext %s build configuration:" % VERSION, file=sys.stderr)
    print("  torch            %s (CUDA %s)" % (torch.__version__, torch.version.cuda), file=sys.stderr)
    print("  CUDA kernels     %s (%s)" % ("yes" if WITH_CUDA else "no", CUDA_REASON), file=sys.stderr)
    if WITH_CUDA:
        print("  CUDA_HOME        %s" % CUDA_HOME, file=sys.stderr)
        print("  arch list        %s" % os.environ.get("TORCH_CUDA_ARCH_LIST"), file=sys.stderr)
    print("  sources          %s" % " ".join(ext.sources), file=sys.stderr)
    print("  debug            %s, MAX_JOBS=%s" % (DEBUG, os.environ.get("MAX_JOBS", "auto")), file=sys.stderr)

_print_config()

setup(
    name="medconv_ext",
    version=VERSION,
    description="Fast, exact rolling convolution and involution operators for lightweight medical-imaging CNNs",
    packages=find_packages(include=["medconv_ext", "medconv_ext.*"]) + ["medconv_ext.triton_kernels"],
    # The top-level folder triton_kernels/ is installed as medconv_ext.triton_kernels: the
    # top-level name `triton_kernels` belongs to an unrelated PyPI package.
    package_dir={"medconv_ext.triton_kernels": "triton_kernels"},
    # The measured CUDA `auto` table (bench/make_cuda_auto_table.py from bench/results/<gpu>/ CSVs).
    package_data={"medconv_ext": ["data/cuda_auto_table.json"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
    python_requires=">=3.9",
    install_requires=["torch==%s" % TORCH_RELEASE, "numpy"],
    license="BSD-3-Clause",
    # Optional packages, by what needs them. Without one, the feature that needs it stops with one
    # line naming the package and its extra (medconv_ext/_errors.py: EXTRAS), the rest works.
    #   io        file formats of exact tiled inference (python -m medconv_ext.tile): Zarr / OME-Zarr,
    #             TIFF stacks, NIfTI (.npy needs nothing)
    #   analysis  the figures of the filter-analysis report (python -m medconv_ext.analysis report)
    #   onnx      ONNX export (medconv_ext.export.onnx_export, torch.onnx.export) and running the result
    #   monai     medconv_ext.monai: ExactTiledInferer (a MONAI Inferer) and the rollified MONAI builders
    #   all       every extra
    extras_require=_EXTRAS,
    zip_safe=False,
)
