"""Self-test of the CUDA-on-CPU emulator: every deliberately broken kernel of selftest/bad_kernels.cu
must be flagged, the correct one must pass. Seconds; needs g++ only (no torch headers).

Each case runs in its own process (so that a sanitizer report belongs to exactly one case) under the
forward and the reverse schedule. The expectations:
  ok_reduce                 no error, no report, exact result under both schedules
  ok_votes_atomics          likewise (__ballot_sync, __any_sync, __all_sync, atomicAdd)
  missing_syncthreads       wrong (NaN: poisoned shared memory read) or schedule-dependent result
  store_off_by_one          AddressSanitizer heap-buffer-overflow (global memory)
  dyn_smem_short            AddressSanitizer heap-buffer-overflow (dynamic shared memory)
  static_smem_overrun       AddressSanitizer global-buffer-overflow or UBSan out-of-bounds index
  divergent_barrier         emulator error (__syncthreads not reached by the whole block)
  partial_shuffle           emulator error (warp op not reached by every lane of the mask)
  uninit_shared             NaN in the output (shared memory is poisoned at block start)
  missing_grid_stride_loop  NaN in the output when the grid is clamped to one block
  grid_y_too_large, block_too_large, dyn_smem_too_large    launch error, as on a GPU

Usage: python tests/cuda_on_cpu/selftest.py [--out DIR]
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import transform  # noqa: E402


def build(out):
    os.makedirs(out, exist_ok=True)
    src = os.path.join(HERE, "selftest", "bad_kernels.cu")
    cpp = os.path.join(out, "bad_kernels.cpp")
    exe = os.path.join(out, "bad_kernels")
    with open(src) as f:
        text = f.read()
    with open(cpp, "w") as f:
        f.write(transform.transform(text, "bad_kernels.cu", src))
    deps = [src, os.path.join(HERE, "runtime", "cudaemu.h"), os.path.join(HERE, "runtime", "context_switch.S"),
            os.path.join(HERE, "transform.py")]
    if os.path.exists(exe) and all(os.path.getmtime(d) <= os.path.getmtime(exe) for d in deps):
        return exe
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer",
           "-fsanitize=address,undefined", "-fsanitize-recover=address,undefined", "-I" + os.path.join(HERE, "runtime"),
           cpp, os.path.join(HERE, "runtime", "context_switch.S"), "-o", exe]
    subprocess.run(cmd, check=True)
    return exe


def run_case(exe, case, sched, max_grid=0):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:halt_on_error=0:print_legend=0:color=never",
               UBSAN_OPTIONS="print_stacktrace=0:halt_on_error=0:color=never")
    env.pop("LD_PRELOAD", None)
    r = subprocess.run([exe, case, str(sched), str(max_grid)], capture_output=True, text=True, env=env, timeout=120)
    out = {"error": None, "err": None, "nans": None, "asan": None, "ubsan": None, "at": None, "rc": r.returncode}
    for line in r.stdout.splitlines():
        if line.startswith("error: "):
            out["error"] = line[7:]
        elif line.startswith("result: "):
            e, n = line.split()[1:3]
            out["err"], out["nans"] = float(e), int(n)
    for line in r.stderr.splitlines():
        if "ERROR: AddressSanitizer:" in line and out["asan"] is None:
            out["asan"] = line.split("ERROR: AddressSanitizer:")[1].split(" on ")[0].strip()
        if "runtime error:" in line and out["ubsan"] is None:
            out["ubsan"] = line.strip()
        if "bad_kernels.cu:" in line and out["at"] is None:  # first frame in the kernel source
            out["at"] = "bad_kernels.cu:" + line.split("bad_kernels.cu:")[1].split()[0]
    return out


def clean(r):
    return r["rc"] == 0 and r["error"] is None and r["asan"] is None and r["ubsan"] is None


def asan(kind):
    """The AddressSanitizer report of this kind, attributed to a line of the kernel source."""
    return lambda rs: all(r["asan"] == kind and r["at"] for r in rs)


EXPECT = {
    # case: (what must be seen, predicate over the runs under schedules 0 and 1)
    "ok_reduce": ("clean and exact", lambda rs: all(clean(r) and r["err"] == 0 and r["nans"] == 0 for r in rs)),
    "ok_votes_atomics": ("clean and exact", lambda rs: all(clean(r) and r["err"] == 0 and r["nans"] == 0 for r in rs)),
    "missing_syncthreads": ("NaN or a schedule-dependent result",
                            lambda rs: any(r["nans"] for r in rs) or rs[0]["err"] != rs[1]["err"]),
    "store_off_by_one": ("heap-buffer-overflow", asan("heap-buffer-overflow")),
    "dyn_smem_short": ("heap-buffer-overflow", asan("heap-buffer-overflow")),
    "static_smem_overrun": ("global-buffer-overflow or out-of-bounds index",
                            lambda rs: all(r["asan"] == "global-buffer-overflow" or
                                           (r["ubsan"] and "out of bounds" in r["ubsan"]) for r in rs)),
    "divergent_barrier": ("emulator error", lambda rs: all(r["error"] and "__syncthreads" in r["error"] for r in rs)),
    "partial_shuffle": ("emulator error", lambda rs: all(r["error"] and "deadlock" in r["error"] for r in rs)),
    "uninit_shared": ("NaN output", lambda rs: all(r["nans"] for r in rs)),
    "missing_grid_stride_loop": ("NaN output with a clamped grid", lambda rs: all(r["nans"] for r in rs)),
    "grid_y_too_large": ("launch error", lambda rs: all(r["error"] and "invalid grid" in r["error"] for r in rs)),
    "block_too_large": ("launch error", lambda rs: all(r["error"] and "invalid block" in r["error"] for r in rs)),
    "dyn_smem_too_large": ("launch error", lambda rs: all(r["error"] and "shared memory" in r["error"] for r in rs)),
}


def main(out=None, verbose=True):
    """Runs every case; returns the number of cases whose expectation failed."""
    out = out or os.path.join(ROOT, "build", "cuda_on_cpu", "selftest")
    exe = build(out)
    failures = 0
    for case, (want, ok) in EXPECT.items():
        max_grid = 1 if case == "missing_grid_stride_loop" else 0
        rs = [run_case(exe, case, s, max_grid) for s in (0, 1)]
        good = bool(ok(rs))
        failures += not good
        seen = "; ".join("sched %d: %s" % (s, ", ".join("%s=%s" % (k, str(v)[-70:]) for k, v in r.items()
                                                        if v not in (None, 0)) or "clean")
                         for s, r in enumerate(rs))
        if verbose or not good:
            print("%s selftest %-26s expect %-42s got %s" % ("ok  " if good else "FAIL", case, want, seen[:300]),
                  flush=True)
    return failures


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    sys.exit(1 if main(ap.parse_args().out) else 0)
