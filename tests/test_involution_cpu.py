"""Involution CPU kernels (backend "cpu") against the float64 references: forward, both
gradients, gradcheck/gradgradcheck, opcheck, layouts, empty batch, determinism."""
import pytest
import torch

import medconv_ext as M
from medconv_ext import available_backends
from medconv_ext.reference.involution import involution as ref_unfold

from _involution_util import involution_loop, make_case, poison_heap

pytestmark = pytest.mark.skipif(not available_backends()["cpu"][0], reason="compiled CPU ops not built")

# (N, C, spatial, K, stride, padding, dilation, G): odd sizes, stride 2/3, dilation 2, G = 1 and
# G = C, K = 1, 3, 5, 7, non-square kernels, C = 1.
CASES_2D = [
    (2, 6, (7, 9), 3, 2, 1, 1, 3),
    (1, 4, (11, 8), 7, 1, 3, 1, 4),
    (2, 5, (9, 10), 3, 2, 2, 2, 1),
    (3, 1, (6, 5), 1, 1, 0, 1, 1),
    (1, 8, (10, 13), (3, 5), (1, 2), (1, 0), (1, 2), 2),
    (2, 4, (12, 11), 5, 3, 0, 1, 2),
    (1, 3, (8, 8), 7, 2, 5, 2, 3),
]
CASES_3D = [
    (2, 4, (5, 6, 7), 3, 2, 1, 1, 2),
    (1, 3, (4, 5, 6), 1, 1, 0, 1, 1),
    (1, 6, (7, 6, 5), 3, 1, 2, 2, 6),
    (1, 2, (9, 6, 5), (7, 5, 3), 1, (3, 2, 1), 1, 1),
    (1, 4, (6, 5, 7), (1, 3, 5), (2, 1, 2), (0, 1, 2), (1, 2, 1), 2),
]
ALL = [(2,) + c for c in CASES_2D] + [(3,) + c for c in CASES_3D]


def _fn(dims):
    return M.involution2d if dims == 2 else M.involution3d


def test_reference_matches_literal_loop():
    # the unfold reference (backend "reference") against the tap loop, on every case
    for dims, n, c, sp, k, s, p, d, g in ALL:
        x, w, k, s, p, d = make_case(n, c, sp, k, s, p, d, g)
        torch.testing.assert_close(ref_unfold(x, w, k, s, p, d), involution_loop(x, w, k, s, p, d),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ALL, ids=lambda c: "%dd-%s" % (c[0], "-".join(map(str, c[1:]))))
def test_forward_and_gradients_float64(case):
    dims, n, c, sp, k, s, p, d, g = case
    x, w, k, s, p, d = make_case(n, c, sp, k, s, p, d, g, requires_grad=True)
    poison_heap(n * c * int(torch.tensor(sp).prod()) * 8)
    y = _fn(dims)(x, w, k, s, p, d, backend="cpu")
    y_ref = involution_loop(x, w, k, s, p, d)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), gy)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [ALL[0], ALL[1], ALL[4], ALL[7], ALL[11]], ids=str)
def test_float32_against_float64(case):
    dims, n, c, sp, k, s, p, d, g = case
    x, w, k, s, p, d = make_case(n, c, sp, k, s, p, d, g)
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    y = _fn(dims)(x32, w32, k, s, p, d, backend="cpu")
    assert y.dtype == torch.float32
    y_ref = involution_loop(x, w, k, s, p, d)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y_ref)
    gx, gw = torch.autograd.grad(y, (x32, w32), gy.float())
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    gx_ref, gw_ref = torch.autograd.grad(involution_loop(xr, wr, k, s, p, d), (xr, wr), gy)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcheck_and_gradgradcheck(dims):
    if dims == 2:
        x, w, k, s, p, d = make_case(1, 4, (5, 4), 3, 2, 1, 1, 2, requires_grad=True)
    else:
        x, w, k, s, p, d = make_case(1, 2, (3, 3, 4), 3, (1, 2, 1), 1, (1, 1, 2), 1, requires_grad=True)
    f = lambda x_, w_: _fn(dims)(x_, w_, k, s, p, d, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w))
    if dims == 2:  # double backward: each gradient is one of the three ops again (3D: same code)
        assert torch.autograd.gradgradcheck(f, (x, w))


@pytest.mark.parametrize("dims", [2, 3])
def test_opcheck(dims):
    if dims == 2:
        x, w, k, s, p, d = make_case(2, 4, (7, 6), 3, 2, 1, 1, 2)
    else:
        x, w, k, s, p, d = make_case(1, 4, (3, 4, 5), 3, 1, 1, (1, 2, 1), 2)
    x.requires_grad_()
    w.requires_grad_()
    ops = torch.ops.medconv
    y = ops.involution(x, w, k, s, p, d)
    gy = torch.randn_like(y)
    torch.library.opcheck(ops.involution.default, (x, w, k, s, p, d))
    if dims == 3:  # the grad ops share the geometry code of 2D; keep the test time down
        return
    torch.library.opcheck(ops.involution_grad_input.default, (gy.requires_grad_(), w, list(x.shape), k, s, p, d))
    torch.library.opcheck(ops.involution_grad_weight.default, (gy, x, k, s, p, d, w.shape[1]))


def test_noncontiguous_and_channels_last():
    x, w, k, s, p, d = make_case(2, 6, (9, 7), 3, 2, 1, 1, 3)
    y_ref = involution_loop(x, w, k, s, p, d)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    # weight as a non-contiguous view: built in another order and permuted back
    w_nc = w.permute(0, 4, 5, 1, 2, 3).contiguous().permute(0, 3, 4, 5, 1, 2).requires_grad_()
    assert not x_cl.is_contiguous() and not w_nc.is_contiguous()
    y = M.involution2d(x_cl, w_nc, k, s, p, d, backend="cpu")
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(y.shape[3], y.shape[2], y.shape[1], y.shape[0], dtype=y.dtype).permute(3, 2, 1, 0)
    gx, gw = torch.autograd.grad(y, (x_cl, w_nc), gy)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    gx_ref, gw_ref = torch.autograd.grad(involution_loop(xr, wr, k, s, p, d), (xr, wr), gy)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)
    # 3D channels_last_3d and a sliced (strided) input
    x3, w3, k, s, p, d = make_case(1, 4, (5, 6, 7), 3, 1, 1, 1, 2)
    x3_cl = x3.to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(M.involution3d(x3_cl, w3, k, s, p, d, backend="cpu"),
                               involution_loop(x3, w3, k, s, p, d), rtol=1e-12, atol=1e-12)
    big = torch.randn(2, 8, 10, 14, dtype=torch.float64)
    xs = big[:, ::2, :, ::2]
    _, ws, k, s, p, d = make_case(2, 4, (10, 7), 3, 1, 1, 1, 2)
    torch.testing.assert_close(M.involution2d(xs, ws, k, s, p, d, backend="cpu"),
                               involution_loop(xs, ws, k, s, p, d), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
@pytest.mark.parametrize("dims", [2, 3])
def test_empty_batch(dims, backend):
    sp = (5, 6) if dims == 2 else (3, 4, 5)
    x, w, k, s, p, d = make_case(0, 4, sp, 3, 2, 1, 1, 2, requires_grad=True)
    y = _fn(dims)(x, w, k, s, p, d, backend=backend)
    assert y.shape == (0, 4) + tuple(w.shape[2 + dims:])
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_deterministic_across_thread_counts_float32():
    x, w, k, s, p, d = make_case(4, 32, (23, 21), 7, 2, 3, 1, 2, dtype=torch.float32, requires_grad=True)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            y = M.involution2d(x, w, k, s, p, d, backend="cpu")
            gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
            results.append((y, gx, gw))
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


def test_direct_op_calls_are_checked():
    # The compiled ops are reachable without the Python checks: their TORCH_CHECKs must
    # refuse every shape that would make them read or write out of bounds.
    ops = torch.ops.medconv
    x, w, k, s, p, d = make_case(1, 4, (7, 7), 3, 2, 1, 1, 2)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.involution(x, w[..., :-1, :-1].contiguous(), k, s, p, d)  # floor(7/2) kernels for ceil(7/2) outputs
    with pytest.raises(RuntimeError, match="multiple of G"):
        ops.involution(x, torch.randn(1, 3, 3, 3, 4, 4, dtype=torch.float64), k, s, p, d)
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        ops.involution(x, w, [9, 9], s, [0, 0], d)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.involution(x.half(), w.half(), k, s, p, d)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.involution(x, w.float(), k, s, p, d)
    with pytest.raises(RuntimeError, match="2 values each"):
        ops.involution(x, w, [3], s, p, d)
    gy = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.involution_grad_input(gy, w, [1, 4, 9, 9], k, s, p, d)  # weight does not fit input_size
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        ops.involution_grad_input(gy[:, :, :3].contiguous(), w, [1, 4, 7, 7], k, s, p, d)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        ops.involution_grad_weight(gy[:, :, :3], x, k, s, p, d, 2)
    with pytest.raises(RuntimeError, match="multiple of G"):
        ops.involution_grad_weight(gy, x, k, s, p, d, 3)
    with pytest.raises(RuntimeError, match="G must be >= 1"):
        ops.involution_grad_weight(gy, x, k, s, p, d, 0)
