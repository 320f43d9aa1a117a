"""Shared helpers of the GPU-kernel involution tests: an independent float64 reference (direct
tap loop over a zero-padded input, no unfold) and tolerances by dtype."""
import itertools

import torch
import torch.nn.functional as F


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
