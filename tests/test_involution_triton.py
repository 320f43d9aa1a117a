"""Triton involution kernels (backend "triton") against an independent float64 reference.

Without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) on CPU
tensors, which is slow: shapes are tiny and each case runs the three kernels once. On a GPU the
same tests run on CUDA tensors. tests/test_involution_cuda.py has the larger GPU-only cases.
"""
import os

import pytest
import torch

from _involution_gpu_util import TOL, make_inputs, ref_outputs_and_grads, reference_involution

triton = pytest.importorskip("triton")

import medconv_ext  # noqa: E402
from medconv_ext.backends import available_backends, resolve  # noqa: E402
from medconv_ext.ops import involution_triton as it  # noqa: E402
from medconv_ext.triton_kernels import involution as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


@pytest.fixture
def poisoned(monkeypatch):
    """Every output buffer of the Triton host code starts as NaN: a position a kernel forgets
    to write shows up as NaN."""
    def nan_empty(size, like):
        return torch.full([int(v) for v in size], float("nan"), dtype=like.dtype, device=like.device)
    monkeypatch.setattr(tk, "_empty", nan_empty)


def _check(dims, N, C, G, S, K, s, p, d, dtype):
    x, w, ks, st, pa, di = make_inputs(dims, N, C, G, S, K, s, p, d, dtype=dtype, device=DEVICE)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = it.involution_triton(xr, wr, ks, st, pa, di)
    ref, rgx, rgw, go = ref_outputs_and_grads(x, w, ks, st, pa, di)
    gx, gw = torch.autograd.grad(out, (xr, wr), go.to(dtype))
    assert out.dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
    assert out.shape == ref.shape and gx.shape == x.shape and gw.shape == w.shape
    tol = TOL[dtype]
    # gradients sum over K^d taps / C/G channels: scale the absolute tolerance by the term count
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(gx.double(), rgx, atol=tol["atol"] * 4, rtol=tol["rtol"])
    torch.testing.assert_close(gw.double(), rgw, atol=tol["atol"] * 4, rtol=tol["rtol"])


# (dims, N, C, G, S, K, stride, padding, dilation): odd sizes, stride 2, dilation 2, G=1, G=C, 3D
CASES = [
    pytest.param(2, 2, 4, 2, (7, 9), 3, 1, 1, 1, id="2d-odd-k3"),
    pytest.param(2, 1, 3, 1, (9, 7), 3, 2, 1, 1, id="2d-stride2-odd-G1"),
    pytest.param(2, 1, 3, 3, (8, 7), 3, 1, 2, 2, id="2d-dilation2-G=C"),
    pytest.param(3, 1, 4, 2, (5, 4, 5), 3, 2, 1, 1, id="3d-stride2-odd"),
]


@pytest.mark.parametrize("dims,N,C,G,S,K,s,p,d", CASES)
def test_forward_and_gradients_fp32(poisoned, dims, N, C, G, S, K, s, p, d):
    _check(dims, N, C, G, S, K, s, p, d, torch.float32)


def test_forward_and_gradients_bf16_k5(poisoned):
    # bfloat16 in and out, float32 accumulation; also K=5 and more channels than one block
    _check(2, 1, 10, 1, (6, 5), 5, 1, 2, 1, torch.bfloat16)


def test_kernel_size_1_no_padding(poisoned):
    _check(2, 1, 2, 2, (3, 5), 1, 1, 0, 1, torch.float32)


def test_float64_gradcheck():
    x, w, ks, st, pa, di = make_inputs(2, 1, 2, 1, (4, 3), 3, 2, 1, 1, dtype=torch.float64, device=DEVICE,
                                       requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: it.involution_triton(a, b, ks, st, pa, di), (x, w), fast_mode=True)


def test_float64_gradgradcheck():
    """Double backward through the Triton gradient ops (their own autograd: the three ops again)."""
    x, w, ks, st, pa, di = make_inputs(2, 1, 2, 1, (4, 3), 3, 2, 1, 1, dtype=torch.float64, device=DEVICE,
                                       requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: it.involution_triton(a, b, ks, st, pa, di), (x, w),
                                        fast_mode=True)


def test_empty_batch():
    x, w, ks, st, pa, di = make_inputs(2, 0, 4, 2, (5, 5), 3, 1, 1, 1, dtype=torch.float32, device=DEVICE,
                                       requires_grad=True)
    out = it.involution_triton(x, w, ks, st, pa, di)
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_noncontiguous_and_channels_last(poisoned):
    x, w, ks, st, pa, di = make_inputs(2, 1, 4, 2, (5, 6), 3, 1, 1, 1, dtype=torch.float32, device=DEVICE)
    x_cl = x.to(memory_format=torch.channels_last)
    w_nc = w.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, non-contiguous
    assert not w_nc.is_contiguous()
    out = it.involution_triton(x_cl, w_nc, ks, st, pa, di)
    torch.testing.assert_close(out.double(), reference_involution(x.double(), w.double(), ks, st, pa, di),
                               **TOL[torch.float32])


def test_bad_input_errors():
    x, w, ks, st, pa, di = make_inputs(2, 1, 4, 2, (7, 7), 3, 2, 1, 1, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        # the published odd-size/stride-2 defect: a weight of ceil(H/2) positions instead of floor
        it.involution_triton(x, torch.randn(1, 2, 3, 3, 5, 5, device=DEVICE), ks, st, pa, di)
    with pytest.raises(ValueError, match="divisible"):
        it.involution_triton(torch.randn(1, 3, 7, 7, device=DEVICE), w, ks, st, pa, di)
    with pytest.raises(ValueError, match="larger than the padded input"):
        it.involution_triton(torch.randn(1, 4, 2, 2, device=DEVICE), torch.randn(1, 2, 3, 3, 1, 1, device=DEVICE),
                             ks, [1, 1], [0, 0], di)
    with pytest.raises(TypeError, match="dtype"):
        it.involution_triton(x, w.double(), ks, st, pa, di)
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        it.involution_triton(x.int(), w.int(), ks, st, pa, di)


def test_registry_backend():
    ok, why = available_backends()["triton"]
    assert ok, why
    name, fn = resolve("involution", "triton", torch.device(DEVICE), torch.float32, ["triton"])
    assert name == "triton"
    assert it._supports(torch.device("cpu"), torch.int32) is not None


def test_supports_cpu_only_in_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in it._supports(torch.device("cpu"), torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert it._supports(torch.device("cpu"), torch.float32) is None
    assert it._supports(torch.device("cpu"), torch.bfloat16) is None


def test_opcheck():
    x, w, ks, st, pa, di = make_inputs(2, 1, 2, 1, (4, 3), 3, 1, 1, 1, dtype=torch.float32, device=DEVICE,
                                       requires_grad=True)
    torch.library.opcheck(torch.ops.medconv.involution_triton, (x, w, ks, st, pa, di),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    gy = torch.randn(1, 2, 4, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.medconv.involution_triton_grad_input,
                          (gy, w.detach(), list(x.shape), ks, st, pa, di),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.medconv.involution_triton_grad_weight,
                          (gy, x.detach(), ks, st, pa, di, 1),
                          test_utils=("test_schema", "test_faketensor"))


def test_public_api_uses_triton():
    inv = pytest.importorskip("medconv_ext.ops.involution", reason="the involution op layer is not merged yet")
    x, w, ks, st, pa, di = make_inputs(2, 1, 2, 1, (5, 4), 3, 1, 1, 1, dtype=torch.float32, device=DEVICE)
    out = inv.involution2d(x, w, 3, stride=1, padding=1, dilation=1, backend="triton")
    torch.testing.assert_close(out.double(), reference_involution(x.double(), w.double(), ks, st, pa, di),
                               **TOL[torch.float32])


def test_naive_baseline():
    import os as _os
    import sys as _sys
    _sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "bench"))
    from naive_involution import naive_involution_forward, naive_per_output

    assert naive_per_output is naive_involution_forward

    x, w, ks, st, pa, di = make_inputs(2, 1, 4, 2, (5, 6), 3, 2, 1, 1, dtype=torch.float32, device=DEVICE)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = naive_involution_forward(xr, wr, ks, st, pa, di)
    ref, rgx, rgw, go = ref_outputs_and_grads(x, w, ks, st, pa, di)
    gx, gw = torch.autograd.grad(out, (xr, wr), go.float())
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    torch.testing.assert_close(gx.double(), rgx, **TOL[torch.float32])
    torch.testing.assert_close(gw.double(), rgw, **TOL[torch.float32])


@triton.jit
def _tap_offset_probe(out_ptr, t, So, WIDE: triton.language.constexpr):
    if WIDE:
        off = tk.tap_offset(t, So)
    else:  # the 32-bit expression the kernels used before: must wrap here, or the test cannot fail
        off = t * So
    triton.language.store(out_ptr, off)


def test_tap_offset_is_64bit():
    """The weight row of tap t starts t * S_out into a (n, g) block: for 3D K=7 (343 taps) at 160^3 outputs,
    t = 342 gives 1.4e9 and K=7 at 200^3 gives 2.7e9 > 2^31. The kernels' helper is exact; int32 wraps."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t, so = 342, 200 ** 3
    assert t * so > 2 ** 31 - 1
    for wide in (True, False):
        out = torch.zeros(1, dtype=torch.int64, device=dev)
        _tap_offset_probe[(1,)](out, t, so, WIDE=wide)
        if wide:
            assert int(out.item()) == t * so
        else:
            assert int(out.item()) != t * so, "int32 did not wrap: this test would not catch the overflow"
