"""Shared helpers of the GPU-kernel involution tests: an independent float64 reference (direct
tap loop over a zero-padded input, no unfold) and tolerances by dtype."""
import itertools

import torch
import torch.nn.functional as F


# The shapes of the CUDA kernel tests, one list for two consumers: tests/test_involution_cuda.py (on a
# GPU) and tests/cuda_on_cpu (the same kernels compiled for and emulated on the CPU, in CI). A case
# added here runs in both. They reach every path of csrc/cuda/involution.cu: several tiles per axis,
# a group larger than one channel chunk (grad_weight's workspace) and partial chunks, stride 2 and 3
# with odd sizes and gaps, dilation 2 and 3, a dilation so large that the window falls back to global
# reads (and, in 3D, to one-thread blocks), K = 1, 2, 5, 7, tiny maps (16-thread blocks), 3D, G = 1
# and G = C.   (id, dims, N, C, G, S, K, stride, padding, dilation)
CUDA_CASES = [
    ("rednet-k7", 2, 2, 64, 4, (28, 28), 7, 1, 3, 1),
    ("group-of-20-two-chunks", 2, 2, 40, 2, (13, 17), 3, 1, 1, 1),
    ("stride2-odd", 2, 3, 32, 2, (15, 17), 3, 2, 1, 1),
    ("stride2-k7-G1", 2, 1, 32, 1, (33, 31), 7, 2, 3, 1),
    ("dilation2-G=C", 2, 1, 16, 16, (20, 19), 3, 1, 2, 2),
    ("huge-dilation-global-reads", 2, 1, 4, 2, (110, 109), 3, 1, 0, 51),
    ("wide-many-tiles", 2, 2, 8, 2, (5, 70), 3, 1, 1, 1),
    ("k1", 2, 1, 8, 2, (5, 6), 1, 1, 0, 1),
    ("3d-k3", 3, 2, 32, 2, (9, 10, 11), 3, 1, 1, 1),
    ("3d-k5-stride2-odd", 3, 1, 8, 1, (9, 8, 7), 5, 2, 2, 1),
    ("3d-dilation2", 3, 1, 6, 3, (7, 6, 9), 3, 1, 2, 2),
    ("s3-k2-gaps-Cg35", 2, 2, 35, 1, (14, 11), 2, 3, 0, 1),
    ("tiny-3x3-block16", 2, 2, 6, 3, (3, 3), 3, 1, 1, 1),
    ("s2-d3-p4-Cg17", 2, 1, 34, 2, (12, 13), 3, 2, 4, 3),
    ("3d-s2-d2-p3-Cg33", 3, 1, 33, 1, (6, 7, 5), 3, 2, 3, 2),
    ("3d-big-window-fallback", 3, 1, 3, 1, (40, 40, 40), 3, 1, 0, 19),
]


def out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def reference_involution(x, weight, kernel_size, stride, padding, dilation):
    """out[n, c, p] = sum_t weight[n, c // (C // G), t, p] * x[n, c, p*s + t*d - pad], differentiable,
    computed in the dtype of its inputs (call it with float64)."""
    dims = x.dim() - 2
    N, C = x.shape[:2]
    G = weight.shape[1]
    pad = []
    for p in reversed(padding):
        pad += [p, p]
    xp = F.pad(x, pad)
    O = [out_size(n, k, s, p, d) for n, k, s, p, d in zip(x.shape[2:], kernel_size, stride, padding, dilation)]
    out = x.new_zeros((N, C, *O))
    for t in itertools.product(*[range(k) for k in kernel_size]):
        sl = tuple(slice(ti * d, ti * d + s * (o - 1) + 1, s) for ti, d, s, o in zip(t, dilation, stride, O))
        wt = weight[(slice(None), slice(None)) + t]  # (N, G, *O)
        out = out + wt.repeat_interleave(C // G, dim=1) * xp[(slice(None), slice(None)) + sl]
    return out


def make_inputs(dims, N, C, G, S, K, s, p, d, dtype=torch.float64, device="cpu", requires_grad=False):
    S = [S] * dims if isinstance(S, int) else list(S)
    O = [out_size(n, K, s, p, d) for n in S]
    x = torch.randn(N, C, *S, dtype=dtype, device=device, requires_grad=requires_grad)
    w = torch.randn(N, G, *([K] * dims), *O, dtype=dtype, device=device, requires_grad=requires_grad)
    return x, w, [K] * dims, [s] * dims, [p] * dims, [d] * dims


# absolute/relative tolerances against the float64 reference, by dtype (float32 accumulation
# for the half types: the error is the rounding of inputs and output, not of the sum)
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=3e-2),
}


def tolerance(dtype, grad=False):
    """(rtol, atol) of an output (grad=False) or of a gradient, which sums more products: 4x atol."""
    t = TOL[dtype]
    return t["rtol"], t["atol"] * (4 if grad else 1)


def ref_outputs_and_grads(x, w, ks, st, pa, di, grad_out=None, seed=1):
    """Reference output and both gradients in float64 for the given (any dtype) inputs."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    out = reference_involution(x64, w64, ks, st, pa, di)
    if grad_out is None:
        gen = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(x.device)
    gx, gw = torch.autograd.grad(out, (x64, w64), grad_out.double())
    return out.detach(), gx, gw, grad_out
