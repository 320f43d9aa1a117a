"""Triton backend of rolling convolution. Without a GPU the kernels run on CPU tensors under
TRITON_INTERPRET=1 (set by conftest.py), so shapes are tiny; on a GPU the same tests run on CUDA.

Every case: forward, grad_input and grad_weight against the float64 reference (autograd through the
materialized bank) and grad_weight against the paper's eq. 7 written out literally; outputs are
poisoned (every torch.empty in the wrapper and the kernels' partial buffers starts as NaN) so an
element a kernel fails to write is caught.
"""

import math
import os
import re
import types

import pytest
import torch

import medconv_ext
from medconv_ext import backends
from medconv_ext.ops import rolling_conv_triton as RT

from _rolling_gpu_util import (
    TOL,
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





def _run(transposed, x, w, b, stride, padding, output_padding, dilation, n_rolls, dtype):
    """Kernel outputs and float64 reference for y, grad x, grad w, grad b."""
    xk = x.detach().clone().requires_grad_()
    wk = w.detach().clone().requires_grad_()
    bk = b.detach().clone().requires_grad_() if b is not None else None
    if transposed:
        y = RT.rolling_conv_transpose_triton(xk, wk, bk, stride, padding, output_padding, dilation, n_rolls)
    else:
        y = RT.rolling_conv_triton(xk, wk, bk, stride, padding, dilation, n_rolls)
    g = torch.Generator().manual_seed(7)
    go = torch.randn(y.shape, generator=g).to(dtype)  # rounded to dtype: the reference sees the same values
    y.backward(go.to(y.device))
    ref = reference_all(transposed, x.cpu(), w.cpu(), b.cpu() if b is not None else None, stride, padding,
                        output_padding, dilation, n_rolls, grad_out=go.double())
    return (y, xk.grad, wk.grad, bk.grad if bk is not None else None), ref


# (transposed, dims, N, C, n_base, n_rolls, k, spatial, stride, padding, output_padding, dilation, bias, dtype, layout)
CASES = [
    pytest.param(False, 2, 2, 5, 2, 3, 3, (9, 8), [2, 2], [1, 1], [0, 0], [2, 2], True, torch.float32, "channels_last",
                 id="conv2d-s2-d2-partial-nb2-channels_last"),
    pytest.param(False, 2, 1, 1, 1, 1, (3, 2), (5, 6), [1, 1], [0, 0], [0, 0], [1, 1], False, torch.float32, "contiguous",
                 id="conv2d-C1-nobias"),
    pytest.param(False, 3, 1, 4, 1, 4, 3, 5, [1, 2, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1], True, torch.float32,
                 "noncontiguous", id="conv3d-fullroll-stride121-noncontig"),
    pytest.param(True, 2, 2, 5, 2, 3, 3, (4, 5), [2, 2], [1, 1], [1, 1], [1, 1], True, torch.float32, "contiguous",
                 id="convT2d-s2-op1-partial-nb2"),
    pytest.param(True, 2, 1, 4, 1, 4, 3, (4, 3), [1, 1], [2, 2], [1, 1], [2, 2], False, torch.float32, "contiguous",
                 id="convT2d-d2-op1"),
    pytest.param(True, 3, 1, 3, 1, 2, 2, 3, [2, 2, 2], [0, 0, 0], [1, 0, 1], [1, 1, 1], True, torch.float32,
                 "contiguous", id="convT3d-s2-partial"),
    pytest.param(False, 2, 1, 6, 2, 3, 3, 6, [1, 1], [1, 1], [0, 0], [1, 1], True, torch.bfloat16, "contiguous",
                 id="conv2d-bf16"),
    pytest.param(True, 2, 1, 4, 2, 2, 2, 4, [2, 2], [0, 0], [0, 0], [1, 1], True, torch.float16, "contiguous",
                 id="convT2d-fp16"),
]


@needs_triton
@pytest.mark.parametrize("transposed,dims,N,C,nb,n_rolls,k,spatial,stride,padding,output_padding,dilation,bias,dtype,layout",
                         CASES)
def test_triton_vs_reference(poison, transposed, dims, N, C, nb, n_rolls, k, spatial, stride, padding, output_padding,
                             dilation, bias, dtype, layout):
    x, w, b = make_case(transposed, dims, N, C, nb, n_rolls, k, spatial, dtype, DEVICE, bias=bias)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    elif layout == "noncontiguous":
        x = torch.cat([x, x], dim=-1)[..., ::2]
        assert not x.is_contiguous()
    (y, gx, gw, gb), (ry, rgx, rgw, rgb, go) = _run(transposed, x, w, b, stride, padding, output_padding, dilation,
                                                   n_rolls, dtype)
    assert y.dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
    assert_close(y, ry, dtype, "forward")
    assert_close(gx, rgx, dtype, "grad_input")
    assert_close(gw, rgw, dtype, "grad_weight")
    if bias:
        assert_close(gb, rgb, dtype, "grad_bias")
    # the paper's equations, literally (independent of autograd)
    kk = list(w.shape[2:])
    if transposed:
        assert_close(gw, eq7_grad_weight_transpose(go, x.cpu(), kk, stride, padding, dilation, n_rolls, nb), dtype, "eq7")
    else:
        assert_close(gw, eq7_grad_weight(go, x.cpu(), kk, stride, padding, dilation, n_rolls, nb), dtype, "eq7")
        assert_close(gx, eq8_grad_input(go, w.cpu(), x.shape, stride, padding, dilation, n_rolls), dtype, "eq8")


@needs_triton
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
def test_triton_empty_batch(transposed):
    x, w, b = make_case(transposed, 2, 0, 3, 1, 2, 3, 5, torch.float32, DEVICE)
    x.requires_grad_()
    w.requires_grad_()
    if transposed:
        y = RT.rolling_conv_transpose_triton(x, w, b, [1, 1], [1, 1], [0, 0], [1, 1], 2)
    else:
        y = RT.rolling_conv_triton(x, w, b, [1, 1], [1, 1], [1, 1], 2)
    assert y.shape == (0, 2, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


@needs_triton
def test_triton_public_api_and_determinism():
    x, w, b = make_case(False, 2, 1, 4, 2, 3, 3, 6, torch.float32, DEVICE)
    y1 = medconv_ext.rolling_conv2d(x, w, b, stride=1, padding=1, n_rolls=3, backend="triton")
    y2 = medconv_ext.rolling_conv2d(x, w, b, stride=1, padding=1, n_rolls=3, backend="triton")
    ref = medconv_ext.rolling_conv2d(x.double(), w.double(), b.double(), stride=1, padding=1, n_rolls=3, backend="reference")
    assert_close(y1, ref, torch.float32, "public API")
    assert torch.equal(y1, y2), "two runs differ: the kernel must be deterministic"
    # module layer with backend="triton"
    m = medconv_ext.nn.RollingConvTranspose2d(4, 6, 2, stride=2, backend="triton").to(DEVICE)
    xt = torch.randn(1, 4, 3, 3, device=DEVICE)
    ref = torch.nn.functional.conv_transpose2d(xt.double().cpu(), m.expanded_weight().double().cpu(),
                                               m.bias.double().cpu(), 2)  # float64 on the CPU: no TF32
    assert_close(m(xt).detach(), ref, torch.float32, "RollingConvTranspose2d")


@needs_triton
def test_triton_refuses_what_it_cannot_run():
    x, w, b = make_case(False, 2, 1, 3, 1, 3, 3, 5, torch.float64, DEVICE)
    with pytest.raises(RuntimeError, match="float64"):
        medconv_ext.rolling_conv2d(x, w, b, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        RT.rolling_conv_triton(x, w, b, [1, 1], [0, 0], [1, 1], 3)


def test_triton_registered_with_reason():
    ok, why = backends.available_backends()["triton"]
    assert isinstance(why, str) and why
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert RT._supports(torch.device("cpu"), torch.float32) is None
    else:
        assert "TRITON_INTERPRET" in RT._supports(torch.device("cpu"), torch.float32)
    assert RT._supports(torch.device("cuda"), torch.bfloat16) is None
    assert "float64" in RT._supports(torch.device("cuda"), torch.float64)


@needs_triton
def test_triton_opcheck():
    C, nb, nr = 3, 1, 2
    x = torch.randn(1, C, 4, 4, device=DEVICE)
    w = torch.randn(nb, C, 2, 2, device=DEVICE)
    wt = torch.randn(C, nb, 2, 2, device=DEVICE)
    b = torch.randn(nr * nb, device=DEVICE)
    p = dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1])
    go = torch.randn(1, nr * nb, 3, 3, device=DEVICE)
    got = torch.randn(1, nr * nb, 5, 5, device=DEVICE)
    # the schema, fake-tensor and autograd registration checks (the costly aot_dispatch check is left to the GPU suite)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    checks = [
        (RT.rolling_conv_triton, (x.requires_grad_(), w.requires_grad_(), b, p["stride"], p["padding"], p["dilation"], nr)),
        (RT.rolling_conv_triton_grad_input, (go, w.detach(), list(x.shape), p["stride"], p["padding"], p["dilation"], nr)),
        (RT.rolling_conv_triton_grad_weight, (go, x.detach(), list(w.shape), p["stride"], p["padding"], p["dilation"], nr)),
        (RT.rolling_conv_transpose_triton, (x.detach(), wt, b, [1, 1], [0, 0], [0, 0], [1, 1], nr)),
        (RT.rolling_conv_transpose_triton_grad_input, (got, wt, list(x.shape), [1, 1], [0, 0], [1, 1], nr)),
        (RT.rolling_conv_transpose_triton_grad_weight, (got, x.detach(), list(wt.shape), [1, 1], [0, 0], [1, 1], nr)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=utils)
    # the full check (with aot_dispatch_dynamic, which traces forward and backward) on the forward op
    torch.library.opcheck(*checks[0])


def test_imports_without_triton():
    """Where triton is missing the package still imports and the backend says why it is unavailable."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch, medconv_ext\n"
        "from medconv_ext.triton_kernels import rolling_conv as k\n"
        "assert k.triton is None and 'triton' in k.TRITON_ERROR, k.TRITON_ERROR\n"
        "ok, why = medconv_ext.available_backends()['triton']\n"
        "assert not ok and 'triton' in why, why\n"
        "x = torch.randn(1, 2, 4, 4); w = torch.randn(1, 2, 3, 3)\n"
        "try:\n"
        "    medconv_ext.rolling_conv2d(x, w, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'not available' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "y = medconv_ext.rolling_conv2d(x, w, backend='reference')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


# --------------------------------------------------------------------------------------
# large-index logic (> 2^31 output elements): launch plans and int64 offsets
# --------------------------------------------------------------------------------------
def test_launch_plan_large_output():
    from medconv_ext.triton_kernels import rolling_conv as K

    # conv3d, 70000 samples x 64 channels x 8^3: 2.3e9 output elements (> 2^31)
    N, A, P = 70000, 64, 8 ** 3
    assert K.needs_int64((N, A, 8, 8, 8))
    assert K.max_offset(N, A, (8, 8, 8)) > K.INT32_MAX
    plan = K.gemm_grid(P, A, N, 64, 32)
    assert sum(c for _, (_, c) in plan) == N and [s for s, _ in plan] == [0, 65535]
    for start, (gx, gy) in plan:
        assert gx <= K.MAX_GRID_X and 1 <= gy <= K.MAX_GRID_YZ
    # one sample larger than 2^31 elements: the grid stays legal, offsets must be 64-bit
    plan = K.gemm_grid(1024 ** 3, 4, 1, 64, 16)
    assert plan == [(0, ((1024 ** 3 // 64), 1))]
    with pytest.raises(RuntimeError, match="grid limit"):
        K.gemm_grid(2 ** 40, 2 ** 10, 1, 16, 16)
    splits, chunk = K.grad_weight_splits(3 * 2 ** 31, 1, interpret=False)
    assert 1 <= splits <= K.MAX_GRID_YZ and splits * chunk >= 3 * 2 ** 31
    # the weight offset formula on a huge base stays exact (Python ints: no wraparound)
    rw = K.make_rollw((4, 70000, 5, 5, 5), False, 70000)
    assert K.weight_offset(4 * 70000 - 1, 0, 124, rw) == 3 * 70000 * 125 + 1 * 125 + 124


def test_kernels_use_int64_offsets():
    """Every program id is widened to int64 before it enters an offset (Triton), and every CUDA loop
    index built from blockIdx is int64_t: sizes beyond 2^31 elements cannot wrap."""
    src = open(os.path.join(ROOT, "triton_kernels", "rolling_conv.py")).read()
    pids = re.findall(r"tl\.program_id\(\d\)[^\n]*", src)
    assert pids, "no program ids found"
    for line in pids:
        assert line.startswith(tuple("tl.program_id(%d).to(tl.int64)" % i for i in range(3))), line
    cu = open(os.path.join(ROOT, "csrc", "cuda", "rolling_conv.cu")).read()
    uses = [l for l in cu.splitlines() if "blockIdx" in l and "for (" in l]
    assert uses, "no grid-stride loops found"
    for l in uses:
        assert re.search(r"for \(int64_t \w+ = (blockIdx|split = blockIdx)", l) or "int64_t" in l, l
    assert "int " not in "".join(l for l in cu.splitlines() if "blockIdx" in l and "threadIdx" not in l)


# --------------------------------------------------------------------------------------
# launch on the tensor's GPU; 64-bit offsets of the grad_weight roll rows
# --------------------------------------------------------------------------------------
def test_device_guard_selects_the_tensors_gpu(monkeypatch):
    """device_guard(t) enters torch.cuda.device(t.device) for CUDA tensors (mocked: no GPU needed) and
    nothing for CPU tensors."""
    entered = []

    class FakeDevice:
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            entered.append(self.dev)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with RT.device_guard(types.SimpleNamespace(device=torch.device("cuda", 1))):  # only .device is read
        pass
    assert entered == [torch.device("cuda", 1)]
    with RT.device_guard(torch.empty(1)):  # CPU: a no-op context
        pass


@needs_triton
def test_every_op_launches_under_the_device_guard(monkeypatch):
    """The six ops call the kernels only inside device_guard(tensor)."""
    from medconv_ext.triton_kernels import rolling_conv as K

    state = {"inside": 0, "calls": 0, "guarded": []}

    class Guard:
        def __init__(self, t):
            state["guarded"].append(t.device)

        def __enter__(self):
            state["inside"] += 1

        def __exit__(self, *exc):
            state["inside"] -= 1
            return False

    def check(fn):
        def wrapped(*a, **kw):
            assert state["inside"] == 1, "kernel launched outside device_guard"
            state["calls"] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(RT, "device_guard", Guard)
    monkeypatch.setattr(K, "rolling_gemm", check(K.rolling_gemm))
    monkeypatch.setattr(K, "rolling_grad_weight", check(K.rolling_grad_weight))
    for transposed in (False, True):
        x, w, b = make_case(transposed, 2, 1, 3, 1, 2, 2, 4, torch.float32, DEVICE)
        x.requires_grad_()
        w.requires_grad_()
        if transposed:
            y = RT.rolling_conv_transpose_triton(x, w, b, [1, 1], [0, 0], [0, 0], [1, 1], 2)
        else:
            y = RT.rolling_conv_triton(x, w, b, [1, 1], [0, 0], [1, 1], 2)
        y.sum().backward()
    assert state["calls"] == 6 and len(state["guarded"]) == 6


if triton_ok:
    import triton
    import triton.language as tl
    from medconv_ext.triton_kernels.rolling_conv import roll_row_offset

    @triton.jit
    def _roll_offset_probe(out_ptr, base, r, NB, P_R, WIDE: tl.constexpr):
        if WIDE:
            off = roll_row_offset(base, r, NB, P_R)
        else:  # the 32-bit expression the kernel used before: must wrap here, or the test cannot fail
            off = base + r * NB * P_R
        tl.store(out_ptr, off)


@needs_triton
def test_grad_weight_roll_offset_is_64bit():
    """The offset of the roll-r rows of grad_out, r * n_base * P, at 3D C=256 (full roll), n_base=1, 256^3:
    (C - 1) * 256^3 > 2^31. The kernel's own helper computes it exactly; the plain int32 product wraps."""
    r, nb, p = 255, 1, 256 ** 3
    base = 5 * p  # a batch / base offset already in int64
    want = base + r * nb * p
    assert r * nb * p > K_INT32_MAX
    for wide in (True, False):
        out = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        _roll_offset_probe[(1,)](out, base, r, nb, p, WIDE=wide)
        if wide:
            assert int(out.item()) == want
        else:
            assert int(out.item()) != want, "int32 did not wrap: this test would not catch the overflow"
    # n_base > 1: NB is not specialized, r * NB alone stays small, the product with P_R does not
    out = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    _roll_offset_probe[(1,)](out, 0, 127, 2, 128 ** 3 * 80, WIDE=True)
    assert int(out.item()) == 127 * 2 * 128 ** 3 * 80


K_INT32_MAX = 2 ** 31 - 1


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
def test_large_case_check_logic_small(transposed):
    """The > 2^31-element GPU check (large_case_check, run at H=33000 by test_rolling_conv_cuda.py) run at a
    small H on the CPU reference backend: its crops and its float64 eq. 7 sums are right, and it catches
    a wrong weight gradient."""
    from _rolling_gpu_util import large_case_check

    assert large_case_check(transposed, "reference", 11, "cpu") == 2 * 11 * 11
    import medconv_ext.reference.rolling_conv as R

    orig = R.expand_rolling_weight_transpose if transposed else R.expand_rolling_weight

    def wrong(w, n_rolls):  # a bank whose rolls go the wrong way: gradients differ
        bank = orig(w, n_rolls)
        return bank.flip(1 if not transposed else 0)

    name = "expand_rolling_weight_transpose" if transposed else "expand_rolling_weight"
    import _rolling_gpu_util as U
    mp = pytest.MonkeyPatch()
    mp.setattr(U.R, name, wrong)
    try:
        with pytest.raises(AssertionError):
            large_case_check(transposed, "reference", 11, "cpu")
    finally:
        mp.undo()
