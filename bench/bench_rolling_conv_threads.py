"""Thread scaling of the fused spectral CPU kernel: each shape timed with 1 thread and with N threads back
to back in one process, in --rounds rounds over the whole list of shapes (the median of --reps calls per
timing, the fastest round kept per shape and thread count), so that neither a virtual machine's drift
between separate runs nor a disturbed stretch of one run decides the ratio.
Forward, float32, channels-last input, single base, full roll, "same" padding. Prints the times, the
speed-up, the kernel's ISA copy, and per call the user CPU time of all threads (equal at 1 and N threads
where the partition adds no work), the system (kernel) time and the page faults of the
process: a fresh output above glibc's mmap threshold (32 MB at most) is new memory on every call, and
the operating system's page faults on it are time the kernel's own partition does not control.

    PYTHONPATH=. python bench/bench_rolling_conv_threads.py [--threads 2] [--reps 9] [--quick]
    /work/shared/tools/quiet-run python bench/bench_rolling_conv_threads.py     # on a shared machine
"""
import os
import resource
import sys
import time

import torch

import harness  # noqa: E402  (bench/, the script's folder)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from medconv_ext.ops import rolling_conv_spectral_cpu as fused  # noqa: E402

# (N, C, S, k, dims): the fused kernel's target shapes and the deep 3x3x3 layers of a QSMnet step
SHAPES = [(1, 64, 256, 3, 2), (1, 64, 512, 3, 2), (1, 128, 128, 3, 2), (1, 128, 256, 3, 2),
          (1, 64, 24, 5, 3), (1, 128, 16, 5, 3), (2, 16, 32, 3, 3), (2, 32, 32, 3, 3)]
QUICK = [(1, 16, 24, 3, 2), (1, 8, 8, 3, 3)]


def _timed(shape, threads, reps):
    """(median ms of reps calls, user CPU ms per call, system ms per call, page faults per call) of one shape at
    a thread count. The user CPU time of all threads together shows the work the partition adds (equal at 1 and N
    threads: none) or a slowed processor (more time for the same work)."""
    n, c, s, k, dims = shape
    mf = torch.channels_last_3d if dims == 3 else torch.channels_last
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, *(s,) * dims, generator=gen).contiguous(memory_format=mf)
    w = torch.randn(1, c, *(k,) * dims, generator=gen)
    one = [1] * dims

    def run():
        return torch.ops.medconv.rolling_conv_spectral(x, w, None, None, None, False, one, [k // 2] * dims, one, c)
    torch.set_num_threads(threads)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    ms = harness.median_ms(run, reps)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    calls = reps + 2  # median_ms's warm-up calls count in the rusage difference
    return (ms, (r1.ru_utime - r0.ru_utime) * 1e3 / calls, (r1.ru_stime - r0.ru_stime) * 1e3 / calls,
            (r1.ru_minflt - r0.ru_minflt) / calls)


def main(argv=None):
    ap = harness.ab_parser(__doc__, threads=2, reps=9, threads_help="the thread count compared with 1")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the whole shape list (the fastest kept)")
    a = ap.parse_args(argv)
    if not fused.available():
        print("the compiled extension is not built; nothing to time")
        return 0
    print("isa=%s load=%.2f; 1 vs %d threads, back to back per shape, fastest of %d rounds"
          % (fused.isa(), os.getloadavg()[0], a.threads, a.rounds))
    print("%-26s %10s %10s %8s %13s %12s %12s" % ("shape", "1 thr ms", "%d thr ms" % a.threads, "speedup",
                                                  "user ms 1/%d" % a.threads, "sys ms 1/%d" % a.threads,
                                                  "faults 1/%d" % a.threads))
    shapes = QUICK if a.quick else SHAPES
    best = {}  # (shape, threads) -> (ms, user ms, sys ms per call, page faults per call) of the fastest round
    old = torch.get_num_threads()
    try:
        # rounds over the whole list, so that a disturbed stretch of time hits each shape in one round at most
        for _ in range(a.rounds):
            for shape in shapes:
                for t in (1, a.threads):
                    r = _timed(shape, t, a.reps)
                    if (shape, t) not in best or r[0] < best[(shape, t)][0]:
                        best[(shape, t)] = r
    finally:
        torch.set_num_threads(old)
    for shape in shapes:
        n, c, s, k, dims = shape
        (t1, u1, sys1, f1), (tn, un, sysn, fn) = best[(shape, 1)], best[(shape, a.threads)]
        print("%-26s %10.3f %10.3f %8.2f %13s %12s %12s" % (
            "%dd N=%d C=%d S=%d k=%d" % (dims, n, c, s, k), t1, tn, t1 / tn, "%.1f/%.1f" % (u1, un),
            "%.1f/%.1f" % (sys1, sysn), "%.0f/%.0f" % (f1, fn)))
    print("load average after: %.2f" % os.getloadavg()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
