"""rolling_conv_cat(x, x2, weight, ...) = rolling_conv{2,3}d(torch.cat([x, x2], 1), weight, ...): the fused
CPU op torch.ops.medconv.rolling_conv_spectral_cat reads both tensors in place. Checked against the float64
reference (forward, both inputs' and the weight's gradients, the epilogue), on every instruction-set copy
and dtype, for every pairing of memory layouts, thread-count independence, opcheck, torch.compile, the
fallback to torch.cat where the fused kernel does not run, and bad inputs."""
import pytest
import torch

from medconv_ext.ops import rolling_conv_cat as cat_mod
from medconv_ext.ops import rolling_conv_spectral_cpu as fused
from medconv_ext.ops.rolling_conv_cat import rolling_conv_cat
from medconv_ext.reference import rolling_conv as ref

pytestmark = pytest.mark.skipif(not cat_mod.available(), reason="compiled extension not built")

TOL = {torch.float64: 1e-11, torch.float32: 3e-5, torch.bfloat16: 8e-3}
ISAS = fused.supported_isas() or ["generic"]
CL = {2: torch.channels_last, 3: torch.channels_last_3d}


def _layout(t, name):
    if name == "cl":
        return t.contiguous(memory_format=CL[t.dim() - 2])
    if name == "strided":  # every other column of a wider tensor
        wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _rel(y, r):
    assert y.shape == r.shape, (tuple(y.shape), tuple(r.shape))
    return ((y.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30)).item()


def _ran_fused_cat(fn):
    """(result, whether the in-place op ran) of fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any("rolling_conv_spectral_cat" in e.key for e in prof.key_averages())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [
    # dims, N, C1, C2, n_base, n_rolls, size, k, stride, padding, dilation
    (2, 2, 5, 3, 1, None, (7, 9), 3, 1, 1, 1),
    (2, 1, 16, 16, 2, 5, (8, 11), 3, 2, 1, 1),
    (2, 1, 1, 6, 1, 7, (6, 5), 3, 1, 2, 2),
    (3, 1, 4, 4, 1, None, (4, 5, 6), 3, 1, 1, 1),
    (3, 2, 6, 2, 1, 3, (5, 4, 6), 3, 2, 0, 1),
])
def test_matches_float64_reference(case, dtype, isa):
    dims, N, c1, c2, nb, nr, size, k, s, p, d = case
    C = c1 + c2
    gen = torch.Generator().manual_seed(C * 7 + N)
    x = torch.randn(N, c1, *size, generator=gen).to(dtype)
    x2 = torch.randn(N, c2, *size, generator=gen).to(dtype)
    w = torch.randn(nb, C, *(k,) * dims, generator=gen).to(dtype)
    n_out = (C if nr is None else nr) * nb
    b = torch.randn(n_out, generator=gen).to(dtype)
    sc = (torch.rand(n_out, generator=gen) + 0.5).to(dtype)
    sh = torch.randn(n_out, generator=gen).to(dtype)
    want = ref.rolling_conv(torch.cat([x, x2], 1).double(), w.double(), b.double(), [s] * dims, [p] * dims,
                            [d] * dims, nr if nr is not None else C)
    want = torch.relu(want * sc.double().view(1, -1, *(1,) * dims) + sh.double().view(1, -1, *(1,) * dims))
    with fused.use_isa(isa):
        for l1, l2 in (("nchw", "nchw"), ("cl", "cl"), ("cl", "nchw"), ("strided", "cl")):
            a = _layout(x, l1).requires_grad_(True)
            a2 = _layout(x2, l2).requires_grad_(True)
            wg = w.clone().requires_grad_(True)
            y, ran = _ran_fused_cat(lambda: rolling_conv_cat(a, a2, wg, b, s, p, d, nr, "spectral", scale=sc,
                                                             shift=sh, relu=True))
            assert ran, "the in-place op did not run"
            assert _rel(y, want) < TOL[dtype], (l1, l2)
            if l1 == "cl" and c1 > 1:
                assert y.is_contiguous(memory_format=CL[dims])  # x's memory format
            # gradients against the float64 reference's autograd
            g = torch.randn(want.shape, generator=gen).double()
            gy = torch.autograd.grad(y, (a, a2, wg), g.to(dtype))
            xr = torch.cat([x, x2], 1).double().requires_grad_(True)
            wr = w.double().requires_grad_(True)
            zr = ref.rolling_conv(xr, wr, b.double(), [s] * dims, [p] * dims, [d] * dims, nr if nr is not None else C)
            zr = torch.relu(zr * sc.double().view(1, -1, *(1,) * dims) + sh.double().view(1, -1, *(1,) * dims))
            gxr, gwr = torch.autograd.grad(zr, (xr, wr), g)
            assert _rel(gy[0], gxr[:, :c1]) < TOL[dtype]
            assert _rel(gy[1], gxr[:, c1:]) < TOL[dtype]
            assert _rel(gy[2], gwr) < TOL[dtype] * (4 if dtype == torch.bfloat16 else 1)


def test_thread_count_independent():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 13, 11, generator=gen)
    x2 = torch.randn(1, 8, 13, 11, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(1, 16, 3, 3, generator=gen)
    old = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(torch.ops.medconv.rolling_conv_spectral_cat(x, x2, w, None, None, None, False, [1, 1], [1, 1],
                                                                     [1, 1], 16))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_falls_back_to_cat_where_the_fused_kernel_does_not_run():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 6, 7, generator=gen)
    x2 = torch.randn(1, 5, 6, 7, generator=gen)
    w = torch.randn(1, 8, 3, 3, generator=gen)
    want = ref.rolling_conv(torch.cat([x, x2], 1).double(), w.double(), None, [1, 1], [1, 1], [1, 1], 8)
    for backend in ("reference", "spectral_unfused", "cpu"):
        y, ran = _ran_fused_cat(lambda: rolling_conv_cat(x, x2, w, None, 1, 1, 1, None, backend))
        assert not ran and _rel(y, want) < 3e-5
    y, ran = _ran_fused_cat(lambda: rolling_conv_cat(x.half(), x2.half(), w.half(), None, 1, 1, 1, None, "spectral"))
    assert not ran and _rel(y, want) < 5e-3
    bad_w = w.clone()
    bad_w[0, 0, 0, 0] = float("nan")  # a non-finite weight runs the per-base composition, as rolling_conv2d
    y, ran = _ran_fused_cat(lambda: rolling_conv_cat(x, x2, bad_w, None, 1, 1, 1, None, "spectral"))
    from medconv_ext.ops.rolling_conv import rolling_conv2d
    assert not ran and torch.equal(torch.isnan(y), torch.isnan(rolling_conv2d(torch.cat([x, x2], 1), bad_w, None, 1, 1,
                                                                                1, None, "reference")))


def test_bad_inputs():
    x = torch.randn(1, 3, 6, 7)
    w = torch.randn(1, 8, 3, 3)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):  # torch.cat's own error
        rolling_conv_cat(x, torch.randn(1, 5, 6, 8), w, None, 1, 1, 1, None, "spectral")
    with pytest.raises(ValueError, match="rolling_conv"):  # the channels of the pair do not match the weight
        rolling_conv_cat(x, torch.randn(1, 4, 6, 7), w, None, 1, 1, 1, None, "spectral")
    with pytest.raises(RuntimeError, match="same batch and spatial sizes"):
        torch.ops.medconv.rolling_conv_spectral_cat(x, torch.randn(2, 5, 6, 7), w, None, None, None, False, [1, 1],
                                                    [1, 1], [1, 1], 8)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.medconv.rolling_conv_spectral_cat(x, torch.randn(1, 5, 6, 7, dtype=torch.float64), w, None, None,
                                                    None, False, [1, 1], [1, 1], [1, 1], 8)


def test_opcheck_and_compile():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 5, 6, generator=gen, requires_grad=True)
    x2 = torch.randn(1, 4, 5, 6, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(1, 8, 3, 3, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.medconv.rolling_conv_spectral_cat.default,
                          (x, x2, w, None, None, None, False, [1, 1], [1, 1], [1, 1], 8))
    f = torch.compile(lambda a, b, c: rolling_conv_cat(a, b, c, None, 1, 1, 1, None, "spectral"), fullgraph=True)
    want = ref.rolling_conv(torch.cat([x, x2], 1).double(), w.double(), None, [1, 1], [1, 1], [1, 1], 8)
    assert _rel(f(x, x2, w), want) < 3e-5


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_decoder_reads_the_skip_in_place(dims):
    """In eval mode every decoder block of a rolling U-Net whose first conv runs on the fused kernel
    reads the up-sampled tensor and the skip in place, and the model's output is the float64 result of
    the same model with torch.cat (reference backend)."""
    from medconv_ext import backends
    from medconv_ext.models.unet import UNet
    torch.manual_seed(6)
    net = UNet(dims, 1, 2, features=4, kind="rolling", depth=3).eval()
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 1, *(16,) * dims)
    with torch.no_grad():
        y, ran = _ran_fused_cat(lambda: net(x))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            net(x)
        n_cat = sum(e.count for e in prof.key_averages() if e.key == "medconv::rolling_conv_spectral_cat")
        with backends.forced_backend("reference"):
            want = net.double()(x.double())
    assert ran and n_cat == len(net.decoders)
    assert _rel(y, want) < 1e-4


def test_unet_training_step_reads_the_skip_in_place():
    """Training mode: the decoder's first conv reads the pair in place in the forward and in the weight
    gradient, and the gradients equal those of the same model with torch.cat (float64, reference backend)."""
    from medconv_ext import backends
    from medconv_ext.models.unet import UNet
    torch.manual_seed(7)
    net = UNet(2, 1, 2, features=4, kind="rolling", depth=2).train()
    x = torch.randn(2, 1, 16, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        net(x).square().sum().backward()
    keys = {e.key: e.count for e in prof.key_averages()}
    assert keys.get("medconv::rolling_conv_spectral_cat", 0) == len(net.decoders)
    assert keys.get("medconv::rolling_conv_spectral_cat_grad_weight", 0) == len(net.decoders)
    grads = [p.grad.double().clone() for p in net.parameters()]
    net64 = net.double()
    net64.zero_grad()
    with backends.forced_backend("reference"):
        net64(x.double()).square().sum().backward()
    # a conv bias before BatchNorm has a zero gradient (the mean is removed): compare on the overall scale
    scale = max(p.grad.abs().max().item() for p in net64.parameters())
    for g, p in zip(grads, net64.parameters()):
        assert (g - p.grad).abs().max().item() < 1e-4 * scale


def test_hooked_conv_is_called_as_a_module():
    """A forward pre-hook on the decoder's conv (e.g. torch.nn.utils.prune's) must run: the module is called."""
    from medconv_ext.models.unet import UNet
    net = UNet(2, 1, 2, features=4, kind="rolling", depth=1).eval()
    calls = []
    net.decoders[0][0].conv.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1]))
    with torch.no_grad():
        net(torch.randn(1, 1, 8, 8))
    assert calls == [8]  # the concatenated 4 + 4 channels


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_inf_as_torch(dtype, isa):
    """A NaN in either tensor gives NaN exactly where the dense conv of the concatenation does; ReLU keeps it."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 5, 7, 8, generator=gen).to(dtype)
    x2 = torch.randn(1, 3, 7, 8, generator=gen).to(dtype)
    x[0, 2, 1, 1] = float("nan")
    x2[0, 1, 5, 6] = float("nan")
    w = torch.randn(1, 8, 3, 3, generator=gen).to(dtype)
    want = torch.relu(ref.rolling_conv(torch.cat([x, x2], 1).double(), w.double(), None, [1, 1], [1, 1], [1, 1], 8))
    with fused.use_isa(isa):
        y = torch.ops.medconv.rolling_conv_spectral_cat(x, x2.contiguous(memory_format=torch.channels_last), w, None,
                                                        None, None, True, [1, 1], [1, 1], [1, 1], 8)
    nan = torch.isnan(want)
    assert nan.any() and torch.equal(torch.isnan(y), nan)
    assert _rel(y[~nan], want[~nan]) < TOL[dtype]


def test_gradcheck():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    sc = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    sc.requires_grad_(True)
    sh = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda a, a2, w_, b_, s_, h_: rolling_conv_cat(a, a2, w_, b_, 2, 1, (1, 2), 3, "spectral", scale=s_,  # noqa: E731
                                                        shift=h_, relu=True)
    assert torch.autograd.gradcheck(fn, (x, x2, w, b, sc, sh))
    assert torch.autograd.gradgradcheck(fn, (x, x2, w, b, sc, sh))  # the weight gradient op's own autograd


def test_eager_training_path_matches_the_registered_autograd():
    """Eager training runs the op through a torch.autograd.Function (less Python per call than the
    torch.library autograd layer that torch.compile uses): the same output and gradients, bit for bit."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 2, 5, 6, generator=gen)
    x2 = torch.randn(2, 4, 5, 6, generator=gen)
    w = torch.randn(1, 6, 3, 3, generator=gen)
    b, sc, sh = (torch.randn(6, generator=gen) for _ in range(3))
    gout = torch.randn(2, 6, 5, 6, generator=gen)
    results = []
    for eager in (True, False):
        args = [t.clone().requires_grad_(True) for t in (x, x2, w, b, sc, sh)]
        if eager:
            y = rolling_conv_cat(args[0], args[1], args[2], args[3], 1, 1, 1, 6, "spectral", scale=args[4],
                                 shift=args[5], relu=True)
        else:
            y = torch.ops.medconv.rolling_conv_spectral_cat(*args, True, [1, 1], [1, 1], [1, 1], 6)
        assert ("CatFunctionBackward" in type(y.grad_fn).__name__) == eager, type(y.grad_fn).__name__
        y.backward(gout)
        results.append([y.detach()] + [a.grad for a in args])
    for got, want in zip(*results):
        assert got is not None and torch.equal(got, want)
