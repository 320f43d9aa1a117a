"""The fused spectral CPU kernel (backend "spectral" on CPU tensors) and backend "auto" against
torch's dense convolution (oneDNN) of the same shape, each in NCHW and channels-last memory, per
instruction-set copy of the kernel (avx512 / avx2 / generic, the ones this CPU runs), forward and
forward+backward. Every row names the ISA copy and channel transform (fft or gemm) of the kernel, the dtype
and the machine's load average.

    PYTHONPATH=. python bench/bench_rolling_conv_cpu.py --set fused --threads 2
    PYTHONPATH=. python bench/bench_rolling_conv_cpu.py --set small --isa avx512 --mode fwd
    PYTHONPATH=. python bench/bench_rolling_conv_cpu.py --set small --mode fwd --dtype float32,bfloat16 --auto-only
    PYTHONPATH=. python bench/bench_rolling_conv_cpu.py --overhead --threads 1     # per-call Python cost
    PYTHONPATH=. python bench/bench_rolling_conv_cpu.py --set fused --threads 1 --timer cpu   # load-robust
    /work/shared/tools/quiet-run python bench/bench_rolling_conv_cpu.py ...                 # when shared

Columns: dense_ms (the faster of NCHW / channels-last, layout named), spectral_ms (the fused kernel,
faster input layout, named) and speedup = dense / spectral with each side in its faster layout;
auto = dense / auto with each side in its faster layout (auto's named in auto_layout; the goal: >= 0.9 on
every row, small layers included: `--set small --dtype float32,bfloat16`); auto_nchw / auto_cl = dense time / auto time with both in that layout (above 1: auto is faster),
ref_nchw / ref_cl the same for backend "reference" (the bank + the same oneDNN conv; the
alternative auto chooses from), spec_nchw / spec_cl for backend "spectral";
gflops: the dense conv's nominal FLOPs / time for dense and for spectral (so spectral's figure is
"dense-equivalent"), and the float32 GEMM rate measured in the same run (peak reference).
--timer cpu measures process CPU time (with --threads 1: the kernel's own time, robust to other
jobs on the machine); wall is wall-clock (the targets' measure, needs a quiet machine).
"""
import argparse
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import medconv_ext as mc  # noqa: E402
from medconv_ext.ops import rolling_conv_spectral_cpu as fused  # noqa: E402

SETS = {  # dims, C, S, k   (N=1, single roll, stride 1, "same" padding)
    "fused": [(2, 64, 256, 3), (2, 64, 512, 3), (2, 128, 128, 3), (2, 128, 256, 3), (2, 512, 32, 3),
              (3, 64, 24, 5), (3, 128, 16, 5)],
    "small": [(2, c, s, 3) for c in (16, 32, 64, 128, 256) for s in (16, 32, 64, 128)]
    + [(3, c, s, 3) for c in (16, 32, 64) for s in (12, 16)],
}
SETS["all"] = SETS["fused"] + SETS["small"]
CL = {2: torch.channels_last, 3: torch.channels_last_3d}


def timer_ms(fn, budget, kind):
    clock = time.perf_counter if kind == "wall" else time.process_time
    for _ in range(2):
        fn()
    times = []
    t_all = time.perf_counter()
    while len(times) < 50 and (len(times) < 5 or time.perf_counter() - t_all < budget):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    return statistics.median(times)


def gemm_gflops(budget, kind):
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048 ** 3 / timer_ms(lambda: torch.mm(a, b), budget, kind) / 1e6


def runner(fn, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn()
    else:
        def run():
            fn().sum().backward()
    return run


def overhead(threads, budget):
    """Per-call cost of the Python layers (microseconds, inference, 1 sample, 25th percentile of single calls):
    the functional API and the nn module against the op they end in, for the fused kernel (2D 3x3 C=16 at 16^2)
    and the bank + oneDNN conv (the same layer with a gradient-free C=16 at 128^2 in channels-last)."""
    torch.set_num_threads(threads)

    def t_us(fn):
        for _ in range(20):
            fn()
        ts, t0 = [], time.perf_counter()
        while len(ts) < 20000 and (len(ts) < 200 or time.perf_counter() - t0 < budget):
            a = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - a)
        ts.sort()
        return ts[len(ts) // 4] * 1e6

    from medconv_ext.ops.rolling_conv import _auto_candidates, expand_bank
    x = torch.randn(1, 16, 16, 16)
    w = torch.randn(1, 16, 3, 3)
    m = mc.nn.RollingConv2d(16, 16, 3, padding=1, bias=False)
    m.weight.data.copy_(w)
    op = torch.ops.medconv.rolling_conv_spectral.default
    one = [1, 1]

    def kernel():
        with torch._C._AutoDispatchBelowAutograd():
            return op(x, w, None, None, None, False, one, one, one, 16)
    xl = torch.randn(1, 16, 128, 128).contiguous(memory_format=torch.channels_last)
    print("per-call cost, %d thread(s), load %.2f, kernel ISA copy %s (C=16), float32, no grad"
          % (threads, os.getloadavg()[0], fused.isa(16)))
    with torch.no_grad():
        k = t_us(kernel)
        print("  fused op alone (below autograd)            %7.1f us   (auto picks %s)"
              % (k, _auto_candidates(x, w, False, 16)[0]))
        for name, fn in (("torch.ops.medconv.rolling_conv_spectral", lambda: torch.ops.medconv.rolling_conv_spectral(
                x, w, None, None, None, False, one, one, one, 16)),
                         ("rolling_conv2d(x, w, padding=1)", lambda: mc.rolling_conv2d(x, w, padding=1)),
                         ("RollingConv2d module", lambda: m(x))):
            v = t_us(fn)
            print("  %-42s %7.1f us   (%+.1f)" % (name, v, v - k))
        bank = expand_bank(w, 16)
        d = t_us(lambda: F.conv2d(xl, bank, None, 1, 1))
        print("  dense conv alone, C=16 128^2 channels-last %7.1f us   (auto picks %s)"
              % (d, _auto_candidates(xl, w, False, 16)[0]))
        for name, fn in (("bank gather (expand_bank)", lambda: expand_bank(w, 16)),
                         ("rolling_conv2d(..., backend=\"reference\")",
                          lambda: mc.rolling_conv2d(xl, w, padding=1, backend="reference"))):
            v = t_us(fn)
            print("  %-42s %7.1f us   (%+.1f)" % (name, v, v - (0 if "gather" in name else d)))
    # a training step (forward + backward, gradients of x and w) of the fused kernel: its kernels alone, through
    # the eager path of rolling_conv2d, and through torch.library's registered autograd layer
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    gi = torch.ops.medconv.rolling_conv_spectral_grad_input.default
    gw = torch.ops.medconv.rolling_conv_spectral_grad_weight.default
    ones = torch.ones(1, 16, 16, 16)

    def kernels():
        with torch._C._AutoDispatchBelowAutograd():
            op(x, w, None, None, None, False, one, one, one, 16)
            gi(ones, w, [1, 16, 16, 16], one, one, one, 16)
            gw(ones, x, [1, 16, 3, 3], one, one, one, 16)
    k = t_us(kernels)
    with torch.enable_grad():
        picked = _auto_candidates(xg, wg, False, 16)[0]
    print("  training step, C=16 16^2 (y.sum().backward(); auto picks %s):" % picked)
    print("  %-42s %7.1f us" % ("its three kernels alone", k))
    dense_w = expand_bank(w, 16).requires_grad_(True)
    for name, fn in (("dense conv2d step", lambda: F.conv2d(xg, dense_w, None, 1, 1).sum().backward()),
                     ("rolling_conv2d(x, w, padding=1) step", lambda: mc.rolling_conv2d(xg, wg, padding=1).sum().backward()),
                     ("torch.ops.medconv.rolling_conv_spectral step", lambda: torch.ops.medconv.rolling_conv_spectral(
                         xg, wg, None, None, None, False, one, one, one, 16).sum().backward())):
        v = t_us(fn)
        print("  %-42s %7.1f us   (%+.1f)" % (name, v, v - k))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="fused", choices=sorted(SETS))
    ap.add_argument("--shape", action="append", help="dims,C,S,k[,n_rolls] (repeatable; replaces --set)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", default="auto", help="comma list of auto,avx512,avx2,generic; 'all': auto and "
                    "every copy this CPU runs (auto: the default selection, the copy it picked is named)")
    ap.add_argument("--transform", default="auto", help="comma list of the fused kernel's channel transforms: "
                    "auto (the FFT where C_in allows it), fft, gemm (the folded DFT GEMMs); each row names the one run")
    ap.add_argument("--mode", default="fwd,fwdbwd")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or both: float32,bfloat16")
    ap.add_argument("--timer", default="wall", choices=["wall", "cpu"])
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    ap.add_argument("--no-auto", action="store_true")
    ap.add_argument("--auto-only", action="store_true", help="dense and auto only (no spectral/reference columns)")
    ap.add_argument("--csv", default=None, help="write the rows here (default bench/out/cpu/rolling_conv_fused_isa.csv)")
    ap.add_argument("--overhead", action="store_true", help="only the per-call cost of the Python layers")
    a = ap.parse_args()
    if a.overhead:
        overhead(a.threads, a.budget)
        return
    torch.set_num_threads(a.threads)
    dtypes = a.dtype.split(",")
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            ap.error("--dtype: float32 and/or bfloat16, got %r" % d)
    isas = ["auto"] + fused.supported_isas() if a.isa == "all" else a.isa.split(",")
    transforms = a.transform.split(",")
    for t in transforms:
        if t not in fused.TRANSFORMS:
            ap.error("--transform: a comma list of %s, got %r" % (", ".join(fused.TRANSFORMS), t))
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shape] if a.shape else SETS[a.set]
    load0 = os.getloadavg()[0]
    peak = gemm_gflops(a.budget, a.timer)
    print("threads=%d timer=%s dtype=%s load=%.2f; float32 GEMM 2048^3: %.0f GFLOP/s; oneDNN dense conv; "
          "kernel ISA copies %s" % (a.threads, a.timer, a.dtype, load0, peak, ",".join(isas)))
    hdr = ("shape", "dtype", "mode", "isa", "dense_ms", "dense_layout", "spectral_ms", "spectral_layout", "speedup",
           "auto", "auto_layout", "auto_nchw", "auto_cl", "auto_backend", "ref_nchw", "ref_cl", "spec_nchw", "spec_cl",
           "dense_gflops", "spectral_gflops", "gemm_gflops", "load")
    fmt_h = "%-24s %-8s %-6s %-16s %9s %-5s %11s %-5s %7s %5s %-5s %9s %7s %-9s %8s %6s %9s %7s %8s %8s"
    fmt_r = ("%-24s %-8s %-6s %-16s %9.3f %-5s %11.3f %-5s %7.2f %5.2f %-5s %9.2f %7.2f %-9s %8.2f %6.2f %9.2f %7.2f "
             "%8.0f %8.0f")
    print(fmt_h % hdr[:20])
    rows = []
    for dtype_name, sh in [(d, sh) for d in dtypes for sh in shapes]:
        dtype = getattr(torch, dtype_name)
        dims, C, S, k = sh[:4]
        nr = sh[4] if len(sh) > 4 else C
        conv = {2: F.conv2d, 3: F.conv3d}[dims]
        rc = {2: mc.rolling_conv2d, 3: mc.rolling_conv3d}[dims]
        x0 = torch.randn(1, C, *[S] * dims).to(dtype)
        w = (torch.randn(1, C, *[k] * dims) * 0.05).to(dtype)
        W = torch.randn(nr, C, *[k] * dims).to(dtype) * 0.05
        pad = k // 2
        flops = 2.0 * nr * C * k ** dims * S ** dims
        shape = "%dd C=%d S=%d k=%d" % (dims, C, S, k) + ("" if nr == C else " r=%d" % nr)
        for mode in a.mode.split(","):
            grad = mode != "fwd"
            xs = {"nchw": x0.clone(), "cl": x0.contiguous(memory_format=CL[dims])}
            for t in xs.values():
                t.requires_grad_(grad)
            ws = w.clone().requires_grad_(grad)
            Ws = {"nchw": W.clone().requires_grad_(grad), "cl": W.contiguous(memory_format=CL[dims]).requires_grad_(grad)}
            dense = {lay: timer_ms(runner(lambda lay=lay: conv(xs[lay], Ws[lay], None, 1, pad), mode), a.budget,
                                   a.timer) for lay in ("nchw", "cl")}
            dl = min(dense, key=dense.get)
            nan = float("nan")
            for isa, transform in [(i, t) for i in isas for t in transforms]:
                with fused.use_isa(isa), fused.use_channel_transform(transform):
                    spec = {"nchw": nan, "cl": nan}
                    if not a.auto_only:
                        spec = {lay: timer_ms(runner(lambda lay=lay: rc(xs[lay], ws, None, 1, pad, n_rolls=nr,
                                                                        backend="spectral"), mode), a.budget, a.timer)
                                for lay in ("nchw", "cl")}
                    sl = min(spec, key=spec.get)
                    auto, be, ref, auto_ms = {}, "-", {}, {}
                    if not a.no_auto:
                        for lay in ("nchw", "cl") if not a.auto_only else ():
                            ref[lay] = dense[lay] / timer_ms(runner(
                                lambda lay=lay: rc(xs[lay], ws, None, 1, pad, n_rolls=nr, backend="reference"), mode), a.budget,
                                a.timer)
                        from medconv_ext.ops.rolling_conv import _auto_candidates
                        with torch.set_grad_enabled(grad):
                            be = "/".join(_auto_candidates(xs[lay], ws, False, nr)[0][:4] for lay in ("nchw", "cl"))
                        for lay in ("nchw", "cl"):
                            auto_ms[lay] = timer_ms(runner(lambda lay=lay: rc(xs[lay], ws, None, 1, pad, n_rolls=nr), mode),
                                                    a.budget, a.timer)
                            auto[lay] = dense[lay] / auto_ms[lay]
                    al = min(auto_ms, key=auto_ms.get) if auto_ms else "-"
                    label = (isa if isa != "auto" else "auto:" + fused.isa(C, dtype)) + "/" + fused.transform_for(C)
                row = dict(shape=shape, dtype=dtype_name, mode=mode, isa=label, dense_ms=dense[dl], dense_layout=dl,
                           spectral_ms=spec[sl], spectral_layout=sl, speedup=dense[dl] / spec[sl],
                           auto=dense[dl] / auto_ms[al] if auto_ms else nan, auto_layout=al,
                           auto_nchw=auto.get("nchw", nan), auto_cl=auto.get("cl", nan), auto_backend=be,
                           ref_nchw=ref.get("nchw", float("nan")), ref_cl=ref.get("cl", float("nan")),
                           spec_nchw=dense["nchw"] / spec["nchw"], spec_cl=dense["cl"] / spec["cl"],
                           dense_gflops=flops * (3 if grad else 1) / dense[dl] / 1e6,
                           spectral_gflops=flops * (3 if grad else 1) / spec[sl] / 1e6, gemm_gflops=peak,
                           load=os.getloadavg()[0])
                rows.append(row)
                print(fmt_r % tuple(row[h] for h in hdr[:20]), flush=True)
    path = a.csv or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "cpu", "rolling_conv_fused_isa.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(hdr) + ["threads", "timer"])
        wr.writeheader()
        for r in rows:
            wr.writerow(dict(r, threads=a.threads, timer=a.timer))
    print("load average %.2f before, %.2f after; rows in %s" % (load0, os.getloadavg()[0], path))


if __name__ == "__main__":
    main()
