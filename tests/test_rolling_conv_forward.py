"""Every rolling-conv backend against the float64 reference, on awkward shapes and layouts."""
import pytest
import torch

import medconv_ext as mc
from medconv_ext.reference import rolling_conv as ref
from _rolling_util import OP, OP_T, assert_close_to_ref, backend_params, make_input, skip_unsupported

# (id, dims, N, C_in, n_base, n_rolls, spatial, kernel, stride, padding, dilation, output_padding)
CASES = [
    ("2d-full-roll", 2, 2, 5, 1, 5, (7, 9), (3, 3), 1, 1, 1, 0),
    ("2d-stride2-odd", 2, 2, 6, 2, 3, (9, 7), (3, 2), (2, 1), (1, 0), (1, 2), (1, 0)),
    ("2d-dil2-nb3", 2, 1, 4, 3, 4, (8, 9), (3, 3), 1, 2, 2, 1),
    ("2d-cin1", 2, 3, 1, 2, 1, (6, 5), (3, 3), (2, 2), (1, 1), 1, (1, 1)),
    ("2d-half-roll", 2, 2, 8, 1, 4, (5, 6), (3, 3), 1, 1, 1, 0),
    ("2d-nrolls1", 2, 2, 7, 2, 1, (6, 6), (2, 3), (1, 2), (0, 1), 1, (0, 1)),
    ("2d-1x1", 2, 2, 9, 1, 9, (4, 5), (1, 1), 1, 0, 1, 0),
    ("2d-wide", 2, 1, 3, 1, 3, (3, 37), (3, 5), (1, 3), (1, 2), (1, 1), (0, 2)),
    ("2d-empty-batch", 2, 0, 4, 2, 4, (6, 6), (3, 3), 1, 1, 1, 0),
    ("3d-full-roll", 3, 2, 4, 1, 4, (5, 6, 7), (3, 3, 3), 1, 1, 1, 0),
    ("3d-stride2-nb2", 3, 1, 5, 2, 5, (7, 5, 6), (3, 2, 3), (2, 1, 2), (1, 0, 1), (1, 1, 2), (1, 0, 1)),
    ("3d-half-roll-nb3", 3, 2, 6, 3, 3, (4, 5, 5), (2, 2, 2), 2, 0, 1, 1),
    ("3d-empty-batch", 3, 0, 3, 1, 3, (4, 4, 4), (3, 3, 3), 1, 1, 1, 0),
]
IDS = [c[0] for c in CASES]
LAYOUTS = ["contiguous", "channels_last", "noncontig"]


def _api(dims, transposed):
    if transposed:
        return {2: mc.rolling_conv_transpose2d, 3: mc.rolling_conv_transpose3d}[dims]
    return {2: mc.rolling_conv2d, 3: mc.rolling_conv3d}[dims]


def _run(case, device, backend, dtype, transposed, layout, with_bias):
    _, dims, N, C, nb, nr, S, k, s, p, d, op_ = case
    x = make_input((N, C) + S, dtype, device, layout)
    wshape = (C, nb) + k if transposed else (nb, C) + k
    w = make_input(wshape, dtype, device, "noncontig" if layout == "noncontig" else "contiguous")
    b = torch.randn(nr * nb, dtype=dtype, device=device) if with_bias else None
    if transposed:
        out = _api(dims, True)(x, w, b, stride=s, padding=p, output_padding=op_, n_rolls=nr, backend=backend,
                               dilation=d)
        expect = ref.rolling_conv_transpose(x.double(), w.double(), None if b is None else b.double(),
                                            s, p, op_, d, nr)
    else:
        out = _api(dims, False)(x, w, b, stride=s, padding=p, dilation=d, n_rolls=nr, backend=backend)
        expect = ref.rolling_conv(x.double(), w.double(), None if b is None else b.double(), s, p, d, nr)
    return out, expect


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_forward_matches_reference(device, backend, case, dtype, transposed):
    op = OP_T if transposed else OP
    skip_unsupported(op, backend, device, dtype)
    out, expect = _run(case, device, backend, dtype, transposed, "contiguous", with_bias=True)
    assert out.dtype == dtype and out.device.type == device
    assert_close_to_ref(out, expect, dtype, "%s %s %s" % (backend, case[0], op))


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("layout", ["channels_last", "noncontig"])
@pytest.mark.parametrize("case", [CASES[1], CASES[10]], ids=[CASES[1][0], CASES[10][0]])
@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_forward_layouts(device, backend, case, layout, transposed):
    op = OP_T if transposed else OP
    skip_unsupported(op, backend, device, torch.float32)
    out, expect = _run(case, device, backend, torch.float32, transposed, layout, with_bias=False)
    assert_close_to_ref(out, expect, torch.float32, "%s %s %s %s" % (backend, case[0], op, layout))


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_cpu_deterministic(transposed):
    """Backend "cpu": the same bits every run and for any thread count (each output element
    is summed by one thread in a fixed order)."""
    case = ("det", 2, 2, 16, 2, 12, (11, 13), (3, 3), (2, 1), 1, (1, 2), (1, 0))
    torch.manual_seed(1)
    x = make_input((2, 16, 11, 13), torch.float32, "cpu", requires_grad=True)
    w = make_input(((16, 2) if transposed else (2, 16)) + (3, 3), torch.float32, "cpu", requires_grad=True)

    def run():
        if transposed:
            y = mc.rolling_conv_transpose2d(x, w, None, case[8], case[9], case[11], 12, backend="cpu", dilation=case[10])
        else:
            y = mc.rolling_conv2d(x, w, None, case[8], case[9], case[10], 12, backend="cpu")
        gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y) * 0.5 + y.detach())
        return y.detach(), gx, gw

    first = run()
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, 2):
            torch.set_num_threads(n)
            again = run()
            for a, b in zip(first, again):
                assert torch.equal(a, b), "results differ between runs (threads=%d)" % n
    finally:
        torch.set_num_threads(threads)


def _poisoned_call(fn, nbytes):
    """Frees a NaN-filled block of the output's size right before the call, so that an output
    element the kernel forgets to write is likely to read back as NaN (malloc reuses the block)."""
    poison = torch.full((nbytes // 4 + 16,), float("nan"), dtype=torch.float32)
    del poison
    return fn()


@pytest.mark.skipif("cpu" not in [p.values[1] for p in backend_params(OP) if p.values[0] == "cpu"],
                    reason="compiled CPU kernels not built")
def test_cpu_kernels_write_every_output_element():
    ops = torch.ops.medconv
    x = torch.randn(2, 6, 9, 7)
    w = torch.randn(2, 6, 3, 2)
    wt = torch.randn(6, 2, 3, 2)
    s, p, d = [2, 1], [1, 1], [1, 2]
    y = ops.rolling_conv(x, w, None, s, p, d, 4)
    yt = ops.rolling_conv_transpose(x, wt, None, s, p, [1, 0], d, 4)
    calls = {
        "rolling_conv": lambda: ops.rolling_conv(x, w, None, s, p, d, 4),
        "rolling_conv_grad_input": lambda: ops.rolling_conv_grad_input(y, w, list(x.shape), s, p, d, 4),
        "rolling_conv_grad_weight": lambda: ops.rolling_conv_grad_weight(y, x, list(w.shape), s, p, d, 4),
        "rolling_conv_transpose": lambda: ops.rolling_conv_transpose(x, wt, None, s, p, [1, 0], d, 4),
        "rolling_conv_transpose_grad_input": lambda: ops.rolling_conv_transpose_grad_input(yt, wt, list(x.shape), s, p, d, 4),
        "rolling_conv_transpose_grad_weight": lambda: ops.rolling_conv_transpose_grad_weight(yt, x, list(wt.shape), s, p, d, 4),
    }
    for name, fn in calls.items():
        first = fn()
        for _ in range(3):
            out = _poisoned_call(fn, first.numel() * first.element_size())
            assert torch.isfinite(out).all(), "%s left output elements unwritten" % name
            assert torch.equal(out, first), name
