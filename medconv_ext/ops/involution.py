"""Involution: functional API, argument checks, backend choice, and the torch.library
registrations (fake kernels, autograd) of the compiled ops.

Definition (docs/design.md §2), x (N, C, *S), weight (N, G, *K, *S_out):
    out[n, c, p] = sum_t weight[n, g(c), t, p] * x[n, c, p*s + t*d - pad],  g(c) = c // (C // G)
    S_out = floor((S + 2*padding - dilation*(K-1) - 1) / stride) + 1

Registry op name "involution" (2D and 3D, dims from x.dim()); every implementation has the
signature fn(x, weight, kernel_size, stride, padding, dilation) with lists of ints.
"""
from typing import List

import torch

from .. import _ext
from ..backends import register_impl, resolve, supports_any, supports_device_dtypes
from ..reference import involution as _ref
from .rolling_conv import plain_onnx_export
from ._common import (autocast_inputs, autodiff_transform_active, check_kernel_fits, check_positive, check_rank,
                      check_same_dtype_device, conv_out_size, ntuple)

OP = "involution"
_LAYOUT = {2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}
_W_LAYOUT = {2: "(N, G, K, K, H_out, W_out)", 3: "(N, G, K, K, K, D_out, H_out, W_out)"}


# --------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------
def _check(name, dims, x, weight, kernel_size, stride, padding, dilation):
    check_rank(x, dims + 2, "x", _LAYOUT[dims], name)
    check_rank(weight, 2 + 2 * dims, "weight", _W_LAYOUT[dims], name)
    check_same_dtype_device(name, x=x, weight=weight)
    kernel_size = ntuple(kernel_size, dims, "kernel_size", name)
    stride = ntuple(stride, dims, "stride", name)
    padding = ntuple(padding, dims, "padding", name)
    dilation = ntuple(dilation, dims, "dilation", name)
    if any(k < 1 or k % 2 == 0 for k in kernel_size):
        raise ValueError("%s: kernel_size must be odd and positive (1, 3, 5, ...), got %s" % (name, kernel_size))
    check_positive(stride, "stride", name)
    check_positive(dilation, "dilation", name)
    check_positive(padding, "padding", name, minimum=0)
    n, c = x.shape[:2]
    spatial = list(x.shape[2:])
    if c < 1:
        raise ValueError("%s: x must have at least one channel, got shape %s" % (name, tuple(x.shape)))
    if any(s < 1 for s in spatial):
        raise ValueError("%s: x must have non-empty spatial dims, got shape %s" % (name, tuple(x.shape)))
    wn, g = weight.shape[:2]
    if wn != n:
        raise ValueError("%s: weight %s has batch size %d but x has N=%d (weight shape %s)"
                         % (name, _W_LAYOUT[dims], wn, n, tuple(weight.shape)))
    if g < 1:
        raise ValueError("%s: weight must have G >= 1 groups, got shape %s" % (name, tuple(weight.shape)))
    if c % g != 0:
        raise ValueError("%s: the number of channels C=%d must be divisible by the number of groups G=%d "
                         "(weight dim 1, weight shape %s)" % (name, c, g, tuple(weight.shape)))
    wk = list(weight.shape[2:2 + dims])
    if wk != kernel_size:
        raise ValueError("%s: weight kernel dims %s do not match kernel_size=%s (weight %s, shape %s)"
                         % (name, wk, kernel_size, _W_LAYOUT[dims], tuple(weight.shape)))
    check_kernel_fits(spatial, kernel_size, padding, dilation, name)
    expected = [conv_out_size(s_, k, st, p, d) for s_, k, st, p, d in zip(spatial, kernel_size, stride, padding, dilation)]
    got = list(weight.shape[2 + dims:])
    if got != expected:
        raise ValueError(
            "%s: weight spatial size %s does not match the output size %s that x %s implies with kernel_size=%s, "
            "stride=%s, padding=%s, dilation=%s (S_out = floor((S + 2*padding - dilation*(K-1) - 1) / stride) + 1); "
            "expected weight shape %s" % (name, tuple(got), tuple(expected), tuple(x.shape), kernel_size, stride,
                                          padding, dilation, (n, g, *kernel_size, *expected)))
    return kernel_size, stride, padding, dilation


# --------------------------------------------------------------------------------------
# backend choice for backend="auto" (rule derived from bench/bench_involution.py)
# --------------------------------------------------------------------------------------
def _auto_candidates(x: torch.Tensor) -> List[str]:
    """Ordered backends to try for backend="auto"; "reference" is always the last resort."""
    if x.device.type == "cuda":
        return ["cuda", "triton"]
    return ["cpu"]


def _involution_nd(dims, x, weight, kernel_size, stride, padding, dilation, backend):
    name = "involution%dd" % dims
    x, weight = autocast_inputs(x, weight)
    kernel_size, stride, padding, dilation = _check(name, dims, x, weight, kernel_size, stride, padding, dilation)
    _, fn = resolve(OP, backend, x.device, x.dtype, _auto_candidates(x),
                    ctx={"dims": dims, "x_shape": tuple(x.shape), "w_shape": tuple(weight.shape)})
    if plain_onnx_export() or autodiff_transform_active():
        # torch.onnx.export without the package's translations (medconv_ext.export); forward-mode AD or a
        # torch.func transform, which the compiled ops do not support (_common.autodiff_transform_active)
        _, fn = resolve(OP, "reference", x.device, x.dtype, [])
    return fn(x, weight, kernel_size, stride, padding, dilation)


def involution2d(x, weight, kernel_size, stride=1, padding=0, dilation=1, backend="auto"):
    """2D involution. x (N, C, H, W), weight (N, G, K, K, H_out, W_out) with G dividing C;
    channel c uses the kernel of group c // (C // G). Returns (N, C, H_out, W_out) with
    H_out = floor((H + 2*padding - dilation*(K-1) - 1) / stride) + 1 (likewise W_out).
    backend: "auto", "cpu", "cuda", "triton" or "reference" (see medconv_ext.available_backends())."""
    return _involution_nd(2, x, weight, kernel_size, stride, padding, dilation, backend)


def involution3d(x, weight, kernel_size, stride=1, padding=0, dilation=1, backend="auto"):
    """3D involution; as involution2d with x (N, C, D, H, W) and weight (N, G, K, K, K, D_out, H_out, W_out)."""
    return _involution_nd(3, x, weight, kernel_size, stride, padding, dilation, backend)


# --------------------------------------------------------------------------------------
# backend "reference": pure PyTorch, unfold-based (materializes every window)
# --------------------------------------------------------------------------------------
register_impl(OP, "reference", _ref.involution, supports_any)


# --------------------------------------------------------------------------------------
# backends "cpu" / "cuda": the compiled ops torch.ops.medconv.involution*
# --------------------------------------------------------------------------------------
def _compiled(x, weight, kernel_size, stride, padding, dilation):
    return torch.ops.medconv.involution(x, weight, kernel_size, stride, padding, dilation)


CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _out_sizes(spatial, kernel_size, stride, padding, dilation):
    return [conv_out_size(n, k, s, p, d) for n, k, s, p, d in zip(spatial, kernel_size, stride, padding, dilation)]


def register_grad_op_autograd(grad_input_name: str, grad_weight_name: str, fwd, grad_input, grad_weight):
    """The autograd of an involution's two gradient ops (qualified names), which are bilinear, so each
    gradient is one of the three ops fwd(x, w, k, s, p, d), grad_input(gy, w, input_size, k, s, p, d),
    grad_weight(gy, x, k, s, p, d, groups) again; this gives double backward (gradgradcheck):
      gx = A(w)^T gy:  d<v, gx>/d gy = fwd(v, w),  d<v, gx>/d w = grad_weight(gy, v)
      gw[g, t, p] = sum_c gy[c, p] x[c, p*s + t*d - pad]:  d<V, gw>/d gy = fwd(x, V),  d<V, gw>/d x = grad_input(gy, V)
    Used for the compiled ops and the Triton ones."""
    def make_setup(first):  # where (kernel_size, stride, padding, dilation) start among the inputs
        def setup(ctx, inputs, output):
            ctx.save_for_backward(*inputs[:2])  # (grad_out, weight) or (grad_out, x)
            ctx.params = tuple(list(v) for v in inputs[first:first + 4])
        return setup

    def backward_gi(ctx, v):  # inputs (grad_out, weight, input_size, kernel_size, stride, padding, dilation)
        grad_out, weight = ctx.saved_tensors
        g_gy = fwd(v, weight, *ctx.params) if ctx.needs_input_grad[0] else None
        g_w = grad_weight(grad_out, v, *ctx.params, weight.shape[1]) if ctx.needs_input_grad[1] else None
        return g_gy, g_w, None, None, None, None, None

    def backward_gw(ctx, v):  # inputs (grad_out, x, kernel_size, stride, padding, dilation, groups)
        grad_out, x = ctx.saved_tensors
        g_gy = fwd(x, v, *ctx.params) if ctx.needs_input_grad[0] else None
        g_x = grad_input(grad_out, v, list(x.shape), *ctx.params) if ctx.needs_input_grad[1] else None
        return g_gy, g_x, None, None, None, None, None

    torch.library.register_autograd(grad_input_name, backward_gi, setup_context=make_setup(3))
    torch.library.register_autograd(grad_weight_name, backward_gw, setup_context=make_setup(2))


if _ext.has_compiled_ops():
    register_impl(OP, "cpu", _compiled, supports_device_dtypes("cpu", CPU_DTYPES))
    register_impl(OP, "cuda", _compiled, supports_device_dtypes("cuda", CUDA_DTYPES))

    # ---- fake kernels (shapes only), so the ops trace under torch.compile ----
    @torch.library.register_fake("medconv::involution")
    def _(x, weight, kernel_size, stride, padding, dilation):
        out = _out_sizes(x.shape[2:], kernel_size, stride, padding, dilation)
        return x.new_empty((x.shape[0], x.shape[1], *out))

    @torch.library.register_fake("medconv::involution_grad_input")
    def _(grad_out, weight, input_size, kernel_size, stride, padding, dilation):
        return grad_out.new_empty(input_size)

    @torch.library.register_fake("medconv::involution_grad_weight")
    def _(grad_out, x, kernel_size, stride, padding, dilation, groups):
        out = _out_sizes(x.shape[2:], kernel_size, stride, padding, dilation)
        return x.new_empty((x.shape[0], groups, *kernel_size, *out))

    # ---- autograd. All three ops are (bi)linear, so each gradient is one of the three ops
    # again; this also gives double backward (gradgradcheck) for free.
    def _setup_fwd(ctx, inputs, output):
        x, weight, kernel_size, stride, padding, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.params = (kernel_size, stride, padding, dilation)

    def _backward_fwd(ctx, grad):
        x, weight = ctx.saved_tensors
        k, s, p, d = ctx.params
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.medconv.involution_grad_input(grad, weight, list(x.shape), k, s, p, d)
        if ctx.needs_input_grad[1]:
            gw = torch.ops.medconv.involution_grad_weight(grad, x, k, s, p, d, weight.shape[1])
        return gx, gw, None, None, None, None

    torch.library.register_autograd("medconv::involution", _backward_fwd, setup_context=_setup_fwd)

    register_grad_op_autograd("medconv::involution_grad_input", "medconv::involution_grad_weight",
                              torch.ops.medconv.involution, torch.ops.medconv.involution_grad_input,
                              torch.ops.medconv.involution_grad_weight)
