"""Forward-mode AD and torch.func transforms (jvp, grad, vmap) through the public API: the compiled and
Triton ops carry reverse-mode formulas only and torch.library's autograd layer does not run under
torch.func, so there every layer computes with its pure-PyTorch "reference" backend. Checked against the
float64 reference's own tangents and gradients, for every backend a user can name, after the same layer
was called (and its backend choice memoised) outside the transform."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import medconv_ext as mc
from medconv_ext import _ext
from medconv_ext.ops import rolling_conv_spectral_cpu as fused

BACKENDS = [pytest.param("cpu", marks=pytest.mark.skipif(not _ext.has_compiled_ops(), reason="compiled ops not built")),
            pytest.param("spectral", marks=pytest.mark.skipif(not fused.available(), reason="fused kernel not built")),
            "auto", "reference"]


def _rolling(backend, transposed):
    if transposed:
        return lambda x, w: mc.rolling_conv_transpose2d(x, w, None, 2, 1, 1, backend=backend)
    return lambda x, w: mc.rolling_conv2d(x, w, None, 1, 1, backend=backend)


def _inputs(transposed, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 6, 7, dtype=torch.float64, generator=gen)  # C=16: auto picks the fused kernel
    w = torch.randn(*((16, 1) if transposed else (1, 16)), 3, 3, dtype=torch.float64, generator=gen)
    return x, w, torch.randn(x.shape, dtype=torch.float64, generator=gen), torch.randn(w.shape, dtype=torch.float64,
                                                                                        generator=gen)


def _close(a, b):
    assert a is not None and a.shape == b.shape
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-10


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_and_torch_func(backend, transposed):
    x, w, tx, tw = _inputs(transposed)
    f, ref = _rolling(backend, transposed), _rolling("reference", transposed)
    f(x, w)  # a call outside any transform first: its memoised backend choice must not leak into them
    _, want_t = torch.func.jvp(ref, (x, w), (tx, tw))
    with fwAD.dual_level():
        _close(fwAD.unpack_dual(f(fwAD.make_dual(x, tx), fwAD.make_dual(w, tw))).tangent, want_t)
    _close(torch.func.jvp(f, (x, w), (tx, tw))[1], want_t)
    gx, gw = torch.func.grad(lambda a, b: f(a, b).pow(2).sum(), argnums=(0, 1))(x, w)
    rx, rw = torch.func.grad(lambda a, b: ref(a, b).pow(2).sum(), argnums=(0, 1))(x, w)
    _close(gx, rx)
    _close(gw, rw)
    _close(torch.func.vmap(lambda a: f(a[None], w)[0])(x), ref(x, w))


@pytest.mark.skipif(not _ext.has_compiled_ops(), reason="compiled ops not built")
def test_involution_forward_mode_and_torch_func():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, generator=gen)
    w = torch.randn(1, 2, 3, 3, 6, 6, dtype=torch.float64, generator=gen)
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    f = lambda a, b: mc.involution2d(a, b, 3, 1, 1, backend="cpu")  # noqa: E731
    ref = lambda a, b: mc.involution2d(a, b, 3, 1, 1, backend="reference")  # noqa: E731
    f(x, w)
    _, want_t = torch.func.jvp(ref, (x, w), (tx, tw))
    _close(torch.func.jvp(f, (x, w), (tx, tw))[1], want_t)
    _close(torch.func.grad(lambda a: f(a, w).pow(2).sum())(x), torch.func.grad(lambda a: ref(a, w).pow(2).sum())(x))


@pytest.mark.skipif(not fused.available(), reason="fused kernel not built")
def test_rolling_conv_cat_under_torch_func():
    """The decoder's concatenating layer (in-place read of both inputs on the fused path) under jvp and vmap."""
    from medconv_ext.ops.rolling_conv_cat import rolling_conv_cat
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, generator=gen)
    x2 = torch.randn(2, 8, 5, 6, dtype=torch.float64, generator=gen)
    w = torch.randn(1, 16, 3, 3, dtype=torch.float64, generator=gen)
    f = lambda a, a2: rolling_conv_cat(a, a2, w, None, 1, 1, 1, 16)  # noqa: E731
    ref = lambda a, a2: mc.rolling_conv2d(torch.cat([a, a2], 1), w, None, 1, 1, backend="reference")  # noqa: E731
    f(x, x2)
    t, t2 = torch.randn_like(x), torch.randn_like(x2)
    _close(torch.func.jvp(f, (x, x2), (t, t2))[1], torch.func.jvp(ref, (x, x2), (t, t2))[1])
    _close(torch.func.vmap(lambda a, a2: f(a[None], a2[None])[0])(x, x2), ref(x, x2))
