"""Model-level benchmark of the rolling-filters models (bench/harness.py; `make bench` runs it).

CPU: inference time and peak memory per 512x512 slice (batch 1, fp32, torch.inference_mode) for
  rolling_unet      the default backend ("auto"; the backend it picks per layer is printed)
  unet              the dense UNet
  rolling_unet      through the published "roll_loop" path (bank rebuilt with a Python torch.roll
                    loop + torch.cat on every call, then the dense conv)
CUDA (when a GPU is visible): training step time (forward + backward + Adam step) and peak memory
  for unet, rolling_unet, qsmnet and rolling_qsmnet, fp32 and bf16 autocast, at
  UNet: batch 8 of 512x512 slices (cross-entropy, 3 classes); QSMnet: batch 16 of 64^3 patches (L1).
CSV: bench/out/<device>/models.csv.  --quick: fewer repetitions.

CPU (with --qsm-step): one training step of rolling_qsmnet and qsmnet at width 16, batch 2 of 32^3.

Goals on 2 CPU cores: rolling_unet at most 0.45x the dense unet's time per 512^2 slice in eval
mode; the rolling_qsmnet training step at most 0.5x the dense qsmnet's.
"""
import argparse
import copy
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import Results, measure_peak_mb, time_ms  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from medconv_ext import models as M  # noqa: E402
from medconv_ext.nn import (RollingConv2d, RollingConv3d, RollingConvTranspose2d,  # noqa: E402
                            RollingConvTranspose3d)

UNET_EVAL_GOAL = 0.45   # rolling_unet / unet time per 512^2 slice, eval, CPU
QSM_STEP_GOAL = 0.5     # rolling_qsmnet / qsmnet training step, width 16, batch 2 of 32^3, CPU
ROLLING = (RollingConv2d, RollingConv3d, RollingConvTranspose2d, RollingConvTranspose3d)
EXTRA = ["params", "batch", "backend", "note"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def backend_choice(model, x):
    """Run model(x) once and record, per rolling layer, the backend that backend="auto" resolves to
    (the same resolver the op calls). Returns [(layer, input shape, backend)]."""
    try:
        from medconv_ext.ops.rolling_conv import OP, OP_T, _choose
    except ImportError as e:  # internals moved: report rather than fail the benchmark
        print("  (backend choice not available: %s)" % e)
        with torch.inference_mode():
            model(x)
        return []
    seen, hooks = [], []
    for name, m in model.named_modules():
        if isinstance(m, ROLLING):
            def hook(mod, inp, name=name):
                t = isinstance(mod, (RollingConvTranspose2d, RollingConvTranspose3d))
                try:
                    b = _choose(OP_T if t else OP, inp[0], mod.weight, mod.backend, t, mod.n_rolls)[0]
                except Exception as e:  # noqa: BLE001 - shown in the table
                    b = "error: %s" % e
                seen.append((name, tuple(inp[0].shape), b))
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def bench_cpu(args):
    dev = torch.device("cpu")
    res = Results("models", dev, EXTRA)
    s = args.size
    shape = "1x1x%dx%d" % (s, s)
    x = torch.randn(1, 1, s, s)
    reps = dict(warmup=1, min_reps=1, max_reps=1, budget_s=0.0) if args.quick else \
        dict(warmup=1, min_reps=3, max_reps=5, budget_s=0.0)
    print("CPU inference, batch 1, fp32, %dx%d slice, %d threads (other processes on this machine affect timings)"
          % (s, s, torch.get_num_threads()), flush=True)
    rolling = M.rolling_unet().eval()
    dense = M.unet().eval()
    loop = M.to_roll_loop(rolling).eval()

    choice = backend_choice(rolling, x)
    if choice:
        print("  backend chosen by 'auto' per rolling layer of rolling_unet:")
        for name, shp, b in choice:
            print("    %-24s %-22s %s" % (name, "x".join(map(str, shp)), b))
    picked = sorted({b for _, _, b in choice})

    cases = [("rolling_unet[auto]", rolling, "+".join(picked) or "auto"),
             ("unet", dense, "torch conv2d"),
             ("rolling_unet[roll_loop]", loop, "torch.roll loop + conv2d")]
    for b in args.backends:  # optional: the rolling UNet pinned to one backend
        cases.append(("rolling_unet[%s]" % b, M.set_backend(copy.deepcopy(rolling), b), b))
    for impl, model, backend in cases:
        def run(model=model):
            with torch.inference_mode():
                return model(x)
        try:
            ms = time_ms(run, dev, **reps)
            mem = measure_peak_mb(run, dev)
        except Exception as e:  # noqa: BLE001 - e.g. a pinned backend that cannot run here
            print("  %s failed: %s" % (impl, str(e).splitlines()[0][:200]))
            continue
        res.add(op="models", impl=impl, dtype="float32", mode="infer", shape=shape, median_ms=ms, peak_mem_mb=mem,
                params=n_params(model), batch=1, backend=backend, note="per %dx%d slice" % (s, s))
    res.write_csv()
    by = {r["impl"]: r["median_ms"] for r in res.rows}
    if not all(k in by for k in ("rolling_unet[auto]", "unet", "rolling_unet[roll_loop]")):
        return res
    r, d, lp = by["rolling_unet[auto]"], by["unet"], by["rolling_unet[roll_loop]"]
    print("rolling_unet %.2f s, unet %.2f s, roll_loop %.2f s per slice: rolling/dense = %.2fx; goal <= %.2fx: %s"
          % (r / 1e3, d / 1e3, lp / 1e3, r / d, UNET_EVAL_GOAL, "met" if r / d <= UNET_EVAL_GOAL else "NOT met"))
    return res


def bench_cpu_qsm_step(args):
    """CPU training step (forward + backward + Adam, fp32) of the QSMnets at width 16, batch 2 of 32^3."""
    dev = torch.device("cpu")
    res = Results("models", dev, EXTRA)
    reps = dict(warmup=1, min_reps=2, max_reps=3, budget_s=0.0) if args.quick else \
        dict(warmup=1, min_reps=3, max_reps=10, budget_s=10.0)
    shape = (2, 1, 32, 32, 32)
    print("CPU training step, QSMnets at width 16, batch %d of %d^3 (fp32, L1, Adam)" % (shape[0], shape[2]),
          flush=True)
    for name, build in (("qsmnet", M.qsmnet), ("rolling_qsmnet", M.rolling_qsmnet)):
        torch.manual_seed(0)
        model = build(features=16).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x, target = torch.randn(shape), torch.randn(shape)

        def step(model=model, opt=opt, x=x, target=target):
            opt.zero_grad(set_to_none=True)
            loss = F.l1_loss(model(x), target)
            loss.backward()
            opt.step()
            return loss.detach()
        ms = time_ms(step, dev, **reps)
        res.add(op="models", impl=name, dtype="float32", mode="train", shape="x".join(map(str, shape)), median_ms=ms,
                peak_mem_mb=float("nan"), params=n_params(model), batch=shape[0], backend="auto",
                note="CPU training step, width 16")
        print("  %-15s %.0f ms per step" % (name, ms), flush=True)
    res.write_csv()
    by = {r["impl"]: r["median_ms"] for r in res.rows}
    ratio = by["rolling_qsmnet"] / by["qsmnet"]
    print("rolling_qsmnet/qsmnet training step = %.2fx; goal <= %.2fx: %s"
          % (ratio, QSM_STEP_GOAL, "met" if ratio <= QSM_STEP_GOAL else "NOT met"))
    return res


def _train_cases(tiny):
    if tiny:  # smoke run of the training path on any device
        return [("unet", lambda: M.unet(features=4), (2, 1, 32, 32), "ce"),
                ("rolling_unet", lambda: M.rolling_unet(features=4), (2, 1, 32, 32), "ce"),
                ("qsmnet", lambda: M.qsmnet(features=2), (2, 1, 16, 16, 16), "l1"),
                ("rolling_qsmnet", lambda: M.rolling_qsmnet(features=2), (2, 1, 16, 16, 16), "l1")]
    return [("unet", M.unet, (8, 1, 512, 512), "ce"),
            ("rolling_unet", M.rolling_unet, (8, 1, 512, 512), "ce"),
            ("qsmnet", M.qsmnet, (16, 1, 64, 64, 64), "l1"),
            ("rolling_qsmnet", M.rolling_qsmnet, (16, 1, 64, 64, 64), "l1")]


def bench_train(args, dev):
    res = Results("models", dev, EXTRA)
    reps = dict(warmup=1, min_reps=2, max_reps=3, budget_s=0.0) if args.quick else \
        dict(warmup=2, min_reps=5, max_reps=20, budget_s=5.0)
    print("training step (forward + backward + Adam) on %s" % dev, flush=True)
    for name, build, shape, loss_kind in _train_cases(args.tiny):
        model = build().to(dev).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randn(shape, device=dev)
        if loss_kind == "ce":
            target = torch.randint(0, 3, (shape[0],) + shape[2:], device=dev)
        else:
            target = torch.randn(shape, device=dev)
        for dtype in ("float32", "bfloat16"):
            def step(dtype=dtype):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                    y = model(x)
                    loss = F.cross_entropy(y.float(), target) if loss_kind == "ce" else F.l1_loss(y.float(), target)
                loss.backward()
                opt.step()
                return loss.detach()
            try:
                ms = time_ms(step, dev, **reps)
                mem = measure_peak_mb(step, dev)
                note = "fp32" if dtype == "float32" else "bf16 autocast"
            except Exception as e:  # noqa: BLE001 - recorded in the CSV (e.g. a backend without bf16 support)
                ms, mem, note = float("nan"), float("nan"), "failed: %s" % str(e).splitlines()[0][:120]
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            res.add(op="models", impl=name, dtype=dtype, mode="train", shape="x".join(map(str, shape)), median_ms=ms,
                    peak_mem_mb=mem, params=n_params(model), batch=shape[0], backend="auto", note=note)
        del model, opt, x, target
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    res.write_csv()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--size", type=int, default=512, help="CPU slice size (default 512)")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU inference part")
    p.add_argument("--backends", default="", type=lambda v: [b for b in v.split(",") if b],
                   help="also time rolling_unet pinned to these backends (comma-separated, e.g. spectral,cpu)")
    p.add_argument("--train-device", default=None,
                   help="device of the training part (default: cuda when available, else skipped)")
    p.add_argument("--tiny", action="store_true", help="training part at tiny sizes (smoke test)")
    p.add_argument("--qsm-step", action="store_true",
                   help="also time the CPU training step of the QSMnets (width 16, batch 2 of 32^3)")
    args = p.parse_args(argv)
    if not args.no_cpu:
        bench_cpu(args)
        if args.qsm_step:
            bench_cpu_qsm_step(args)
    dev = args.train_device or ("cuda" if torch.cuda.is_available() else None)
    if dev is None:
        print("no CUDA device: training-step benchmark skipped")
    else:
        bench_train(args, torch.device(dev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
