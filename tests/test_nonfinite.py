"""NaN and Inf semantics of every backend: equal to torch's own ops on the expanded bank.

The expected result is the "reference" backend in float64 (materialized bank + torch's convolution,
the epilogue y = relu?((conv + bias) * scale + shift) by torch ops), on the same values. A backend
agrees when its NaN, +Inf and -Inf masks are exactly the expected ones and its finite values are
within the dtype's tolerance; gradients likewise (torch.relu's backward passes the gradient where
the output is NaN and gives 0 where it is <= 0, whatever the incoming gradient).

The spectral algorithm (channel DFT) guarantees less for Inf inputs, and this is what is tested
(docs/rolling_conv_spectral.md, "Non-finite values"): NaN inputs give exactly the dense conv's
NaN positions (a dense output channel sums over every input channel, so a NaN reaches every
output channel at the pixels whose window holds it, in both algorithms); an Inf input makes
exactly the dense conv's non-finite positions non-finite, but the DFT may turn a dense +-Inf into
NaN (Inf * 0 and Inf - Inf inside the transform), so after a ReLU such a position is NaN where the
dense conv gives relu(-Inf) = 0. A non-finite input never becomes a finite value the dense conv
does not give.
"""
import math
import os

import pytest
import torch

from medconv_ext import backends
from medconv_ext.ops import involution as INV
from medconv_ext.ops import rolling_conv as RC

# the Triton interpreter (numpy) warns on Inf * 0 and Inf - Inf, which these tests compute on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

INF, NAN = math.inf, math.nan
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-4)}
ROLLING_BACKENDS = ["spectral", "spectral_unfused", "cpu", "triton"]
SPECTRAL = ("spectral", "spectral_unfused")


def _backend_ok(name, cpu_tensors=True):
    ok, why = backends.available_backends()[name]
    if not ok:
        pytest.skip("backend %r unavailable: %s" % (name, why))
    if cpu_tensors and name == "triton" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("these tests run Triton on CPU tensors, under TRITON_INTERPRET=1 (set by conftest.py without a GPU)")


def _dtypes(backend):
    # Triton runs under TRITON_INTERPRET=1 without a GPU: float32 only, to stay fast
    return [torch.float32] if backend == "triton" else [torch.float32, torch.float64]


# ------------------------------------------------------------------ comparisons
def _first_diff(a, b):
    idx = torch.nonzero(a != b)
    return tuple(idx[0].tolist()) if len(idx) else None


def assert_same_nonfinite(got, exp, dtype, what):
    """NaN, +Inf and -Inf exactly where expected; finite values within the dtype's tolerance."""
    assert got.shape == exp.shape, "%s: shape %s != %s" % (what, tuple(got.shape), tuple(exp.shape))
    got, exp = got.detach().double().cpu(), exp.detach().double().cpu()
    for name, f in (("NaN", torch.isnan), ("+Inf", lambda t: t == INF), ("-Inf", lambda t: t == -INF)):
        gm, em = f(got), f(exp)
        if not torch.equal(gm, em):
            i = _first_diff(gm, em)
            raise AssertionError("%s: %s mask differs: %d expected, %d got; first difference at %s: got %r, "
                                 "expected %r" % (what, name, int(em.sum()), int(gm.sum()), i, float(got[i]),
                                                  float(exp[i])))
    fin = torch.isfinite(exp)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got[fin], exp[fin], rtol=rtol, atol=atol, msg=lambda m: "%s: %s" % (what, m))


def assert_spectral_inf_semantics(got, exp, dense_nonfinite, dtype, what):
    """The spectral guarantee for Inf inputs: where the dense conv (before bias and epilogue) is
    finite, exactly torch's result; where it is not, a non-finite value, or torch's finite value
    (relu(-Inf) = 0) or NaN in its place. Never a finite value torch does not give."""
    got, exp = got.detach().double().cpu(), exp.detach().double().cpu()
    ok = ~dense_nonfinite
    assert_same_nonfinite(got[ok], exp[ok], dtype, what + " (where the dense conv is finite)")
    g, e = got[dense_nonfinite], exp[dense_nonfinite]
    fine = torch.where(torch.isfinite(e), (g == e) | torch.isnan(g), ~torch.isfinite(g))
    if not fine.all():
        i = int(torch.nonzero(~fine)[0])
        raise AssertionError("%s: where the dense conv is non-finite, got %r (torch: %r)" % (what, float(g[i]), float(e[i])))
    assert (~torch.isfinite(g)).any(), "%s: the test should reach non-finite outputs" % what


# ------------------------------------------------------------------ rolling conv cases
# (id, transposed, dims, N, C, n_base, n_rolls, k, spatial, stride, padding, output_padding, dilation)
CASES = [
    ("conv2d", False, 2, 2, 5, 2, 3, 3, (7, 6), [1, 1], [1, 1], [0, 0], [1, 1]),
    ("conv2d-s2-d2", False, 2, 1, 4, 1, 4, 3, (9, 8), [2, 2], [2, 1], [0, 0], [2, 1]),
    ("conv3d", False, 3, 1, 4, 1, 2, 3, (5, 4, 5), [1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1]),
    ("convT2d-s2", True, 2, 1, 4, 2, 2, 3, (4, 5), [2, 2], [1, 1], [1, 1], [1, 1]),
    ("convT3d-s2", True, 3, 1, 3, 1, 3, 2, (3, 3, 4), [2, 2, 2], [0, 0, 0], [0, 0, 0], [1, 1, 1]),
]
CASE_IDS = [c[0] for c in CASES]


def _case(case, dtype, inputs, seed=0):
    """x, base weight, bias for a case; `inputs` puts NaN ("nan"), +-Inf ("inf") or both ("mixed") into x at a few
    voxels of single channels; the base weight has exact zeros (Inf * 0)."""
    _, transposed, dims, n, c, nb, n_rolls, k, spatial, *_ = case
    g = torch.Generator().manual_seed(seed)
    spatial = (spatial,) * dims if isinstance(spatial, int) else tuple(spatial)
    ks = (k,) * dims if isinstance(k, int) else tuple(k)
    x = torch.randn((n, c) + spatial, generator=g, dtype=torch.float64)
    wshape = (c, nb) + ks if transposed else (nb, c) + ks
    w = torch.randn(wshape, generator=g, dtype=torch.float64)
    w.view(-1)[::7] = 0.0  # exact zeros: Inf * 0 is NaN in the dense conv
    b = torch.randn(n_rolls * nb, generator=g, dtype=torch.float64)
    spots = {"nan": [NAN, NAN], "inf": [INF, -INF], "mixed": [NAN, INF, -INF]}[inputs]
    for i, v in enumerate(spots):
        # inside the image, away from its border (the border cases are tested separately, see below)
        idx = (i % n, (2 * i + 1) % c) + tuple(s // 2 + (i + a) % 2 - (i == 2) for a, s in enumerate(spatial))
        x[idx] = v
    return x.to(dtype), w.to(dtype), b.to(dtype)


def _run(case, backend, x, w, b, **epi):
    _, transposed, dims, _, c, nb, n_rolls, _, _, stride, padding, output_padding, dilation = case
    if transposed:
        f = RC.rolling_conv_transpose2d if dims == 2 else RC.rolling_conv_transpose3d
        return f(x, w, b, stride, padding, output_padding, n_rolls, backend, dilation, **epi)
    f = RC.rolling_conv2d if dims == 2 else RC.rolling_conv3d
    return f(x, w, b, stride, padding, dilation, n_rolls, backend, **epi)


def _epilogue(kind, c_out, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return {}
    if kind == "relu":
        return {"relu": True}
    scale = torch.randn(c_out, generator=g, dtype=torch.float64)
    scale[0] = 0.0  # Inf * 0 in the epilogue
    scale[-1] = -abs(float(scale[-1])) - 0.5  # a negative scale turns +Inf into -Inf before the ReLU
    shift = torch.randn(c_out, generator=g, dtype=torch.float64)
    if kind == "nonfinite-params":  # the epilogue's own non-finite values
        scale[1 % c_out] = INF
        shift[-1] = NAN
    return {"scale": scale.to(dtype), "shift": shift.to(dtype), "relu": kind != "scale-shift"}


EPILOGUES = ["none", "relu", "scale-shift", "scale-shift-relu", "nonfinite-params"]


def _expected(case, x, w, b, **epi):
    return _run(case, "reference", x.double(), w.double(), None if b is None else b.double(),
                **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in epi.items()})


def _dense_nonfinite(case, x, w):
    """Where torch's dense conv of the bank (no bias, no epilogue) is non-finite."""
    return ~torch.isfinite(_expected(case, x, w, None))


@pytest.mark.parametrize("backend", ROLLING_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("inputs", ["nan", "mixed"])
def test_rolling_forward_every_epilogue(backend, case, inputs):
    _backend_ok(backend)
    for dtype in _dtypes(backend):
        x, w, b = _case(case, dtype, inputs)
        c_out = case[6] * case[5]
        dense_nf = _dense_nonfinite(case, x, w)
        for kind in EPILOGUES:
            epi = _epilogue(kind, c_out, dtype)
            bias = b.clone()
            if kind == "nonfinite-params":
                bias[0] = INF
            got = _run(case, backend, x, w, bias, **epi)
            exp = _expected(case, x, w, bias, **epi)
            what = "%s %s %s inputs=%s epilogue=%s" % (backend, case[0], dtype, inputs, kind)
            if backend in SPECTRAL and inputs != "nan":
                assert_spectral_inf_semantics(got, exp, dense_nf, dtype, what)
            else:
                assert_same_nonfinite(got, exp, dtype, what)


@pytest.mark.parametrize("backend", ROLLING_BACKENDS)
@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_rolling_nan_positions_are_the_dense_convs(backend, case):
    """NaN inputs: the NaN positions are every output channel of every pixel whose window holds a NaN (dense
    conv semantics), and nowhere else; ReLU keeps them."""
    _backend_ok(backend)
    dtype = torch.float32
    x, w, b = _case(case, dtype, "nan")
    got = _run(case, backend, x, w, b, relu=True)
    nan_in = torch.isnan(x).any(dim=1, keepdim=True).double()
    dims = case[2]
    conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv3d
    window = conv(torch.nan_to_num(nan_in), torch.ones((1, 1) + (case[7],) * dims, dtype=torch.float64), None,
                  case[9], case[10], case[12]) > 0
    assert window.any()
    assert torch.equal(torch.isnan(got), window.expand_as(got)), backend


def test_relu_keeps_nan_in_the_fused_cpu_kernel():
    """The eval-mode BatchNorm + ReLU fold of a rolling layer runs the fused spectral CPU kernel's ReLU
    epilogue: a NaN stays NaN there, as torch.relu does (it used to become 0)."""
    _backend_ok("cpu")
    from medconv_ext.ops import rolling_conv_spectral_cpu as fused

    if not fused.available():
        pytest.skip("no fused spectral CPU kernel in this build")
    for dims in (2, 3):
        x = torch.randn((1, 8) + (6,) * dims)
        x[(0, 3) + (2,) * dims] = NAN
        w = torch.randn((1, 8) + (3,) * dims)
        y = torch.ops.medconv.rolling_conv_spectral(x, w, None, None, None, True, [1] * dims, [1] * dims,
                                                    [1] * dims, 8)
        assert torch.isnan(y[(0, slice(None)) + (2,) * dims]).all(), dims
        assert torch.isnan(y).sum() == 8 * 3 ** dims


# ------------------------------------------------------------------ backward
def _grads(case, backend, x, w, b, gy_nan, **epi):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    params = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in epi.items()}
    y = _run(case, backend, x, w, b, **params)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(y.dtype)
    if gy_nan:  # NaN incoming gradients at interior outputs of two channels (whichever the ReLU zeroes or passes)
        mid = tuple(sz // 2 for sz in y.shape[2:])
        gy[(0, 0) + mid] = NAN
        gy[(-1, y.shape[1] - 1) + mid] = NAN
    y.backward(gy)
    out = {"y": y, "x": x.grad, "weight": w.grad, "bias": b.grad}
    for k, v in params.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.grad
    return out


def _spread_over_base_channels(case, gw):
    """The spectral weight gradient is computed per channel frequency and transformed back to the base: a NaN
    reaching one base channel of a (base, tap) reaches all of them (the dense gradient of a partial roll
    touches only the channels its rolls read)."""
    dim = 0 if case[1] else 1
    bad = (~torch.isfinite(gw)).any(dim=dim, keepdim=True).expand_as(gw)
    return torch.where(bad, torch.full_like(gw, NAN), gw)


@pytest.mark.parametrize("backend", ROLLING_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("epi_kind", ["none", "scale-shift-relu"])
def test_rolling_backward_nan(backend, case, epi_kind):
    """Gradients with NaN inputs and NaN incoming gradients equal torch's autograd through the bank and
    torch.relu (the gradient passes where the output is NaN, is 0 where the output is <= 0)."""
    _backend_ok(backend)
    if backend == "triton" and case[0] in ("conv2d-s2-d2", "convT3d-s2"):
        pytest.skip("interpreted Triton: the other cases cover its paths")
    for dtype in (torch.float32,):
        x, w, b = _case(case, dtype, "nan")
        epi = _epilogue(epi_kind, case[6] * case[5], dtype)
        for gy_nan in (False, True):
            got = _grads(case, backend, x, w, b, gy_nan, **epi)
            exp = _grads(case, "reference", x.double(), w.double(), b.double(), gy_nan,
                         **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in epi.items()})
            if backend in SPECTRAL:
                exp["weight"] = _spread_over_base_channels(case, exp["weight"])
            for k in exp:
                assert_same_nonfinite(got[k], exp[k], dtype, "%s %s %s epilogue=%s gy_nan=%s: grad %s"
                                      % (backend, case[0], dtype, epi_kind, gy_nan, k))


@pytest.mark.parametrize("backend", ROLLING_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_rolling_backward_inf(backend, case):
    """Inf inputs, no epilogue: the input gradient does not depend on x (finite, equal); the weight
    gradient is non-finite exactly where torch's is (the spectral algorithm may give NaN for a +-Inf)."""
    _backend_ok(backend)
    for dtype in _dtypes(backend):
        x, w, b = _case(case, dtype, "inf")
        got = _grads(case, backend, x, w, b, False)
        exp = _grads(case, "reference", x.double(), w.double(), b.double(), False)
        for k in ("x", "bias"):
            assert_same_nonfinite(got[k], exp[k], dtype, "%s %s grad %s" % (backend, case[0], k))
        if backend in SPECTRAL:
            gw, ew = got["weight"].double(), _spread_over_base_channels(case, exp["weight"])
            assert torch.equal(~torch.isfinite(gw), ~torch.isfinite(ew)), "%s %s grad weight" % (backend, case[0])
            assert (~torch.isfinite(ew)).any()
        else:
            assert_same_nonfinite(got["weight"], exp["weight"], dtype, "%s %s grad weight" % (backend, case[0]))


def test_spectral_fft_path_nan_positions():
    """C_in above the DFT-GEMM limit: the composition uses torch.fft.rfft; NaN positions still equal the dense
    conv's, and Inf never turns into a finite value."""
    from medconv_ext.ops import rolling_conv_spectral as RS

    case = ("conv2d-C130", False, 2, 1, RS.GEMM_MAX_C + 2, 1, 2, 3, (4, 5), [1, 1], [1, 1], [0, 0], [1, 1])
    for inputs in ("nan", "mixed"):
        x, w, b = _case(case, torch.float32, inputs)
        for backend in SPECTRAL:
            got = _run(case, backend, x, w, b, relu=True)
            exp = _expected(case, x, w, b, relu=True)
            if inputs == "nan":
                assert_same_nonfinite(got, exp, torch.float32, backend)
            else:
                assert_spectral_inf_semantics(got, exp, _dense_nonfinite(case, x, w), torch.float32, backend)


# ------------------------------------------------------------------ Triton spectral kernel (interpreter)
def test_triton_spectral_kernel_epilogue_nan():
    """The fused Triton spectral kernel (CUDA's "spectral" backend; here under TRITON_INTERPRET=1): ReLU
    keeps NaN and the NaN positions are the dense conv's."""
    _backend_ok("triton", cpu_tensors=False)
    from medconv_ext.ops import rolling_conv_spectral_triton as ST

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for case, kind in ((CASES[0], "scale-shift-relu"), (CASES[3], "scale-shift-relu"), (CASES[0], "nonfinite-params")):
        x, w, b = _case(case, torch.float32, "nan")
        if kind == "nonfinite-params":
            b[0] = INF
        x, w, b = x.to(device), w.to(device), b.to(device)
        epi = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
               for k, v in _epilogue(kind, case[6] * case[5], torch.float32).items()}
        _, transposed, _, _, _, _, n_rolls, _, _, stride, padding, output_padding, dilation = case
        if transposed:
            got = ST.conv_transpose(x, w, b, stride, padding, output_padding, dilation, n_rolls, **epi)
        else:
            got = ST.conv(x, w, b, stride, padding, dilation, n_rolls, **epi)
        exp = _expected(case, x.cpu(), w.cpu(), b.cpu(), **{k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                                             for k, v in epi.items()})
        assert_same_nonfinite(got, exp, torch.float32, "triton spectral %s %s" % (case[0], kind))


# ------------------------------------------------------------------ involution
INV_BACKENDS = ["cpu", "triton"]
# (id, dims, N, C, G, K, spatial, stride, padding, dilation)
INV_CASES = [
    ("inv2d", 2, 2, 4, 2, 3, (7, 6), 1, 1, 1),
    ("inv2d-s2-d2", 2, 1, 4, 1, 3, (8, 9), 2, 2, 2),
    ("inv3d", 3, 1, 2, 1, 3, (4, 5, 4), 1, 1, 1),
]


def _inv_case(case, dtype, where, seed=0):
    _, dims, n, c, groups, k, spatial, s, p, d = case
    g = torch.Generator().manual_seed(seed)
    out = [(m + 2 * p - d * (k - 1) - 1) // s + 1 for m in spatial]
    x = torch.randn((n, c) + tuple(spatial), generator=g, dtype=torch.float64)
    wt = torch.randn((n, groups) + (k,) * dims + tuple(out), generator=g, dtype=torch.float64)
    wt.view(-1)[::5] = 0.0
    mid = tuple(m // 2 for m in spatial)
    omid = tuple(o // 2 for o in out)  # its window lies inside the image in every case
    if where in ("x", "both"):
        x[(0, 1) + mid] = NAN
        x[(n - 1, c - 1) + tuple(m - 1 for m in mid)] = INF
        x[(0, 0) + tuple(m + 1 for m in mid)] = -INF
    if where in ("weight", "both"):
        wt[(0, 0) + (0,) * dims + omid] = NAN
        wt[(n - 1, groups - 1) + (1,) * dims + omid] = INF
        wt[(0, groups - 1) + (0,) * (dims - 1) + (2,) + tuple(o - 1 for o in omid)] = -INF
    if where == "border-weight":
        # the tap (0, ..) of the first output voxel reads zero padding: NaN * 0 is NaN in torch's unfold
        wt[(0, 0) + (0,) * dims + (0,) * dims] = NAN
    return x.to(dtype), wt.to(dtype)


def _inv(case, backend, x, wt):
    _, dims, _, _, _, k, _, s, p, d = case
    f = INV.involution2d if dims == 2 else INV.involution3d
    return f(x, wt, k, s, p, d, backend=backend)


def _inv_check(backend, case, where, gy_at):
    _backend_ok(backend)
    for dtype in _dtypes(backend):
        x, wt = _inv_case(case, dtype, where)
        res = {}
        for name, (xx, ww) in (("got", (x, wt)), ("exp", (x.double(), wt.double()))):
            xx = xx.clone().requires_grad_(True)
            ww = ww.clone().requires_grad_(True)
            y = _inv(case, backend if name == "got" else "reference", xx, ww)
            gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(y.dtype)
            gy[(0, 1) + (tuple(o // 2 for o in y.shape[2:]) if gy_at == "inside" else (0,) * (y.dim() - 2))] = NAN
            y.backward(gy)
            res[name] = {"y": y, "x": xx.grad, "weight": ww.grad}
        for k in ("y", "x", "weight"):
            assert_same_nonfinite(res["got"][k], res["exp"][k], dtype,
                                  "involution %s %s %s %s: %s" % (backend, case[0], dtype, where, k))


@pytest.mark.parametrize("backend", INV_BACKENDS)
@pytest.mark.parametrize("case", INV_CASES, ids=[c[0] for c in INV_CASES])
@pytest.mark.parametrize("where", ["x", "weight", "both"])
def test_involution_forward_backward(backend, case, where):
    """Non-finite inputs, kernel weights and incoming gradients inside the image: torch's semantics."""
    _inv_check(backend, case, where, "inside")


# ------------------------------------------------------------------ the image border
# torch's dense convolution (and the unfold reference of involution) multiplies its implicit zero padding:
# a non-finite weight makes every output whose window reads padding NaN (Inf * 0, NaN * 0), and a
# non-finite incoming gradient at such an output makes the weight gradient of the tap that reads
# padding NaN. Every kernel does the same (a zero-padded copy, masked loads of zeros, border terms
# w * 0), except the spectral composition's weight gradient of a (non-transposed) conv: its depthwise
# weight gradient skips the padding, so there the tap keeps the finite sum (strict xfail below; docs/
# rolling_conv_spectral.md, "Non-finite values"). A non-finite *weight* runs torch's dense conv in the
# spectral backends on CPU tensors.
_BORDER = "the spectral depthwise weight gradient skips the implicit zero padding that torch's conv multiplies (NaN * 0)"


@pytest.mark.parametrize("backend", ROLLING_BACKENDS)
def test_border_nonfinite_weight_forward(backend):
    _backend_ok(backend)
    case = ("conv2d-pad", False, 2, 1, 4, 1, 4, 3, (5, 6), [1, 1], [1, 1], [0, 0], [1, 1])
    x, w, b = _case(case, torch.float32, "nan")
    x = torch.nan_to_num(x)
    w[0, 1, 0, 0] = NAN
    assert_same_nonfinite(_run(case, backend, x, w, b), _expected(case, x, w, b), torch.float32, backend)


BORDER_GW_CASES = [("conv2d-pad", False, 2, 1, 4, 1, 4, 3, (5, 6), [1, 1], [1, 1], [0, 0], [1, 1]),
                   ("conv2d-pad-partial", False, 2, 1, 5, 1, 2, 3, (5, 6), [1, 1], [1, 1], [0, 0], [1, 1]),
                   ("convT2d-pad-partial", True, 2, 1, 5, 1, 2, 3, (5, 6), [1, 1], [1, 1], [0, 0], [1, 1]),
                   ("convT2d-s2-pad", True, 2, 1, 4, 1, 3, 3, (3, 4), [2, 2], [1, 1], [1, 0], [1, 1])]


@pytest.mark.parametrize("backend", ROLLING_BACKENDS)
@pytest.mark.parametrize("case", BORDER_GW_CASES, ids=[c[0] for c in BORDER_GW_CASES])
def test_border_nonfinite_grad_weight(backend, case):
    """A NaN incoming gradient at a corner output: torch's weight gradient multiplies it by the zero padding
    of the taps that read padding (conv), or by every input voxel whose taps land on it (transposed: also
    the positions cropped by `padding`); and NaN nowhere else (a partial roll keeps the other channels)."""
    _backend_ok(backend)
    x, w, b = _case(case, torch.float32, "nan")
    x = torch.nan_to_num(x)
    res = []
    for bk, xx, ww, bb in ((backend, x, w, b), ("reference", x.double(), w.double(), b.double())):
        ww = ww.clone().requires_grad_(True)
        y = _run(case, bk, xx, ww, bb)
        gy = torch.ones_like(y)
        gy[0, 1, 0, 0] = NAN  # the output at the corner: its taps (0, .) and (., 0) read padding
        y.backward(gy)
        res.append(ww.grad)
    assert_same_nonfinite(res[0], res[1], torch.float32, backend)


_GAPS = ("the Triton kernel of the transposed correlation (transposed conv forward, conv input gradient) gathers over "
         "the zero-padded, zero-interleaved grid with a weight tile shared by all positions, so a non-finite weight "
         "meets zeros (Inf * 0) at the outputs no input voxel reaches with that tap, which torch keeps finite")
ONE_BASE_CASES = [("conv2d-valid", False, 2, 1, 5, 2, 3, 3, (6, 7), [1, 1], [0, 0], [0, 0], [1, 1]),
                  ("conv2d-s2-pad", False, 2, 1, 5, 2, 3, 3, (7, 8), [2, 2], [1, 1], [0, 0], [1, 1]),
                  ("convT2d-s2", True, 2, 1, 5, 2, 3, 3, (4, 5), [2, 2], [0, 0], [0, 0], [1, 1]),
                  ("convT2d-s2-pad", True, 2, 1, 5, 2, 3, 3, (4, 5), [2, 2], [1, 1], [1, 1], [1, 1])]


@pytest.mark.parametrize("backend", ROLLING_BACKENDS)
@pytest.mark.parametrize("case", ONE_BASE_CASES, ids=[c[0] for c in ONE_BASE_CASES])
def test_nonfinite_weight_of_one_base(backend, case, request):
    """A NaN or Inf in the base weight: forward and input gradient as torch's dense conv of the bank: the
    outputs of that base (all its rolls) are non-finite where the tap is used (at every pixel, padding
    included: Inf * 0), the other bases' outputs stay finite, and with a stride > 1 the input gradient is NaN
    only at the voxels the tap reaches. (The fused spectral CPU kernel's inverse transform, one GEMM over all
    bases, would carry it into every base, and the spectral composition's depthwise convs skip the padding:
    on CPU tensors such a weight runs torch's dense conv of the bank.)"""
    _backend_ok(backend)
    if backend == "triton":
        request.applymarker(pytest.mark.xfail(strict=True, reason=_GAPS))
    transposed = case[1]
    for dtype in _dtypes(backend):
        x, w, b = _case(case, dtype, "nan")
        x = torch.nan_to_num(x)
        for v in (NAN, INF):
            w2 = w.clone()
            w2[(2, 1) if transposed else (1, 2)][0, 1] = v
            res = []
            for bk, xx, ww, bb in ((backend, x, w2, b), ("reference", x.double(), w2.double(), b.double())):
                xx = xx.clone().requires_grad_(True)
                y = _run(case, bk, xx, ww, bb, relu=True)
                y.backward(torch.ones_like(y))
                res.append((y, xx.grad))
            assert_same_nonfinite(res[0][0], res[1][0], dtype, "%s %s weight %r: y" % (backend, case[0], v))
            assert_same_nonfinite(res[0][1], res[1][1], dtype, "%s %s weight %r: grad x" % (backend, case[0], v))


@pytest.mark.parametrize("backend", INV_BACKENDS)
@pytest.mark.parametrize("case", INV_CASES, ids=[c[0] for c in INV_CASES])
@pytest.mark.parametrize("what", ["weight", "grad"])
def test_involution_border(backend, case, what):
    """A non-finite kernel weight at a tap that reads the zero padding (forward), a NaN incoming gradient at a
    border output (weight gradient of the taps that read padding): NaN as in torch's unfold."""
    _inv_check(backend, case, "border-weight" if what == "weight" else "x", "border" if what == "grad" else "inside")


@pytest.mark.parametrize("backend", ROLLING_BACKENDS)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=[CASE_IDS[0], CASE_IDS[1], CASE_IDS[3]])
def test_border_nan_input(backend, case):
    """NaN input voxels on the image border (corners and edges): forward and gradients as torch's."""
    _backend_ok(backend)
    x, w, b = _case(case, torch.float32, "nan")
    x = torch.nan_to_num(x)
    dims = case[2]
    x[(0, 0) + (0,) * dims] = NAN
    x[(-1, case[4] - 1) + tuple(s - 1 for s in x.shape[2:])] = NAN
    x[(0, 1 % case[4]) + (0,) * (dims - 1) + (x.shape[-1] - 1,)] = NAN
    got = _grads(case, backend, x, w, b, False, relu=True)
    exp = _grads(case, "reference", x.double(), w.double(), b.double(), False, relu=True)
    if backend in SPECTRAL:
        exp["weight"] = _spread_over_base_channels(case, exp["weight"])
    for k in exp:
        assert_same_nonfinite(got[k], exp[k], torch.float32, "%s %s border NaN: %s" % (backend, case[0], k))
