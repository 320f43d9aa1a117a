"""Quick check of the C++ CPU kernel (backend "cpu") against torch's dense conv (MKLDNN) of the
same shape and the published roll-loop construction, forward and forward+backward.
The full benchmark of every backend is bench/bench_rolling_conv.py (`make bench`).

    PYTHONPATH=. python bench/bench_rolling_conv_cpu.py [--threads 2]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import medconv_ext as mc  # noqa: E402
from bench.harness import time_ms  # noqa: E402
from medconv_ext.reference.rolling_conv import expand_rolling_weight  # noqa: E402

SHAPES = [  # dims, N, C, spatial, k
    (2, 4, 64, 32, 3),
    (2, 1, 256, 32, 3),
    (3, 1, 32, 16, 5),
]


def roll_loop_bank(w, n_rolls):
    banks, cur = [w], w
    for _ in range(n_rolls - 1):
        cur = torch.roll(cur, shifts=1, dims=1)
        banks.append(cur)
    return torch.cat(banks, dim=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--budget", type=float, default=2.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    print("threads=%d; ratio = other impl time / cpu-kernel time (> 1: the kernel is faster)" % args.threads)
    for dims, N, C, S, k in SHAPES:
        conv = {2: F.conv2d, 3: F.conv3d}[dims]
        rc = {2: mc.rolling_conv2d, 3: mc.rolling_conv3d}[dims]
        x = torch.randn(N, C, *[S] * dims, requires_grad=True)
        w = (torch.randn(1, C, *[k] * dims) * 0.05).requires_grad_()
        W = expand_rolling_weight(w.detach(), C).requires_grad_()
        pad = k // 2
        impls = {
            "cpu": lambda: rc(x, w, None, 1, pad, backend="cpu"),
            "dense": lambda: conv(x, W, None, 1, pad),
            "roll_loop": lambda: conv(x, roll_loop_bank(w, C), None, 1, pad),
        }
        shape = "%dd N=%d C=%d S=%d k=%d" % (dims, N, C, S, k)
        for mode in ("fwd", "fwd+bwd"):
            t = {}
            for name, fn in impls.items():
                if mode == "fwd":
                    def run(fn=fn):
                        with torch.no_grad():
                            fn()
                else:
                    def run(fn=fn):
                        fn().sum().backward()
                t[name] = time_ms(run, dev, budget_s=args.budget)
            print("%-26s %-8s cpu %8.2f ms | dense %8.2f ms (x%.2f) | roll_loop %8.2f ms (x%.2f)"
                  % (shape, mode, t["cpu"], t["dense"], t["dense"] / t["cpu"], t["roll_loop"], t["roll_loop"] / t["cpu"]))


if __name__ == "__main__":
    main()
