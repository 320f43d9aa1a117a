"""backend="auto" on small CPU layers, and the per-call memo of the argument checks and the backend choice.

Correctness only (never timing): for the small-layer grid of the CPU benchmark (bench/bench_rolling_conv_cpu.py
--set small) auto picks a backend that is registered and available, and its result equals the float64
reference in every layout and dtype; a call repeated with other arguments, another MEDCONV_BACKEND, a forced
backend, or a weight turned non-finite in place is checked and dispatched as if it were the first.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import medconv_ext
from medconv_ext import backends
from medconv_ext.ops import rolling_conv as RC
from medconv_ext.reference import rolling_conv as ref

CONV = {2: medconv_ext.rolling_conv2d, 3: medconv_ext.rolling_conv3d}
CONV_T = {2: medconv_ext.rolling_conv_transpose2d, 3: medconv_ext.rolling_conv_transpose3d}
CL = {2: torch.channels_last, 3: torch.channels_last_3d}
# max |err| / max |ref|; bfloat16: one rounding of the output (or of oneDNN's bf16 conv) at 2^-9 relative
TOL = {torch.float32: 3e-5, torch.bfloat16: 8e-3}
# the benchmark's small-layer grid: 2D 3x3 C=16..256 at 16^2..128^2, 3D 3x3x3 C=16..64 at 12^3, 16^3
GRID = ([(2, c, s) for c in (16, 32, 64, 128, 256) for s in (16, 32, 64, 128)]
        + [(3, c, s) for c in (16, 32, 64) for s in (12, 16)])
# the ones computed here (the float64 reference of the largest would take seconds each): both backends the rule
# picks from, both dtypes, both layouts
RUN = [(2, 16, 16), (2, 16, 64), (2, 16, 128), (2, 32, 32), (2, 32, 128), (2, 64, 16), (2, 128, 16), (2, 256, 16), (3, 16, 12),
       (3, 32, 12)]


def _rel(y, r):
    assert y.shape == r.shape, (tuple(y.shape), tuple(r.shape))
    assert torch.isfinite(y).all()
    return ((y.double() - r.double()).abs().max() / r.double().abs().max()).item()


def _ops_run(fn):
    """Names of the operators fn runs (profiler), to see which backend ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _ran_fused(fn):
    return "medconv::rolling_conv_spectral" in _ops_run(fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("training", [False, True], ids=["infer", "train"])
def test_auto_picks_an_available_backend_on_the_small_grid(dtype, training):
    avail = medconv_ext.available_backends()
    for dims, c, s in GRID:
        for fmt in (torch.contiguous_format, CL[dims]):
            x = torch.empty(1, c, *[s] * dims, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(training)
            w = torch.empty(1, c, *[3] * dims, dtype=dtype)
            with torch.set_grad_enabled(training):
                cands = RC._auto_candidates(x, w, False, c)
                name, impl = RC._choose(RC.OP, x, w, "auto", False, c)
            assert cands and cands[0] in backends.BACKENDS, (dims, c, s, cands)
            assert name == cands[0] and avail[name][0], (dims, c, s, name)
            assert impl is backends._IMPLS[RC.OP][name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("dims,c,s", RUN, ids=["%dd-C%d-S%d" % r for r in RUN])
def test_auto_matches_float64_reference_on_small_layers(dims, c, s, dtype):
    g = torch.Generator().manual_seed(c * 131 + s)
    x0 = torch.randn(1, c, *[s] * dims, generator=g)
    w0 = torch.randn(1, c, *[3] * dims, generator=g) / (3 * c ** 0.5)
    b0 = torch.randn(c, generator=g)
    x0, w0, b0 = x0.to(dtype), w0.to(dtype), b0.to(dtype)
    want = ref.rolling_conv(x0.double(), w0.double(), b0.double(), [1] * dims, [1] * dims, [1] * dims, c)
    for fmt in (torch.contiguous_format, CL[dims]):
        x = x0.contiguous(memory_format=fmt)
        with torch.no_grad():
            for _ in range(2):  # the second call is served by the memo
                y = CONV[dims](x, w0, b0, padding=1)
                assert y.dtype == dtype
                assert _rel(y, want) < TOL[dtype], (fmt, dtype)


def test_bank_gather_equals_the_reference_expansion():
    for shape, transposed, n_rolls in (((2, 5, 3, 2), False, 4), ((5, 2, 3, 2), True, 3), ((1, 7, 3, 3, 3), False, 7),
                                       ((3, 4, 1, 1), False, 1)):
        w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        got = RC.expand_bank(w, n_rolls, transposed)
        want = (ref.expand_rolling_weight_transpose if transposed else ref.expand_rolling_weight)(w, n_rolls)
        assert got.shape == want.shape and torch.equal(got, want)
        g = torch.randn_like(got)
        gw, = torch.autograd.grad(got, w, g)
        gw_want, = torch.autograd.grad(want, w, g)
        torch.testing.assert_close(gw, gw_want, rtol=1e-12, atol=1e-12)
    with torch.inference_mode():  # an index cached under inference_mode serves a later training call
        RC.expand_bank(torch.randn(1, 6, 3, 3), 6)
    w = torch.randn(1, 6, 3, 3, requires_grad=True)
    RC.expand_bank(w, 6).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 6.0))


def test_memo_keeps_the_argument_checks():
    x, w = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 3, 3)
    y = medconv_ext.rolling_conv2d(x, w, None, 1, 1)
    medconv_ext.rolling_conv2d(x, w, None, 1, 1)  # memoised now
    # values equal to the memoised ones (True == 1, 1.0 == 1) are still refused
    with pytest.raises(TypeError, match="stride"):
        medconv_ext.rolling_conv2d(x, w, None, True, 1)
    with pytest.raises((TypeError, ValueError), match="padding"):
        medconv_ext.rolling_conv2d(x, w, None, 1, 1.0)
    with pytest.raises((TypeError, ValueError), match="padding"):
        medconv_ext.rolling_conv2d(x, w, None, 1, (1, 1.0))
    with pytest.raises(TypeError, match="relu"):
        medconv_ext.rolling_conv2d(x, w, None, 1, 1, relu=1)
    with pytest.raises(ValueError, match="n_rolls"):
        medconv_ext.rolling_conv2d(x, w, None, 1, 1, n_rolls=17)
    with pytest.raises(TypeError, match="dtype"):
        medconv_ext.rolling_conv2d(x, w.double(), None, 1, 1)
    with pytest.raises(ValueError, match="bias"):
        medconv_ext.rolling_conv2d(x, w, torch.zeros(3), 1, 1)
    with pytest.raises(ValueError, match="scale"):
        medconv_ext.rolling_conv2d(x, w, None, 1, 1, scale=torch.ones(3))
    # the same call with the argument kinds a module passes (tuples) gives the same result
    torch.testing.assert_close(medconv_ext.rolling_conv2d(x, w, None, (1, 1), [1, 1], (1, 1)), y)
    xt, wt = torch.randn(1, 16, 5, 5), torch.randn(16, 1, 3, 3)
    medconv_ext.rolling_conv_transpose2d(xt, wt, None, 2, 1, 1)
    medconv_ext.rolling_conv_transpose2d(xt, wt, None, 2, 1, 1)
    with pytest.raises(ValueError, match="output_padding"):
        medconv_ext.rolling_conv_transpose2d(xt, wt, None, 2, 1, 2)


def test_memo_follows_env_forced_backend_and_grad_mode(monkeypatch):
    x, w = torch.randn(1, 32, 16, 16), torch.randn(1, 32, 3, 3)
    assert RC._auto_candidates(x, w, False, 32) == ["spectral"]
    call = lambda: medconv_ext.rolling_conv2d(x, w, None, 1, 1)  # noqa: E731
    call()
    assert _ran_fused(call)
    monkeypatch.setenv("MEDCONV_BACKEND", "reference")
    assert not _ran_fused(call) and "aten::index_select" in _ops_run(call)
    monkeypatch.setenv("MEDCONV_BACKEND", "auto")
    assert _ran_fused(call)
    monkeypatch.delenv("MEDCONV_BACKEND")
    with backends.forced_backend("reference"):
        assert not _ran_fused(call)
    assert _ran_fused(call)
    # an explicit backend is memoised under its own name
    assert "aten::index_select" in _ops_run(lambda: medconv_ext.rolling_conv2d(x, w, None, 1, 1, backend="reference"))
    assert _ran_fused(lambda: medconv_ext.rolling_conv2d(x, w, None, 1, 1, backend="spectral"))
    with backends.forced_backend("reference"):  # overrides an explicit backend too
        assert not _ran_fused(lambda: medconv_ext.rolling_conv2d(x, w, None, 1, 1, backend="spectral"))
    for _ in range(2):  # a backend that cannot run the input raises every time
        with pytest.raises(RuntimeError, match="cannot run"):
            medconv_ext.rolling_conv2d(x.half(), w.half(), None, 1, 1, backend="cpu")
    # training: a layer the rule runs differently with a gradient (2D C_in=64 -> 16 channels: reference when
    # training)
    x16, w16 = torch.randn(1, 64, 32, 32), torch.randn(1, 64, 3, 3, requires_grad=True)
    part = lambda: medconv_ext.rolling_conv2d(x16, w16, None, 1, 1, n_rolls=16)  # noqa: E731
    with torch.no_grad():
        assert _ran_fused(part)
    y = part()
    assert y.requires_grad and not _ran_fused(part)
    y.sum().backward()
    assert w16.grad is not None
    with torch.no_grad():
        assert _ran_fused(part)


def test_memo_does_not_hide_a_weight_turned_nonfinite():
    x, w = torch.randn(1, 32, 12, 12), torch.randn(2, 32, 3, 3) / 10
    for _ in range(2):
        y = medconv_ext.rolling_conv2d(x, w, None, 1, 1)
    assert torch.isfinite(y).all()
    with torch.no_grad():
        w.data[1, 3, 0, 0] = float("nan")  # through .data: no version-counter bump
    y = medconv_ext.rolling_conv2d(x, w, None, 1, 1)
    want = torch.nn.functional.conv2d(x, ref.expand_rolling_weight(w, 32), None, 1, 1)
    assert torch.equal(torch.isnan(y), torch.isnan(want))


def test_module_calls_run_the_memoised_path():
    m = medconv_ext.nn.RollingConv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        y1, y2 = m(x), m(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    want = torch.nn.functional.conv2d(x.double(), m.expanded_weight().double(), m.bias.double(), 1, 1)
    assert _rel(y2, want) < TOL[torch.float32]
    m2 = medconv_ext.nn.RollingConv2d(16, 16, 3, padding="same", padding_mode="reflect")
    torch.testing.assert_close(m2(x), torch.nn.functional.conv2d(torch.nn.functional.pad(x, [1, 1, 1, 1], mode="reflect"),
                                                                 m2.expanded_weight(), m2.bias), rtol=1e-4, atol=1e-5)
