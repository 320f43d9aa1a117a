"""Per-kernel profile (torch.profiler) of one fused spectral rolling-conv forward and one backward:
which kernels the time goes to (channel transform GEMM, spectral mix, grad_weight, torch glue).

    python bench/gpu_profile.py [--device cuda|cpu] [--shape '2d N=8 C=256 S=128 k=3'] [--dtype bfloat16]
                                [--out FILE]

Runs backend="spectral" (the fused Triton kernels on CUDA; on the CPU under TRITON_INTERPRET=1 the same
kernels in the interpreter, for the dry run). Warm-up calls first (autotuning, compiles), then one profiled
forward and one profiled forward+backward; the tables are sorted by device time (CPU time on the CPU).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> int:
    sys.path.insert(0, HERE)
    from bench_rolling_conv import parse_shape

    import medconv_ext

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=parse_shape, default=parse_shape("2d N=8 C=256 S=128 k=3"))
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--rows", type=int, default=25, help="rows per table")
    p.add_argument("--out", default=None, help="also write the tables to this file")
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    dims, n, c, s, k = a.shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, c) + (s,) * dims, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn((1, c) + (k,) * dims, generator=g) / (c * k ** dims) ** 0.5).to(device, dtype).requires_grad_()
    f = medconv_ext.rolling_conv2d if dims == 2 else medconv_ext.rolling_conv3d
    go = torch.randn((n, c) + (s,) * dims, generator=g).to(device, dtype)
    from medconv_ext.ops.rolling_conv_spectral import _fused_for

    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        # the dry run: the fused Triton kernels themselves, in the interpreter (on the CPU backend="spectral"
        # would run the CPU kernels instead)
        from medconv_ext.ops import rolling_conv_spectral_triton as ST

        def call():
            return ST.conv(x, w, None, [1] * dims, [k // 2] * dims, [1] * dims, c)
        fused = True
    else:
        fused = _fused_for(x, w, False) is not None

        def call():
            return f(x, w, None, padding=k // 2, backend="spectral")
    print("fused spectral Triton kernel runs this input: %s" % fused)

    def fwd():
        with torch.no_grad():
            return call()

    def fwdbwd():
        return torch.autograd.grad(call(), (x, w), go)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for fn in (fwd, fwdbwd):  # warm-up: autotuning and compiles outside the profile
        fn()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    text = []
    for name, fn in (("forward", fwd), ("forward+backward", fwdbwd)):
        with profile(activities=acts) as prof:
            fn()
            sync()
        head = "== %s, %s %s, backend=spectral (fused: %s), %s" % (
            name, "%dd N=%d C=%d S=%d k=%d" % a.shape, a.dtype, fused,
            torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
        table = prof.key_averages().table(sort_by=sort, row_limit=a.rows)
        text.append(head + "\n" + table)
        print(text[-1], flush=True)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as fh:
            fh.write("\n".join(text))
    return 0 if fused else 1


if __name__ == "__main__":
    sys.exit(main())
