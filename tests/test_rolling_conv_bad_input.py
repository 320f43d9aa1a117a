"""Bad input gives a clear error (what was expected, what was given), never a crash or a
silently wrong result: through the public API, and through direct torch.ops.medconv calls."""
import pytest
import torch

import medconv_ext as mc
from medconv_ext import _ext
from medconv_ext.reference import rolling_conv as ref

needs_ext = pytest.mark.skipif(not _ext.has_compiled_ops(), reason="compiled extension not built")


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


CONV_CASES = [
    # (id, call, exception, match)
    ("x-rank", lambda: mc.rolling_conv2d(_x(4, 6, 6), _x(1, 4, 3, 3)), ValueError, r"x must have 4 dims .*got shape \(4, 6, 6\)"),
    ("w-rank", lambda: mc.rolling_conv3d(_x(1, 4, 6, 6, 6), _x(1, 4, 3, 3)), ValueError, r"weight must have 5 dims"),
    ("cin-mismatch", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), _x(1, 5, 3, 3)), ValueError, r"x has C_in=4 .*C_in=5"),
    ("n_rolls-0", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), _x(1, 4, 3, 3), n_rolls=0), ValueError,
     r"1 <= n_rolls <= C_in=4, got 0"),
    ("n_rolls-big", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), _x(1, 4, 3, 3), n_rolls=5), ValueError,
     r"1 <= n_rolls <= C_in=4, got 5"),
    ("n_rolls-float", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), _x(1, 4, 3, 3), n_rolls=2.0), TypeError,
     r"n_rolls must be an int"),
    ("bias-size", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), _x(2, 4, 3, 3), _x(4), n_rolls=3), ValueError,
     r"bias must have n_rolls \* n_base = 3 \* 2 = 6 values.*got 4"),
    ("bias-rank", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), _x(1, 4, 3, 3), _x(4, 1)), ValueError,
     r"bias must have 1 dims"),
    ("dtype-mismatch", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), _x(1, 4, 3, 3, dtype=torch.float64)), TypeError,
     r"weight has dtype torch.float64 but x has dtype torch.float32"),
    ("bias-dtype", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), _x(1, 4, 3, 3), _x(4, dtype=torch.float64)), TypeError,
     r"bias has dtype torch.float64"),
    ("int-input", lambda: mc.rolling_conv2d(torch.ones(1, 4, 6, 6, dtype=torch.int64),
                                             torch.ones(1, 4, 3, 3, dtype=torch.int64)), TypeError,
     r"x must be a floating-point tensor"),
    ("device-mismatch", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), torch.empty(1, 4, 3, 3, device="meta")),
     ValueError, r"weight is on meta but x is on cpu"),
    ("padding-negative", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), _x(1, 4, 3, 3), padding=(1, -1)), ValueError,
     r"padding must be >= 0, got \[1, -1\]"),
    ("stride-0", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), _x(1, 4, 3, 3), stride=0), ValueError,
     r"stride must be >= 1, got \[0, 0\]"),
    ("dilation-0", lambda: mc.rolling_conv3d(_x(1, 4, 6, 6, 6), _x(1, 4, 3, 3, 3), dilation=(1, 0, 1)), ValueError,
     r"dilation must be >= 1"),
    ("stride-len", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), _x(1, 4, 3, 3), stride=(1, 1, 1)), ValueError,
     r"stride must be an int or a sequence of 2 ints"),
    ("kernel-too-big", lambda: mc.rolling_conv2d(_x(1, 4, 6, 4), _x(1, 4, 3, 7), padding=1), ValueError,
     r"kernel \(size 7, dilation 1: extent 7\) is larger than the padded input along spatial dim 1"),
    ("kernel-too-big-dilated", lambda: mc.rolling_conv2d(_x(1, 4, 5, 5), _x(1, 4, 3, 3), dilation=3), ValueError,
     r"extent 7\) is larger than the padded input"),
    ("t-cin-mismatch", lambda: mc.rolling_conv_transpose2d(_x(1, 4, 6, 6), _x(1, 4, 2, 2)), ValueError,
     r"x has C_in=4 .*C_in=1"),
    ("t-output-padding", lambda: mc.rolling_conv_transpose2d(_x(1, 4, 6, 6), _x(4, 1, 2, 2), stride=2,
                                                             output_padding=2), ValueError,
     r"output_padding must be smaller than stride or dilation"),
    ("t-empty-output", lambda: mc.rolling_conv_transpose2d(_x(1, 4, 1, 1), _x(4, 1, 1, 1), padding=1), ValueError,
     r"output would be empty"),
    # an empty spatial dim: refused on every backend (torch's conv refuses it; the kernels returned the bias)
    *[("empty-spatial-%s" % be, lambda be=be: mc.rolling_conv2d(_x(1, 4, 0, 6), _x(1, 4, 1, 1), padding=1, backend=be),
       ValueError, r"x must have non-empty spatial dims, got shape \(1, 4, 0, 6\)")
      for be in ("auto", "reference", "cpu", "spectral", "spectral_unfused")],
    ("t-empty-spatial", lambda: mc.rolling_conv_transpose3d(_x(1, 4, 2, 0, 3), _x(4, 2, 3, 3, 3), backend="spectral"),
     ValueError, r"x must have non-empty spatial dims"),
    ("cat-empty-spatial", lambda: mc.rolling_conv_cat(_x(1, 2, 5, 0), _x(1, 2, 5, 0), _x(1, 4, 3, 3), padding=1),
     ValueError, r"non-empty spatial dims"),
    ("unknown-backend", lambda: mc.rolling_conv2d(_x(1, 4, 6, 6), _x(1, 4, 3, 3), backend="fast"), ValueError,
     r"unknown backend 'fast'"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CONV_CASES], ids=[c[0] for c in CONV_CASES])
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@needs_ext
def test_explicit_backend_unsupported_dtype_raises():
    x, w = _x(1, 4, 6, 6).half(), _x(1, 4, 3, 3).half()
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run this input: dtype torch.float16 is not supported"):
        mc.rolling_conv2d(x, w, backend="cpu")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run this input"):
        mc.rolling_conv2d(_x(1, 4, 6, 6), _x(1, 4, 3, 3), backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_falls_back_for_unsupported_dtype(dtype):
    x, w = _x(1, 4, 6, 6), _x(1, 4, 3, 3)
    y = mc.rolling_conv2d(x.to(dtype), w.to(dtype), padding=1)  # "cpu" cannot; auto picks another backend
    assert y.dtype == dtype and y.shape == (1, 4, 6, 6)
    expect = ref.rolling_conv(x.to(dtype).double(), w.to(dtype).double(), None, 1, 1, 1, 4)
    torch.testing.assert_close(y.double(), expect, rtol=2e-2, atol=5e-2 * expect.abs().max().item())


# ---- direct calls of the compiled ops with inconsistent sizes: errors, not out-of-bounds reads ----
def _direct_cases():
    ops = torch.ops.medconv
    x, w, wt = _x(2, 4, 6, 6), _x(2, 4, 3, 3), _x(4, 2, 3, 3)
    gy = _x(2, 8, 6, 6)  # rolling_conv(x, w, pad 1, n_rolls 4) output
    gyt = _x(2, 8, 8, 8)  # rolling_conv_transpose(x, wt, pad 0, n_rolls 4) output
    s, p, d = [1, 1], [1, 1], [1, 1]
    return [
        ("fwd-n_rolls", lambda: ops.rolling_conv(x, w, None, s, p, d, 5), r"1 <= n_rolls <= C_in=4, got 5"),
        ("fwd-cin", lambda: ops.rolling_conv(x, _x(2, 3, 3, 3), None, s, p, d, 2), r"input has C_in=4 .* C_in=3"),
        ("fwd-bias", lambda: ops.rolling_conv(x, w, _x(3), s, p, d, 4), r"bias must have shape \[n_rolls \* n_base\] = \[8\]"),
        ("fwd-rank", lambda: ops.rolling_conv(_x(2, 4, 6, 6, 6, 6), _x(2, 4, 3, 3, 3, 3), None, s, p, d, 4),
         r"expected 3, 4 or 5 dims"),
        ("fwd-stride-len", lambda: ops.rolling_conv(x, w, None, [1, 1, 1], p, d, 4), r"stride must have 1 or 2 values"),
        ("fwd-stride-0", lambda: ops.rolling_conv(x, w, None, [0, 1], p, d, 4), r"stride must be >= 1"),
        ("fwd-padding", lambda: ops.rolling_conv(x, w, None, s, [-1, 0], d, 4), r"padding must be >= 0"),
        ("fwd-kernel", lambda: ops.rolling_conv(_x(1, 4, 2, 2), w, None, s, [0, 0], d, 4), r"larger than the padded input"),
        ("fwd-half", lambda: ops.rolling_conv(x.half(), w.half(), None, s, p, d, 4), r"must be float32 or float64"),
        ("fwd-dtype", lambda: ops.rolling_conv(x, w.double(), None, s, p, d, 4), r"x has dtype Float but weight has dtype Double"),
        ("gin-shape", lambda: ops.rolling_conv_grad_input(_x(2, 8, 5, 6), w, [2, 4, 6, 6], s, p, d, 4),
         r"grad_out has shape \[2, 8, 5, 6\] but the sizes given imply \[2, 8, 6, 6\]"),
        ("gin-input-size", lambda: ops.rolling_conv_grad_input(gy, w, [2, 4, 6], s, p, d, 4), r"input_size .* must have 4 values"),
        ("gin-cin", lambda: ops.rolling_conv_grad_input(gy, w, [2, 5, 6, 6], s, p, d, 4), r"input has C_in=5"),
        ("gw-shape", lambda: ops.rolling_conv_grad_weight(gy, x, [2, 4, 3, 3], s, p, d, 3),
         r"sizes given imply \[2, 6, 6, 6\]"),
        ("gw-weight-size", lambda: ops.rolling_conv_grad_weight(gy, x, [2, 3, 3, 3], s, p, d, 4), r"C_in=4 .* C_in=3"),
        ("t-fwd-opad", lambda: ops.rolling_conv_transpose(x, wt, None, [2, 2], [0, 0], [2, 0], d, 4),
         r"output_padding must satisfy"),
        ("t-gin-shape", lambda: ops.rolling_conv_transpose_grad_input(_x(2, 8, 8, 7), wt, [2, 4, 6, 6], s, [0, 0], d, 4),
         r"output size 7 .* does not match input size 6"),
        ("t-gin-channels", lambda: ops.rolling_conv_transpose_grad_input(gyt, wt, [2, 4, 6, 6], s, [0, 0], d, 3),
         r"grad_out has 8 channels, expected n_rolls \* n_base = 6"),
        ("t-gw-shape", lambda: ops.rolling_conv_transpose_grad_weight(_x(2, 8, 8, 9), x, [4, 2, 3, 3], s, [0, 0], d, 4),
         r"does not match input size 6"),
        ("t-gw-batch", lambda: ops.rolling_conv_transpose_grad_weight(_x(3, 8, 8, 8), x, [4, 2, 3, 3], s, [0, 0], d, 4),
         r"expected batch 2"),
    ]


@needs_ext
@pytest.mark.parametrize("idx", range(20))
def test_direct_op_bad_sizes_raise(idx):
    cases = _direct_cases()
    assert len(cases) == 20
    name, call, match = cases[idx]
    with pytest.raises(RuntimeError, match=match):
        call()
