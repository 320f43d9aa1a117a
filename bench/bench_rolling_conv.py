"""Rolling-convolution microbenchmark: every available medconv backend against the
published approach and the dense layer it replaces.

Cases: 2D 3x3 with C in {32, 64, 128, 256, 512} and 3D 5x5x5 with C in {16, 32, 64, 128, 256},
single roll (n_base = 1, C_out = C_in), stride 1, "same" padding; N and S chosen per C so that a
case takes ~1-100 ms on 2 CPU cores. Modes: "fwd" (under torch.no_grad, inference) and
"fwdbwd" (forward + gradients of input and weights, training).

Impls:
  reference, cpu, spectral, auto [, cuda, triton on CUDA]   medconv_ext.rolling_conv{2,3}d(backend=...)
  roll_loop            the published approach: a Python loop of torch.roll + torch.cat builds the
                       bank on every call, then the dense conv
  dense                a dense conv of the same shape (C x C x k weights), what rolling replaces
  depthwise_separable  depthwise kxk + pointwise 1x1, same in/out channels

Output: a line per measurement, ratio tables (time of each impl / time of roll_loop and / dense:
below 1 is faster), bench/out/<device>/rolling_conv.csv (harness columns + vs_roll_loop,
vs_dense, max_rel_err) and rolling_conv.png (speed-up over dense per shape and impl).

    python bench/bench_rolling_conv.py [--quick] [--device cpu|cuda] [--dtype float32,bfloat16]
                                       [--mode fwd|fwdbwd|all] [--budget SECONDS]
"""
import argparse
import os
import re
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import medconv_ext  # noqa: E402
from medconv_ext import backends  # noqa: E402

OP = "rolling_conv"
CONV = {2: F.conv2d, 3: F.conv3d}
ROLLING = {2: medconv_ext.rolling_conv2d, 3: medconv_ext.rolling_conv3d}

# (dims, N, C, S, k). Sizes so that the dense conv takes ~1-100 ms forward on 2 CPU cores.
# The two cases the project's goals name: 2D C=512 at 32^2 and 3D C=128 at 16^3.
CPU_SHAPES = [
    (2, 1, 32, 128, 3), (2, 1, 64, 96, 3), (2, 1, 128, 64, 3), (2, 1, 256, 48, 3), (2, 1, 512, 32, 3),
    (3, 1, 16, 32, 5), (3, 1, 32, 24, 5), (3, 1, 64, 16, 5), (3, 1, 128, 16, 5), (3, 1, 256, 8, 5),
]
# On a GPU the same cases with a batch large enough to fill the device.
CUDA_SHAPES = [(d, 8 * n, c, s, k) for d, n, c, s, k in CPU_SHAPES]
QUICK_SHAPES = [(2, 1, 64, 32, 3), (2, 1, 512, 32, 3), (3, 1, 16, 16, 5), (3, 1, 128, 16, 5)]
# --set fused: the shapes of the fused spectral CPU kernel's targets (dense / spectral time, 2 threads,
# float32, N=1, "same" padding): (forward, forward+backward) minimum speed-ups.
FUSED_SHAPES = [(2, 1, 64, 256, 3), (2, 1, 64, 512, 3), (2, 1, 128, 128, 3), (2, 1, 128, 256, 3),
                (2, 1, 512, 32, 3), (3, 1, 64, 24, 5), (3, 1, 128, 16, 5)]
FUSED_TARGETS = {
    "2d N=1 C=64 S=256 k=3": (2.5, 1.5), "2d N=1 C=64 S=512 k=3": (2.5, 1.5),
    "2d N=1 C=128 S=128 k=3": (3.0, 2.0), "2d N=1 C=128 S=256 k=3": (3.0, 2.0),
    "2d N=1 C=512 S=32 k=3": (6.0, 3.0), "3d N=1 C=64 S=24 k=5": (6.0, 3.0), "3d N=1 C=128 S=16 k=5": (10.0, 5.0),
}
TARGETS = {  # (shape, minimum forward speed-up of "auto" over dense) the project's goals, CPU float32
    "2d N=1 C=512 S=32 k=3": 3.0,
    "3d N=1 C=128 S=16 k=5": 5.0,
}
BASELINES = ["roll_loop", "dense", "dense_cl", "depthwise_separable"]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "float32-tf32": torch.float32}
# On CUDA, "float32" rows run with TF32 off in cuDNN and cuBLAS (exact float32 for every impl alike: a
# comparison of algorithms); "float32-tf32" rows with PyTorch's defaults (cuDNN TF32 on, cuBLAS TF32 off),
# what a user who sets nothing gets. The fused spectral kernel uses tf32x3 dots in both.


def shape_str(dims, n, c, s, k) -> str:
    return "%dd N=%d C=%d S=%d k=%d" % (dims, n, c, s, k)


def parse_shape(text: str):
    m = re.fullmatch(r"\s*([23])d\s+N=(\d+)\s+C=(\d+)\s+S=(\d+)\s+k=(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError("shape must look like '3d N=1 C=128 S=16 k=5', got %r" % text)
    return tuple(int(v) for v in m.groups())


def roll_loop(x, w, pad):
    """The published construction, rebuilt on every call: roll the base by +1 along its channel
    axis C-1 times, concatenate along the output axis, convolve."""
    bank, cur = [w], w
    for _ in range(1, x.shape[1]):
        cur = torch.roll(cur, shifts=1, dims=1)
        bank.append(cur)
    return CONV[x.dim() - 2](x, torch.cat(bank, 0), None, 1, pad)


def medconv_impls(device: torch.device, dtype: torch.dtype, shape) -> Dict[str, Optional[str]]:
    """{backend: None if it can run this case, else why not} for the medconv backends to time."""
    dims, n, c, s, k = shape
    names = (["reference", "spectral", "spectral_unfused", "cpu"] if device.type == "cpu"
             else ["reference", "spectral", "spectral_unfused", "cuda", "triton"])
    x_shape, w_shape = (n, c) + (s,) * dims, (1, c) + (k,) * dims
    out = {}
    for name in names:
        try:
            backends.resolve(OP, name, device, dtype, [], ctx={"transposed": False, "x_shape": x_shape,
                                                              "w_shape": w_shape})
            out[name] = None
        except (RuntimeError, ValueError) as e:
            out[name] = str(e)
    out["auto"] = None
    return out


def _make_fn(impl: str, mode: str, dims: int, tensors: Dict[str, torch.Tensor], pad: int, grad_out: torch.Tensor):
    x = tensors["x"]
    if impl == "roll_loop":
        params = [x, tensors["w"]]
        fwd = lambda: roll_loop(x, tensors["w"], pad)  # noqa: E731
    elif impl == "dense":
        params = [x, tensors["w_dense"]]
        fwd = lambda: CONV[dims](x, tensors["w_dense"], None, 1, pad)  # noqa: E731
    elif impl == "dense_cl":  # the same dense conv on channels-last activations and weights
        params = [tensors["x_cl"], tensors["w_dense_cl"]]
        fwd = lambda: CONV[dims](tensors["x_cl"], tensors["w_dense_cl"], None, 1, pad)  # noqa: E731
    elif impl == "depthwise_separable":
        params = [x, tensors["w_dw"], tensors["w_pw"]]
        fwd = lambda: CONV[dims](CONV[dims](x, tensors["w_dw"], None, 1, pad, 1, x.shape[1]), tensors["w_pw"])  # noqa: E731
    elif impl.endswith("_cl"):  # a medconv backend on channels-last activations (its output stays channels-last)
        params = [tensors["x_cl"], tensors["w"]]
        fwd = lambda: ROLLING[dims](tensors["x_cl"], tensors["w"], None, padding=pad, backend=impl[:-3])  # noqa: E731
    else:
        params = [x, tensors["w"]]
        fwd = lambda: ROLLING[dims](x, tensors["w"], None, padding=pad, backend=impl)  # noqa: E731
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd()
        return run

    def run_bwd():
        y = fwd()
        return torch.autograd.grad(y, params, grad_out)
    return run_bwd


def time_thread_ms(fn, warmup: int = 2, min_reps: int = 5, max_reps: int = 50, budget_s: float = 0.5) -> float:
    """Median CPU time of the calling thread (ms): insensitive to other processes competing for the
    cores, meaningful with --threads 1 only (other threads' work is not counted)."""
    import statistics
    import time
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.thread_time()
        fn()
        times.append((time.thread_time() - t0) * 1e3)
    return statistics.median(times)


def bench_case(res: harness.Results, shape, device, dtype, modes, budget_s: float, skipped: Dict[str, str],
               timer: str = "wall", peak_mem: bool = True, only: Optional[List[str]] = None,
               dtype_label: Optional[str] = None):
    dims, n, c, s, k = shape
    pad = k // 2
    sh = shape_str(*shape)
    gen = torch.Generator().manual_seed(0)

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    fan = c * k ** dims
    tensors = {
        "x": rnd(n, c, *([s] * dims)),
        "w": rnd(1, c, *([k] * dims), scale=fan ** -0.5),
        "w_dense": rnd(c, c, *([k] * dims), scale=fan ** -0.5),
        "w_dw": rnd(c, 1, *([k] * dims), scale=k ** (-dims / 2)),
        "w_pw": rnd(c, c, *([1] * dims), scale=c ** -0.5),
    }
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    tensors["x_cl"] = tensors["x"].contiguous(memory_format=fmt)
    tensors["w_dense_cl"] = tensors["w_dense"].contiguous(memory_format=fmt)
    grad_out = rnd(n, c, *([s] * dims))
    impls = medconv_impls(device, dtype, shape)
    for name, why in impls.items():
        if why is not None:
            skipped.setdefault(name, why)
    names = [m for m, why in impls.items() if why is None]
    names.insert(names.index("auto") + 1, "auto_cl")  # each side in its faster layout: auto on channels-last too
    names += BASELINES
    if only:
        names = [m for m in names if m in only]
    # Correctness guard: a backend that computes garbage must not produce a benchmark number.
    with torch.no_grad():
        ref_out = ROLLING[dims](tensors["x"].double(), tensors["w"].double(), None, padding=pad, backend="reference")
    for mode in modes:
        for t in tensors.values():
            t.requires_grad_(mode == "fwdbwd")
        for impl in names:
            fn = _make_fn(impl, mode, dims, tensors, pad, grad_out)
            err = ""
            if impl not in ("dense", "dense_cl", "depthwise_separable") and mode == "fwd":
                y = fn()
                err = ((y.double() - ref_out).abs().max() / ref_out.abs().max()).item()
            if timer == "thread":
                ms = time_thread_ms(fn, budget_s=budget_s)
            else:
                ms = harness.time_ms(fn, device, budget_s=budget_s)
            mem = harness.measure_peak_mb(fn, device) if peak_mem else float("nan")
            gb, gf = work(impl, mode, shape, dtype)
            res.add(op=OP, impl=impl, dtype=dtype_label or str(dtype).replace("torch.", ""), mode=mode, shape=sh,
                    median_ms=ms, peak_mem_mb=mem, max_rel_err=err, gbytes=gb, gflop=gf,
                    bw_frac=gb / (ms * 1e-3) / MACHINE["copy_gbs"] if MACHINE.get("copy_gbs") else float("nan"),
                    flop_frac=gf / (ms * 1e-3) / MACHINE["peak_gflops"] if MACHINE.get("peak_gflops") else float("nan"))


# Measured in the same run (see measure_machine): copy bandwidth (GB/s, read + write bytes) and the
# float32 GEMM rate (GFLOP/s) standing for the peak, so that the distance to the limit is visible.
MACHINE: Dict[str, float] = {}


def measure_machine(device: torch.device, dtype: torch.dtype) -> Dict[str, float]:
    a = torch.empty(64 * 2 ** 20 // 4, device=device, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    ms = harness.time_ms(lambda: b.copy_(a), device, budget_s=0.2)
    m = torch.randn(1024, 1024, device=device, dtype=dtype)
    ms_mm = harness.time_ms(lambda: torch.mm(m, m), device, budget_s=0.2)
    return {"copy_gbs": 2 * a.numel() * 4 / (ms * 1e-3) / 1e9,
            "peak_gflops": 2 * 1024 ** 3 / (ms_mm * 1e-3) / 1e9}


def work(impl: str, mode: str, shape, dtype: torch.dtype):
    """(GB moved, GFLOP) of one call, by the algorithm behind impl (mode fwdbwd: about 3x fwd).
    Bytes: the activations read and written once (the least any implementation moves), plus weights.
    FLOPs (2 per multiply-add): dense C*C*taps per pixel; spectral: channel DFT C*C, per-frequency
    complex depthwise 2*C*taps (4 real multiply-adds per frequency, C/2 frequencies), inverse C*C."""
    dims, n, c, s, k = shape
    taps, px = k ** dims, n * s ** dims
    es = torch.finfo(dtype).bits // 8
    bytes_ = 2 * c * px * es + (c * c * taps if impl.startswith("dense") else c * taps) * es
    if impl in ("dense", "dense_cl", "roll_loop", "reference", "cpu"):
        macs = c * c * taps * px
    elif impl == "depthwise_separable":
        macs = (c * taps + c * c) * px
    else:  # spectral / spectral_unfused / auto (counted as spectral)
        macs = (c * c + 2 * c * taps + c * c) * px
    f = 3 if mode == "fwdbwd" else 1
    return f * bytes_ / 1e9, f * 2 * macs / 1e9


def _by_key(rows):
    out: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        out.setdefault((r["dtype"], r["mode"], r["shape"]), {})[r["impl"]] = r
    return out


def add_ratios(rows: List[dict]) -> None:
    for by_impl in _by_key(rows).values():
        best = min((by_impl[d] for d in ("dense", "dense_cl") if d in by_impl), key=lambda r: r["median_ms"],
                   default=None)
        for base, col in (("roll_loop", "vs_roll_loop"), ("dense", "vs_dense")):
            # vs_dense: against the faster of the NC(D)HW and channels-last dense conv
            b = best if base == "dense" else by_impl.get(base)
            for r in by_impl.values():
                r[col] = r["median_ms"] / b["median_ms"] if b and b["median_ms"] > 0 else float("nan")


def print_tables(rows: List[dict], impls: List[str]) -> None:
    for base in ("roll_loop", "dense"):
        print("\nTime ratio: impl / %s  (below 1 = faster than %s)" % (base, base))
        head = "%-9s %-7s %-24s" % ("dtype", "mode", "shape") + "".join("%12s" % i[:11] for i in impls)
        print(head)
        print("-" * len(head))
        for (dt, mode, sh), by_impl in _by_key(rows).items():
            if base not in by_impl:
                continue
            b = by_impl[base]["median_ms"]
            cells = "".join("%12s" % ("%.3f" % (by_impl[i]["median_ms"] / b) if i in by_impl else "-") for i in impls)
            print("%-9s %-7s %-24s" % (dt, mode, sh) + cells)


def best_layout(by_impl: Dict[str, dict], impl: str) -> Optional[dict]:
    """The faster row of impl on NC(D)HW input and on channels-last input (impl + "_cl"), where timed."""
    rows = [by_impl[i] for i in (impl, impl + "_cl") if i in by_impl]
    return min(rows, key=lambda r: r["median_ms"], default=None)


def check_targets(rows: List[dict]) -> List[str]:
    """The project's CPU goals, as lines of text (PASS/MISS); every side in its faster memory layout."""
    lines = []
    for (dt, mode, sh), by_impl in _by_key(rows).items():
        dense = [by_impl[d]["median_ms"] for d in ("dense", "dense_cl") if d in by_impl]
        auto = best_layout(by_impl, "auto")
        if dt == "float32" and sh in FUSED_TARGETS and dense:
            want = FUSED_TARGETS[sh][0 if mode == "fwd" else 1]
            for impl in ("spectral", "auto"):
                r = best_layout(by_impl, impl)
                if r is not None:
                    ratio = min(dense) / r["median_ms"]
                    lines.append("%s %-8s vs dense  %-7s %-24s %6.2fx faster (target >= %.1fx; %s)"
                                 % ("PASS" if ratio >= want else "MISS", impl, mode, sh, ratio, want, r["impl"]))
        if auto is not None and "roll_loop" in by_impl:
            ratio = by_impl["roll_loop"]["median_ms"] / auto["median_ms"]
            lines.append("%s auto vs roll_loop  %-7s %-24s %6.2fx faster" % ("PASS" if ratio >= 1 else "MISS", mode, sh, ratio))
        if mode == "fwd" and dt == "float32" and sh in TARGETS and auto is not None and dense:
            ratio = min(dense) / auto["median_ms"]
            lines.append("%s auto vs dense      %-7s %-24s %6.2fx faster (target >= %.0fx; %s)"
                         % ("PASS" if ratio >= TARGETS[sh] else "MISS", mode, sh, ratio, TARGETS[sh], auto["impl"]))
    return lines


def plot(rows: List[dict], impls: List[str], path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # matplotlib is a bench requirement; the numbers are in the CSV anyway
        print("no plot (%s)" % e)
        return None
    keys = sorted({(r["dtype"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(len(keys), 1, figsize=(12, 3.6 * len(keys)), squeeze=False)
    groups = _by_key(rows)
    for ax, (dt, mode) in zip(axes[:, 0], keys):
        shapes = [sh for (d, m, sh) in groups if d == dt and m == mode]
        for j, impl in enumerate(i for i in impls if i != "dense"):
            xs, ys = [], []
            for i, sh in enumerate(shapes):
                g = groups[(dt, mode, sh)]
                if impl in g and "dense" in g:
                    xs.append(i + (j - len(impls) / 2) * 0.08)
                    ys.append(g["dense"]["median_ms"] / g[impl]["median_ms"])
            ax.plot(xs, ys, "o-" if impl in ("auto", "spectral") else "o:", label=impl, ms=4)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([s.replace("N=", "\nN=", 1) for s in shapes], fontsize=7, rotation=25, ha="right")
        ax.set_ylabel("speed-up over dense\n(dense ms / impl ms)")
        ax.set_title("rolling_conv, %s, %s, %s" % (dt, mode, rows[0]["device"]), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print("wrote %s" % os.path.relpath(path, harness.ROOT))
    return path


def set_tf32(on: bool) -> None:
    """on: PyTorch's defaults (cuDNN convolutions in TF32, cuBLAS matmuls not); off: exact float32 everywhere."""
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few shapes only (smoke run)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="comma list (default: float32 on CPU; float32,float32-tf32,bfloat16 "
                   "on CUDA: float32 = TF32 off, float32-tf32 = PyTorch's default cuDNN TF32)")
    p.add_argument("--mode", default="all", choices=["fwd", "fwdbwd", "all"])
    p.add_argument("--budget", type=float, default=0.5, help="seconds of repeats per measurement (>= 5 repeats)")
    p.add_argument("--shape", action="append", type=parse_shape, help="custom case, e.g. '3d N=1 C=128 S=16 k=5'")
    p.add_argument("--impls", default=None, help="comma list: time only these impls (e.g. spectral,auto,dense,dense_cl)")
    p.add_argument("--set", default="default", choices=["default", "fused"],
                   help="fused: the shapes of the fused spectral CPU kernel's targets")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--timer", default="wall", choices=["wall", "thread"],
                   help="wall: median wall time (the default, what the targets mean); thread: median CPU time "
                        "of the main thread, for a CPU shared with other jobs, only with --threads 1")
    p.add_argument("--no-peak-mem", action="store_true",
                   help="skip the peak-memory measurement (each one runs gc.collect(), ~0.2-0.7 s)")
    p.add_argument("--out-dir", default=None, help="where to write the CSV and plot (default <results root>/<device>, "
                   "bench/out/ unless MEDCONV_BENCH_RESULTS is set)")
    a = p.parse_args(argv)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    dtype_names = (a.dtype or ("float32" if device.type == "cpu" else "float32,float32-tf32,bfloat16")).split(",")
    for d in dtype_names:
        if d not in DTYPES:
            p.error("--dtype: unknown %r (choose from %s)" % (d, ", ".join(DTYPES)))
        if d == "float32-tf32" and device.type != "cuda":
            p.error("--dtype float32-tf32 needs --device cuda (TF32 is a CUDA setting)")
    modes = ["fwd", "fwdbwd"] if a.mode == "all" else [a.mode]
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if a.timer == "thread" and (device.type != "cpu" or torch.get_num_threads() != 1):
        p.error("--timer thread needs --device cpu and --threads 1")
    shapes = a.shape or (QUICK_SHAPES if a.quick else FUSED_SHAPES if a.set == "fused" else
                         (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES))

    print("rolling_conv benchmark on %s, torch %s, %d threads, %s timer" % (
        harness.device_name(device), torch.__version__, torch.get_num_threads(), a.timer))
    for name, (ok, why) in medconv_ext.available_backends().items():
        print("  backend %-9s %s  %s" % (name, "yes" if ok else "no ", why))
    if device.type == "cuda":
        print("  float32 rows: TF32 OFF in cuDNN and cuBLAS (dense, reference, roll_loop: exact float32); "
              "float32-tf32 rows: PyTorch's defaults (cuDNN TF32 on, cuBLAS TF32 off); the fused spectral kernel "
              "uses tf32x3 dots in both (float32-level error)")
        print("  backend spectral on CUDA: %s; spectral_unfused: the torch-op composition (cuFFT + cuDNN)"
              % ("the fused Triton kernel where it supports the input" if "cuda" in backends.capabilities(OP)["spectral"]["fused"]
                 else "no fused kernel registered, the torch-op composition"))
    res = harness.Results("rolling_conv", device, extra_columns=["vs_roll_loop", "vs_dense", "max_rel_err", "gbytes",
                                                                 "gflop", "bw_frac", "flop_frac"])
    MACHINE.update(measure_machine(device, DTYPES[dtype_names[0]]))
    print("  machine: copy %.1f GB/s, %s GEMM %.1f GFLOP/s (measured now; bw_frac / flop_frac columns)"
          % (MACHINE["copy_gbs"], dtype_names[0], MACHINE["peak_gflops"]))
    skipped: Dict[str, str] = {}
    for dt in dtype_names:
        if device.type == "cuda":
            set_tf32(dt == "float32-tf32")
        for shape in shapes:
            bench_case(res, shape, device, DTYPES[dt], modes, a.budget, skipped, a.timer, not a.no_peak_mem,
                       a.impls.split(",") if a.impls else None, dtype_label=dt)
    for name, why in skipped.items():
        print("not timed: %s (%s)" % (name, why))

    add_ratios(res.rows)
    impls = []
    for r in res.rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    print_tables(res.rows, impls)
    targets = check_targets(res.rows)
    if targets:
        print("\nGoals (meaningful on 2 CPU cores at full size):")
        print("\n".join("  " + t for t in targets))
    out_dir = a.out_dir or os.path.join(harness.results_root(),
                                        harness.device_slug(device) + ("-threadtime" if a.timer == "thread" else ""))
    os.makedirs(out_dir, exist_ok=True)
    stem = "rolling_conv" + ("_fused" if a.set == "fused" and not a.shape else "")
    res.write_csv(os.path.join(out_dir, stem + ".csv"))
    plot(res.rows, impls, os.path.join(out_dir, stem + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
