"""Mutation test of the emulator on the real sources (part of --full, or --mutants): copies of
csrc/cuda with one bug injected each are built and run on a few cases; each run must fail.

A mutant whose text no longer occurs in the source is reported as a failure too, so that the list is
kept in step with the kernels (update `old`/`new` when the code they point at changes).
"""
import os
import shutil
import subprocess
import sys

# (name, source file, exact text, replacement, case-id filter)
MUTANTS = [
    ("rolling_gemm store bound off by one", "rolling_conv.cu",
     "          if (p >= P_out) continue;", "          if (p > P_out) continue;", "conv2d-C37-tiles"),
    ("rolling_gemm barrier after the K stage removed", "rolling_conv.cu",
     "                acc[1][j] += x1 * wv;\n              }\n            }\n            __syncthreads();\n",
     "                acc[1][j] += x1 * wv;\n              }\n            }\n", "conv2d-C37-tiles"),
    ("involution dynamic shared memory one byte short", "involution.cu",
     "      t.smem_bytes = (int64_t)t.cps * per_chan;", "      t.smem_bytes = (int64_t)t.cps * per_chan - 1;",
     "group-of-20-two-chunks"),
]


def run_mutants(root, out, jobs, run_py):
    """Returns the number of mutants that were not flagged (or could not be applied)."""
    import builder

    bad = 0
    for i, (name, src, old, new, only) in enumerate(MUTANTS):
        mroot = os.path.join(out, "mutants", "m%d" % i)
        shutil.rmtree(os.path.join(mroot, "csrc"), ignore_errors=True)
        shutil.copytree(os.path.join(root, "csrc"), os.path.join(mroot, "csrc"))
        path = os.path.join(mroot, "csrc", "cuda", src)
        with open(path) as f:
            text = f.read()
        if text.count(old) != 1:
            print("FAIL mutant %-50s its text occurs %d times in %s (update tests/cuda_on_cpu/mutants.py)" %
                  (name, text.count(old), src), flush=True)
            bad += 1
            continue
        with open(path, "w") as f:
            f.write(text.replace(old, new))
        lib, _ = builder.build(mroot, os.path.join(mroot, "build"), jobs, sources=[src], quiet=True)
        r = subprocess.run([sys.executable, run_py, "--lib", lib, "--only", only, "--out", os.path.join(mroot, "build")],
                           capture_output=True, text=True)
        fails = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL")]
        flagged = r.returncode != 0 and fails
        bad += not flagged
        print("%s mutant %-50s %s" % ("ok  " if flagged else "FAIL", name,
                                      ("flagged: %d failed checks, first: %s" % (len(fails), fails[0][:200])) if flagged
                                      else "NOT flagged"), flush=True)
    return bad
