"""Fused spectral rolling convolution (Triton). Without a GPU the kernels run on CPU tensors under
TRITON_INTERPRET=1 (set by conftest.py), so shapes are tiny; on a GPU the same tests run on CUDA.

Forward, grad_input and grad_weight against the float64 reference (autograd through the materialized
bank) and the paper's eq. 7/8 written out literally; outputs poisoned (every torch.empty starts as NaN);
every configuration of the autotune lists run explicitly; 16-bit numerics at C=128; the registration as
the fused kernel of "spectral" on CUDA. (The CUDA `auto` rule: tests/test_cuda_auto_rule.py; the
ahead-of-time compile of every config: tests/test_triton_aot.py.)
"""
import math
import os

import pytest
import torch

from medconv_ext import backends
from medconv_ext.ops import rolling_conv as RC
from medconv_ext.ops import rolling_conv_spectral as RS
from medconv_ext.ops import rolling_conv_spectral_triton as ST

from _rolling_gpu_util import (
    assert_close,
    eq7_grad_weight,
    eq7_grad_weight_transpose,
    eq8_grad_input,
    make_case,
    needs_triton,
    poison,  # noqa: F401 (fixture)
    reference_all,
    triton_ok,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"




def _fwd(transposed, x, w, b, stride, padding, output_padding, dilation, n_rolls, **epi):
    if transposed:
        return ST.conv_transpose(x, w, b, stride, padding, output_padding, dilation, n_rolls, **epi)
    return ST.conv(x, w, b, stride, padding, dilation, n_rolls, **epi)


# (transposed, dims, N, C, n_base, n_rolls, k, spatial, stride, padding, output_padding, dilation, dtype)
CASES = [
    pytest.param(False, 2, 2, 5, 2, 3, 3, (9, 8), [2, 2], [1, 1], [0, 0], [2, 2], torch.float32,
                 id="conv2d-C5-odd-s2-d2-partial-nb2"),
    pytest.param(False, 2, 1, 1, 1, 1, (3, 2), (5, 6), [1, 1], [0, 0], [0, 0], [1, 1], torch.float32, id="conv2d-C1"),
    pytest.param(False, 3, 1, 6, 1, 6, 3, (4, 5, 3), [1, 2, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1], torch.float32,
                 id="conv3d-C6-fullroll"),
    pytest.param(True, 2, 2, 5, 2, 3, 3, (4, 5), [2, 2], [1, 1], [1, 1], [1, 1], torch.float32,
                 id="convT2d-s2-op1-partial-nb2"),
    pytest.param(True, 3, 1, 4, 1, 2, 2, 3, [2, 2, 2], [0, 0, 0], [1, 0, 1], [1, 1, 1], torch.float32,
                 id="convT3d-s2-partial"),
    pytest.param(False, 2, 1, 6, 2, 3, 3, 6, [1, 1], [1, 1], [0, 0], [1, 1], torch.bfloat16, id="conv2d-bf16"),
    pytest.param(True, 2, 1, 4, 2, 4, 2, 4, [2, 2], [0, 0], [0, 0], [1, 1], torch.float16, id="convT2d-fp16"),
]


@needs_triton
@pytest.mark.parametrize("transposed,dims,N,C,nb,n_rolls,k,spatial,stride,padding,output_padding,dilation,dtype", CASES)
def test_fused_spectral_vs_reference(poison, transposed, dims, N, C, nb, n_rolls, k, spatial, stride, padding,
                                     output_padding, dilation, dtype):
    x, w, b = make_case(transposed, dims, N, C, nb, n_rolls, k, spatial, dtype, DEVICE)
    xk, wk, bk = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = _fwd(transposed, xk, wk, bk, stride, padding, output_padding, dilation, n_rolls)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    y.backward(go.to(y.device))
    ry, rgx, rgw, rgb, _ = reference_all(transposed, x.cpu(), w.cpu(), b.cpu(), stride, padding, output_padding,
                                         dilation, n_rolls, grad_out=go.double())
    assert y.dtype == dtype and xk.grad.dtype == dtype and wk.grad.dtype == dtype
    assert_close(y, ry, dtype, "forward")
    assert_close(xk.grad, rgx, dtype, "grad_input")
    assert_close(wk.grad, rgw, dtype, "grad_weight")
    assert_close(bk.grad, rgb, dtype, "grad_bias")
    kk = list(w.shape[2:])
    if transposed:
        assert_close(wk.grad, eq7_grad_weight_transpose(go, x.cpu(), kk, stride, padding, dilation, n_rolls, nb),
                     dtype, "eq7")
    else:
        assert_close(wk.grad, eq7_grad_weight(go, x.cpu(), kk, stride, padding, dilation, n_rolls, nb), dtype, "eq7")
        assert_close(xk.grad, eq8_grad_input(go, w.cpu(), x.shape, stride, padding, dilation, n_rolls), dtype, "eq8")


# --------------------------------------------------------------------------------------
# 16-bit numerics at a realistic channel count (the GPU test's C=128 case and tolerances)
# --------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_16bit_c128_forward_and_gradients(poison, dtype):
    """2D 3x3, C=128, full roll, in bfloat16 and float16, with the tolerances of the GPU test of realistic
    channel counts (tests/test_rolling_conv_cuda.py::test_realistic_channel_counts, conv2d-C128):
    (a) forward, grad_input and grad_weight through autograd at N=1, 6x6 (the interpreter is slow);
    (b) grad_weight at exactly the GPU test's shape (N=2, 17x19).
    With the channel DFT matrices rounded once to 16 bits, 60-90 of the 1152 grad_weight elements fall
    outside these tolerances (the error scales with the whole spectrum, not each element); the hi/lo split
    of the matrices (split16) keeps them float32-accurate."""
    C, k, s, p, d = 128, 3, [1, 1], [1, 1], [1, 1]
    x, w, b = make_case(False, 2, 1, C, 1, C, k, (6, 6), dtype, DEVICE)
    _, _, _, _, go = reference_all(False, x.cpu(), w.cpu(), b.cpu(), s, p, [0, 0], d, C)
    go = go.to(dtype)
    ry, rgx, rgw, _, _ = reference_all(False, x.cpu(), w.cpu(), b.cpu(), s, p, [0, 0], d, C, grad_out=go.double())
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = ST.conv(xk, wk, b, s, p, d, C)
    y.backward(go.to(DEVICE))
    assert_close(y, ry, dtype, "forward C=128")
    assert_close(xk.grad, rgx, dtype, "grad_input C=128")
    assert_close(wk.grad, rgw, dtype, "grad_weight C=128")
    # (b) the GPU test's shape, grad_weight alone (the op autograd uses when only the weights need it)
    x, w, b = make_case(False, 2, 2, C, 1, C, k, (17, 19), dtype, DEVICE)
    _, _, _, _, go = reference_all(False, x.cpu(), w.cpu(), b.cpu(), s, p, [0, 0], d, C)
    go = go.to(dtype)
    rgw = reference_all(False, x.cpu(), w.cpu(), b.cpu(), s, p, [0, 0], d, C, grad_out=go.double())[2]
    gw = ST.rolling_conv_spectral_triton_grad_weight(go.to(DEVICE), x, list(w.shape), s, p, d, C)
    assert_close(gw, rgw, dtype, "grad_weight C=128 N=2 17x19")


def test_split16_carries_the_float32_matrix():
    from medconv_ext.triton_kernels import rolling_conv_spectral as K

    m = K.dft_matrix(128, "cpu")
    for dtype, bits in ((torch.bfloat16, 15), (torch.float16, 20)):
        hl = K.split16(m, dtype)
        assert hl.shape == (2,) + tuple(m.shape) and hl.dtype == dtype
        err = (hl[0].double() + hl[1].double() - m.double()).abs().max().item()
        assert err <= 2.0 ** -bits, (dtype, err)
        assert (hl[0].double() - m.double()).abs().max().item() > 2.0 ** -14  # the low half is needed


@needs_triton
def test_epilogue_scale_shift_relu(poison):
    """relu((conv + bias) * scale + shift) in the kernel (inference) and by torch ops when training."""
    x, w, b = make_case(False, 2, 1, 6, 2, 3, 3, 5, torch.float32, DEVICE)
    g = torch.Generator().manual_seed(3)
    scale = torch.randn(6, generator=g).to(DEVICE)
    shift = torch.randn(6, generator=g).to(DEVICE)
    ry = reference_all(False, x.cpu(), w.cpu(), b.cpu(), [1, 1], [1, 1], [0, 0], [1, 1], 3)[0]
    want = torch.relu(ry * scale.double().cpu().view(1, -1, 1, 1) + shift.double().cpu().view(1, -1, 1, 1))
    with torch.no_grad():
        y = ST.conv(x, w, b, [1, 1], [1, 1], [1, 1], 3, scale=scale, shift=shift, relu=True)
    assert_close(y, want, torch.float32, "fused epilogue")
    assert (y == 0).any() and (y > 0).any()
    y_shift = ST.conv(x, w, None, [1, 1], [1, 1], [1, 1], 3, shift=shift)  # one part alone
    ry0 = reference_all(False, x.cpu(), w.cpu(), None, [1, 1], [1, 1], [0, 0], [1, 1], 3)[0]
    assert_close(y_shift, ry0 + shift.double().cpu().view(1, -1, 1, 1), torch.float32, "shift only")
    # training: the same values, gradients through the torch epilogue
    xk = x.clone().requires_grad_()
    y2 = ST.conv(xk, w, b, [1, 1], [1, 1], [1, 1], 3, scale=scale, shift=shift, relu=True)
    assert_close(y2.detach(), want, torch.float32, "epilogue with autograd")
    y2.sum().backward()
    assert torch.isfinite(xk.grad).all()
    # the custom op itself refuses a gradient through its fused epilogue, with a clear message
    xk2 = x.clone().requires_grad_()
    y3 = ST.rolling_conv_spectral_triton(xk2, w, b, scale, shift, True, [1, 1], [1, 1], [1, 1], 3)
    with pytest.raises(RuntimeError, match="epilogue"):
        y3.sum().backward()


# --------------------------------------------------------------------------------------
# every configuration of the autotune lists, run explicitly on each kernel
# --------------------------------------------------------------------------------------
@needs_triton
def test_every_config(poison):
    """Every configuration this device may launch (on a GPU: the lists minus the ones pruned for its
    architecture, triton_kernels/_configs.PRUNED; under the interpreter: all of them)."""
    from medconv_ext.triton_kernels import _configs
    from medconv_ext.triton_kernels import rolling_conv_spectral as K
    from medconv_ext.triton_kernels.rolling_conv import make_geom

    def launched(kernel, configs):
        return _configs.select(kernel, configs, None, pin="")

    C, nb, nr = 5, 2, 3
    x, w, _ = make_case(False, 2, 2, C, nb, nr, 3, (6, 5), torch.float32, DEVICE)
    stride, pad, dil = [1, 2], [1, 1], [1, 1]
    lo = [RC.conv_out_size(n, 3, s, p, d) for n, s, p, d in zip((6, 5), stride, pad, dil)]
    g = make_geom(lo, (6, 5), (3, 3), stride, pad, dil)
    D = K.dft_matrix(C, DEVICE)
    want_spec = (x.double().movedim(1, -1).reshape(2, 1, -1, C) @ D.double())
    ry, rgx, rgw, _, go = reference_all(False, x.cpu(), w.cpu(), None, stride, pad, [0, 0], dil, nr)
    go = go.float().to(DEVICE)
    coef = K.forward_coef(K.weight_spectrum(w))
    inv = K.inverse_matrix(C, nr, DEVICE)
    gspec = K.channel_transform(go, K.inverse_matrix(C, nr, DEVICE).t().contiguous(), nb, nb)
    for cfg in launched("spec_gemm", K.GEMM_CONFIG_LIST):
        spec = K.channel_transform(x, D, 1, 1, config=cfg)
        assert_close(spec, want_spec, torch.float32, "channel_transform %s" % (cfg,))
    for cfg in launched("spec_mix", K.MIX_CONFIG_LIST):
        out = torch.empty((2, nr * nb, *lo), device=DEVICE)
        K.spectral_mix(out, spec, coef, inv, g, inverse=False, config=cfg)
        assert_close(out, ry, torch.float32, "spectral_mix forward %s" % (cfg,))
        gx = torch.empty(x.shape, device=DEVICE)
        K.spectral_mix(gx, gspec, K.adjoint_coef(K.weight_spectrum(w)), D.t().contiguous(), g, inverse=True, config=cfg)
        assert_close(gx, rgx, torch.float32, "spectral_mix grad_input %s" % (cfg,))
    for cfg in launched("spec_grad_weight", K.GW_CONFIG_LIST):
        part = K.spectral_grad_weight(gspec, spec, g, 9, True, config=cfg)
        gw = torch.einsum("ck,btk->bct", D, part).reshape(w.shape)
        assert_close(gw, rgw, torch.float32, "spectral_grad_weight %s" % (cfg,))


@needs_triton
def test_opcheck():
    """Schema, fake-tensor and autograd-registration checks of the six custom ops."""
    C, nb, nr = 3, 1, 2
    x = torch.randn(1, C, 4, 4, device=DEVICE)
    w = torch.randn(nb, C, 2, 2, device=DEVICE)
    wt = torch.randn(C, nb, 2, 2, device=DEVICE)
    b = torch.randn(nr * nb, device=DEVICE)
    go = torch.randn(1, nr * nb, 3, 3, device=DEVICE)
    got = torch.randn(1, nr * nb, 5, 5, device=DEVICE)
    s, p, d = [1, 1], [0, 0], [1, 1]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    checks = [
        (ST.rolling_conv_spectral_triton, (x.clone().requires_grad_(), w.clone().requires_grad_(), b, None, None,
                                           False, s, p, d, nr)),
        (ST.rolling_conv_spectral_triton_grad_input, (go, w, list(x.shape), s, p, d, nr)),
        (ST.rolling_conv_spectral_triton_grad_weight, (go, x, list(w.shape), s, p, d, nr)),
        (ST.rolling_conv_transpose_spectral_triton, (x, wt, b, b, None, True, s, p, [0, 0], d, nr)),
        (ST.rolling_conv_transpose_spectral_triton_grad_input, (got, wt, list(x.shape), s, p, d, nr)),
        (ST.rolling_conv_transpose_spectral_triton_grad_weight, (got, x, list(wt.shape), s, p, d, nr)),
    ]
    checks += [
        (ST.rolling_conv_spectral_triton_backward, (go, x, w, s, p, d, nr)),
        (ST.rolling_conv_transpose_spectral_triton_backward, (got, x, wt, s, p, d, nr)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=utils)


@needs_triton
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
def test_separate_grad_ops_match_the_shared_backward(poison, transposed):
    """Autograd uses the shared backward op when both gradients are needed and the separate ops otherwise:
    they compute the same bits."""
    x, w, _ = make_case(transposed, 2, 1, 5, 2, 3, 3, (5, 4), torch.float32, DEVICE, bias=False)
    s, p, d = [2, 1], [1, 1], [1, 1]
    if transposed:
        go = torch.randn(1, 6, 9, 4, device=DEVICE)
        both = ST.rolling_conv_transpose_spectral_triton_backward(go, x, w, s, p, d, 3)
        gx = ST.rolling_conv_transpose_spectral_triton_grad_input(go, w, list(x.shape), s, p, d, 3)
        gw = ST.rolling_conv_transpose_spectral_triton_grad_weight(go, x, list(w.shape), s, p, d, 3)
        ref = reference_all(True, x.cpu(), w.cpu(), None, s, p, [0, 0], d, 3, grad_out=go.double().cpu())
    else:
        go = torch.randn(1, 6, 3, 4, device=DEVICE)
        both = ST.rolling_conv_spectral_triton_backward(go, x, w, s, p, d, 3)
        gx = ST.rolling_conv_spectral_triton_grad_input(go, w, list(x.shape), s, p, d, 3)
        gw = ST.rolling_conv_spectral_triton_grad_weight(go, x, list(w.shape), s, p, d, 3)
        ref = reference_all(False, x.cpu(), w.cpu(), None, s, p, [0, 0], d, 3, grad_out=go.double().cpu())
    assert_close(gx, ref[1], torch.float32, "grad_input")
    assert_close(gw, ref[2], torch.float32, "grad_weight")
    assert torch.equal(both[0], gx) and torch.equal(both[1], gw)


def test_transform_matrices_match_torch_fft():
    from medconv_ext.triton_kernels import rolling_conv_spectral as K

    g = torch.Generator().manual_seed(0)
    for c in (1, 2, 5, 8):
        x = torch.randn(3, c, generator=g, dtype=torch.float64)
        spec = torch.fft.rfft(x, dim=1)
        got = x @ K.dft_matrix(c, "cpu", torch.float64)
        torch.testing.assert_close(got, torch.cat([spec.real, spec.imag], 1))
        for rows in (1, c):
            y = torch.cat([spec.real, spec.imag], 1) @ K.inverse_matrix(c, rows, "cpu", torch.float64)
            torch.testing.assert_close(y, torch.fft.irfft(spec, n=c, dim=1)[:, :rows])


# --------------------------------------------------------------------------------------
# registration; the operation-count model (documentation, not the `auto` rule)
# --------------------------------------------------------------------------------------
def test_registered_as_fused_spectral_on_cuda():
    f, f_t = (backends._IMPLS[op]["spectral"].fused["cuda"] for op in (RC.OP, RC.OP_T))
    assert f.fn is ST.conv and f_t.fn is ST.conv_transpose and f.epilogue and f_t.epilogue
    assert f.supports.func is ST.supports and f_t.supports.func is ST.supports
    assert f.supports.keywords == {"transposed": False} and f_t.supports.keywords == {"transposed": True}
    caps = backends.capabilities(RC.OP)
    assert caps["spectral"]["fused"]["cuda"] == {"epilogue": True} and caps["spectral_unfused"]["fused"] == {}
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    w = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    why = ST.supports(x, w, False)
    assert why is not None and ("float64" in why or "triton" in why or "CUDA" in why)
    if torch.cuda.is_available() and triton_ok:  # on a GPU the "spectral" backend runs the fused kernel
        xc, wc = x.float().cuda(), w.float().cuda()
        assert RS._fused_for(xc, wc, False) is ST.conv and RS._fused_for(xc, wc.transpose(0, 1), True) is ST.conv_transpose
        assert RS._fused_for(x.cuda(), w.cuda(), False) is None  # float64: the composition


def test_predicted_speedup_arithmetic():
    # 2D 3x3 C=256 full roll, bf16: dense 256*256*9 = 589824; spectral 256*258 + 258*256*2 + 4*129*9*15
    want = 589824 / (256 * 258 * 1.0 + 258 * 256 * 2.0 + 2 * 258 * 9 * 15.0)
    assert ST.predicted_speedup(256, 1, 256, 9, torch.bfloat16) == pytest.approx(want)
    # float32: dense on the FMA units, the transforms in tf32x3
    want = 589824 * 15.0 / ((256 * 258 + 258 * 256) * 6.0 + 2 * 258 * 9 * 15.0)
    assert ST.predicted_speedup(256, 1, 256, 9, torch.float32) == pytest.approx(want)
