"""Emulated tests of csrc/cuda/involution.cu: involution, involution_grad_input and
involution_grad_weight against the float64 reference of the GPU tests, on the shared case list
_involution_gpu_util.CUDA_CASES, plus random configurations."""
import zlib

import torch

from _involution_gpu_util import CUDA_CASES, make_inputs, ref_outputs_and_grads, tolerance

SOURCE = "involution.cu"
OPS = ("involution", "involution_grad_input", "involution_grad_weight")


def fixed_cases():
    return list(CUDA_CASES)


def fuzz_cases(rnd, n):
    """n random valid configurations (same tuple layout as CUDA_CASES)."""
    cases = []
    while len(cases) < n:
        dims = rnd.choice([2, 2, 3])
        G, Cg, N = rnd.randint(1, 4), rnd.randint(1, 20), rnd.randint(1, 2)
        K = rnd.randint(1, 5 if dims == 2 else 3)
        s, p, d = rnd.randint(1, 3), rnd.randint(0, 3), rnd.randint(1, 3)
        S = tuple(rnd.randint(1, 16 if dims == 2 else 8) for _ in range(dims))
        if min(S) + 2 * p < d * (K - 1) + 1:
            continue
        cases.append(("fuzz%d-%dd" % (len(cases), dims), dims, N, G * Cg, G, S, K, s, p, d))
    return cases


def run(case, dtypes, t):
    """The three ops of one case in each dtype, through the checker t (run.Checker)."""
    cid, dims, N, C, G, S, K, s, p, d = case
    ops = t.ops
    for dtype in dtypes:
        torch.manual_seed(zlib.crc32(cid.encode()))  # make_inputs draws from the global generator
        x, w, ks, st, pa, di = make_inputs(dims, N, C, G, S, K, s, p, d, dtype=dtype)
        go = ref_outputs_and_grads(x, w, ks, st, pa, di)[3].to(dtype)  # rounded like the kernel sees it
        ro, rgx, rgw, _ = ref_outputs_and_grads(x, w, ks, st, pa, di, grad_out=go.double())
        t.check(cid, dtype, "forward", ops.involution, (x, w, ks, st, pa, di), ro, tolerance(dtype))
        t.check(cid, dtype, "grad_input", ops.involution_grad_input, (go, w, list(x.shape), ks, st, pa, di), rgx,
                tolerance(dtype, grad=True))
        t.check(cid, dtype, "grad_weight", ops.involution_grad_weight, (go, x, ks, st, pa, di, G), rgw,
                tolerance(dtype, grad=True))
