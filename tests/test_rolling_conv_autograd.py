"""gradcheck of every backend, opcheck of every compiled rolling op, torch.compile fullgraph."""
import pytest
import torch

import medconv_ext as mc
from medconv_ext import _ext
from medconv_ext.nn import RollingConv2d, RollingConvTranspose2d
from _rolling_util import HAS_CUDA, OP, OP_T, backend_params, skip_unsupported

needs_ext = pytest.mark.skipif(not _ext.has_compiled_ops(), reason="compiled extension not built")


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_gradcheck_conv(device, backend):
    skip_unsupported(OP, backend, device, torch.float64)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(2, 3, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x, w, b: mc.rolling_conv2d(x, w, b, stride=(2, 1), padding=1, dilation=(1, 2), n_rolls=2,
                                           backend=backend)
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_gradcheck_conv3d(device, backend):
    skip_unsupported(OP, backend, device, torch.float64)
    x = torch.randn(1, 2, 4, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(1, 2, 2, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x, w: mc.rolling_conv3d(x, w, None, stride=(1, 1, 2), padding=(0, 1, 1), backend=backend)
    assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.parametrize("device,backend", backend_params(OP_T))
def test_gradcheck_transposed(device, backend):
    skip_unsupported(OP_T, backend, device, torch.float64)
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x, w, b: mc.rolling_conv_transpose2d(x, w, b, stride=(2, 1), padding=(1, 0), output_padding=(1, 0),
                                                     n_rolls=2, backend=backend, dilation=(1, 2))
    assert torch.autograd.gradcheck(fn, (x, w, b))


def _opcheck_samples(device):
    """(op name, args) for every compiled rolling op, conv and transposed, 2D and 3D, with and without bias."""
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 4, 6, 5, **f64, requires_grad=True)
    w = torch.randn(2, 4, 3, 3, **f64, requires_grad=True)
    b = torch.randn(6, **f64, requires_grad=True)
    sp = ([2, 1], [1, 1], [1, 2], 3)  # stride, padding, dilation, n_rolls
    y = torch.ops.medconv.rolling_conv(x.detach(), w.detach(), None, *sp)
    gy = torch.randn_like(y)
    x3 = torch.randn(1, 3, 4, 3, 5, **f64, requires_grad=True)
    w3 = torch.randn(1, 3, 2, 2, 3, **f64, requires_grad=True)
    sp3 = ([1, 2, 1], [0, 1, 1], [1, 1, 1], 3)
    wt = torch.randn(4, 2, 3, 2, **f64, requires_grad=True)
    spt = ([2, 1], [1, 0], [1, 2], 3)
    yt = torch.ops.medconv.rolling_conv_transpose(x.detach(), wt.detach(), None, spt[0], spt[1], [1, 0], spt[2], 3)
    gyt = torch.randn_like(yt)
    return [
        ("rolling_conv", (x, w, b, *sp)),
        ("rolling_conv", (x3, w3, None, *sp3)),  # 3D, no bias
        ("rolling_conv_grad_input", (gy, w.detach(), list(x.shape), *sp)),
        ("rolling_conv_grad_weight", (gy, x.detach(), list(w.shape), *sp)),
        ("rolling_conv_transpose", (x, wt, b, spt[0], spt[1], [1, 0], spt[2], 3)),
        ("rolling_conv_transpose_grad_input", (gyt, wt.detach(), list(x.shape), *spt)),
        ("rolling_conv_transpose_grad_weight", (gyt, x.detach(), list(wt.shape), *spt)),
    ] + (_spectral_samples(x, w, b, sp, gy, wt, spt, gyt) if device == "cpu" else [])


def _spectral_samples(x, w, b, sp, gy, wt, spt, gyt):
    """The fused spectral CPU ops (CPU kernels only): forward with the epilogue, both gradients."""
    sc = torch.rand(6, dtype=x.dtype) + 0.5
    sh = torch.randn(6, dtype=x.dtype)
    return [
        ("rolling_conv_spectral", (x, w, b, sc, sh, True, *sp)),
        # the channel concatenation of two tensors (one channels-last) read in place
        ("rolling_conv_spectral_cat", (x[:, :1], x[:, 1:].contiguous(memory_format=torch.channels_last), w, b, sc, sh,
                                       True, *sp)),
        ("rolling_conv_spectral_cat_grad_weight", (gy, x.detach()[:, :3], x.detach()[:, 3:], list(w.shape), *sp)),
        ("rolling_conv_spectral_grad_input", (gy, w.detach(), list(x.shape), *sp)),
        ("rolling_conv_spectral_grad_weight", (gy, x.detach(), list(w.shape), *sp)),
        ("rolling_conv_transpose_spectral", (x, wt, b, None, None, False, spt[0], spt[1], [1, 0], spt[2], 3)),
        ("rolling_conv_transpose_spectral_grad_input", (gyt, wt.detach(), list(x.shape), *spt)),
        ("rolling_conv_transpose_spectral_grad_weight", (gyt, x.detach(), list(wt.shape), *spt)),
    ]


@needs_ext
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not _ext.has_cuda_kernels() or not HAS_CUDA, reason="no CUDA kernels or no GPU"))])
def test_opcheck_every_rolling_op(device):
    checked = set()
    for name, args in _opcheck_samples(device):
        torch.library.opcheck(getattr(torch.ops.medconv, name).default, args)
        checked.add(name)
    # The Triton custom ops (medconv::rolling_conv*_triton*) are opchecked in test_rolling_conv_triton.py.
    registered = {n for n in dir(torch.ops.medconv) if n.startswith("rolling_conv") and "_triton" not in n
                  and (device == "cpu" or "_spectral" not in n)}  # the fused spectral ops are CPU kernels
    assert registered <= checked, "ops without an opcheck: %s" % sorted(registered - checked)


class _Tiny(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.c1 = RollingConv2d(4, 8, 3, padding=1, backend=backend)
        self.c2 = RollingConv2d(8, 4, 3, stride=2, padding=1, bias=False, backend=backend)
        self.up = RollingConvTranspose2d(4, 2, 2, stride=2, backend=backend)

    def forward(self, x):
        return self.up(torch.relu(self.c2(torch.relu(self.c1(x)))))


@needs_ext
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = _Tiny("cpu").double()
    x = torch.randn(2, 4, 8, 7, dtype=torch.float64, requires_grad=True)
    eager = model(x)
    ge = torch.autograd.grad(eager.square().sum(), [x] + list(model.parameters()))
    # fullgraph=True raises on any graph break. "aot_eager" traces exactly what inductor would
    # (dynamo, fake kernels, AOT autograd of the registered backward) without C++ codegen,
    # which would cost a minute of CI time.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    gc = torch.autograd.grad(out.square().sum(), [x] + list(model.parameters()))
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-12)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# 3D layers padded above "same" with stride 2 in depth: torch's CPU conv3d / conv_transpose3d weight gradient
# (oneDNN, torch 2.14) came out wrong there (up to 1e35) when it saw the padding; the bank + conv of backend
# "reference" (and "auto" where it picks it) and the depthwise convs of "spectral_unfused" pad explicitly.
OVER_PADDED_3D = [  # (transposed, x shape, base shape, stride, padding, output_padding, n_rolls)
    (False, (2, 2, 4, 8, 5), (1, 2, 4, 2, 4), (2, 2, 2), (3, 1, 1), None, 2),
    (False, (2, 3, 3, 6, 6), (2, 3, 4, 5, 3), (2, 2, 1), (3, 1, 1), None, 3),
    (False, (3, 5, 4, 5, 4), (1, 5, 5, 3, 3), (3, 3, 3), (4, 1, 1), None, 5),
    (True, (2, 2, 3, 2, 8), (2, 1, 4, 5, 4), (2, 2, 2), (3, 1, 3), (1, 1, 1), 1),
    (True, (2, 2, 3, 6, 6), (2, 2, 4, 5, 3), (2, 2, 1), (3, 1, 1), (1, 1, 0), 2),
    (False, (1, 9, 4, 4, 1), (1, 9, 5, 3, 3), (3, 2, 1), (4, 0, 1), None, 9),
    (True, (1, 2, 3, 1, 4), (2, 1, 5, 3, 3), (3, 1, 2), (4, 0, 1), (1, 0, 0), 2),
    (False, (1, 6, 3, 4, 4), (1, 6, 3, 3, 3), (1, 1, 1), (1, 1, 1), None, 4),  # partial rolls: the composition's view
]


@pytest.mark.parametrize("backend", ["reference", "auto", "cpu", "spectral", "spectral_unfused"])
@pytest.mark.parametrize("case", range(len(OVER_PADDED_3D)))
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_over_padded_3d_weight_gradient_on_cpu(backend, case, layout):
    from medconv_ext.reference import rolling_conv as ref
    if backend in ("cpu", "spectral") and not _ext.has_compiled_ops():
        pytest.skip("compiled extension not built")
    transposed, xs, ws, stride, padding, out_pad, n_rolls = OVER_PADDED_3D[case]
    gen = torch.Generator().manual_seed(case)
    for _ in range(3):  # the wrong values depended on memory contents: several draws
        x = torch.randn(xs, generator=gen)
        w = torch.randn(ws, generator=gen)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
        if transposed:
            y = mc.rolling_conv_transpose3d(xg, wg, None, stride, padding, out_pad, n_rolls, backend)
            want = ref.rolling_conv_transpose(xd, wd, None, stride, padding, out_pad, (1, 1, 1), n_rolls)
        else:
            y = mc.rolling_conv3d(xg, wg, None, stride, padding, 1, n_rolls, backend)
            want = ref.rolling_conv(xd, wd, None, stride, padding, (1, 1, 1), n_rolls)
        assert y.shape == want.shape
        # a dense result (NCDHW or channels-last), not a view into a larger buffer
        assert y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last_3d), y.stride()
        g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        gx, gw = torch.autograd.grad(y, (xg, wg), g.float())
        gxd, gwd = torch.autograd.grad(want, (xd, wd), g)
        for got, exp in ((y, want), (gx, gxd), (gw, gwd)):
            err = (got.double() - exp).abs().max() / exp.abs().max()
            assert err < 1e-4, (backend, case, layout, float(err))
