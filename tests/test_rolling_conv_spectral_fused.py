"""The fused CPU kernel of the spectral rolling convolution (torch.ops.medconv.rolling_conv*_spectral*)
against the float64 reference: forward, transposed, both gradients, the epilogue, layouts and the
output's memory format, NaN/Inf, the paper's eq. 7/8 summed literally, thread-count independence,
opcheck and torch.compile; for every instruction-set copy this CPU runs (avx512 / avx2 / generic)
and for float64, float32 and bfloat16."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import medconv_ext
from medconv_ext.ops import rolling_conv_spectral_cpu as fused
from medconv_ext.reference import rolling_conv as ref

pytestmark = pytest.mark.skipif(not fused.available(), reason="compiled extension not built")

CONV = {2: medconv_ext.rolling_conv2d, 3: medconv_ext.rolling_conv3d}
CONV_T = {2: medconv_ext.rolling_conv_transpose2d, 3: medconv_ext.rolling_conv_transpose3d}
# max |err| / max |ref|; bfloat16 is computed in float32 and rounded once at the store (2^-9 relative)
TOL = {torch.float64: 1e-11, torch.float32: 3e-5, torch.bfloat16: 8e-3}
# every copy of the hot loops this CPU executes (widest first)
ISAS = fused.supported_isas() or ["generic"]
# the channel transforms: "auto" runs the channel FFT wherever C_in allows it (the GEMMs for the odd and
# large-prime C_in below), "gemm" the folded DFT GEMMs for every C_in
TRANSFORMS = ["auto", "gemm"]


@pytest.fixture(params=[(i, t) for i in ISAS for t in TRANSFORMS], ids=lambda p: "%s-%s" % p)
def isa(request):
    name, transform = request.param
    with fused.use_isa(name), fused.use_channel_transform(transform):
        assert fused.isa_setting() == name and fused.isa() == name
        assert fused.isa(3) == name  # forced: every layer runs that copy
        assert fused.channel_transform() == transform
        yield name


def _fmt(t):
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(t)


def _rel(y, r):
    assert y.shape == r.shape, (tuple(y.shape), tuple(r.shape))
    assert torch.isfinite(y).all()
    return ((y.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30)).item()


def _op(x, w, b, transposed, s, p, op_, d, nr, scale=None, shift=None, relu=False):
    dims = x.dim() - 2
    if transposed:
        return torch.ops.medconv.rolling_conv_transpose_spectral(x, w, b, scale, shift, relu, [s] * dims, [p] * dims,
                                                                 [op_] * dims, [d] * dims, nr)
    return torch.ops.medconv.rolling_conv_spectral(x, w, b, scale, shift, relu, [s] * dims, [p] * dims, [d] * dims, nr)


def _ref(x, w, b, transposed, s, p, op_, d, nr):
    dims = x.dim() - 2
    args = [x.double(), w.double(), None if b is None else b.double(), [s] * dims, [p] * dims]
    if transposed:
        return ref.rolling_conv_transpose(*args, [op_] * dims, [d] * dims, nr)
    return ref.rolling_conv(*args, [d] * dims, nr)


def _inputs(dims, n, c, nb, nr, size, k, transposed, dtype, gen):
    x = torch.randn(n, c, *size, dtype=dtype, generator=gen)
    w = torch.randn(*((c, nb) if transposed else (nb, c)), *([k] * dims), dtype=dtype, generator=gen)
    b = torch.randn(nr * nb, dtype=dtype, generator=gen)
    return x, w, b


# (dims, N, C_in, n_base, n_rolls, spatial, k, stride, padding, dilation, output_padding)
CASES = [
    (2, 2, 1, 1, 1, (7, 5), 3, 1, 1, 1, 0),      # C = 1: DC only
    (2, 1, 2, 2, 2, (6, 7), 3, 1, 0, 1, 0),      # C = 2: DC + Nyquist, two bases
    (2, 2, 5, 1, 5, (9, 8), 3, 2, 1, 1, 1),      # odd C, stride 2
    (2, 1, 6, 3, 2, (11, 9), 3, 1, 2, 2, 1),     # n_base 3, partial roll, dilation 2
    (2, 2, 12, 1, 7, (8, 13), 4, 2, 3, 1, 1),    # even kernel, big padding, partial roll
    (2, 1, 24, 2, 24, (5, 31), 3, 1, 1, 1, 0),   # wide rows, several register tiles
    (3, 1, 3, 1, 3, (5, 6, 7), 3, 1, 1, 1, 0),   # 3D, odd C
    (3, 2, 8, 2, 5, (6, 5, 7), 3, 2, 1, 1, 1),   # 3D, stride 2, partial roll, 2 bases
    (3, 1, 10, 1, 10, (7, 6, 5), 3, 1, 2, 2, 0),  # 3D dilation
    (2, 1, 32, 1, 32, (4, 9), 3, 1, 1, 1, 0),    # C/2 a multiple of the vector width: split inverse column
    (2, 1, 33, 1, 33, (3, 7), 3, 1, 1, 1, 0),    # odd C, the split column read by both halves
    (2, 1, 4, 1, 4, (3, 267), 3, 1, 1, 1, 0),    # rows longer than a 128-pixel block
    # channel FFT stages (C/2 = 8: one radix-8 stage; 15 = 3 * 5; 7; 32 = 8 * 4) and partial pixel blocks
    (2, 1, 16, 1, 16, (4, 21), 3, 1, 1, 1, 0),
    (2, 1, 30, 1, 30, (5, 7), 3, 1, 1, 1, 0),
    (2, 2, 14, 2, 9, (6, 5), 3, 2, 1, 1, 1),      # 2 bases, partial roll, stride 2
    (3, 1, 64, 2, 64, (3, 4, 19), 3, 1, 1, 1, 0),  # 2 bases
    (2, 1, 34, 1, 34, (3, 5), 3, 1, 1, 1, 0),    # C/2 = 17, a prime above 13: the GEMMs
    (2, 1, 300, 1, 300, (3, 4), 3, 1, 1, 1, 0),  # above 256 channels (C/2 = 2 * 3 * 5^2)
    (2, 2, 32, 1, 16, (5, 7), 2, 2, 0, 1, 0),    # the U-Net's 2x2 stride-2 up-sampling, half roll
]


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "%dd-C%d-nb%d-r%d-s%d-d%d" % (c[0], c[2], c[3], c[4], c[7], c[9]))
def test_forward_and_grads_vs_float64(case, transposed, isa):
    dims, n, c, nb, nr, size, k, s, p, d, op_ = case
    if not transposed:
        op_ = 0
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x, w, b = _inputs(dims, n, c, nb, nr, size, k, transposed, dtype, gen)
        x.requires_grad_(True)
        w.requires_grad_(True)
        b.requires_grad_(True)
        y = _op(x, w, b, transposed, s, p, op_, d, nr)
        xr, wr, br = (t.detach().double().requires_grad_(True) for t in (x, w, b))
        yr = _ref(xr, wr, br, transposed, s, p, op_, d, nr)
        assert _rel(y, yr) < TOL[dtype], "forward %s" % dtype
        assert y.dtype == dtype
        g = torch.randn(yr.shape, dtype=torch.float64, generator=gen).to(dtype).double()
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), g.to(dtype))
        rx, rw, rb = torch.autograd.grad(yr, (xr, wr, br), g)
        assert _rel(gx, rx) < TOL[dtype], "grad_input %s" % dtype
        assert _rel(gw, rw) < 4 * TOL[dtype], "grad_weight %s" % dtype
        assert _rel(gb, rb) < TOL[dtype]


def test_equations_7_and_8_literal():
    """dL/dw by eq. 7 summed literally; dL/dx by eq. 8 (transposed conv with the rolled bank)."""
    gen = torch.Generator().manual_seed(7)
    n, c, nb, nr, k = 2, 5, 2, 3, 3
    x = torch.randn(n, c, 6, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(nb, c, k, k, dtype=torch.float64, generator=gen, requires_grad=True)
    y = _op(x, w, None, False, 1, 1, 0, 1, nr)
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    xp = F.pad(x.detach(), (1, 1, 1, 1))
    want = torch.zeros_like(gw)
    for b in range(nb):
        for m in range(c):
            for r in range(nr):
                for ti in range(k):
                    for tj in range(k):
                        want[b, m, ti, tj] += (g[:, r * nb + b] * xp[:, (m + r) % c, ti:ti + 6, tj:tj + 7]).sum()
    torch.testing.assert_close(gw, want, rtol=1e-10, atol=1e-10)
    bank = torch.stack([torch.roll(w.detach()[b], r, 0) for r in range(nr) for b in range(nb)])
    torch.testing.assert_close(gx, F.conv_transpose2d(g, bank, padding=1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dims", [2, 3])
def test_epilogue_matches_batchnorm_relu_eval(dims):
    gen = torch.Generator().manual_seed(3)
    c, nb = 6, 1
    conv = medconv_ext.nn.RollingConv2d if dims == 2 else medconv_ext.nn.RollingConv3d
    m = conv(c, c, 3, padding=1, bias=True, backend="spectral")
    bn = (torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm3d)(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=gen))
        bn.bias.copy_(torch.randn(c, generator=gen))
    m.eval()
    bn.eval()
    x = torch.randn(2, c, *([7] * dims), generator=gen)
    want = torch.relu(bn(m(x)))
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    with torch.no_grad():
        got = CONV[dims](x, m.weight, m.bias, padding=1, backend="spectral", scale=scale, shift=shift, relu=True)
        got_ref = CONV[dims](x, m.weight, m.bias, padding=1, backend="reference", scale=scale, shift=shift, relu=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_ref, want, rtol=1e-4, atol=1e-5)
    assert (got == 0).any() and (got > 0).any()  # the ReLU did something


@pytest.mark.parametrize("transposed", [False, True])
def test_epilogue_gradcheck(transposed, isa):
    gen = torch.Generator().manual_seed(5)
    x, w, b = _inputs(2, 1, 3, 1, 2, (4, 5), 3, transposed, torch.float64, gen)
    scale = torch.randn(2, dtype=torch.float64, generator=gen)
    shift = torch.randn(2, dtype=torch.float64, generator=gen)
    args = [t.requires_grad_(True) for t in (x, w, b, scale, shift)]

    def f(x, w, b, scale, shift):
        return _op(x, w, b, transposed, 2, 1, 1 if transposed else 0, 1, 2, scale, shift, True)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
def test_eager_training_path_matches_the_registered_autograd(transposed, epilogue):
    """Eager training runs the ops through a torch.autograd.Function (less Python per call than the
    torch.library autograd layer that torch.compile uses): the same output and the same gradients, bit for bit,
    and gradcheck through it."""
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.float64):
        x, w, b = _inputs(2, 2, 6, 1, 6, (7, 6), 3, transposed, dtype, gen)
        scale = torch.randn(6, dtype=dtype, generator=gen) if epilogue else None
        shift = torch.randn(6, dtype=dtype, generator=gen) if epilogue else None
        s, p, op_, d, nr = 2, 1, 1 if transposed else 0, 1, 6
        gout = torch.randn_like(_op(x, w, b, transposed, s, p, op_, d, nr, scale, shift, epilogue), memory_format=torch.contiguous_format)

        def eager(*a):
            if transposed:
                return fused.rolling_conv_transpose_spectral_cpu(a[0], a[1], a[2], [s] * 2, [p] * 2, [op_] * 2, [d] * 2,
                                                                 nr, scale=a[3], shift=a[4], relu=epilogue)
            return fused.rolling_conv_spectral_cpu(a[0], a[1], a[2], [s] * 2, [p] * 2, [d] * 2, nr,
                                                   scale=a[3], shift=a[4], relu=epilogue)

        def registered(*a):
            return _op(a[0], a[1], a[2], transposed, s, p, op_, d, nr, a[3], a[4], epilogue)

        results = []
        for fn in (eager, registered):
            args = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, scale, shift)]
            y = fn(*args)
            name = type(y.grad_fn).__name__
            assert ("SpectralFunctionBackward" in name) == (fn is eager), name
            y.backward(gout)
            results.append([y.detach()] + [a.grad for a in args if a is not None])
        for got, want in zip(*results):
            assert torch.equal(got, want)
        if dtype == torch.float64:
            args = [t.detach().clone().requires_grad_(True) for t in (x, w, b, scale, shift) if t is not None]
            f = eager if epilogue else (lambda x_, w_, b_: eager(x_, w_, b_, None, None))
            assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def _layouts(x):
    """x as NC(D)HW, channels-last, a permuted (non-contiguous) view and a strided slice."""
    cl = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    return {"nchw": x.contiguous(), "cl": x.contiguous(memory_format=cl),
            "permuted": x.transpose(-2, -1).contiguous().transpose(-2, -1),
            "sliced": wide[..., ::2].copy_(x)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
@pytest.mark.parametrize("dims", [2, 3])
def test_layouts_and_output_memory_format(dims, transposed, dtype, isa):
    """Any input layout gives the same numbers; the output (and grad_input) comes back in the input's
    memory format (channels-last in, channels-last out; NC(D)HW otherwise), so .view works."""
    gen = torch.Generator().manual_seed(11 + dims)
    size = (5, 6, 7) if dims == 3 else (9, 11)
    s, p, op_ = (2, 1, 1) if transposed else (1, 1, 0)
    x, w, b = _inputs(dims, 2, 7, 1, 4, size, 3, transposed, dtype, gen)
    want = _ref(x, w, b, transposed, s, p, op_, 1, 4)
    for name, xx in _layouts(x).items():
        xx = xx.detach().requires_grad_(True)
        y = _op(xx, w, b, transposed, s, p, op_, 1, 4)
        assert _rel(y, want) < TOL[dtype], name
        assert y.dtype == dtype
        fmt = _fmt(xx)
        assert y.is_contiguous(memory_format=fmt), (name, fmt, y.stride())
        if name != "cl":
            assert y.is_contiguous()
            y.view(y.shape[0], -1)  # the drop-in use that channels-last output broke
        gx, = torch.autograd.grad(y, xx, torch.ones_like(y))
        assert gx.is_contiguous(memory_format=_fmt(y)), (name, gx.stride())


def test_empty_batch():
    gen = torch.Generator().manual_seed(11)
    x, w, b = _inputs(3, 2, 7, 1, 4, (5, 6, 7), 3, False, torch.float32, gen)
    y = _op(x[:0], w, b, False, 1, 1, 0, 1, 4)
    assert y.shape == (0, 4, 5, 6, 7)
    xe = x[:0].requires_grad_(True)
    we = w.clone().requires_grad_(True)
    y = _op(xe, we, None, False, 1, 1, 0, 1, 4)
    gx, gw = torch.autograd.grad(y.sum(), (xe, we))
    assert gx.shape == xe.shape and (gw == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [2, 3])
def test_nan_inf_as_torch(dims, dtype, isa):
    """A NaN or Inf input makes exactly the outputs non-finite whose receptive field holds it, as the
    dense conv with the rolled bank does; ReLU keeps NaN (as torch.relu)."""
    gen = torch.Generator().manual_seed(21)
    size = (6, 7, 5) if dims == 3 else (9, 10)
    for transposed in (False, True):
        x, w, b = _inputs(dims, 1, 6, 1, 6, size, 3, transposed, dtype, gen)
        x[0, 2][(1,) * dims] = float("nan")
        x[0, 4][(4,) * dims] = float("inf")
        y = _op(x, w, b, transposed, 1, 1, 0, 1, 6)
        ydense = _ref(x, w, b, transposed, 1, 1, 0, 1, 6)
        bad = ~torch.isfinite(ydense)
        assert bad.any() and (~bad).any()
        assert torch.equal(~torch.isfinite(y), bad)
        assert _rel(y[~bad], ydense[~bad]) < TOL[dtype]
        # NaN only (an Inf may turn into NaN inside the channel DFT): the ReLU epilogue keeps it
        x[0, 4][(4,) * dims] = 0.0
        yr = _op(x, w, b, transposed, 1, 1, 0, 1, 6, relu=True)
        want = torch.relu(_ref(x, w, b, transposed, 1, 1, 0, 1, 6))
        nan = torch.isnan(want)
        assert nan.any() and torch.equal(torch.isnan(yr), nan)
        assert _rel(yr[~nan], want[~nan]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_independent(dtype, isa):
    """1, 2, 3 threads give bit-identical results; (2, 13, 7) has fewer slices than twice the
    threads, so its slices are also cut into ranges of rows (2 and 3 parts)."""
    gen = torch.Generator().manual_seed(2)
    for dims, size in ((2, (13, 11)), (3, (5, 6, 7)), (3, (2, 13, 7))):
        for layout in ("nchw", "cl"):
            x, w, b = _inputs(dims, 2, 16, 1, 16, size, 3, False, dtype, gen)
            x = _layouts(x)[layout].requires_grad_(True)
            w.requires_grad_(True)
            old = torch.get_num_threads()
            outs = []
            try:
                for nt in (1, 2, 3):
                    torch.set_num_threads(nt)
                    y = _op(x, w, b, False, 1, 1, 0, 1, 16)
                    outs.append((y.detach(),) + torch.autograd.grad(y, (x, w), torch.ones_like(y)))
            finally:
                torch.set_num_threads(old)
            for o in outs[1:]:
                for a, bb in zip(outs[0], o):
                    assert torch.equal(a, bb)
            assert _rel(outs[-1][0], _ref(x, w, b, False, 1, 1, 0, 1, 16)) < TOL[dtype]


def test_isa_copies_agree():
    """Every copy and the automatic selection agree with the reference on a wide and a narrow layer."""
    gen = torch.Generator().manual_seed(8)
    x, w, b = _inputs(2, 1, 40, 1, 40, (9, 37), 3, False, torch.float32, gen)
    outs = {}
    for name in ISAS + ["auto"]:
        with fused.use_isa(name):
            outs[name] = _op(x, w, b, False, 1, 1, 0, 1, 40)
    want = _ref(x, w, b, False, 1, 1, 0, 1, 40)
    for name, y in outs.items():
        assert _rel(y, want) < TOL[torch.float32], name
    x, w, b = _inputs(3, 1, 12, 1, 12, (5, 6, 7), 3, False, torch.float32, gen)
    with fused.use_isa("auto"):
        assert _rel(_op(x, w, b, False, 1, 1, 0, 1, 12), _ref(x, w, b, False, 1, 1, 0, 1, 12)) < TOL[torch.float32]


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_bfloat16_output_is_the_float32_result_rounded_by_torch(layout, isa):
    """bfloat16 runs the float32 arithmetic and rounds once at the store (vectorized): bit for bit torch's
    rounding of the float32 op's output on the same values, NaN and +-Inf (from the epilogue) included."""
    gen = torch.Generator().manual_seed(13)
    for dims, size, c in ((2, (5, 37), 32), (2, (3, 9), 5), (3, (3, 4, 11), 16)):
        x, w, b = _inputs(dims, 1, c, 1, c, size, 3, False, torch.bfloat16, gen)
        x = _layouts(x)[layout]
        scale = torch.randn(c, generator=gen).to(torch.bfloat16)
        shift = torch.randn(c, generator=gen).to(torch.bfloat16)
        scale[1], shift[2], shift[3] = float("nan"), float("inf"), -float("inf")
        y16 = _op(x, w, b, False, 1, 1, 0, 1, c, scale, shift, True)
        y32 = _op(x.float(), w.float(), b.float(), False, 1, 1, 0, 1, c, scale.float(), shift.float(), True)
        assert y16.dtype == torch.bfloat16 and _fmt(y16) == _fmt(y32)
        torch.testing.assert_close(y16, y32.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(y16[:, 1]).all() and torch.isinf(y16[:, 2]).all()


def test_channel_transform_setting_and_agreement():
    """The FFT runs for even C_in whose half has no prime factor above 13 (the GEMMs otherwise, and under
    "gemm"); both give the reference's result, by different sums (not bit-identical: the switch works)."""
    assert fused.channel_transform() == "auto"  # no MEDCONV_CHANNEL_TRANSFORM in the test environment
    assert [fused.transform_for(c) for c in (1, 2, 5, 16, 30, 34, 64, 300, 512)] == [
        "gemm", "fft", "gemm", "fft", "fft", "gemm", "fft", "fft", "fft"]
    for t in ("auto", "gemm", "fft"):  # the Python mirror the dispatch rule reads agrees with the kernel's choice
        with fused.use_channel_transform(t):
            for c in range(1, 530):
                assert fused.transform_for(c) == torch.ops.medconv.channel_transform_for(c), (t, c)
    gen = torch.Generator().manual_seed(11)
    x, w, b = _inputs(2, 1, 64, 1, 64, (5, 9), 3, False, torch.float32, gen)
    outs = {}
    for t in ("fft", "gemm"):
        with fused.use_channel_transform(t):
            assert fused.transform_for(64) == t and fused.transform_for(5) == "gemm"
            outs[t] = _op(x, w, b, False, 1, 1, 0, 1, 64)
    want = _ref(x, w, b, False, 1, 1, 0, 1, 64)
    assert _rel(outs["fft"], want) < TOL[torch.float32] and _rel(outs["gemm"], want) < TOL[torch.float32]
    assert not torch.equal(outs["fft"], outs["gemm"])
    assert fused.channel_transform() == "auto"
    with pytest.raises(ValueError, match="fft"):
        fused.set_channel_transform("dft")
    with pytest.raises(RuntimeError, match="expected one of"):
        torch.ops.medconv.set_channel_transform("dft")


def test_fused_above_256_channels_only_with_the_fft():
    """Above 256 input channels the "spectral" backend runs the fused kernel where its channel FFT runs (up to
    1024), the composition elsewhere; both agree with the reference."""
    def probe(c):
        return fused.supports(torch.empty(1, c, 4, 4), torch.empty(1, c, 3, 3), False)
    assert probe(256) is None and probe(512) is None and probe(300) is None
    assert "514" in probe(514)  # C/2 = 257, a prime: GEMMs, so the composition
    assert probe(1024) is None and probe(2048) is not None
    with fused.use_channel_transform("gemm"):
        assert probe(512) is not None and probe(256) is None
    gen = torch.Generator().manual_seed(12)
    x, w, _ = _inputs(2, 1, 512, 1, 512, (3, 4), 3, False, torch.float32, gen)
    want = _ref(x, w, None, False, 1, 1, 0, 1, 512)
    for t in ("auto", "gemm"):
        with fused.use_channel_transform(t):
            y = medconv_ext.rolling_conv2d(x, w, padding=1, backend="spectral")
        assert _rel(y, want) < TOL[torch.float32], t


def _last_line_with_env(code, **env_vars):
    """The last line that `code` prints in a fresh interpreter with env_vars set (settings read at start-up)."""
    env = dict(os.environ, **env_vars)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_channel_transform_environment_variable():
    code = ("import medconv_ext, torch; from medconv_ext.ops import rolling_conv_spectral_cpu as f; "
            "print(f.channel_transform(), f.transform_for(64))")
    assert _last_line_with_env(code, MEDCONV_CHANNEL_TRANSFORM="gemm") == "gemm gemm"


def test_isa_selection():
    top = fused.supported_isas()[0]
    assert fused.isa_setting() == "auto"  # no MEDCONV_CPU_ISA in the test environment
    assert fused.isa() == top and fused.isa(256) == top
    if top == "avx512":  # 8 frequency slots would fill half of the 16 lanes: the AVX2 copy runs
        assert fused.isa(16) == "avx2" and fused.isa(16, torch.float64) == "avx512"
    with fused.use_isa("generic"):
        assert fused.isa_setting() == "generic" and fused.isa(16) == "generic"
        with fused.use_isa("avx512"):  # clipped to what the CPU runs
            assert fused.isa() == top
        assert fused.isa() == "generic"
    assert fused.isa_setting() == "auto"
    with pytest.raises(ValueError, match="avx2"):
        fused.set_isa("sse9")
    with pytest.raises(RuntimeError, match="expected one of"):
        torch.ops.medconv.set_cpu_isa("sse9")


def test_isa_environment_variable():
    want = "avx2" if "avx2" in fused.supported_isas() else "generic"
    code = ("import medconv_ext, torch; from medconv_ext.ops import rolling_conv_spectral_cpu as f; "
            "x = torch.randn(1, 4, 5, 5); medconv_ext.rolling_conv2d(x, torch.randn(1, 4, 3, 3), padding=1, "
            "backend='spectral'); print(f.isa_setting(), f.isa(16))")
    assert _last_line_with_env(code, MEDCONV_CPU_ISA=want) == "%s %s" % (want, want)


def test_spectral_backend_dispatches_to_fused():
    x = torch.randn(1, 8, 6, 6)
    w = torch.randn(1, 8, 3, 3)
    y = medconv_ext.rolling_conv2d(x, w, padding=1, backend="spectral")
    assert y.is_contiguous()  # the input's memory format
    assert fused.supports(x, w, False) is None
    assert fused.supports(x.bfloat16(), w.bfloat16(), False) is None
    assert fused.supports(x.half(), w.half(), False) is not None  # falls back to the composition
    want = _ref(x.bfloat16(), w.bfloat16(), None, False, 1, 1, 0, 1, 8)
    y16 = medconv_ext.rolling_conv2d(x.bfloat16(), w.bfloat16(), padding=1, backend="spectral")
    assert y16.dtype == torch.bfloat16 and _rel(y16, want) < TOL[torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = medconv_ext.rolling_conv2d(x, w, padding=1, backend="spectral")
    assert ya.dtype == torch.bfloat16 and _rel(ya, want) < TOL[torch.bfloat16]


def test_bad_inputs():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(1, 4, 3, 3)
    with pytest.raises(RuntimeError, match="C_in"):
        torch.ops.medconv.rolling_conv_spectral(x, torch.randn(1, 3, 3, 3), None, None, None, False, [1], [1], [1], 4)
    with pytest.raises(RuntimeError, match="n_rolls"):
        torch.ops.medconv.rolling_conv_spectral(x, w, None, None, None, False, [1], [1], [1], 5)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.medconv.rolling_conv_spectral(x, w, None, torch.ones(3), None, False, [1], [1], [1], 4)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.medconv.rolling_conv_spectral(x.double(), w, None, None, None, False, [1], [1], [1], 4)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.medconv.rolling_conv_spectral(x.half(), w.half(), None, None, None, False, [1], [1], [1], 4)
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        torch.ops.medconv.rolling_conv_spectral(x[..., :1, :], w, None, None, None, False, [1], [0], [1], 4)
    with pytest.raises(ValueError, match="scale"):
        medconv_ext.rolling_conv2d(x, w, padding=1, scale=torch.ones(3))
    with pytest.raises(TypeError, match="relu"):
        medconv_ext.rolling_conv2d(x, w, padding=1, relu=1)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_opcheck(layout):
    """Includes the fake kernels' output strides (the input's memory format) against the real ones."""
    gen = torch.Generator().manual_seed(1)
    x, w, b = _inputs(2, 1, 5, 1, 3, (5, 6), 3, False, torch.float64, gen)
    x = _layouts(x)[layout]
    sc, sh = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.medconv.rolling_conv_spectral,
                          (x.requires_grad_(True), w.requires_grad_(True), b, sc, sh, True, [1, 1], [1, 1], [1, 1], 3))
    xt, wt, bt = _inputs(3, 1, 4, 2, 2, (3, 4, 3), 2, True, torch.float64, gen)
    xt = _layouts(xt)[layout]
    torch.library.opcheck(torch.ops.medconv.rolling_conv_transpose_spectral,
                          (xt.requires_grad_(True), wt.requires_grad_(True), bt, None, None, False, [2, 2, 2],
                           [0, 0, 0], [1, 1, 1], [1, 1, 1], 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_fullgraph(dtype):
    gen = torch.Generator().manual_seed(4)
    x, w, b = _inputs(2, 1, 6, 1, 6, (6, 6), 3, False, dtype, gen)
    w.requires_grad_(True)

    def f(x, w, b):
        y = medconv_ext.rolling_conv2d(x, w, b, padding=1, backend="spectral", relu=True)
        return y.view(y.shape[0], -1).sum()  # NCHW in, NCHW out: view works in the graph too

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    got = cf(x, w, b)
    gw, = torch.autograd.grad(got, w)
    want = f(x, w, b)
    gw_want, = torch.autograd.grad(want, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gw, gw_want)


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_eval_folds_batchnorm_relu(dims, monkeypatch):
    """A rolling UNet in eval mode folds conv -> BN -> ReLU into the epilogue: same output as module
    by module; training mode is unchanged (batch statistics)."""
    import sys
    from medconv_ext.models.unet import ConvUnit, UNet
    from medconv_ext.nn import fuse
    unet_mod = sys.modules["medconv_ext.models.unet"]
    torch.manual_seed(0)
    model = UNet(dims, 2, 3, features=4, kernel_size=3, kind="rolling", first_kind="dense", depth=1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 2, *([8] * dims))
    calls = []
    real = fuse.rolling_conv_bn_relu
    monkeypatch.setattr(unet_mod, "rolling_conv_bn_relu", lambda *a: calls.append(1) or real(*a))
    model.eval()
    with torch.no_grad():
        fused_out = model(x)
        assert calls, "no conv unit was folded"
        monkeypatch.setattr(ConvUnit, "forward", torch.nn.Sequential.forward)
        plain = model(x)
    torch.testing.assert_close(fused_out, plain, rtol=1e-4, atol=1e-5)
    monkeypatch.undo()
    monkeypatch.setattr(unet_mod, "rolling_conv_bn_relu", lambda *a: calls.append(1) or real(*a))
    model.train()
    calls.clear()
    model(x)
    assert not calls  # training mode: never folded
