"""The fused spectral CPU kernel's two channel transforms side by side: the real FFT over channels
(csrc/cpu/channel_fft.h) against the folded DFT GEMMs, the same build switched in one process
(set_channel_transform), and, above 256 channels, the torch-op composition (backend "spectral_unfused")
that the fused kernel replaces there. Forward, float32, single base, full roll, "same" padding, each
layout; median of --reps calls per cell, the cells of one shape back to back. Prints the kernel's ISA copy
and the load average.

    PYTHONPATH=. python bench/bench_rolling_conv_transforms.py [--threads 1] [--reps 15] [--quick]
    /work/shared/tools/quiet-run python bench/bench_rolling_conv_transforms.py     # on a shared machine
"""
import os
import sys

import torch

import harness  # noqa: E402  (bench/, the script's folder)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from medconv_ext.ops import rolling_conv_spectral_cpu as fused  # noqa: E402

# (dims, C, S, k): the 2D/3D target layers, small layers, and layers above 256 channels
SHAPES = [(2, 16, 128, 3), (2, 32, 128, 3), (2, 64, 256, 3), (2, 128, 128, 3), (2, 256, 64, 3), (2, 16, 16, 3),
          (3, 64, 24, 5), (3, 128, 16, 5), (3, 16, 32, 3), (3, 32, 32, 3), (3, 32, 12, 3),
          (2, 512, 32, 3), (2, 512, 16, 3), (2, 1024, 16, 3), (3, 256, 8, 5), (3, 512, 8, 3)]
QUICK = [(2, 16, 12, 3), (3, 8, 6, 3), (2, 300, 4, 3)]


def main(argv=None):
    ap = harness.ab_parser(__doc__, threads=1, reps=15)
    a = ap.parse_args(argv)
    if not fused.available():
        print("the compiled extension is not built; nothing to time")
        return 0
    torch.set_num_threads(a.threads)
    print("threads=%d isa=%s load=%.2f; forward, float32, median of %d calls (ms)"
          % (a.threads, fused.isa(), os.getloadavg()[0], a.reps))
    print("%-22s %-5s %-6s %9s %9s %7s %12s" % ("shape", "lay", "isa", "gemm", "fft", "gain", "composition"))
    prev = fused.channel_transform()
    try:
        for dims, c, s, k in (QUICK if a.quick else SHAPES):
            for lay in ("cl", "nchw"):
                x = torch.randn(1, c, *(s,) * dims)
                if lay == "cl":
                    x = x.contiguous(memory_format=torch.channels_last_3d if dims == 3 else torch.channels_last)
                w = torch.randn(1, c, *(k,) * dims)
                one = [1] * dims

                def fused_op():
                    return torch.ops.medconv.rolling_conv_spectral(x, w, None, None, None, False, one,
                                                                   [k // 2] * dims, one, c)
                t = {}
                for name in ("gemm", "fft"):
                    fused.set_channel_transform(name)
                    t[name] = harness.median_ms(fused_op, a.reps) if fused.transform_for(c) == name else float("nan")
                comp = float("nan")
                if c > fused.FUSED_MAX_C:
                    conv = fused.rolling_conv_spectral
                    comp = harness.median_ms(lambda: conv(x, w, None, one, [k // 2] * dims, one, c), a.reps)
                print("%-22s %-5s %-6s %9.3f %9.3f %7.2f %12.3f" % ("%dd C=%d S=%d k=%d" % (dims, c, s, k), lay,
                                                                    fused.isa(c), t["gemm"], t["fft"],
                                                                    t["gemm"] / t["fft"], comp), flush=True)
    finally:
        fused.set_channel_transform(prev)
    print("load average after: %.2f" % os.getloadavg()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
