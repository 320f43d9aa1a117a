"""Backend "spectral" of rolling convolution vs the float64 reference (materialized bank).

The core suite (test_rolling_conv*.py) runs every registered backend through the common cases;
this file covers what is specific to the spectral algorithm: channel counts whose rFFT has a
Nyquist bin or not (even / odd C_in, C_in = 1, 2), several bases, partial rolls, stride and
dilation (the adjoint of the CPU depthwise path re-indexes for those), the transposed op,
16-bit inputs computed in float32, gradients, and torch.compile(fullgraph=True).
"""
import contextlib

import pytest
import torch

import medconv_ext
from medconv_ext.ops import rolling_conv_spectral as spectral
from medconv_ext.reference import rolling_conv as ref

F32_TOL = 2e-5  # max |err| / max |ref|, float32 in and out
TOL_16 = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}  # output rounding dominates (eps/2 + slack)

CONV = {2: medconv_ext.rolling_conv2d, 3: medconv_ext.rolling_conv3d}
CONV_T = {2: medconv_ext.rolling_conv_transpose2d, 3: medconv_ext.rolling_conv_transpose3d}


def _rel_err(y, r):
    assert y.shape == r.shape, (y.shape, r.shape)
    assert torch.isfinite(y).all()
    return ((y.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()


def _ref(x, w, b, transposed, stride, padding, output_padding, dilation, n_rolls):
    dims = x.dim() - 2
    args = [x.double(), w.double(), None if b is None else b.double(), [stride] * dims, [padding] * dims]
    if transposed:
        return ref.rolling_conv_transpose(*args, [output_padding] * dims, [dilation] * dims, n_rolls)
    return ref.rolling_conv(*args, [dilation] * dims, n_rolls)


def _run(x, w, b, transposed, stride, padding, output_padding, dilation, n_rolls):
    dims = x.dim() - 2
    if transposed:
        return CONV_T[dims](x, w, b, stride=stride, padding=padding, output_padding=output_padding,
                            dilation=dilation, n_rolls=n_rolls, backend="spectral")
    return CONV[dims](x, w, b, stride=stride, padding=padding, dilation=dilation, n_rolls=n_rolls,
                      backend="spectral")


def _inputs(dims, n, c_in, n_base, size, k, transposed, dtype, n_rolls, bias=True):
    x = torch.randn(n, c_in, *size, dtype=dtype)
    wshape = (c_in, n_base) if transposed else (n_base, c_in)
    w = torch.randn(*wshape, *([k] * dims), dtype=dtype)
    b = torch.randn(n_rolls * n_base, dtype=dtype) if bias else None
    return x, w, b


# (dims, N, C_in, n_base, n_rolls, spatial, k, stride, padding, dilation, output_padding)
CASES = [
    (2, 2, 1, 1, 1, (7, 5), 3, 1, 1, 1, 0),     # C_in = 1: only the DC bin
    (2, 1, 2, 2, 2, (6, 7), 3, 1, 0, 1, 0),     # C_in = 2: DC + Nyquist, two bases
    (2, 2, 5, 1, 5, (9, 8), 3, 2, 1, 1, 1),     # odd C_in, stride 2, full roll
    (2, 1, 6, 3, 2, (11, 9), 3, 1, 2, 2, 1),    # n_base 3, partial roll, dilation 2 (> stride: output_padding 1)
    (2, 2, 7, 1, 3, (8, 9), 4, 2, 3, 1, 1),     # even kernel, big padding, partial roll
    (2, 3, 8, 1, 4, (5, 6), 1, 1, 0, 1, 0),     # 1x1 kernel, half roll
    (3, 1, 3, 1, 3, (5, 6, 4), 3, 1, 1, 1, 0),
    (3, 2, 4, 2, 3, (7, 5, 6), 3, 2, 1, 1, 1),  # 3D stride 2, n_base 2, partial roll
    (3, 1, 5, 1, 5, (6, 5, 7), 3, 1, 2, 2, 1),  # 3D dilation 2, output_padding 1 with stride 1
]
IDS = ["%dd-N%d-C%d-B%d-R%d-k%d-s%d-p%d-d%d-op%d" % (c[0], c[1], c[2], c[3], c[4], c[6], c[7], c[8], c[9], c[10])
       for c in CASES]


@pytest.fixture(params=["gemm", "fft", "fft-native-dw"])
def transform(request, monkeypatch):
    """The channel DFT runs as a GEMM for C_in <= GEMM_MAX_C and as an rFFT above: test both.
    "fft-native-dw" also swaps the CPU depthwise adjoints for torch's own conv/conv_transpose and
    their autograd, the path taken on CUDA (run here on the CPU, so that it is tested without a GPU)."""
    if request.param != "gemm":
        monkeypatch.setattr(spectral, "GEMM_MAX_C", 0)
    if request.param == "fft-native-dw":
        monkeypatch.setattr(spectral, "_use_cpu_adjoints", lambda u: False)
    return request.param


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_grads_float64(case, transposed, transform):
    dims, n, c_in, n_base, n_rolls, size, k, s, p, d, op_ = case
    if not transposed:
        op_ = 0
    x, w, b = _inputs(dims, n, c_in, n_base, size, k, transposed, torch.float64, n_rolls)
    x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    y = _run(x, w, b, transposed, s, p, op_, d, n_rolls)
    r = _ref(x, w, b, transposed, s, p, op_, d, n_rolls)
    assert y.dtype == torch.float64
    assert _rel_err(y, r) < 1e-12
    g = torch.randn_like(r)
    gy = torch.autograd.grad(y, (x, w, b), g)
    gr = torch.autograd.grad(r, (x, w, b), g)
    for name, a, e in zip(("x", "weight", "bias"), gy, gr):
        assert _rel_err(a, e) < 1e-12, name


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[7]], ids=[IDS[2], IDS[3], IDS[7]])
def test_float32_vs_float64_reference(case, transposed, transform):
    dims, n, c_in, n_base, n_rolls, size, k, s, p, d, op_ = case
    if not transposed:
        op_ = 0
    x, w, b = _inputs(dims, n, c_in, n_base, size, k, transposed, torch.float32, n_rolls)
    x.requires_grad_(True), w.requires_grad_(True)
    y = _run(x, w, b, transposed, s, p, op_, d, n_rolls)
    assert y.dtype == torch.float32
    xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    r = _ref(xr, wr, b, transposed, s, p, op_, d, n_rolls)
    assert _rel_err(y, r) < F32_TOL
    g = torch.randn_like(r)
    gx, gw = torch.autograd.grad(y, (x, w), g.float())
    rx, rw = torch.autograd.grad(r, (xr, wr), g)
    assert _rel_err(gx, rx) < F32_TOL
    assert _rel_err(gw, rw) < F32_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_16bit_computed_in_float32(dtype, transposed, transform):
    # C_in = 64 and 3x3 taps: 576 products per output. Accumulating them in 16 bits would give
    # errors far above the output rounding that the tolerance allows.
    c_in, n_rolls = 64, 32
    x, w, b = _inputs(2, 2, c_in, 1, (9, 10), 3, transposed, dtype, n_rolls)
    x.requires_grad_(True), w.requires_grad_(True)
    y = _run(x, w, b, transposed, 2, 1, 1 if transposed else 0, 1, n_rolls)
    assert y.dtype == dtype
    # Reference from the same (already 16-bit) values, in float64.
    xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    r = _ref(xr, wr, b, transposed, 2, 1, 1 if transposed else 0, 1, n_rolls)
    assert _rel_err(y, r) < TOL_16[dtype]
    g = torch.randn_like(r)
    gx, gw = torch.autograd.grad(y, (x, w), g.to(dtype))
    assert gx.dtype == dtype and gw.dtype == dtype
    rx, rw = torch.autograd.grad(r, (xr, wr), g.to(dtype).double())
    assert _rel_err(gx, rx) < TOL_16[dtype]
    assert _rel_err(gw, rw) < TOL_16[dtype]


def test_layouts_noncontiguous_channels_last_and_empty_batch():
    w = torch.randn(1, 6, 3, 3, dtype=torch.float64)
    base = torch.randn(2, 9, 6, 8, dtype=torch.float64)
    x = base.permute(0, 3, 1, 2)[:, :6, :, ::2]  # non-contiguous view, shape (2, 6, 9, 3)
    y = medconv_ext.rolling_conv2d(x, w, padding=1, backend="spectral")
    assert _rel_err(y, ref.rolling_conv(x, w, None, [1, 1], [1, 1], [1, 1], 6)) < 1e-12
    xc = torch.randn(2, 6, 7, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = medconv_ext.rolling_conv2d(xc, w, padding=1, backend="spectral")
    assert y.is_contiguous(memory_format=torch.channels_last)  # as torch's conv does
    assert _rel_err(y, ref.rolling_conv(xc, w, None, [1, 1], [1, 1], [1, 1], 6)) < 1e-12
    from medconv_ext.ops import rolling_conv_spectral_cpu as fused
    # the fused CPU kernel returns the input's memory format, the composition channels-last (see _finish)
    for backend in ("spectral", "spectral_unfused"):
        keeps = backend == "spectral" and fused.available()
        y = medconv_ext.rolling_conv2d(torch.randn(1, 6, 7, 5, dtype=torch.float64), w, backend=backend)
        assert y.is_contiguous() if keeps else y.is_contiguous(memory_format=torch.channels_last)
        y3 = medconv_ext.rolling_conv3d(torch.randn(2, 6, 4, 5, 3), w.float()[..., None], backend=backend)
        assert y3.is_contiguous() if keeps else y3.is_contiguous(memory_format=torch.channels_last_3d)
    y = medconv_ext.rolling_conv2d(torch.randn(0, 6, 7, 5, dtype=torch.float64), w, padding=1, backend="spectral")
    assert y.shape == (0, 6, 7, 5)
    y = medconv_ext.rolling_conv_transpose2d(torch.randn(0, 6, 4, 5), w.transpose(0, 1).float(), stride=2,
                                             backend="spectral")
    assert y.shape == (0, 6, 9, 11)


def test_large_c_default_paths():
    # C_in above GEMM_MAX_C takes the rFFT path by default; odd C_in has no Nyquist bin.
    for c_in in (spectral.GEMM_MAX_C + 1, spectral.GEMM_MAX_C + 2):
        x = torch.randn(1, c_in, 5, 4, dtype=torch.float64)
        w = torch.randn(1, c_in, 3, 3, dtype=torch.float64)
        y = medconv_ext.rolling_conv2d(x, w, padding=1, n_rolls=c_in - 1, backend="spectral")
        assert _rel_err(y, ref.rolling_conv(x, w, None, [1, 1], [1, 1], [1, 1], c_in - 1)) < 1e-12


def test_inference_mode_then_training():
    # The channel-DFT matrix is cached; one first made under inference_mode must still serve autograd.
    c_in = 11  # a size no other test uses, so the cache starts empty for it
    x = torch.randn(1, c_in, 5, 5, requires_grad=True)
    w = torch.randn(1, c_in, 3, 3, requires_grad=True)
    with torch.inference_mode():
        y0 = medconv_ext.rolling_conv2d(x.detach(), w.detach(), padding=1, backend="spectral")
    y = medconv_ext.rolling_conv2d(x, w, padding=1, backend="spectral")
    y.sum().backward()
    assert x.grad is not None and w.grad is not None
    torch.testing.assert_close(y.detach(), y0)


def test_deterministic():
    x = torch.randn(2, 16, 9, 8)
    w = torch.randn(1, 16, 3, 3)
    a = medconv_ext.rolling_conv2d(x, w, padding=1, backend="spectral")
    b = medconv_ext.rolling_conv2d(x, w, padding=1, backend="spectral")
    assert torch.equal(a, b)


def test_compile_fullgraph_forward_and_backward():
    # aot_eager traces forward and backward exactly as inductor does (dynamo + AOTAutograd) without
    # spending minutes compiling C++ kernels on a 2-core CI runner.
    x = torch.randn(2, 6, 7, 9, requires_grad=True)
    w = torch.randn(1, 6, 3, 3, requires_grad=True)
    wt = torch.randn(6, 1, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)

    def fn(x, w, wt, b):
        y = medconv_ext.rolling_conv2d(x, w, b, stride=2, padding=1, backend="spectral")
        return medconv_ext.rolling_conv_transpose2d(y, wt, None, stride=2, padding=1, output_padding=0,
                                                    n_rolls=3, backend="spectral")

    torch._dynamo.reset()
    yc = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w, wt, b)
    gc = torch.autograd.grad(yc.square().sum(), (x, w, wt, b))
    ye = fn(x, w, wt, b)
    ge = torch.autograd.grad(ye.square().sum(), (x, w, wt, b))
    torch.testing.assert_close(yc, ye)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e)


def test_cpu_auto_rule():
    from medconv_ext.ops.rolling_conv import _cpu_auto_candidates as rule
    from medconv_ext.ops import rolling_conv_spectral_cpu as fused
    w2 = lambda c, k=3, dt=torch.float32: torch.randn(1, c, k, k, dtype=dt)  # noqa: E731
    x2 = lambda c, dt=torch.float32, **kw: torch.randn(1, c, 4, 4, dtype=dt, **kw)  # noqa: E731
    assert rule(x2(512), w2(512), False) == ["spectral"]
    assert rule(x2(512), w2(512, 1), False) == ["reference"]  # 1x1: no gain
    if fused.available():  # with the fused CPU kernel's channel FFT (the default for even C_in): lower 2D thresholds
        xb = lambda c, dt=torch.float32, **kw: torch.empty(1, c, 64, 64, dtype=dt, **kw)  # noqa: E731
        cl, bf = torch.channels_last, torch.bfloat16
        x128 = torch.empty(1, 16, 128, 128)
        assert rule(x128.contiguous(memory_format=cl), w2(16), False) == ["spectral"]  # any layout from C_in = 16
        assert rule(xb(16, requires_grad=True), w2(16), False) == ["spectral"]  # training too, full roll
        assert rule(xb(64, requires_grad=True), w2(64), False, 16) == ["reference"]  # partial: as with the GEMMs
        assert rule(xb(15), w2(15), False) == ["reference"]  # odd C_in: the GEMMs' rule
        assert rule(xb(16, bf), w2(16, 3, bf), False) == ["spectral"]  # bfloat16 NCHW from C_in = 16
        assert rule(xb(32, bf, requires_grad=True), w2(32, 3, bf), False) == ["spectral"]
        big_cl = torch.empty(1, 16, 128, 128, dtype=bf).contiguous(memory_format=cl)
        assert rule(big_cl, w2(16, 3, bf), False) == ["reference"]  # bf16 channels-last C_in < 32 above 64^2
        assert rule(xb(16, bf).contiguous(memory_format=cl), w2(16, 3, bf), False) == ["spectral"]
        assert rule(torch.empty(1, 32, 128, 128, dtype=bf).contiguous(memory_format=cl), w2(32, 3, bf),
                    False) == ["spectral"]
        xcl = xb(32, bf).contiguous(memory_format=cl).requires_grad_(True)
        assert rule(xcl, w2(32, 3, bf), False) == ["reference"]  # bf16 channels-last training: C_in >= 64
        # the 2x2 transposed up-sampling (weight (C_in, n_base, 2, 2), half roll): fused from C_in = 128
        # (training: 64); a 2x2 conv, 3D up-sampling and few-tap layers without the FFT stay on the bank
        up = lambda c: torch.empty(c, 1, 2, 2)  # noqa: E731
        assert rule(xb(128), up(128), True, 64) == ["spectral"]
        assert rule(xb(64), up(64), True, 32) == ["reference"]
        assert rule(xb(64, requires_grad=True), up(64), True, 32) == ["spectral"]
        assert rule(xb(128), torch.empty(1, 128, 2, 2), False, 64) == ["reference"]
        assert rule(torch.empty(1, 128, 4, 4, 4), torch.empty(128, 1, 2, 2, 2), True, 64) == ["reference"]
        assert rule(xb(130), up(130), True, 65) == ["spectral"]  # 130 / 2 = 5 * 13 has an FFT ...
        assert rule(xb(134), up(134), True, 67) == ["reference"]  # ... 67 is a prime above 13: none
    with fused.use_channel_transform("gemm") if fused.available() else contextlib.nullcontext():
        _cpu_auto_rule_gemm(rule, fused, w2, x2)


def _cpu_auto_rule_gemm(rule, fused, w2, x2):
    """The rule with the folded DFT GEMMs (odd C_in, or MEDCONV_CHANNEL_TRANSFORM=gemm)."""
    if fused.available():  # with the fused CPU kernel (float32/float64/bfloat16, C_in <= 256)
        xb = lambda c, dt=torch.float32, **kw: torch.empty(1, c, 64, 64, dtype=dt, **kw)  # noqa: E731
        assert rule(xb(16), w2(16), False) == ["spectral"]  # 2D inference from C_in=16 ...
        assert rule(xb(8), w2(8), False) == ["reference"]
        x128 = torch.empty(1, 16, 128, 128)
        assert rule(x128, w2(16), False) == ["spectral"]  # NCHW: oneDNN's NCHW conv is slow there
        cl = torch.channels_last
        assert rule(x128.contiguous(memory_format=cl), w2(16), False) == ["reference"]  # CL, C_in < 32, > 64^2
        assert rule(xb(16).contiguous(memory_format=cl), w2(16), False) == ["spectral"]
        assert rule(torch.empty(1, 32, 128, 128).contiguous(memory_format=cl), w2(32), False) == ["spectral"]
        assert rule(x2(8), w2(8), False) == ["spectral"]  # ... or small work: C_in * pixels <= 16 * 32^2
        assert rule(xb(32), w2(32), False) == ["spectral"]
        assert rule(xb(64), w2(64), False, 16) == ["spectral"]  # C_out >= C_in / 4
        assert rule(xb(256), w2(256), False, 32) == ["reference"]  # C_out < C_in / 4
        assert rule(xb(32, requires_grad=True), w2(32), False) == ["spectral"]
        assert rule(xb(64, requires_grad=True), w2(64), False, 16) == ["reference"]  # training: C_out >= 32
        assert rule(xb(16, requires_grad=True), w2(16), False) == ["reference"]
        assert rule(torch.randn(1, 4, 4, 4, 4), torch.randn(1, 4, 3, 3, 3), False) == ["spectral"]  # 3D: any C
        assert rule(torch.randn(1, 16, 4, 4, 4), torch.randn(1, 16, 2, 2, 2), False) == ["reference"]
        bf = torch.bfloat16  # against oneDNN's bf16 conv: higher thresholds
        assert rule(xb(32, bf), w2(32, 3, bf), False) == ["spectral"]  # inference: C_in >= 32 up to 64^2 pixels
        assert rule(torch.empty(1, 32, 128, 128, dtype=bf), w2(32, 3, bf), False) == ["reference"]
        assert rule(xb(32, bf, requires_grad=True), w2(32, 3, bf), False) == ["reference"]  # training: C_in >= 64
        assert rule(xb(64, bf), w2(64, 3, bf), False) == ["spectral"]
        assert rule(xb(16, bf), w2(16, 3, bf), False) == ["reference"]
        assert rule(torch.empty(1, 16, 32, 32, dtype=bf), w2(16, 3, bf), False) == ["spectral"]  # small work
        xs = torch.empty(1, 16, 32, 32, dtype=bf, requires_grad=True)
        assert rule(xs, w2(16, 3, bf), False) == ["spectral"]  # small work: training too
        x3 = torch.empty(1, 8, 8, 8, 8, dtype=bf)
        assert rule(x3, torch.empty(1, 8, 3, 3, 3, dtype=bf), False) == ["reference"]
        assert rule(x3, torch.empty(1, 8, 5, 5, 5, dtype=bf), False) == ["spectral"]
        assert rule(torch.empty(1, 16, 8, 8, 8, dtype=bf), torch.empty(1, 16, 3, 3, 3, dtype=bf), False) == ["spectral"]
    # without it (float16, C_in > 256): the composition's rule
    bf = torch.float16
    assert rule(x2(32, bf), w2(32, 3, bf), False) == ["reference"]
    assert rule(x2(64, bf), w2(64, 3, bf), False) == ["reference"]  # 2D inference from C_in=128
    assert rule(x2(256, bf), w2(256, 3, bf), False) == ["spectral"]
    assert rule(x2(256, bf), w2(256, 3, bf), False, 128) == ["reference"]  # half roll: C_out < 256
    assert rule(x2(512), w2(512), False, 256) == ["spectral"]
    x = x2(128, bf, requires_grad=True)
    assert rule(x, w2(128, 3, bf), False) == ["spectral"]  # training: 2D from C_in=128 too
    x3 = torch.randn(1, 16, 4, 4, 4, dtype=bf, requires_grad=True)
    w3 = torch.randn(1, 16, 5, 5, 5, dtype=bf)
    assert rule(x3, w3, False) == ["reference"]  # 3D training: higher threshold
    with torch.no_grad():
        assert rule(x3, w3, False) == ["spectral"]
