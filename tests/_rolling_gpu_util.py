"""Shared helpers of the GPU-kernel tests of rolling convolution (Triton and CUDA backends).

Ground truth is float64: the reference module (materialized bank + torch conv) for the forward and
autograd gradients, and the paper's eq. 7 written out literally (independent of autograd) for the
weight gradient. Tolerances are by dtype and never loosened to pass.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from medconv_ext import backends
from medconv_ext.reference import rolling_conv as R

# (rtol, atol) for outputs whose entries are sums of O(C * k^d) products of N(0, 1) values: float32
# accumulates in float32, 16-bit types accumulate in float32 and round once on store.
# Inputs are rounded to the dtype before the reference sees them, so 16-bit errors are the single
# rounding of the float32 accumulator on store (2^-9 bf16, 2^-12 fp16 relative) plus summation order.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


# The shapes of the CUDA kernel tests, one list for two consumers: tests/test_rolling_conv_cuda.py (on
# a GPU) and tests/cuda_on_cpu (the same kernels compiled for and emulated on the CPU, in CI). A case
# added here runs in both. The shapes reach every path of csrc/cuda/rolling_conv.cu: several pixel
# and channel tiles, partial K stages, n_rolls < C, stride > kernel (gaps), padding > kernel, k = 1,
# 3D, channels_last, no bias, grad_weight with several splits, empty batch.
# (id, transposed, dims, N, C, n_base, n_rolls, k, spatial, stride, padding, output_padding, dilation,
#  layout, bias)
CUDA_CASES = [
    ("conv2d-s2-d2-nb2", False, 2, 2, 5, 2, 3, 3, (9, 8), [2, 2], [1, 1], [0, 0], [2, 2], "channels_last", True),
    ("conv2d-C1", False, 2, 3, 1, 1, 1, (3, 2), (7, 6), [1, 1], [0, 0], [0, 0], [1, 1], "contiguous", True),
    ("conv2d-C37-tiles", False, 2, 2, 37, 3, 20, 3, (13, 11), [1, 2], [1, 0], [0, 0], [1, 1], "contiguous", True),
    ("conv3d-full-roll", False, 3, 1, 6, 1, 6, 3, (5, 6, 7), [1, 2, 1], [1, 1, 0], [0, 0, 0], [1, 1, 2], "channels_last",
     True),
    ("conv3d-5x5x5", False, 3, 2, 8, 2, 4, 5, 7, [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1], "contiguous", True),
    ("convT2d-s2-op1", True, 2, 2, 5, 2, 3, 3, (4, 5), [2, 2], [1, 1], [1, 1], [1, 1], "contiguous", True),
    ("convT2d-C33", True, 2, 1, 33, 1, 33, 2, (6, 5), [2, 2], [0, 0], [0, 0], [1, 1], "channels_last", True),
    ("convT3d", True, 3, 1, 4, 2, 2, 3, 3, [2, 1, 2], [1, 1, 0], [1, 0, 1], [1, 2, 1], "contiguous", True),
    ("conv2d-empty-batch", False, 2, 0, 4, 1, 4, 3, 5, [1, 1], [1, 1], [0, 0], [1, 1], "contiguous", True),
    ("convT2d-empty-batch", True, 2, 0, 4, 1, 4, 3, 5, [1, 1], [1, 1], [0, 0], [1, 1], "contiguous", True),
    ("conv2d-splits4-odd", False, 2, 2, 6, 1, 4, 3, (24, 20), [1, 1], [0, 0], [0, 0], [1, 1], "contiguous", True),
    ("conv2d-s3-k2-gaps", False, 2, 2, 7, 2, 5, 2, (11, 10), [3, 3], [0, 1], [0, 0], [1, 1], "contiguous", True),
    ("conv2d-pad-gt-k", False, 2, 1, 9, 3, 2, (2, 3), (5, 4), [1, 2], [2, 3], [0, 0], [1, 2], "contiguous", True),
    ("conv2d-k1-C17", False, 2, 2, 17, 2, 9, 1, (5, 13), [1, 1], [0, 0], [0, 0], [1, 1], "contiguous", True),
    ("conv2d-A70-E40", False, 2, 1, 40, 2, 35, 3, (9, 9), [2, 1], [1, 1], [0, 0], [1, 3], "contiguous", True),
    ("conv3d-s2-d2-nb3", False, 3, 2, 5, 3, 2, (3, 2, 3), (7, 6, 9), [2, 1, 2], [1, 0, 2], [0, 0, 0], [2, 1, 2],
     "contiguous", True),
    ("convT2d-s3-d2-op2", True, 2, 2, 6, 2, 4, 3, (5, 4), [3, 2], [1, 0], [2, 1], [2, 1], "contiguous", True),
    ("convT3d-s2-nb2-C9", True, 3, 1, 9, 2, 5, 3, (3, 4, 3), [2, 2, 1], [0, 1, 1], [1, 0, 0], [1, 1, 2], "contiguous",
     True),
    ("convT2d-k1-s2", True, 2, 2, 18, 1, 7, 1, (6, 7), [2, 2], [0, 0], [1, 0], [1, 1], "contiguous", True),
    ("conv2d-nobias-N3", False, 2, 3, 4, 2, 3, 3, (6, 7), [1, 1], [1, 1], [0, 0], [1, 1], "contiguous", False),
    ("convT2d-splits3-nobias", True, 2, 2, 5, 1, 3, 3, (20, 18), [1, 2], [1, 1], [0, 1], [1, 1], "contiguous", False),
]


def assert_close(actual, expected, dtype, what=""):
    rtol, atol = TOL[dtype]
    assert actual.shape == expected.shape, "%s: shape %s != %s" % (what, tuple(actual.shape), tuple(expected.shape))
    assert torch.isfinite(actual).all(), "%s: non-finite values (an output element left unwritten?)" % what
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol, msg=lambda m: "%s: %s" % (what, m))


def tap_slices(z, lo, k, s, p, d):
    """For every tap t (row-major over k), z (N, C, *hi) zero-padded by p and read at lo * s + t * d:
    a (N, C, *lo) tensor. Positions past the end of z read zeros as well."""
    dims = len(lo)
    need = [(lo[i] - 1) * s[i] + (k[i] - 1) * d[i] + 1 for i in range(dims)]
    pads = []
    for i in reversed(range(dims)):
        extra = max(0, need[i] - (z.shape[2 + i] + 2 * p[i]))
        pads += [p[i], p[i] + extra]
    zp = F.pad(z, pads)
    out = []
    for t in range(math.prod(k)):
        tt, rem = [], t
        for i in reversed(range(dims)):
            tt.append(rem % k[i])
            rem //= k[i]
        tt = tt[::-1]
        idx = [slice(None), slice(None)] + [slice(tt[i] * d[i], tt[i] * d[i] + (lo[i] - 1) * s[i] + 1, s[i])
                                            for i in range(dims)]
        out.append(zp[tuple(idx)])
    return out


def eq7_grad_weight(grad_out, x, k, stride, padding, dilation, n_rolls, n_base):
    """Paper eq. 7, literally: dL/dw[b, m, t] = sum_n sum_p sum_r gy[n, r*nb + b, p] * x[n, (m + r) mod C, p*s + t*d - pad]."""
    C = x.shape[1]
    lo = list(grad_out.shape[2:])
    gw = torch.zeros((n_base, C, math.prod(k)), dtype=torch.float64)
    for t, xs in enumerate(tap_slices(x.double(), lo, k, stride, padding, dilation)):
        for r in range(n_rolls):
            xr = torch.roll(xs, -r, dims=1)  # xr[:, m] = xs[:, (m + r) mod C]
            for b in range(n_base):
                gw[b, :, t] += torch.einsum("n...,nc...->c", grad_out[:, r * n_base + b].double(), xr)
    return gw.view(n_base, C, *k)


def eq7_grad_weight_transpose(grad_out, x, k, stride, padding, dilation, n_rolls, n_base):
    """The same sum for the transposed conv (base (C, nb, *k)):
    dL/dw[m, b, t] = sum_n sum_i sum_r x[n, (m + r) mod C, i] * gy[n, r*nb + b, i*s + t*d - pad]."""
    C = x.shape[1]
    lo = list(x.shape[2:])
    gw = torch.zeros((C, n_base, math.prod(k)), dtype=torch.float64)
    taps = tap_slices(grad_out.double(), lo, k, stride, padding, dilation)
    for t, gs in enumerate(taps):
        for r in range(n_rolls):
            xr = torch.roll(x.double(), -r, dims=1)
            for b in range(n_base):
                gw[:, b, t] += torch.einsum("n...,nc...->c", gs[:, r * n_base + b], xr)
    return gw.view(C, n_base, *k)


def eq8_grad_input(grad_out, weight, x_shape, stride, padding, dilation, n_rolls):
    """Paper eq. 8: dL/dx is the transposed convolution of dL/dy with the rolled bank."""
    dims = weight.dim() - 2
    bank = R.expand_rolling_weight(weight.double(), n_rolls)
    out = [(grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1) + 1
           for i in range(dims)]
    op_ = [x_shape[2 + i] - out[i] for i in range(dims)]
    f = {2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    return f(grad_out.double(), bank, None, stride, padding, op_, 1, dilation)


def reference_all(transposed, x, weight, bias, stride, padding, output_padding, dilation, n_rolls, grad_out=None, seed=1):
    """float64 reference: (y, gx, gw, gb, grad_out) by autograd through the materialized bank."""
    xr = x.detach().double().requires_grad_()
    wr = weight.detach().double().requires_grad_()
    br = bias.detach().double().requires_grad_() if bias is not None else None
    if transposed:
        y = R.rolling_conv_transpose(xr, wr, br, stride, padding, output_padding, dilation, n_rolls)
    else:
        y = R.rolling_conv(xr, wr, br, stride, padding, dilation, n_rolls)
    if grad_out is None:
        g = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad_out.to(y.device))
    return y.detach(), xr.grad, wr.grad, (br.grad if br is not None else None), grad_out


def make_case(transposed, dims, N, C, nb, n_rolls, k, spatial, dtype, device="cpu", bias=True, seed=0):
    """Random inputs in `dtype`, rounded there first so that the float64 reference sees the same values."""
    g = torch.Generator().manual_seed(seed)
    k = [k] * dims if isinstance(k, int) else list(k)
    spatial = [spatial] * dims if isinstance(spatial, int) else list(spatial)
    x = torch.randn((N, C, *spatial), generator=g).to(dtype)
    wshape = (C, nb, *k) if transposed else (nb, C, *k)
    w = (torch.randn(wshape, generator=g) / math.sqrt(C * math.prod(k))).to(dtype)
    b = torch.randn((n_rolls * nb,), generator=g).to(dtype) if bias else None
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return to(x), to(w), to(b)


# --------------------------------------------------------------------------------------
# a large single-sample case (2 channels, 3x3, stride 1, padding 1): gradients and transposed
# --------------------------------------------------------------------------------------
def _corr_f64(a, b, t0, t1, chunk_rows=2048):
    """sum_p a[p] * b[p + t - 1] over the positions where both exist (a, b (H, W), same size), in float64,
    a few thousand rows at a time (no full float64 copy)."""
    H, W = a.shape
    r_lo, r_hi = max(0, 1 - t0), min(H, H + 1 - t0)
    c_lo, c_hi = max(0, 1 - t1), min(W, W + 1 - t1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for r in range(r_lo, r_hi, chunk_rows):
        re = min(r + chunk_rows, r_hi)
        av = a[r:re, c_lo:c_hi].double()
        bv = b[r + t0 - 1:re + t0 - 1, c_lo + t1 - 1:c_hi + t1 - 1].double()
        total += (av * bv).sum()
    return total.item()


def large_case_check(transposed, backend, H, device, dtype=torch.float32):
    """Forward and both gradients of a rolling (transposed) conv with C=2, n_rolls=2, 3x3, stride 1, padding 1
    on one (1, 2, H, H) sample: at H=33000 every activation tensor has 2.18e9 > 2^31 elements. Checked:
    the output and grad_input on the first and last rows/columns (crops against the float64 reference: the
    smallest and the largest offsets), and the whole weight gradient against eq. 7 summed in float64."""
    import medconv_ext

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((1, 2, H, H), generator=g, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn((2, 1, 3, 3) if transposed else (1, 2, 3, 3), generator=g, device=device, dtype=dtype) / 4)
    w.requires_grad_()
    if transposed:
        y = medconv_ext.rolling_conv_transpose2d(x, w, None, 1, 1, 0, n_rolls=2, backend=backend)
    else:
        y = medconv_ext.rolling_conv2d(x, w, None, 1, 1, n_rolls=2, backend=backend)
    assert y.shape == (1, 2, H, H)
    go = torch.randn(y.shape, generator=g, device=device, dtype=dtype)
    gx, gw = torch.autograd.grad(y, (x, w), go)
    wd = w.detach().double().cpu()
    if transposed:
        bank = R.expand_rolling_weight_transpose(wd, 2)  # (C_in, C_out, 3, 3)
        ref_y = lambda xc: F.conv_transpose2d(xc, bank, None, 1, 1)  # noqa: E731
        ref_gx = lambda gc: F.conv2d(gc, bank, None, 1, 1)  # noqa: E731  (the adjoint)
    else:
        bank = R.expand_rolling_weight(wd, 2)  # (C_out, C_in, 3, 3)
        ref_y = lambda xc: F.conv2d(xc, bank, None, 1, 1)  # noqa: E731
        ref_gx = lambda gc: F.conv_transpose2d(gc, bank, None, 1, 1)  # noqa: E731
    # a 6x6 crop at each corner: its outer 5x5 (away from the crop's inner edge) sees only crop pixels
    for sl, cut, inner in ((slice(None, 6), slice(None, 5), slice(None, 5)),
                           (slice(-6, None), slice(-5, None), slice(1, None))):
        ry = ref_y(x.detach()[..., sl, sl].double().cpu())
        rgx = ref_gx(go[..., sl, sl].double().cpu())
        assert_close(y.detach()[..., cut, cut], ry[..., inner, inner], dtype, "output, corner %s" % sl)
        assert_close(gx[..., cut, cut], rgx[..., inner, inner], dtype, "grad_input, corner %s" % sl)
    # the whole weight gradient: eq. 7 (and its transposed form), summed in float64
    xd, gd = x.detach()[0], go[0]
    want = torch.zeros(gw.shape, dtype=torch.float64)
    for m in range(2):
        for t0 in range(3):
            for t1 in range(3):
                for r in range(2):
                    if transposed:  # gw[m, b, t] = sum_{i, r} x[(m + r) mod C, i] gy[r, i + t - 1]
                        want[m, 0, t0, t1] += _corr_f64(xd[(m + r) % 2], gd[r], t0, t1)
                    else:  # gw[b, m, t] = sum_{p, r} gy[r, p] x[(m + r) mod C, p + t - 1]
                        want[0, m, t0, t1] += _corr_f64(gd[r], xd[(m + r) % 2], t0, t1)
    # float32 sums of H^2 terms: compare relative to the gradient's own scale
    scale = want.abs().max().item()
    assert torch.isfinite(gw).all()
    torch.testing.assert_close(gw.double().cpu(), want, rtol=0, atol=max(1e-4 * scale, 1e-4), msg="grad_weight")
    return y.numel()


triton_ok, triton_why = backends.available_backends()["triton"]
needs_triton = pytest.mark.skipif(not triton_ok, reason="triton backend unavailable: %s" % triton_why)


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty called from Python (the op wrappers, the partial buffers) is filled with NaN."""
    orig = torch.empty

    def empty_nan(*args, **kwargs):
        t = orig(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty_nan)
