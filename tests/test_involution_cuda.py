"""GPU involution kernels: the compiled CUDA ops (backend "cuda": torch.ops.medconv.involution*)
and the Triton ops (backend "triton") on CUDA tensors, against an independent float64 reference.

Skips without a GPU. Shapes are chosen to reach every path of csrc/cuda/involution.cu: several
tiles per axis, a group larger than one channel chunk (grad_weight's workspace), stride 2 with
odd sizes, dilation 2, a dilation so large that the window falls back to global reads, K = 1, 5,
7, 3D, G = 1 and G = C, a grid larger than the launch cap (grid-stride loop), a side stream,
another device, and more than 2**31 elements (int64 offsets).
"""
import pytest
import torch

from _involution_gpu_util import CUDA_CASES, TOL, make_inputs, ref_outputs_and_grads, reference_involution, tolerance

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import medconv_ext  # noqa: E402
from medconv_ext import _ext  # noqa: E402

BACKENDS = []
if _ext.has_cuda_kernels():
    BACKENDS.append("cuda")
try:
    import triton  # noqa: F401
    from medconv_ext.ops import involution_triton as it

    BACKENDS.append("triton")
except ImportError:  # pragma: no cover
    it = None
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def run(backend, x, w, ks, st, pa, di, go):
    """Forward and both gradients by the backend's three ops (no autograd involved)."""
    if backend == "cuda":
        out = torch.ops.medconv.involution(x, w, ks, st, pa, di)
        gx = torch.ops.medconv.involution_grad_input(go, w, list(x.shape), ks, st, pa, di)
        gw = torch.ops.medconv.involution_grad_weight(go, x, ks, st, pa, di, w.shape[1])
    else:
        out = it.involution_triton(x, w, ks, st, pa, di)
        gx = it.involution_triton_grad_input(go, w, list(x.shape), ks, st, pa, di)
        gw = it.involution_triton_grad_weight(go, x, ks, st, pa, di, w.shape[1])
    return out, gx, gw


def forward(backend, x, w, ks, st, pa, di):
    """Differentiable forward (the compiled op's autograd is registered by medconv_ext.ops.involution)."""
    if backend == "cuda":
        pytest.importorskip("medconv_ext.ops.involution", reason="autograd of the compiled op is registered there")
        return torch.ops.medconv.involution(x, w, ks, st, pa, di)
    return it.involution_triton(x, w, ks, st, pa, di)


def check(backend, dims, N, C, G, S, K, s, p, d, dtype, device="cuda"):
    x, w, ks, st, pa, di = make_inputs(dims, N, C, G, S, K, s, p, d, dtype=dtype, device=device)
    ref, rgx, rgw, go = ref_outputs_and_grads(x, w, ks, st, pa, di)
    out, gx, gw = run(backend, x, w, ks, st, pa, di, go.to(dtype))
    assert out.dtype == gx.dtype == gw.dtype == dtype
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    rtol, atol = tolerance(dtype, grad=True)
    torch.testing.assert_close(gx.double(), rgx, rtol=rtol, atol=atol)
    torch.testing.assert_close(gw.double(), rgw, rtol=rtol, atol=atol)
    return out, gx, gw


# One list with the CPU emulation of these kernels (tests/cuda_on_cpu): see _involution_gpu_util.CUDA_CASES.
CASES = [pytest.param(*c[1:], id=c[0]) for c in CUDA_CASES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims,N,C,G,S,K,s,p,d", CASES)
def test_against_reference(backend, dtype, dims, N, C, G, S, K, s, p, d):
    check(backend, dims, N, C, G, S, K, s, p, d, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_outputs(backend):
    """Fill the caching allocator's free memory with NaN first: every output buffer the ops
    allocate then starts as NaN, and a position a kernel forgets to write stays NaN."""
    for dims, S, K, s, p, d in [(2, (15, 17), 3, 2, 1, 1), (3, (7, 6, 9), 3, 1, 2, 2), (2, (40, 9), 7, 1, 3, 1)]:
        torch.cuda.empty_cache()
        junk = torch.full((64 * 2**20,), float("nan"), device="cuda")
        del junk  # back to the cache, NaN-filled
        out, gx, gw = check(backend, dims, 2, 40, 2, S, K, s, p, d, torch.float32)
        assert torch.isfinite(out).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    x, w, ks, st, pa, di = make_inputs(2, 2, 64, 4, (23, 29), 7, 1, 3, 1, dtype=torch.float32, device="cuda")
    go = torch.randn(2, 64, 23, 29, device="cuda")
    a = run(backend, x, w, ks, st, pa, di, go)
    b = run(backend, x, w, ks, st, pa, di, go)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x, w, ks, st, pa, di = make_inputs(2, 1, 4, 2, (5, 6), 3, 2, 1, 1, dtype=torch.float64, device="cuda",
                                       requires_grad=True)
    forward(backend, x, w, ks, st, pa, di)
    assert torch.autograd.gradcheck(lambda a, b: forward(backend, a, b, ks, st, pa, di), (x, w))
    x3, w3, ks3, st3, pa3, di3 = make_inputs(3, 1, 2, 1, (3, 4, 3), 3, 1, 1, 2, dtype=torch.float64, device="cuda",
                                             requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: forward(backend, a, b, ks3, st3, pa3, di3), (x3, w3))


def test_opcheck_compiled_ops():
    if "cuda" not in BACKENDS:
        pytest.skip("CUDA kernels not compiled in")
    pytest.importorskip("medconv_ext.ops.involution", reason="fake kernels and autograd are registered there")
    x, w, ks, st, pa, di = make_inputs(2, 2, 8, 2, (9, 7), 3, 2, 1, 1, dtype=torch.float32, device="cuda",
                                       requires_grad=True)
    torch.library.opcheck(torch.ops.medconv.involution.default, (x, w, ks, st, pa, di))
    go = torch.randn(2, 8, 5, 4, device="cuda")
    torch.library.opcheck(torch.ops.medconv.involution_grad_input.default, (go, w.detach(), list(x.shape), ks, st, pa, di))
    torch.library.opcheck(torch.ops.medconv.involution_grad_weight.default, (go, x.detach(), ks, st, pa, di, 2))


def test_opcheck_triton_ops():
    if "triton" not in BACKENDS:
        pytest.skip("triton missing")
    x, w, ks, st, pa, di = make_inputs(3, 1, 4, 2, (5, 6, 4), 3, 1, 1, 1, dtype=torch.float32, device="cuda",
                                       requires_grad=True)
    torch.library.opcheck(torch.ops.medconv.involution_triton.default, (x, w, ks, st, pa, di))
    go = torch.randn(1, 4, 5, 6, 4, device="cuda")
    torch.library.opcheck(torch.ops.medconv.involution_triton_grad_input.default,
                          (go, w.detach(), list(x.shape), ks, st, pa, di))
    torch.library.opcheck(torch.ops.medconv.involution_triton_grad_weight.default,
                          (go, x.detach(), ks, st, pa, di, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, w, ks, st, pa, di = make_inputs(2, 2, 16, 2, (11, 12), 3, 1, 1, 1, dtype=torch.float32, device="cuda",
                                       requires_grad=True)
    forward(backend, x, w, ks, st, pa, di)

    def f(a, b):
        return (forward(backend, a, b, ks, st, pa, di) * 2).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    ga = torch.autograd.grad(cf(x, w), (x, w))
    gb = torch.autograd.grad(f(x, w), (x, w))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast(backend):
    """Under autocast the ops run in the dtype of their inputs (no autocast rule: involution is
    memory-bound, the caller picks the dtype); float32 results are unchanged, bf16 inputs work."""
    x, w, ks, st, pa, di = make_inputs(2, 2, 16, 2, (11, 12), 3, 1, 1, 1, dtype=torch.float32, device="cuda")
    go = torch.randn(2, 16, 11, 12, device="cuda")
    plain = run(backend, x, w, ks, st, pa, di, go)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        auto = run(backend, x, w, ks, st, pa, di, go)
        half = run(backend, x.bfloat16(), w.bfloat16(), ks, st, pa, di, go.bfloat16())
    for u, v in zip(plain, auto):
        assert v.dtype == torch.float32
        torch.testing.assert_close(u, v)
    for u, v in zip(plain, half):
        assert v.dtype == torch.bfloat16
        torch.testing.assert_close(v.float(), u, atol=0.25, rtol=0.05)


def test_module_autocast_train_step():
    nn_mod = pytest.importorskip("medconv_ext.nn")
    if not hasattr(nn_mod, "Involution2d"):
        pytest.skip("medconv_ext.nn.Involution2d not merged yet")
    for backend in BACKENDS:
        try:
            m = nn_mod.Involution2d(32, 7, backend=backend).cuda()
        except TypeError:
            m = nn_mod.Involution2d(32, 7).cuda()
        x = torch.randn(2, 32, 14, 14, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.float().sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_channels_last_and_side_stream(backend):
    x, w, ks, st, pa, di = make_inputs(2, 0, 8, 2, (6, 7), 3, 1, 1, 1, dtype=torch.float32, device="cuda")
    go = torch.randn(0, 8, 6, 7, device="cuda")
    out, gx, gw = run(backend, x, w, ks, st, pa, di, go)
    assert out.shape == (0, 8, 6, 7) and gx.shape == x.shape and gw.shape == w.shape

    x, w, ks, st, pa, di = make_inputs(2, 2, 8, 2, (6, 7), 3, 1, 1, 1, dtype=torch.float32, device="cuda")
    go = torch.randn(2, 8, 6, 7, device="cuda")
    ref = run(backend, x, w, ks, st, pa, di, go)
    cl = run(backend, x.to(memory_format=torch.channels_last), w, ks, st, pa, di,
             go.to(memory_format=torch.channels_last))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        side = run(backend, x, w, ks, st, pa, di, go)
    torch.cuda.current_stream().wait_stream(s)
    for u, v, t in zip(ref, cl, side):
        torch.testing.assert_close(u, v)
        torch.testing.assert_close(u, t)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_second_device(backend):
    check(backend, 2, 1, 8, 2, (9, 10), 3, 1, 1, 1, torch.float32, device="cuda:1")


def test_bad_input_direct_op_calls():
    if "cuda" not in BACKENDS:
        pytest.skip("CUDA kernels not compiled in")
    x, w, ks, st, pa, di = make_inputs(2, 1, 4, 2, (7, 7), 3, 2, 1, 1, dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.medconv.involution(x, torch.randn(1, 2, 3, 3, 5, 5, device="cuda"), ks, st, pa, di)
    with pytest.raises(RuntimeError, match="not divisible"):
        torch.ops.medconv.involution(torch.randn(1, 3, 7, 7, device="cuda"), w, ks, st, pa, di)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.medconv.involution(x, w.double(), ks, st, pa, di)
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        torch.ops.medconv.involution(x, w, [9, 9], [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="kernel_size must have 2 values"):
        torch.ops.medconv.involution(x, w, [3, 3, 3], st, pa, di)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        torch.ops.medconv.involution_grad_input(torch.randn(1, 4, 3, 3, device="cuda"), w, list(x.shape), ks, st, pa, di)
    with pytest.raises(RuntimeError, match="not divisible"):
        torch.ops.medconv.involution_grad_weight(torch.randn(1, 4, 4, 4, device="cuda"), x, ks, st, pa, di, 3)
    with pytest.raises(RuntimeError, match="too large"):  # per-axis coordinates are 32-bit in the kernels
        torch.ops.medconv.involution(x, w, ks, st, [2**30, 1], di)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        torch.ops.medconv.involution(x, w.cpu(), ks, st, pa, di)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_larger_than_launch_cap(backend):
    # G = C = 1024 and 16 images: more blocks than the CUDA launch cap (2**16): grid-stride loop
    x, w, ks, st, pa, di = make_inputs(2, 16, 1024, 1024, (33, 33), 3, 1, 1, 1, dtype=torch.float32, device="cuda")
    out = run(backend, x, w, ks, st, pa, di, torch.zeros(16, 1024, 33, 33, device="cuda"))[0]
    torch.testing.assert_close(out.double(), reference_involution(x.double(), w.double(), ks, st, pa, di),
                               **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_2_31_elements(backend):
    """x and out with 2**31 + elements (bf16): offsets past int32 must be right."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    N, C, G, H, W = 1, 64, 4, 4096, 8200  # 2.15e9 elements
    x = torch.randn(N, C, H, W, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, G, 3, 3, H, W, device="cuda", dtype=torch.bfloat16)
    ks, st, pa, di = [3, 3], [1, 1], [1, 1], [1, 1]
    if backend == "cuda":
        out = torch.ops.medconv.involution(x, w, ks, st, pa, di)
    else:
        out = it.involution_triton(x, w, ks, st, pa, di)
    # check the last rows (offsets beyond 2**31) against the reference on a slice
    xs = x[:, :, H - 9:].double()  # input rows H-9 .. H-1 give output rows H-8 .. H-2 unpadded
    ref = reference_involution(xs, w[..., H - 8:H - 1, :].double(), ks, st, [0, 1], di)
    torch.testing.assert_close(out[:, :, H - 8:H - 1].double(), ref, **TOL[torch.bfloat16])
