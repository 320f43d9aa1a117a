"""Build the CUDA-on-CPU test library: every csrc/cuda/*.cu that holds kernels or CUDA op
registrations, unmodified apart from transform.py's line-preserving rewrite, compiled with g++ for
the CPU against the emulator runtime (runtime/) and the header stand-ins (stand_ins/), with
AddressSanitizer and UBSan, linked into build/cuda_on_cpu/libcudaemu.so.

Incremental: a file is recompiled only when its translation, a header it includes or the flags
changed. Writes manifest.json next to the library: per source file its kernels, launch sites and
exported ops (torch.ops.cudaemu.<op>), and the files skipped with the reason.

Usage: python tests/cuda_on_cpu/builder.py [--src ROOT] [--out DIR] [-j N] [--no-sanitize]
(normally called by run.py; ROOT must contain csrc/cuda/*.cu, a mutated copy works too)
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import transform  # noqa: E402

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fsanitize-recover=address,undefined"]


def cxx():
    return os.environ.get("CXX", "g++")


def torch_flags():
    """Include flags and library folder of the torch this python runs (CPU libtorch suffices)."""
    import torch

    base = os.path.dirname(torch.__file__)
    inc = [os.path.join(base, "include"), os.path.join(base, "include", "torch", "csrc", "api", "include")]
    abi = int(torch.compiled_with_cxx11_abi())
    return ["-I" + p for p in inc] + ["-D_GLIBCXX_USE_CXX11_ABI=%d" % abi], os.path.join(base, "lib")


def _write_if_changed(path, text):
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return False
    with open(path, "w") as f:
        f.write(text)
    return True


def _up_to_date(obj, dep, flags_file, flags):
    """obj is newer than every file in its g++ dependency list and was built with these flags."""
    if not (os.path.exists(obj) and os.path.exists(dep) and os.path.exists(flags_file)):
        return False
    with open(flags_file) as f:
        if f.read() != flags:
            return False
    with open(dep) as f:
        deps = f.read().replace("\\\n", " ").split(":", 1)[1].split()
    t = os.path.getmtime(obj)
    return all(os.path.exists(d) and os.path.getmtime(d) <= t for d in deps)


def compile_one(src, obj, flags, log):
    dep, flags_file = obj[:-2] + ".d", obj[:-2] + ".flags"
    key = " ".join(flags)
    if _up_to_date(obj, dep, flags_file, key):
        return False
    cmd = [cxx()] + flags + ["-MMD", "-MF", dep, "-c", src, "-o", obj]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("compiling %s failed:\n%s\n%s" % (src, " ".join(cmd), r.stderr[-20000:]))
    if r.stderr.strip():
        log.append(r.stderr)
    with open(flags_file, "w") as f:
        f.write(key)
    return True


def scan(src_root, only=None):
    """(sources to build, skipped {name: reason}) of src_root/csrc/cuda (only: these file names)."""
    cdir = os.path.join(src_root, "csrc", "cuda")
    build, skipped = [], {}
    for name in sorted(os.listdir(cdir)):
        if not name.endswith(".cu") or (only is not None and name not in only):
            continue
        path = os.path.join(cdir, name)
        with open(path) as f:
            d = transform.describe(f.read(), name)
        if d["kernels"] or d["ops"]:
            build.append((name, path, d))
        else:
            skipped[name] = "no __global__ kernel and no TORCH_LIBRARY_IMPL(medconv, CUDA) registration"
    return build, skipped


def build(src_root=ROOT, out=None, jobs=2, sanitize=True, quiet=False, sources=None):
    """Build (or bring up to date) libcudaemu.so of all .cu files (or of `sources`, file names);
    returns (library path, manifest dict)."""
    out = out or os.path.join(src_root, "build", "cuda_on_cpu")
    gen = os.path.join(out, "gen")
    os.makedirs(gen, exist_ok=True)
    tflags, tlib = torch_flags()
    san = SANITIZE if sanitize else []
    flags = (["-std=c++20", "-O1", "-g", "-fPIC", "-fno-omit-frame-pointer", "-Wno-attributes"] + san +
             ["-I" + os.path.join(HERE, "stand_ins"), "-I" + os.path.join(HERE, "runtime"),
              "-I" + os.path.join(src_root, "csrc", "cuda"), "-I" + os.path.join(src_root, "csrc")] + tflags)
    sources, skipped = scan(src_root, sources)
    manifest = {"files": {}, "skipped": skipped}
    units = []
    for name, path, desc in sources:
        with open(path) as f:
            text = f.read()
        cpp = os.path.join(gen, name[:-3] + ".cpp")
        _write_if_changed(cpp, transform.transform(text, name, path))
        units.append((cpp, os.path.join(out, name[:-3] + ".o")))
        manifest["files"][name] = desc
    units.append((os.path.join(HERE, "runtime", "control.cpp"), os.path.join(out, "control.o")))
    units.append((os.path.join(HERE, "runtime", "context_switch.S"), os.path.join(out, "context_switch.o")))
    log = []
    with ThreadPoolExecutor(max(1, jobs)) as ex:
        done = list(ex.map(lambda u: compile_one(u[0], u[1], flags, log), units))
    lib = os.path.join(out, "libcudaemu.so")
    if any(done) or not os.path.exists(lib):
        cmd = ([cxx(), "-shared", "-o", lib] + [o for _, o in units] + san +
               ["-L" + tlib, "-Wl,-rpath," + tlib, "-ltorch", "-ltorch_cpu", "-lc10"])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("linking failed:\n%s\n%s" % (" ".join(cmd), r.stderr[-5000:]))
    manifest["sanitize"] = sanitize
    manifest["library"] = lib
    manifest["hash"] = hashlib.sha1(open(lib, "rb").read()).hexdigest()[:12]
    _write_if_changed(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=1, sort_keys=True))
    if not quiet:
        for line in log:
            sys.stderr.write(line)
        print("cuda_on_cpu: %s (%s; recompiled %d of %d units)" % (lib, ", ".join(n for n, _, _ in sources),
                                                                    sum(done), len(units)))
    return lib, manifest


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=ROOT, help="project root holding csrc/cuda (default: this checkout)")
    ap.add_argument("--out", default=None, help="output folder (default: SRC/build/cuda_on_cpu)")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--no-sanitize", action="store_true", help="without ASan/UBSan (faster, checks values only)")
    a = ap.parse_args()
    build(os.path.abspath(a.src), a.out and os.path.abspath(a.out), a.jobs, not a.no_sanitize)


if __name__ == "__main__":
    main()
