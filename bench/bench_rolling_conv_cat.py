"""rolling_conv_cat (the fused CPU kernel reading a channel concatenation from two tensors in place)
against torch.cat + rolling_conv2d/3d on backend "spectral" (the fused kernel over the copy): the
layer after a U-Net decoder's concatenation, half roll 2C -> C, 3x3 ("same"), N=1, float32, both
inputs in the same memory layout. Prints the median time of each and the ratio, the ISA copy, the
threads and the load average.

    PYTHONPATH=. python bench/bench_rolling_conv_cat.py [--threads 2] [--reps 7] [--quick]
    /work/shared/tools/quiet-run python bench/bench_rolling_conv_cat.py     # on a shared machine
"""
import os
import sys
import time

import torch

import harness  # noqa: E402  (bench/, the script's folder)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from medconv_ext.ops import rolling_conv_spectral_cpu as fused  # noqa: E402
from medconv_ext.ops.rolling_conv import rolling_conv2d, rolling_conv3d  # noqa: E402
from medconv_ext.ops.rolling_conv_cat import available, rolling_conv_cat  # noqa: E402

SHAPES = [(2, 32, 512), (2, 64, 512), (2, 128, 256), (3, 32, 48)]  # dims, C of each input, size
QUICK = [(2, 8, 24), (3, 4, 8)]


def main(argv=None):
    ap = harness.ab_parser(__doc__, threads=2, reps=7)
    a = ap.parse_args(argv)
    if not available():
        print("rolling_conv_cat: the compiled extension is not built; nothing to time")
        return 0
    torch.set_num_threads(a.threads)
    print("threads=%d isa=%s load=%.2f" % (a.threads, fused.isa(), os.getloadavg()[0]))
    print("%-22s %-6s %12s %12s %8s" % ("shape", "layout", "cat+op_ms", "in_place_ms", "ratio"))
    for dims, c, s in (QUICK if a.quick else SHAPES):
        conv = rolling_conv3d if dims == 3 else rolling_conv2d
        for layout in ("cl", "nchw"):
            x = torch.randn(1, c, *(s,) * dims)
            x2 = torch.randn(1, c, *(s,) * dims)
            if layout == "cl":
                mf = torch.channels_last_3d if dims == 3 else torch.channels_last
                x, x2 = x.contiguous(memory_format=mf), x2.contiguous(memory_format=mf)
            w = torch.randn(1, 2 * c, *(3,) * dims)
            with torch.no_grad():
                t_cat = harness.median_ms(lambda: conv(torch.cat([x, x2], 1), w, None, 1, 1, 1, c, "spectral"), a.reps)
                t_in = harness.median_ms(lambda: rolling_conv_cat(x, x2, w, None, 1, 1, 1, c, "spectral"), a.reps)
            print("%-22s %-6s %12.3f %12.3f %8.2f" % ("%dd C=%d+%d S=%d" % (dims, c, c, s), layout, t_cat, t_in,
                                                     t_cat / t_in))
    print("load average after: %.2f" % os.getloadavg()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
