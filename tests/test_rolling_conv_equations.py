"""Gradients of every backend against the paper's backward equations, summed literally here
(explicit loops over rolls and taps, explicit channel indices (m + r) mod C_in), independent
of autograd and of the reference module.

Paper eq. 7 (weight):  dL/dw[b, m, t] = sum_n sum_p sum_r dy[n, r*nb+b, p] * x[n, (m + r) mod C, p*s + t*d - pad]
Paper eq. 8 (input):   dL/dx = transposed convolution of dy with the rolled filters:
                       dx[n, c, p*s + t*d - pad] += w[b, (c - r) mod C, t] * dy[n, r*nb+b, p]
For the transposed layer (y[n, o, p*s + t*d - pad] += W_t[c, o, t] x[n, c, p]) the same sums
hold with the roles of x and dy exchanged.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import medconv_ext as mc
from _rolling_util import OP, OP_T, assert_close_to_ref, backend_params, skip_unsupported


def _taps(k):
    return list(itertools.product(*[range(n) for n in k]))


def _window(t_pad, t, s, d, out_size):
    """Slices of a padded tensor (N, C, *spatial) picking p*s + t*d for p < out_size."""
    return (slice(None), slice(None)) + tuple(
        slice(ti * di, ti * di + (o - 1) * si + 1, si) for ti, si, di, o in zip(t, s, d, out_size))


def eq7_conv(x, dy, nb, k, s, p, d):
    """dw[b, m, t] = sum_{n,p,r} dy[n, r*nb+b, p] * x[n, (m + r) mod C, p*s + t*d - pad]."""
    C = x.shape[1]
    n_rolls = dy.shape[1] // nb
    xp = F.pad(x, [q for pi in reversed(p) for q in (pi, pi)])
    dw = torch.zeros(nb, C, *k, dtype=x.dtype)
    m = torch.arange(C)
    for t in _taps(k):
        xs = xp[_window(xp, t, s, d, dy.shape[2:])]  # (N, C, *P): x[n, c, p*s + t*d - pad]
        for r in range(n_rolls):
            for b in range(nb):
                dw[(b, slice(None)) + t] += torch.einsum("n...,nm...->m", dy[:, r * nb + b], xs[:, (m + r) % C])
    return dw


def eq8_conv(w, dy, x_shape, s, p, d, n_rolls):
    """dx[n, c, p*s + t*d - pad] += w[b, (c - r) mod C, t] * dy[n, r*nb+b, p]  (scatter, then crop)."""
    nb, C, *k = w.shape
    N, _, *S = x_shape
    dxp = torch.zeros(N, C, *[si + 2 * pi for si, pi in zip(S, p)], dtype=dy.dtype)
    c = torch.arange(C)
    for t in _taps(k):
        win = _window(dxp, t, s, d, dy.shape[2:])
        for r in range(n_rolls):
            for b in range(nb):
                wt = w[(b, (c - r) % C) + t]  # (C,)
                contrib = wt.view(1, C, *[1] * len(k)) * dy[:, r * nb + b].unsqueeze(1)
                dxp[win] += contrib
    return dxp[(slice(None), slice(None)) + tuple(slice(pi, pi + si) for pi, si in zip(p, S))]


def eq7_transposed(x, dy, nb, k, s, p, d):
    """dw[m, b, t] = sum_{n,p,r} x[n, (m + r) mod C, p] * dy[n, r*nb+b, p*s + t*d - pad]."""
    C = x.shape[1]
    n_rolls = dy.shape[1] // nb
    dyp = F.pad(dy, [q for pi in reversed(p) for q in (pi, pi)])
    dw = torch.zeros(C, nb, *k, dtype=x.dtype)
    m = torch.arange(C)
    for t in _taps(k):
        ds = dyp[_window(dyp, t, s, d, x.shape[2:])]  # (N, C_out, *S)
        for r in range(n_rolls):
            for b in range(nb):
                dw[(slice(None), b) + t] += torch.einsum("n...,nm...->m", ds[:, r * nb + b], x[:, (m + r) % C])
    return dw


def eq8_transposed(w, dy, x_shape, s, p, d, n_rolls):
    """dx[n, c, p] = sum_{r,b,t} w[(c - r) mod C, b, t] * dy[n, r*nb+b, p*s + t*d - pad]  (gather)."""
    C, nb, *k = w.shape
    N, _, *S = x_shape
    dyp = F.pad(dy, [q for pi in reversed(p) for q in (pi, pi)])
    dx = torch.zeros(N, C, *S, dtype=dy.dtype)
    c = torch.arange(C)
    for t in _taps(k):
        ds = dyp[_window(dyp, t, s, d, S)]
        for r in range(n_rolls):
            for b in range(nb):
                wt = w[((c - r) % C, b) + t]
                dx += wt.view(1, C, *[1] * len(k)) * ds[:, r * nb + b].unsqueeze(1)
    return dx


# (id, dims, N, C, nb, n_rolls, S, k, stride, padding, dilation, output_padding)
CASES = [
    ("2d-s2-nb2-half", 2, 2, 6, 2, 3, (7, 8), (3, 3), (2, 1), (1, 1), (1, 2), (1, 0)),
    ("2d-full-d2", 2, 1, 5, 1, 5, (6, 7), (3, 2), 1, (2, 1), 2, 1),
    ("2d-cin1-nb3", 2, 2, 1, 3, 1, (5, 5), (2, 3), 2, (0, 1), 1, 1),
    ("3d-s2-nb2", 3, 1, 4, 2, 3, (5, 4, 6), (3, 2, 3), (2, 1, 2), (1, 0, 1), (1, 2, 1), (1, 0, 0)),
]


def _tup(v, dims):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_gradients_match_paper_equations(device, backend, case, transposed):
    op = OP_T if transposed else OP
    skip_unsupported(op, backend, device, torch.float64)
    _, dims, N, C, nb, nr, S, k, s, p, d, op_ = case
    s, p, d, op_ = (_tup(v, dims) for v in (s, p, d, op_))
    x = torch.randn(N, C, *S, dtype=torch.float64)
    w = torch.randn(*((C, nb) if transposed else (nb, C)), *k, dtype=torch.float64)
    xd = x.to(device).requires_grad_(True)
    wd = w.to(device).requires_grad_(True)
    if transposed:
        fn = {2: mc.rolling_conv_transpose2d, 3: mc.rolling_conv_transpose3d}[dims]
        y = fn(xd, wd, None, stride=s, padding=p, output_padding=op_, n_rolls=nr, backend=backend, dilation=d)
    else:
        fn = {2: mc.rolling_conv2d, 3: mc.rolling_conv3d}[dims]
        y = fn(xd, wd, None, stride=s, padding=p, dilation=d, n_rolls=nr, backend=backend)
    dy = torch.randn(y.shape, dtype=torch.float64)
    gx, gw = torch.autograd.grad(y, (xd, wd), dy.to(device))
    if transposed:
        ex_w = eq7_transposed(x, dy, nb, k, s, p, d)
        ex_x = eq8_transposed(w, dy, x.shape, s, p, d, nr)
    else:
        ex_w = eq7_conv(x, dy, nb, k, s, p, d)
        ex_x = eq8_conv(w, dy, x.shape, s, p, d, nr)
    assert_close_to_ref(gw.cpu(), ex_w, torch.float64, "%s eq.7 weight gradient" % backend)
    assert_close_to_ref(gx.cpu(), ex_x, torch.float64, "%s eq.8 input gradient" % backend)
