"""Gradients of gradients (create_graph=True: gradient penalties, second-order methods) through every
backend's gradient ops: gradgradcheck in float64 where the backend runs float64 (the compiled "cpu" ops,
the fused spectral CPU kernel; its concatenating form in test_rolling_conv_cat.py), and a gradient penalty against the reference
backend's for the Triton kernels (interpreter mode on the CPU, float32). Without the gradient ops'
own autograd, their outputs were treated as constants: the second-order terms came out zero, silently."""
import pytest
import torch

import medconv_ext as mc
from medconv_ext import _ext
from medconv_ext.ops import rolling_conv_spectral_cpu as fused

CONV = {2: mc.rolling_conv2d, 3: mc.rolling_conv3d}
CONV_T = {2: mc.rolling_conv_transpose2d, 3: mc.rolling_conv_transpose3d}
# (dims, N, C_in, n_base, n_rolls, spatial, k, stride, padding, dilation, output_padding)
CASES = [
    (2, 1, 4, 2, 2, (5, 6), 3, 2, 1, 2, 1),  # stride 2, dilation 2, two bases, partial roll
    (2, 2, 3, 1, 3, (4, 5), 3, 1, 1, 1, 0),  # odd C, batch 2
    (3, 1, 4, 1, 4, (3, 4, 3), 3, 1, 1, 1, 0),
]
BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not _ext.has_compiled_ops(), reason="compiled ops not built")),
            pytest.param("spectral", marks=pytest.mark.skipif(not fused.available(), reason="fused kernel not built")),
            "reference"]


def _layer(backend, transposed, case):
    dims, n, c, nb, nr, size, k, s, p, d, op = case
    if transposed:
        return lambda x, w, b: CONV_T[dims](x, w, b, s, p, op, nr, backend=backend, dilation=d)
    return lambda x, w, b: CONV[dims](x, w, b, s, p, d, nr, backend=backend)


def _inputs(case, transposed, dtype, seed=0):
    dims, n, c, nb, nr, size, k = case[:7]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *size, dtype=dtype, generator=gen)
    w = torch.randn(*((c, nb) if transposed else (nb, c)), *([k] * dims), dtype=dtype, generator=gen)
    b = torch.randn(nb * nr, dtype=dtype, generator=gen)
    return x, w, b


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "%dd-C%d-nb%d-r%d-s%d-d%d" % (c[0], c[2], c[3], c[4], c[7], c[9]))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck(backend, case, transposed):
    x, w, b = (t.requires_grad_(True) for t in _inputs(case, transposed, torch.float64))
    assert torch.autograd.gradgradcheck(_layer(backend, transposed, case), (x, w, b))


@pytest.mark.skipif(not fused.available(), reason="fused kernel not built")
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
def test_gradgradcheck_fused_epilogue(transposed):
    """The fused kernel's epilogue (scale, shift; ReLU away from its kink) under double backward."""
    case = CASES[0]
    x, w, b = _inputs(case, transposed, torch.float64, seed=3)
    scale, shift = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    dims = case[0]
    fn = CONV_T[dims] if transposed else CONV[dims]

    def f(x, w, b, scale, shift):
        if transposed:
            return fn(x, w, b, 2, 1, 1, 2, backend="spectral", dilation=2, scale=scale, shift=shift, relu=True)
        return fn(x, w, b, 2, 1, 2, 2, backend="spectral", scale=scale, shift=shift, relu=True)
    args = [t.requires_grad_(True) for t in (x, w, b, scale, shift)]
    assert torch.autograd.gradgradcheck(f, args)


def _penalty(layer, x, w):
    """A gradient penalty: |dL/dx|^2 + |dL/dw|^2 with L = sum(y^2), differentiated again."""
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = layer(x, w, None)
    gx, gw = torch.autograd.grad((y * y).sum(), (x, w), create_graph=True)
    ((gx * gx).sum() + (gw * gw).sum()).backward()
    return x.grad, w.grad


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
@pytest.mark.parametrize("impl", ["triton", "spectral_triton"])
def test_triton_gradient_penalty_vs_reference(impl, transposed):
    pytest.importorskip("triton")
    from medconv_ext.ops import rolling_conv_spectral_triton as ST
    from medconv_ext.ops import rolling_conv_triton as RT
    if RT._supports(torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the Triton kernels run on CPU tensors only in interpreter mode (TRITON_INTERPRET=1)")
    case = CASES[0]
    dims, n, c, nb, nr, size, k, s, p, d, op = case
    x, w, _ = _inputs(case, transposed, torch.float32, seed=5)
    if impl == "triton":
        layer = _layer("triton", transposed, case)
    elif transposed:
        layer = lambda x_, w_, b_: ST.conv_transpose(x_, w_, b_, [s] * dims, [p] * dims, [op] * dims,  # noqa: E731
                                                     [d] * dims, nr)
    else:
        layer = lambda x_, w_, b_: ST.conv(x_, w_, b_, [s] * dims, [p] * dims, [d] * dims, nr)  # noqa: E731
    got = _penalty(layer, x, w)
    want = _penalty(_layer("reference", transposed, case), x.double(), w.double())
    for g, r in zip(got, want):
        assert torch.isfinite(g).all() and _rel(g, r) < 1e-4
