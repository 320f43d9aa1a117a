"""Drop-in parity of the rolling modules with nn.Conv2d/3d and nn.ConvTranspose2d/3d: factory keywords
(device=, dtype=), padding='same'/'valid', padding_mode, unbatched input and output_size=. Every
result is compared, in float64, with the torch module of the same options holding the expanded
bank (module.expanded_weight())."""
import pytest
import torch
from torch import nn

from medconv_ext import available_backends
from medconv_ext.nn import (
    Involution2d,
    Involution3d,
    RollingConv2d,
    RollingConv3d,
    RollingConvTranspose2d,
    RollingConvTranspose3d,
)

BACKENDS = ["reference", "spectral"] + (["cpu"] if available_backends()["cpu"][0] else [])
CONV = {2: (RollingConv2d, nn.Conv2d), 3: (RollingConv3d, nn.Conv3d)}
CONV_T = {2: (RollingConvTranspose2d, nn.ConvTranspose2d), 3: (RollingConvTranspose3d, nn.ConvTranspose3d)}
TOL = dict(rtol=1e-10, atol=1e-10)


def _dense_twin(m, torch_cls, **kw):
    """The torch module with m's options and m's expanded bank and bias."""
    t = torch_cls(m.in_channels, m.out_channels, m.kernel_size, bias=m.bias is not None, dtype=torch.float64, **kw)
    with torch.no_grad():
        t.weight.copy_(m.expanded_weight())
        if m.bias is not None:
            t.bias.copy_(m.bias)
    return t


@pytest.mark.parametrize("cls", [RollingConv2d, RollingConv3d, RollingConvTranspose2d, RollingConvTranspose3d])
def test_factory_keywords(cls):
    m = cls(4, 8, 3, dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.bias.dtype == torch.float64
    m = cls(4, 8, 3, device="meta", dtype=torch.float16)
    assert m.weight.device.type == "meta" and m.bias.device.type == "meta" and m.weight.dtype == torch.float16
    m = cls(4, 8, 3, bias=False, device=torch.device("cpu"))
    assert m.weight.device.type == "cpu" and m.weight.dtype == torch.get_default_dtype() and m.bias is None


@pytest.mark.parametrize("cls", [Involution2d, Involution3d])
def test_involution_factory_keywords(cls):
    m = cls(8, 3, group_channels=4, reduction_ratio=2, dtype=torch.float64)
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    assert {b.dtype for b in m.buffers() if b.is_floating_point()} == {torch.float64}
    m = cls(8, 3, stride=2, group_channels=4, device="meta")
    assert {p.device.type for p in m.parameters()} == {"meta"} and {b.device.type for b in m.buffers()} == {"meta"}
    # a float64 module built in place computes the same as one converted afterwards, same state
    a = cls(8, 3, group_channels=4, reduction_ratio=2, dtype=torch.float64).eval()
    b = cls(8, 3, group_channels=4, reduction_ratio=2).double().eval()
    a.load_state_dict(b.state_dict())
    x = torch.randn(2, 8, *(5,) * (2 if cls is Involution2d else 3), dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), **TOL)


# kernel, dilation, padding, padding_mode: odd and even kernels (even extents need asymmetric 'same'),
# dilation, every padding mode, strings and numbers
CONV_CASES = [
    ((3, 3), 1, "same", "zeros"),
    ((4, 3), 1, "same", "zeros"),
    ((2, 5), (2, 1), "same", "zeros"),
    ((4, 4), (1, 3), "same", "reflect"),
    ((3, 2), 1, "same", "replicate"),
    ((2, 3), 2, "same", "circular"),
    ((3, 3), 1, "valid", "zeros"),
    ((3, 2), 1, "valid", "reflect"),
    ((3, 3), 1, (1, 2), "reflect"),
    ((3, 3), 2, 1, "replicate"),
    ((3, 1), 1, (2, 1), "circular"),
    ((3, 3), 1, 2, "zeros"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,dil,pad,mode", CONV_CASES)
def test_conv2d_padding_options(k, dil, pad, mode, backend):
    torch.manual_seed(1)
    stride = 1 if pad == "same" else 2
    m = RollingConv2d(3, 6, k, stride=stride, padding=pad, dilation=dil, padding_mode=mode, backend=backend,
                      dtype=torch.float64)
    t = _dense_twin(m, nn.Conv2d, stride=stride, padding=pad, dilation=dil, padding_mode=mode)
    assert m.padding == t.padding
    assert list(m._reversed_padding_repeated_twice) == list(t._reversed_padding_repeated_twice)
    for shape in [(2, 3, 7, 6), (0, 3, 7, 6), (3, 8, 7)]:  # batched, empty batch, unbatched
        x = torch.randn(shape, dtype=torch.float64)
        out = m(x)
        torch.testing.assert_close(out, t(x), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,dil,pad,mode", [
    ((3, 3, 3), 1, "same", "zeros"),
    ((2, 3, 4), 1, "same", "zeros"),
    ((2, 2, 3), (1, 2, 1), "same", "reflect"),
    ((3, 2, 3), 1, "same", "replicate"),
    ((1, 2, 3), 1, "same", "circular"),
    ((3, 3, 2), 1, "valid", "zeros"),
    ((3, 3, 3), 1, (1, 0, 2), "circular"),
])
def test_conv3d_padding_options(k, dil, pad, mode, backend):
    torch.manual_seed(2)
    m = RollingConv3d(2, 4, k, padding=pad, dilation=dil, padding_mode=mode, backend=backend, dtype=torch.float64)
    t = _dense_twin(m, nn.Conv3d, padding=pad, dilation=dil, padding_mode=mode)
    assert m.padding == t.padding
    for shape in [(2, 2, 5, 6, 7), (2, 6, 5, 4)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(m(x), t(x), **TOL)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_unbatched_and_output_size(dims, backend):
    torch.manual_seed(3)
    cls, tcls = CONV_T[dims]
    kw = dict(stride=2, padding=1, dilation=1)
    m = cls(3, 6, 3, output_padding=1, backend=backend, dtype=torch.float64, **kw)
    t = _dense_twin(m, tcls, output_padding=1, **kw)
    sp = (4, 5, 3)[:dims]
    x = torch.randn(2, 3, *sp, dtype=torch.float64)
    torch.testing.assert_close(m(x), t(x), **TOL)
    xu = x[1]
    torch.testing.assert_close(m(xu), t(xu), **TOL)
    assert m(xu).shape == t(xu).shape and m(xu).dim() == dims + 1
    # output_size chooses output_padding (here against a layer built with output_padding=0)
    m0 = cls(3, 6, 3, backend=backend, dtype=torch.float64, **kw)
    t0 = _dense_twin(m0, tcls, **kw)
    for size in [[2 * n - 1 for n in sp], [2 * n for n in sp], [2, 6] + [2 * n for n in sp]]:
        torch.testing.assert_close(m0(x, output_size=size), t0(x, output_size=size), **TOL)
    usize = [6] + [2 * n for n in sp]  # unbatched: (C, *S) is accepted as torch does
    torch.testing.assert_close(m0(xu, output_size=usize), t0(xu, output_size=usize), **TOL)
    with pytest.raises(ValueError, match="output size"):
        m0(x, output_size=[2 * n + 1 for n in sp])
    with pytest.raises(ValueError, match="output_size must have"):
        m0(x, output_size=[5])


@pytest.mark.parametrize("dims", [2, 3])
def test_conv_unbatched_default_options(dims):
    cls, tcls = CONV[dims]
    torch.manual_seed(4)
    m = cls(1, 3, 3, stride=2, padding=1, dtype=torch.float64)  # C_in = 1
    t = _dense_twin(m, tcls, stride=2, padding=1)
    x = torch.randn(1, *(5,) * dims, dtype=torch.float64)
    out = m(x)
    assert out.shape == t(x).shape == (3,) + (3,) * dims
    torch.testing.assert_close(out, t(x), **TOL)


def test_bad_options_raise_like_torch():
    with pytest.raises(ValueError, match="padding='same' is not supported for strided convolutions"):
        RollingConv2d(3, 3, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="invalid padding string 'full'"):
        RollingConv3d(3, 3, 3, padding="full")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        RollingConv2d(3, 3, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match='only "zeros" padding mode is supported'):
        RollingConvTranspose2d(3, 3, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="strings 'same' and 'valid' are for convolutions"):
        RollingConvTranspose3d(3, 3, 3, padding="same")
    m = RollingConv2d(3, 3, 3)
    with pytest.raises(ValueError, match=r"must have 4 dims"):
        m(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"must have 4 dims"):
        m(torch.randn(1, 1, 3, 5, 5))
    # reflect padding larger than the input: torch's own F.pad error, not a wrong result
    r = RollingConv2d(3, 3, 3, padding=4, padding_mode="reflect")
    with pytest.raises(RuntimeError):
        r(torch.randn(1, 3, 3, 3))


def test_repr_shows_options():
    m = RollingConv2d(4, 8, (4, 3), padding="same", padding_mode="reflect")
    assert "padding=same" in repr(m) and "padding_mode=reflect" in repr(m)
    assert "padding_mode" not in repr(RollingConv2d(4, 8, 3, padding=1))


def test_state_dict_unchanged_by_options():
    a = RollingConv2d(4, 8, 3, padding="same", padding_mode="circular")
    b = RollingConv2d(4, 8, 3, padding=1)
    assert a.state_dict().keys() == b.state_dict().keys() == {"weight", "bias"}
    b.load_state_dict(a.state_dict())


def test_torch_compile_fullgraph_with_new_options():
    """The padding/unbatched handling adds no graph break (aot_eager: what inductor traces, without codegen)."""
    torch.manual_seed(6)
    m = RollingConv2d(3, 6, (4, 3), padding="same", padding_mode="reflect", dtype=torch.float64)
    t = _dense_twin(m, nn.Conv2d, padding="same", padding_mode="reflect")
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(cm(x), t(x), **TOL)


# ---------------------------------------------------------------------------------------------
# torch's positional signatures. The constructor arguments below are those of torch's own module
# tests (torch/testing/_internal/common_nn.py: new_module_tests, the padding-mode tests, and
# common_modules.py's module_inputs_torch_nn_ConvNd), passed positionally to the rolling module and
# to the torch module alike; the outputs are compared with the torch module holding expanded_weight().
# Channel counts without a rolling layout (out_channels = 3 or 5 for 2 or 4 inputs) must raise the
# layout ValueError; each such case also runs with the nearest out_channels that has a layout.
# ---------------------------------------------------------------------------------------------
_MODES = ["reflect", "circular", "replicate", "zeros"]
TORCH_POSITIONAL_CASES = [
    # (dims, transposed, constructor args, input size)
    (2, False, (3, 4, (3, 2)), (2, 3, 7, 5)),
    (2, False, (3, 4, (3, 3), (2, 2)), (2, 3, 6, 6)),
    (2, False, (3, 4, (3, 3), (2, 2), (1, 1)), (2, 3, 6, 6)),
    (2, False, (3, 2, (3, 3), (2, 2), (1, 1), (2, 2)), (2, 3, 8, 8)),
    (2, False, (3, 4, (3, 2), 1, 0, 1, 1, False), (2, 3, 6, 5)),
    (2, False, (3, 4, (3, 2)), (0, 3, 7, 5)),                                   # zero batch
    (2, False, (4, 5, 3), (2, 4, 3, 4)),                                        # module_db (no layout)
    (2, False, (4, 4, 3), (2, 4, 3, 4)),
    (2, False, (4, 8, 3), (4, 3, 4)),                                           # unbatched
    (2, True, (3, 4, 3, (3, 2), 1, (1, 1)), (1, 3, 7, 6)),
    (2, True, (3, 4, 3, (2, 3), 1, (1, 1), 1, False, (2, 2)), (1, 3, 6, 7)),
    (2, True, (3, 4, 3, (2, 3), 1, (1, 1), 1, False), (1, 3, 6, 7)),
    (2, True, (3, 4, 3, (2, 3), 1, (1, 1)), (0, 3, 6, 7)),                      # zero batch
    (3, False, (2, 3, (2, 3, 2)), (1, 2, 4, 5, 4)),                             # no layout
    (3, False, (2, 4, (2, 3, 2)), (1, 2, 4, 5, 4)),
    (3, False, (2, 3, (2, 3, 4), 1, 0, 1, 1, False), (1, 2, 3, 4, 5)),          # no layout
    (3, False, (2, 4, (2, 3, 4), 1, 0, 1, 1, False), (1, 2, 3, 4, 5)),
    (3, False, (2, 4, (1, 1, 1), 1, 0, 1, 1, False), (1, 2, 3, 4, 5)),
    (3, False, (3, 4, 2, 2), (2, 3, 5, 5, 5)),
    (3, False, (3, 4, 2, 2, 1), (2, 3, 5, 5, 5)),
    (3, False, (3, 4, (2, 3, 4)), (0, 3, 3, 4, 5)),                             # zero batch
    (3, True, (2, 3, (2, 3, 2)), (1, 2, 4, 5, 4)),                              # no layout
    (3, True, (2, 4, (2, 3, 2)), (1, 2, 4, 5, 4)),
    (3, True, (2, 4, (2, 3, 2), 1, 0, 0, 1, True, (2, 2, 2)), (1, 2, 4, 5, 4)),
    (3, True, (2, 4, 2, 2, 0, 0, 1, True, 1), (2, 4, 3, 5)),                    # unbatched
] + [
    # the padding-mode tests: (2, 3, 3, 2, padding, 1, 1, True, mode); 3 outputs for 2 inputs has no layout
    (d, False, (2, cout, 3, 2, tuple(range(1, d + 1)), 1, 1, True, mode), (2, 2) + (4,) * d)
    for d in (2, 3) for mode in _MODES for cout in (3, 4)
]


def _case_id(case):
    dims, transposed, args, size = case
    return "%s%dd%s-in%s" % ("T" if transposed else "", dims, list(args), list(size))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", TORCH_POSITIONAL_CASES, ids=_case_id)
def test_torch_positional_constructor_args(case, backend):
    dims, transposed, args, size = case
    cls, tcls = (CONV_T if transposed else CONV)[dims]
    cin, cout = args[0], args[1]
    if cout % -(-cout // cin):  # no rolling layout: the layout's ValueError, as before
        with pytest.raises(ValueError, match="out_channels=%d has no rolling layout" % cout):
            cls(*args)
        return
    torch.manual_seed(7)
    m = cls(*args).double()
    m.backend = backend
    t = tcls(*args).double()
    for name in ("stride", "padding", "dilation", "groups", "padding_mode", "output_padding", "transposed"):
        assert getattr(m, name) == getattr(t, name), name
    assert (m.bias is None) == (t.bias is None)
    with torch.no_grad():
        t.weight.copy_(m.expanded_weight())
        if t.bias is not None:
            t.bias.copy_(m.bias)
    x = torch.randn(size, dtype=torch.float64)
    out = m(x)
    assert out.shape == t(x).shape
    torch.testing.assert_close(out, t(x), **TOL)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
def test_signature_is_torchs(dims, transposed):
    """Same parameter names, order, kinds and defaults as torch's module; `backend` keyword-only."""
    import inspect

    cls, tcls = (CONV_T if transposed else CONV)[dims]
    ours = inspect.signature(cls.__init__).parameters
    theirs = inspect.signature(tcls.__init__).parameters
    assert [p for p in ours if p != "backend"] == list(theirs)
    for name, p in theirs.items():
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name
    assert ours["backend"].kind is inspect.Parameter.KEYWORD_ONLY and ours["backend"].default == "auto"


@pytest.mark.parametrize("dims", [2, 3])
def test_positional_device_dtype_and_keyword_backend(dims):
    cls, tcls = CONV[dims]
    m = cls(3, 6, 3, 1, 1, 1, 1, True, "circular", "cpu", torch.float64, backend="reference")
    assert m.weight.dtype == torch.float64 and m.padding_mode == "circular" and m.backend == "reference"
    t = _dense_twin(m, tcls, padding=1, padding_mode="circular")
    x = torch.randn(2, 3, *(5,) * dims, dtype=torch.float64)
    torch.testing.assert_close(m(x), t(x), **TOL)
    ct, tct = CONV_T[dims]
    mt = ct(3, 6, 3, 2, 1, 1, 1, False, 1, "zeros", None, torch.float64, backend="reference")
    assert mt.weight.dtype == torch.float64 and mt.bias is None and mt.output_padding == (1,) * dims
    tt = _dense_twin(mt, tct, stride=2, padding=1, output_padding=1)
    torch.testing.assert_close(mt(x), tt(x), **TOL)
    with pytest.raises(TypeError):  # one positional argument too many, as torch
        cls(3, 6, 3, 1, 1, 1, 1, True, "zeros", None, None, "reference")


@pytest.mark.parametrize("cls", [RollingConv2d, RollingConv3d, RollingConvTranspose2d, RollingConvTranspose3d])
def test_groups_other_than_one_raise(cls):
    for groups in (2, 4, 0, True, 1.0, "1"):
        with pytest.raises(ValueError, match=r"groups=.* is not supported: rolling convolution supports groups=1 only"):
            cls(4, 8, 3, groups=groups)
    with pytest.raises(ValueError, match=r"groups=2 is not supported.*supports groups=1 only"):
        cls(4, 8, 3, 1, 0, 1, 2)  # groups positionally (7th argument of Conv and ConvTranspose alike)
    assert cls(4, 8, 3, groups=1).groups == 1


def test_old_positional_backend_is_refused():
    """Calls written for the earlier signature (backend after bias) fail loudly, never silently."""
    with pytest.raises(ValueError, match="groups=True is not supported"):
        RollingConv2d(4, 8, 3, 1, 1, 1, True, "reference")
    with pytest.raises(TypeError, match="bias must be a bool"):
        RollingConv2d(4, 8, 3, 1, 1, 1, 1, "reference")
    with pytest.raises(TypeError, match="backend must be a string"):
        RollingConv2d(4, 8, 3, backend=None)
