"""Involution benchmark: time and peak memory of every available backend
against the unfold baseline (the published implementation; backend "reference").

CPU list, batch 8: 2D K in {3, 7} at C = 64, 128, 256 at 56, 28, 14 px, G = C/16;
3D K = 3, C = 32 at 32^3 (batch 2: the unfold baseline needs about 1 GB per 3D sample).
GPU list (when a CUDA device is present), batch 32: RedNet shapes C = 64, 128, 256,
512 at 56, 28, 14, 7 px, K = 3, G = C/16; 3D K = 3, C = 32 at 64^3 (batch 2); float32 and
bfloat16; backends cuda and triton against unfold and `naive_per_output` (from
bench/naive_involution.py when that file exists).
Modes: "fwd" (no autograd) and "fwd+bwd" (forward, then backward to x and weight).

    python bench/bench_involution.py [--quick] [--device cpu|cuda|all] [--only TEXT] [--out CSV] [--no-plot]

CSV: bench/out/<device>/involution.csv (columns of bench/harness.py plus the ratios to
unfold), a plot beside it (involution.png).
"""
import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import harness  # noqa: E402  (also puts the repository root on sys.path)
import medconv_ext  # noqa: E402,F401
from medconv_ext.backends import available_backends  # noqa: E402
from medconv_ext.ops.involution import involution2d, involution3d  # noqa: E402

OP = "involution"
EXTRA = ["speedup_vs_unfold", "mem_ratio_vs_unfold"]


# ---------------------------------------------------------------- CPU peak memory
# ---------------------------------------------------------------- shapes
def cpu_shapes(quick):
    shapes = []
    for k in (3, 7):
        for c, s in ((64, 56), (128, 28), (256, 14)):
            if quick and c != 64:
                continue
            shapes.append(dict(dims=2, n=8, c=c, s=s, k=k, g=c // 16))
    shapes.append(dict(dims=3, n=2, c=32, s=16 if quick else 32, k=3, g=2))
    return shapes


def gpu_shapes(quick):
    shapes = []
    for c, s in ((64, 56), (128, 28), (256, 14), (512, 7)):
        if quick and c not in (64, 512):
            continue
        shapes.append(dict(dims=2, n=32, c=c, s=s, k=3, g=c // 16))
    shapes.append(dict(dims=3, n=2, c=32, s=32 if quick else 64, k=3, g=2))
    return shapes


def parse_shape(text):
    import argparse
    import re

    m = re.fullmatch(r"\s*([23])d\s+N=(\d+)\s+C=(\d+)\s+S=(\d+)\s+K=(\d+)\s+G=(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError("shape must look like '2d N=8 C=64 S=56 K=7 G=4', got %r" % text)
    d, n, c, s, k, g = (int(v) for v in m.groups())
    if c % g:
        raise argparse.ArgumentTypeError("G=%d must divide C=%d" % (g, c))
    return dict(dims=d, n=n, c=c, s=s, k=k, g=g)


# dtype labels: "float32-tf32" is float32 with PyTorch's default TF32 flags on CUDA (cuDNN on, cuBLAS off);
# plain "float32" rows on CUDA run with TF32 off.
DTYPE_LABELS = {"float32": torch.float32, "float32-tf32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "float64": torch.float64}


def smoke_shapes():
    return [dict(dims=2, n=2, c=16, s=9, k=3, g=1), dict(dims=3, n=1, c=16, s=5, k=3, g=1)]


def shape_str(sh):
    return "%dd N=%d C=%d S=%d K=%d G=%d" % (sh["dims"], sh["n"], sh["c"], sh["s"], sh["k"], sh["g"])


# ---------------------------------------------------------------- implementations
def _backend_impl(name):
    def run(x, w, k):
        fn = involution2d if x.dim() == 4 else involution3d
        return fn(x, w, k, 1, (k - 1) // 2, 1, backend=name)
    return run


def _naive_impl():
    """`naive_per_output` from bench/naive_involution.py (written with the GPU kernels), or the
    reason it is missing. Expected signature: fn(x, weight, kernel_size, stride, padding, dilation)."""
    path = os.path.join(HERE, "naive_involution.py")
    if not os.path.exists(path):
        return None, "bench/naive_involution.py does not exist"
    try:
        import naive_involution  # noqa: WPS433
    except Exception as e:  # pragma: no cover - depends on that file
        return None, "importing bench/naive_involution.py failed: %s" % e
    fn = getattr(naive_involution, "naive_per_output", None)
    if fn is None:
        return None, "bench/naive_involution.py has no function naive_per_output"

    def run(x, w, k):
        d = x.dim() - 2
        return fn(x, w, [k] * d, [1] * d, [(k - 1) // 2] * d, [1] * d)
    return run, None


def impls_for(device, dtype):
    """[(impl name, fn)] available on this device; prints why others are left out."""
    avail = available_backends()
    out = []
    names = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    for name in names:
        ok, why = avail[name]
        if name == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            ok, why = False, "interpreter mode (TRITON_INTERPRET=1) is not benchmarked"
        if not ok:
            print("  (skipping %s: %s)" % (name, why))
            continue
        out.append((name, _backend_impl(name)))
    out.append(("unfold", _backend_impl("reference")))
    if device.type == "cuda":
        fn, why = _naive_impl()
        if fn is None:
            print("  (skipping naive_per_output: %s)" % why)
        else:
            out.append(("naive_per_output", fn))
    return out


# ---------------------------------------------------------------- one measurement
def make_inputs(sh, device, dtype):
    d, n, c, s, k, g = sh["dims"], sh["n"], sh["c"], sh["s"], sh["k"], sh["g"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, *([s] * d), generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(n, g, *([k] * d), *([s] * d), generator=gen) / k ** d).to(device=device, dtype=dtype)
    return x, w


def measure(fn, sh, mode, device, dtype, reps):
    x, w = make_inputs(sh, device, dtype)
    k = sh["k"]
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(x, w, k)
    else:
        x.requires_grad_(True)
        w.requires_grad_(True)
        gy = torch.randn_like(fn(x, w, k).detach())

        def call():
            x.grad = None
            w.grad = None
            y = fn(x, w, k)
            y.backward(gy)
            return None
    ms = harness.time_ms(call, device, **reps)
    x.grad = None  # so that the memory baseline does not hold the previous call's gradients
    w.grad = None
    mb = harness.measure_peak_mb(call, device)
    return ms, mb


def run_list(results, shapes, device, dtypes, reps):
    for dtype in dtypes:
        label = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
        dtype = DTYPE_LABELS[label]
        if device.type == "cuda":  # float32: TF32 off; float32-tf32: PyTorch's defaults
            torch.backends.cudnn.allow_tf32 = label == "float32-tf32"
            torch.backends.cuda.matmul.allow_tf32 = False
        elif label == "float32-tf32":
            raise SystemExit("--dtype float32-tf32 needs CUDA (TF32 is a CUDA setting)")
        impls = impls_for(device, dtype)
        for sh in shapes:
            for mode in ("fwd", "fwd+bwd"):
                rows = {}
                for name, fn in impls:
                    try:
                        ms, mb = measure(fn, sh, mode, device, dtype, reps)
                    except Exception as e:  # one failing impl (e.g. out of memory) must not stop the run
                        print("  %s %s %s failed: %s: %s" % (name, mode, shape_str(sh), type(e).__name__,
                                                             str(e).splitlines()[0][:200]))
                        continue
                    rows[name] = results.add(op=OP, impl=name, dtype=label, mode=mode,
                                             shape=shape_str(sh), median_ms=ms, peak_mem_mb=mb)
                base = rows.get("unfold")
                for r in rows.values():
                    if base is not None:
                        r["speedup_vs_unfold"] = base["median_ms"] / r["median_ms"] if r["median_ms"] else float("nan")
                        r["mem_ratio_vs_unfold"] = (base["peak_mem_mb"] / r["peak_mem_mb"]
                                                    if r["peak_mem_mb"] and not math.isnan(r["peak_mem_mb"]) else float("nan"))
                if device.type == "cuda":
                    torch.cuda.empty_cache()


# ---------------------------------------------------------------- plot
def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # pragma: no cover
        print("no plot (matplotlib unavailable: %s)" % e)
        return None
    rows = results.rows
    keys = []
    for r in rows:
        key = (r["dtype"], r["mode"], r["shape"])
        if key not in keys:
            keys.append(key)
    impls = []
    for r in rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    by = {(r["dtype"], r["mode"], r["shape"], r["impl"]): r for r in rows}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(keys) + 2), 9), squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, col, label in ((axes[0][0], "median_ms", "median time (ms)"), (axes[1][0], "peak_mem_mb", "peak memory (MB)")):
        for i, impl in enumerate(impls):
            vals = [by.get(k + (impl,), {}).get(col, float("nan")) for k in keys]
            vals = [v if isinstance(v, float) and v > 0 else float("nan") for v in vals]
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=impl)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels(["%s\n%s %s" % (k[2], k[0], k[1]) for k in keys], rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    axes[0][0].set_title("involution on %s" % harness.device_name(results.device))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print("wrote %s" % os.path.relpath(path, harness.ROOT))
    return path


def summarize(results):
    for r in results.rows:
        if r["impl"] != "unfold" and r.get("speedup_vs_unfold") not in ("", None):
            print("  %-16s %-9s %-8s %-30s %6.2fx faster, %6.2fx less peak memory than unfold" % (
                r["impl"], r["dtype"], r["mode"], r["shape"], r["speedup_vs_unfold"], r["mem_ratio_vs_unfold"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--smoke", action="store_true", help="two tiny shapes (seconds; used by the tests)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="cpu: the CPU list; cuda: the GPU list; all (default): CPU list, plus GPU list if CUDA is present")
    ap.add_argument("--out", default=None, help="CSV path (default bench/out/<device>/involution.csv); "
                    "with --device all and a GPU the GPU CSV gets the suffix _cuda")
    ap.add_argument("--only", default=None, help="keep only shapes whose label contains this text, e.g. 'C=64 S=56 K=7'")
    ap.add_argument("--shape", action="append", type=parse_shape, default=None,
                    help="custom case(s) replacing the shape lists, e.g. '2d N=8 C=64 S=56 K=7 G=4'")
    ap.add_argument("--dtype", default=None, help="comma list replacing the dtypes (default: float32 on the CPU, "
                    "float32,bfloat16 on CUDA); float32-tf32 on CUDA: float32 with PyTorch's default TF32 flags")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        reps = dict(warmup=1, min_reps=2, max_reps=3, budget_s=0.05)
    elif args.quick:
        reps = dict(warmup=1, min_reps=3, max_reps=10, budget_s=0.5)
    else:
        reps = dict(warmup=2, min_reps=5, max_reps=30, budget_s=2.0)
    runs = []
    if args.device in ("cpu", "all"):
        runs.append(("cpu", smoke_shapes() if args.smoke else cpu_shapes(args.quick), [torch.float32]))
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device visible")
            return 1
        runs.append(("cuda", smoke_shapes() if args.smoke else gpu_shapes(args.quick), [torch.float32, torch.bfloat16]))
    if args.shape:
        runs = [(d, list(args.shape), dt) for d, shapes, dt in runs]
    if args.dtype:
        labels = args.dtype.split(",")
        for lab in labels:
            if lab not in DTYPE_LABELS:
                ap.error("--dtype: unknown %r (choose from %s)" % (lab, ", ".join(DTYPE_LABELS)))
        runs = [(d, shapes, labels) for d, shapes, dt in runs]
    if args.only:
        runs = [(d, [sh for sh in shapes if args.only in shape_str(sh)], dt) for d, shapes, dt in runs]
    written = []
    for dev_name, shapes, dtypes in runs:
        device = torch.device(dev_name)
        if dev_name == "cpu" and not harness.exact_cpu_peaks():
            print("  (note: not glibc; CPU peak memory may miss buffers that reuse freed heap pages)")
        print("involution on %s (%s)" % (harness.device_name(device), ", ".join(str(d) for d in dtypes)), flush=True)
        results = harness.Results("involution", device, EXTRA)
        run_list(results, shapes, device, dtypes, reps)
        path = args.out
        if path is not None and len(runs) > 1 and dev_name == "cuda":
            root, ext = os.path.splitext(path)
            path = root + "_cuda" + ext
        path = results.write_csv(path)
        summarize(results)
        if not args.no_plot:
            plot(results, os.path.splitext(path)[0] + ".png")
        written.append(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
