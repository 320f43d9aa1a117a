"""CUDA backend of rolling convolution (csrc/cuda/rolling_conv.cu). Skips without a CUDA device and
CUDA kernels; on a GPU: every dtype against the float64 reference, the paper's eq. 7/8, gradcheck
(float64), opcheck, torch.compile(fullgraph=True), autocast, poisoned outputs, determinism, and a
case with more than 2^31 output elements.
"""
import math

import pytest
import torch

import medconv_ext
from medconv_ext import _ext

from _rolling_gpu_util import (
    CUDA_CASES,
    assert_close,
    eq7_grad_weight,
    eq7_grad_weight_transpose,
    eq8_grad_input,
    make_case,
    reference_all,
)

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cuda_kernels()),
    reason="needs a CUDA device and medconv_ext._C built with CUDA kernels",
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def poison_allocator(nbytes, count=8):
    """Leave NaN-filled blocks of `nbytes` in the caching allocator: the next allocations of that size
    (the kernels' outputs) reuse them, so an element a kernel fails to write stays NaN."""
    n = max(1, nbytes // 4)
    blocks = [torch.full((n,), float("nan"), device="cuda") for _ in range(count)]
    torch.cuda.synchronize()
    del blocks


def _call(transposed, x, w, b, stride, padding, output_padding, dilation, n_rolls):
    dims = x.dim() - 2
    if transposed:
        f = {2: medconv_ext.rolling_conv_transpose2d, 3: medconv_ext.rolling_conv_transpose3d}[dims]
        return f(x, w, b, stride, padding, output_padding, n_rolls=n_rolls, backend="cuda", dilation=dilation)
    f = {2: medconv_ext.rolling_conv2d, 3: medconv_ext.rolling_conv3d}[dims]
    return f(x, w, b, stride, padding, dilation, n_rolls=n_rolls, backend="cuda")


# One list with the CPU emulation of these kernels (tests/cuda_on_cpu): see _rolling_gpu_util.CUDA_CASES.
SHAPES = [pytest.param(*c[1:], id=c[0]) for c in CUDA_CASES]
ARGS = "transposed,dims,N,C,nb,n_rolls,k,spatial,stride,padding,output_padding,dilation,layout,bias"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(ARGS, SHAPES)
def test_cuda_vs_reference(dtype, transposed, dims, N, C, nb, n_rolls, k, spatial, stride, padding, output_padding,
                           dilation, layout, bias):
    x, w, b = make_case(transposed, dims, N, C, nb, n_rolls, k, spatial, dtype, "cuda", bias=bias)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    x.requires_grad_()
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    bc = b.cpu() if b is not None else None
    ry, rgx, rgw, rgb, go = reference_all(transposed, x.cpu(), w.cpu(), bc, stride, padding, output_padding,
                                          dilation, n_rolls, grad_out=None)
    go = go.to(dtype)  # the kernel and the reference see the same rounded grad_out
    ry, rgx, rgw, rgb, go = reference_all(transposed, x.cpu(), w.cpu(), bc, stride, padding, output_padding,
                                          dilation, n_rolls, grad_out=go.double())
    poison_allocator(max(ry.numel(), x.numel(), w.numel()) * 4)
    y = _call(transposed, x, w, b, stride, padding, output_padding, dilation, n_rolls)
    assert y.dtype == dtype and y.device.type == "cuda"
    assert_close(y, ry, dtype, "forward")
    poison_allocator(max(x.numel(), w.numel()) * 8)
    y.backward(go.to("cuda", dtype))
    assert_close(x.grad, rgx, dtype, "grad_input")
    assert_close(w.grad, rgw, dtype, "grad_weight")
    if b is not None:
        assert_close(b.grad, rgb, dtype, "grad_bias")
    if N > 0:  # the paper's equations, literally
        kk = list(w.shape[2:])
        if transposed:
            assert_close(w.grad, eq7_grad_weight_transpose(go, x.detach().cpu(), kk, stride, padding, dilation, n_rolls, nb),
                         dtype, "eq7")
        else:
            assert_close(w.grad, eq7_grad_weight(go, x.detach().cpu(), kk, stride, padding, dilation, n_rolls, nb), dtype, "eq7")
            assert_close(x.grad, eq8_grad_input(go, w.detach().cpu(), x.shape, stride, padding, dilation, n_rolls), dtype,
                         "eq8")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize(ARGS, SHAPES)
def test_cuda_mma_vs_reference(monkeypatch, dtype, transposed, dims, N, C, nb, n_rolls, k, spatial, stride, padding,
                               output_padding, dilation, layout, bias):
    """The opt-in tensor-core (WMMA) GEMM kernel, MEDCONV_CUDA_MMA=1: the same checks."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the WMMA kernel needs compute capability >= 8.0")
    monkeypatch.setenv("MEDCONV_CUDA_MMA", "1")
    test_cuda_vs_reference(dtype, transposed, dims, N, C, nb, n_rolls, k, spatial, stride, padding, output_padding,
                           dilation, layout, bias)


@pytest.mark.parametrize("transposed,dims", [(False, 2), (False, 3), (True, 2), (True, 3)])
def test_cuda_gradcheck(transposed, dims):
    x, w, b = make_case(transposed, dims, 2, 3, 2, 2, 2, 4, torch.float64, "cuda")
    s, p, op_, d = [2] * dims, [1] * dims, [1] * dims, [1] * dims
    for t in (x, w, b):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _call(transposed, x, w, b, s, p, op_, d, 2), (x, w, b))


def test_cuda_opcheck():
    C, nb, nr = 3, 2, 2
    x = torch.randn(2, C, 5, 5, device="cuda", requires_grad=True)
    w = torch.randn(nb, C, 3, 3, device="cuda", requires_grad=True)
    wt = torch.randn(C, nb, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(nr * nb, device="cuda", requires_grad=True)
    go = torch.randn(2, nr * nb, 3, 3, device="cuda")
    got = torch.randn(2, nr * nb, 7, 7, device="cuda")
    ops = torch.ops.medconv
    cases = [
        (ops.rolling_conv.default, (x, w, b, [1, 1], [0, 0], [1, 1], nr)),
        (ops.rolling_conv_grad_input.default, (go, w.detach(), list(x.shape), [1, 1], [0, 0], [1, 1], nr)),
        (ops.rolling_conv_grad_weight.default, (go, x.detach(), list(w.shape), [1, 1], [0, 0], [1, 1], nr)),
        (ops.rolling_conv_transpose.default, (x, wt, b, [1, 1], [0, 0], [0, 0], [1, 1], nr)),
        (ops.rolling_conv_transpose_grad_input.default, (got, wt.detach(), list(x.shape), [1, 1], [0, 0], [1, 1], nr)),
        (ops.rolling_conv_transpose_grad_weight.default, (got, x.detach(), list(wt.shape), [1, 1], [0, 0], [1, 1], nr)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_cuda_compile_fullgraph_ops():
    x, w, b = make_case(False, 2, 2, 8, 1, 8, 3, 12, torch.float32, "cuda")
    wt = torch.randn(8, 1, 2, 2, device="cuda")

    def f(x, w, b, wt):
        y = torch.ops.medconv.rolling_conv(x, w, b, [1, 1], [1, 1], [1, 1], 8).relu()
        return torch.ops.medconv.rolling_conv_transpose(y, wt, None, [2, 2], [0, 0], [0, 0], [1, 1], 4)

    ref = f(x, w, b, wt)
    cf = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(cf(x, w, b, wt), ref, rtol=1e-5, atol=1e-5)
    x.requires_grad_()
    cf(x, w, b, wt).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_cuda_compile_fullgraph_api():
    """The public functional API (argument checks + backend choice) traced without graph breaks."""
    x, w, b = make_case(False, 2, 2, 8, 1, 8, 3, 12, torch.float32, "cuda")

    def f(x, w, b):
        return medconv_ext.rolling_conv2d(x, w, b, stride=1, padding=1, backend="cuda").relu()

    ref = f(x, w, b)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, w, b), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
def test_cuda_autocast(dtype, transposed):
    x, w, b = make_case(transposed, 2, 2, 6, 2, 3, 3, 9, torch.float32, "cuda")
    x.requires_grad_()
    w.requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        y = _call(transposed, x, w, b, [2, 2], [1, 1], [1, 1], [1, 1], 3)
    assert y.dtype == dtype, "the autocast rule should run the op in %s" % dtype
    # reference on the same rounded inputs
    ry = reference_all(transposed, x.detach().to(dtype).cpu(), w.detach().to(dtype).cpu(), b.to(dtype).cpu(),
                       [2, 2], [1, 1], [1, 1], [1, 1], 3)[0]
    assert_close(y, ry, dtype, "autocast forward")
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
def test_cuda_deterministic(dtype, transposed):
    """No atomics: forward and both gradients are the same bits on every run."""
    x, w, b = make_case(transposed, 3, 2, 16, 2, 8, 3, 10, dtype, "cuda")
    outs = []
    for _ in range(2):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = _call(transposed, xi, wi, b, [1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1], 8)
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad, wi.grad))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


def test_cuda_errors():
    x, w, b = make_case(False, 2, 1, 4, 1, 4, 3, 6, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="CUDA tensor|cuda"):
        torch.ops.medconv.rolling_conv(x.cpu(), w, None, [1, 1], [0, 0], [1, 1], 4)
    with pytest.raises(RuntimeError, match="n_rolls"):
        torch.ops.medconv.rolling_conv(x, w, None, [1, 1], [0, 0], [1, 1], 5)
    with pytest.raises(RuntimeError, match="stride"):
        torch.ops.medconv.rolling_conv(x, w, None, [1], [0, 0], [1, 1], 4)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.medconv.rolling_conv_grad_input(torch.randn(1, 4, 3, 3, device="cuda"), w, [1, 4, 6, 6], [1, 1], [0, 0],
                                                  [1, 1], 4)


def test_cuda_more_than_2pow31_output_elements():
    """Output of 2 * 46341^2 > 2^31 elements (fp16, ~17 GB in all): int64 offsets end to end; the last
    rows and columns (the largest offsets) are compared with the reference on a crop."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2 ** 30:
        pytest.skip("needs 24 GiB of free GPU memory")
    H = 46341
    x = torch.randn(1, 2, H, H, device="cuda", dtype=torch.float16)
    w = torch.randn(1, 2, 3, 3, device="cuda", dtype=torch.float16)
    y = medconv_ext.rolling_conv2d(x, w, None, stride=1, padding=1, n_rolls=2, backend="cuda")
    assert y.numel() > 2 ** 31
    crop = x[..., -6:, -6:].double().cpu()
    ref = torch.nn.functional.conv2d(crop, medconv_ext.nn.rolling_conv.expand_rolling_weight(w.double().cpu(), 2), None, 1, 1)
    assert_close(y[..., -4:, -4:], ref[..., -4:, -4:], torch.float16, "last rows")
    top = torch.nn.functional.conv2d(x[..., :6, :6].double().cpu(),
                                     medconv_ext.nn.rolling_conv.expand_rolling_weight(w.double().cpu(), 2), None, 1, 1)
    assert_close(y[..., :4, :4], top[..., :4, :4], torch.float16, "first rows")
    del x, y
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# realistic channel counts and > 2^31 elements in the gradient and transposed paths, for every GPU backend
# --------------------------------------------------------------------------------------
GPU_BACKENDS = ["cuda", "triton", "spectral"]  # "spectral" on CUDA: the fused Triton kernel

# (transposed, dims, N, C, n_base, n_rolls, k, spatial, stride, padding, output_padding)
REALISTIC = [
    pytest.param(False, 2, 2, 128, 1, 128, 3, (17, 19), [1, 1], [1, 1], [0, 0], id="conv2d-C128"),
    pytest.param(False, 2, 1, 256, 1, 128, 3, 12, [2, 2], [1, 1], [0, 0], id="conv2d-C256-half-roll-s2"),
    pytest.param(False, 3, 1, 128, 1, 128, 5, 7, [1, 1, 1], [2, 2, 2], [0, 0, 0], id="conv3d-C128-5x5x5"),
    pytest.param(True, 2, 1, 128, 2, 64, 2, 9, [2, 2], [0, 0], [0, 0], id="convT2d-C128-nb2"),
    pytest.param(True, 3, 1, 256, 1, 256, 3, 5, [2, 2, 2], [1, 1, 1], [1, 1, 1], id="convT3d-C256"),
]


def _call_backend(backend, transposed, x, w, b, stride, padding, output_padding, n_rolls):
    dims = x.dim() - 2
    if transposed:
        f = {2: medconv_ext.rolling_conv_transpose2d, 3: medconv_ext.rolling_conv_transpose3d}[dims]
        return f(x, w, b, stride, padding, output_padding, n_rolls=n_rolls, backend=backend)
    f = {2: medconv_ext.rolling_conv2d, 3: medconv_ext.rolling_conv3d}[dims]
    return f(x, w, b, stride, padding, 1, n_rolls=n_rolls, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("transposed,dims,N,C,nb,n_rolls,k,spatial,stride,padding,output_padding", REALISTIC)
def test_realistic_channel_counts(backend, dtype, transposed, dims, N, C, nb, n_rolls, k, spatial, stride, padding,
                                  output_padding):
    """C = 128 and 256 (several channel tiles, the fused kernel's frequency chunks): forward and both
    gradients against the float64 reference, on poisoned memory."""
    ok, why = medconv_ext.available_backends()[backend]
    if not ok:
        pytest.skip(why)
    x, w, b = make_case(transposed, dims, N, C, nb, n_rolls, k, spatial, dtype, "cuda")
    d = [1] * dims
    _, _, _, _, go = reference_all(transposed, x.cpu(), w.cpu(), b.cpu(), stride, padding, output_padding, d, n_rolls)
    go = go.to(dtype)
    ry, rgx, rgw, rgb, _ = reference_all(transposed, x.cpu(), w.cpu(), b.cpu(), stride, padding, output_padding, d,
                                         n_rolls, grad_out=go.double())
    for t in (x, w, b):
        t.requires_grad_()
    poison_allocator(ry.numel() * 4)
    y = _call_backend(backend, transposed, x, w, b, stride, padding, output_padding, n_rolls)
    assert_close(y, ry, dtype, "%s forward" % backend)
    poison_allocator(max(x.numel(), w.numel()) * 8)
    y.backward(go.to("cuda"))
    assert_close(x.grad, rgx, dtype, "%s grad_input" % backend)
    assert_close(w.grad, rgw, dtype, "%s grad_weight" % backend)
    assert_close(b.grad, rgb, dtype, "%s grad_bias" % backend)


def large_case_memory(backend: str) -> int:
    """Bytes of GPU memory the > 2^31-element case needs (tests/_rolling_gpu_util.large_case_check, H=33000):
    one (1, 2, 33000, 33000) float32 tensor is 8.1 GiB; at the peak (the backward) x, y, grad_out and grad_input
    are alive (4 tensors, 32 GiB), and the fused spectral kernel adds the float32 input and grad spectra (2F = 4
    values per pixel each, 2 tensors' worth each: 65 GiB in all); 8% on top for the allocator and the
    context. So: 35 GiB for cuda/triton, 70 GiB for spectral, which runs on an 80 GB H100/A100."""
    act = 2 * 33000 ** 2 * 4
    return int((8 if backend == "spectral" else 4) * act * 1.08)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("transposed", [False, True], ids=["conv-grads", "convT-fwd-grads"])
def test_more_than_2pow31_elements_gradients_and_transposed(backend, transposed):
    """(1, 2, 33000, 33000) float32 activations (2.18e9 > 2^31 elements each): forward, grad_input and
    grad_weight of the conv and of the transposed conv (tests/_rolling_gpu_util.large_case_check).
    GPU memory: 35 GiB free for cuda/triton, 70 GiB for spectral (large_case_memory)."""
    from _rolling_gpu_util import large_case_check

    ok, why = medconv_ext.available_backends()[backend]
    if not ok:
        pytest.skip(why)
    free, _ = torch.cuda.mem_get_info()
    need = large_case_memory(backend)
    if free < need:
        pytest.skip("needs %.0f GiB of free GPU memory, %.0f GiB free" % (need / 2 ** 30, free / 2 ** 30))
    assert large_case_check(transposed, backend, 33000, "cuda") > 2 ** 31
    torch.cuda.empty_cache()
