"""Whole models, each in its faster memory layout: CPU inference of one 512x512 slice for the
Rolling UNet, the dense UNet and the depthwise-separable UNet (eval mode), and one CPU training
step (forward + backward + Adam, L1) of the QSMnets at width 16, batch 2 of 32^3, each in NC(D)HW
and channels-last. Prints per model the time in each layout, the faster one, and the ratio to the
dense model in its faster layout.

Eval-mode models run as users run them: a rolling layer followed by BatchNorm + ReLU runs as one
fused call with the BatchNorm folded into its epilogue (automatic in eval, medconv_ext/nn/fuse.py).
The training step uses the same torch.optim.Adam implementation for every model (--adam; default
"fused", torch's single-kernel CPU Adam, the fastest of the three measured in docs/models.md).

    PYTHONPATH=. python bench/bench_models_layouts.py [--threads 2] [--reps 3] [--no-qsm]
        [--adam default|foreach|fused] [--timer wall|thread]
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from medconv_ext import models as M  # noqa: E402


def _fmt(layout):
    return torch.channels_last if layout == "cl" else torch.contiguous_format


def _fmt3(layout):
    return torch.channels_last_3d if layout == "cl" else torch.contiguous_format


_CLOCK = time.perf_counter


def _median_s(fn, reps):
    fn()  # warm-up (tables, allocator)
    ts = []
    for _ in range(reps):
        t = _CLOCK()
        fn()
        ts.append(_CLOCK() - t)
    return statistics.median(ts)


def infer(name, reps, size):
    torch.manual_seed(0)
    model = getattr(M, name)().eval()
    out = {}
    for lay in ("nchw", "cl"):
        m = model.to(memory_format=_fmt(lay))
        x = torch.randn(1, 1, size, size).contiguous(memory_format=_fmt(lay))
        with torch.inference_mode():
            out[lay] = _median_s(lambda: m(x), reps)
    return out


def qsm_step(name, reps, adam="fused"):
    torch.manual_seed(0)
    out = {}
    for lay in ("nchw", "cl"):
        model = getattr(M, name)(features=16).train().to(memory_format=_fmt3(lay))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, **({} if adam == "default" else {adam: True}))
        x = torch.randn(2, 1, 32, 32, 32).contiguous(memory_format=_fmt3(lay))
        y = torch.randn(2, 1, 32, 32, 32)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = (model(x) - y).abs().mean()
            loss.backward()
            opt.step()
        out[lay] = _median_s(step, reps)
    return out


def _report(title, rows, dense):
    print(title)
    best_dense = min(rows[dense].values())
    for name, t in rows.items():
        lay = min(t, key=t.get)
        print("  %-18s nchw %8.3f s  channels-last %8.3f s  faster: %-4s  / %s (faster layout): %.2fx"
              % (name, t["nchw"], t["cl"], lay, dense, t[lay] / best_dense))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--no-qsm", action="store_true")
    ap.add_argument("--timer", choices=("wall", "thread"), default="wall",
                    help="wall: wall-clock time; thread: CPU time of the calling thread (needs --threads 1; "
                         "less sensitive to other work on a shared machine)")
    ap.add_argument("--adam", choices=("default", "foreach", "fused"), default="fused",
                    help="torch.optim.Adam implementation of every model's training step (default: fused)")
    a = ap.parse_args()
    if a.timer == "thread" and a.threads != 1:
        ap.error("--timer thread measures one thread's CPU time: it needs --threads 1, got --threads %d" % a.threads)
    global _CLOCK
    _CLOCK = time.thread_time if a.timer == "thread" else time.perf_counter
    torch.set_num_threads(a.threads)
    from medconv_ext.ops import rolling_conv_spectral_cpu as SC
    print("%s, %d threads, %s time, torch %s, fused kernel ISA %s, load average %.2f"
          % (platform.processor() or platform.machine(), a.threads, a.timer, torch.__version__,
             SC.isa() if SC.available() else "n/a", os.getloadavg()[0]))
    rows = {n: infer(n, a.reps, a.size) for n in ("unet", "rolling_unet", "depthwise_unet")}
    _report("inference, one %dx%d slice, eval (rolling layers: BatchNorm + ReLU folded into the epilogue)"
            % (a.size, a.size), rows, "unet")
    if not a.no_qsm:
        rows = {n: qsm_step(n, a.reps, a.adam) for n in ("qsmnet", "rolling_qsmnet", "depthwise_qsmnet")}
        _report("training step, width 16, batch 2 of 32^3, L1 + Adam (%s)" % a.adam, rows, "qsmnet")
    print("load average after: %.2f" % os.getloadavg()[0])


if __name__ == "__main__":
    main()
