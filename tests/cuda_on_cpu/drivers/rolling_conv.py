"""Emulated tests of csrc/cuda/rolling_conv.cu: its six ops (forward, grad_input, grad_weight, plain and
transposed) against the float64 reference of the GPU tests, on the shared case list
_rolling_gpu_util.CUDA_CASES, plus random configurations. 16-bit dtypes also run the opt-in WMMA
(tensor-core) path of launch_gemm (MEDCONV_CUDA_MMA=1) for forward and grad_input."""
import os

import torch

from _rolling_gpu_util import CUDA_CASES, TOL, make_case, reference_all

SOURCE = "rolling_conv.cu"
OPS = ("rolling_conv", "rolling_conv_grad_input", "rolling_conv_grad_weight", "rolling_conv_transpose",
       "rolling_conv_transpose_grad_input", "rolling_conv_transpose_grad_weight")


def fixed_cases():
    return list(CUDA_CASES)


def fuzz_cases(rnd, n):
    """n random valid configurations (same tuple layout as CUDA_CASES)."""
    cases = []
    while len(cases) < n:
        tr, dims = rnd.random() < 0.5, rnd.choice([2, 2, 3])
        C = rnd.randint(1, 40)
        nb, nr, N = rnd.randint(1, 3), rnd.randint(1, C), rnd.randint(1, 2)
        kmax, smax = (4, 12) if dims == 2 else (3, 7)
        k = [rnd.randint(1, kmax) for _ in range(dims)]
        st = [rnd.randint(1, 3) for _ in range(dims)]
        di = [rnd.randint(1, 3) for _ in range(dims)]
        pa = [rnd.randint(0, 3) for _ in range(dims)]
        sp = [rnd.randint(1, smax) for _ in range(dims)]
        op_ = [rnd.randint(0, max(a, b) - 1) for a, b in zip(st, di)] if tr else [0] * dims
        if tr:
            out = [(i - 1) * s - 2 * p + d * (kk - 1) + o + 1 for i, s, p, d, kk, o in zip(sp, st, pa, di, k, op_)]
        else:
            out = [(h + 2 * p - d * (kk - 1) - 1) // s + 1 if h + 2 * p - d * (kk - 1) - 1 >= 0 else 0
                   for h, s, p, d, kk in zip(sp, st, pa, di, k)]
        if min(out) < 1:
            continue
        cid = "fuzz%d-%s%dd" % (len(cases), "convT" if tr else "conv", dims)
        cases.append((cid, tr, dims, N, C, nb, nr, tuple(k), tuple(sp), st, pa, op_, di,
                      "channels_last" if rnd.random() < 0.2 else "contiguous", rnd.random() < 0.8))
    return cases


def run(case, dtypes, t):
    """All ops of one case in each dtype, through the checker t (run.Checker)."""
    cid, tr, dims, N, C, nb, nr, k, sp, st, pa, op_, di, layout, bias = case
    ops = t.ops
    if tr:
        fwd, gin, gwt = ops.rolling_conv_transpose, ops.rolling_conv_transpose_grad_input, ops.rolling_conv_transpose_grad_weight
    else:
        fwd, gin, gwt = ops.rolling_conv, ops.rolling_conv_grad_input, ops.rolling_conv_grad_weight
    for dtype in dtypes:
        x, w, b = make_case(tr, dims, N, C, nb, nr, k, sp, dtype, bias=bias)
        go = reference_all(tr, x, w, b, st, pa, op_, di, nr)[4].to(dtype)  # rounded like the kernel sees it
        ry, rgx, rgw, _, _ = reference_all(tr, x, w, b, st, pa, op_, di, nr, grad_out=go.double())
        xl = x
        if layout == "channels_last":
            xl = x.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
        tol = TOL[dtype]
        fa = (xl, w, b, st, pa, op_, di, nr) if tr else (xl, w, b, st, pa, di, nr)
        ga = (go, w, list(x.shape), st, pa, di, nr)
        t.check(cid, dtype, "forward", fwd, fa, ry, tol)
        t.check(cid, dtype, "grad_input", gin, ga, rgx, tol)
        t.check(cid, dtype, "grad_weight", gwt, (go, xl, list(w.shape), st, pa, di, nr), rgw, tol)
        if dtype in (torch.float16, torch.bfloat16) and t.wmma:  # the opt-in tensor-core path of launch_gemm
            os.environ["MEDCONV_CUDA_MMA"] = "1"
            try:
                t.check(cid, dtype, "forward[wmma]", fwd, fa, ry, tol)
                t.check(cid, dtype, "grad_input[wmma]", gin, ga, rgx, tol)
            finally:
                del os.environ["MEDCONV_CUDA_MMA"]
