"""Helpers shared by the rolling-conv tests: backend/device parametrization, random inputs
of awkward layouts, tolerances by dtype."""
import pytest
import torch

from medconv_ext import available_backends
from medconv_ext.backends import _IMPLS

OP = "rolling_conv"
OP_T = "rolling_conv_transpose"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", "cuda"]


def _ctx(op):
    # a representative 2D input, only so that a backend's `supports` can answer
    if op == OP_T:
        return {"transposed": True, "x_shape": (1, 4, 6, 6), "w_shape": (4, 1, 3, 3)}
    return {"transposed": False, "x_shape": (1, 4, 6, 6), "w_shape": (1, 4, 3, 3)}


def backends_for(op, device):
    """Backends registered for `op` that are available here and run on `device`; "triton" is
    left out on the CPU (its interpreter-mode tests are separate, with tiny shapes)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not HAS_CUDA:
        return []
    avail = available_backends()
    out = []
    for name, impl in sorted(_IMPLS.get(op, {}).items()):
        if name == "triton" and dev.type == "cpu":
            continue
        if not avail.get(name, (False, ""))[0]:
            continue
        if all(impl.supports(dev, dt, **_ctx(op)) is not None for dt in (torch.float32, torch.float64)):
            continue
        out.append(name)
    return out


def backend_params(op):
    """pytest params (device, backend) over DEVICES; one skipped 'cuda' entry without a GPU."""
    params = []
    for device in DEVICES:
        if device == "cuda" and not HAS_CUDA:
            params.append(pytest.param("cuda", None, id="cuda-nogpu", marks=pytest.mark.skip(reason="no CUDA device")))
            continue
        for b in backends_for(op, device):
            params.append(pytest.param(device, b, id="%s-%s" % (device, b)))
    return params


def skip_unsupported(op, backend, device, dtype, transposed=False):
    why = _IMPLS[op][backend].supports(torch.device(device), dtype, **_ctx(op))
    if why is not None:
        pytest.skip("%s/%s: %s" % (backend, device, why))


def make_input(shape, dtype, device, layout="contiguous", requires_grad=False):
    """Random tensor with the given logical shape, stored as `layout`:
    "contiguous", "channels_last" (channels_last / channels_last_3d) or "noncontig"
    (a strided view with the last axis stepped by 2)."""
    if layout == "noncontig":
        big = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
        t = big[..., ::2]
        assert not t.is_contiguous() or t.numel() <= 1
    else:
        t = torch.randn(*shape, dtype=dtype, device=device)
        if layout == "channels_last":
            fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            t = t.contiguous(memory_format=fmt)
    if requires_grad:
        t.requires_grad_(True)
    return t


def tol(dtype):
    """(rtol, atol relative to the reference's largest magnitude)."""
    return {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5)}[dtype]


def assert_close_to_ref(out, ref, dtype, what=""):
    rtol, atol = tol(dtype)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    assert out.shape == ref.shape, "%s: shape %s != reference %s" % (what, tuple(out.shape), tuple(ref.shape))
    assert torch.isfinite(out).all(), "%s: non-finite values" % what
    torch.testing.assert_close(out.to(torch.float64), ref.to(torch.float64), rtol=rtol, atol=atol * scale,
                               msg=lambda m: "%s: %s" % (what, m))
