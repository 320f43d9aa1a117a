"""Rolling convolution of a channel concatenation, rolling_conv_cat(x, x2, weight, ...) =
rolling_conv{2,3}d(torch.cat([x, x2], 1), weight, ...), without the concatenated copy where it can.

A U-Net decoder convolves cat([up-sampled, skip], 1): torch.cat writes a tensor as large as both inputs
(and the next layer reads it again). Where the fused spectral CPU kernel runs the layer (backend
"spectral" on CPU tensors: float32/float64/bfloat16, C_in <= 256; what `auto` picks for the
concatenated input), torch.ops.medconv.rolling_conv_spectral_cat reads both tensors in place: every
input row is gathered into the kernel's per-thread row buffer, in cache, as it is transformed. Every
other case (another backend, device or dtype, autocast, ONNX export, a non-finite weight) runs
torch.cat and the ordinary rolling_conv{2,3}d: the same result, the same checks and errors.

Backward: the input gradient of the concatenation, split into the two inputs' gradients (views), and
the weight gradient from torch.ops.medconv.rolling_conv_spectral_cat_grad_weight, which reads x and x2
in place too.
"""
from typing import Optional

import torch

from . import rolling_conv_spectral_cpu as _fused
from ._common import autodiff_transform_active, check_epilogue, check_kernel_fits, conv_out_size, make_eager_function
from .rolling_conv import OP, _check_common, _choose_kernel, rolling_conv2d, rolling_conv3d
from .rolling_conv_spectral import _grad_finite, rolling_conv_spectral

_OPNAME = "medconv::rolling_conv_spectral_cat"


def available() -> bool:
    return _fused.available() and hasattr(torch.ops.medconv, "rolling_conv_spectral_cat")


if available():
    @torch.library.register_fake(_OPNAME)
    def _(x, x2, weight, bias, scale, shift, relu, stride, padding, dilation, n_rolls):
        out = [conv_out_size(n, k, s, p, d) for n, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
        return x.new_empty((x.shape[0], n_rolls * weight.shape[0], *out)).contiguous(
            memory_format=_fused.out_memory_format(x))

    @torch.library.register_fake(_OPNAME + "_grad_weight")
    def _(grad_out, x, x2, weight_size, stride, padding, dilation, n_rolls):
        return grad_out.new_empty(weight_size)

    def _setup(ctx, inputs, output):
        x, x2, weight, bias, scale, shift, relu, stride, padding, dilation, n_rolls = inputs
        ctx.has_bias, ctx.has_scale, ctx.has_shift, ctx.relu = bias is not None, scale is not None, shift is not None, relu
        ctx.c1 = x.shape[1]
        ctx.save_for_backward(x, x2, weight, bias, scale, output if relu else None)  # None: not needed
        ctx.params = (stride, padding, dilation, n_rolls)

    def _backward(ctx, grad):
        x, x2, weight, bias, scale, y = ctx.saved_tensors
        stride, padding, dilation, n_rolls = ctx.params
        nig = ctx.needs_input_grad
        ctx.needs_bias, ctx.needs_scale, ctx.needs_shift = nig[3], nig[4], nig[5]
        ctx.scale = scale

        def recompute_z():
            return torch.ops.medconv.rolling_conv_spectral_cat(
                x, x2, weight, bias if ctx.has_bias else None, None, None, False, stride, padding, dilation, n_rolls)

        g, gbias, gscale, gshift = _fused._epilogue_backward(ctx, grad, y, recompute_z)
        gx = gx2 = gw = None
        if nig[0] or nig[1]:
            size = [x.shape[0], x.shape[1] + x2.shape[1]] + list(x.shape[2:])
            gxc = _fused._call(torch.ops.medconv.rolling_conv_spectral_grad_input.default,
                               g, weight, size, stride, padding, dilation, n_rolls)
            gx, gx2 = gxc.split([ctx.c1, x2.shape[1]], dim=1)
        if nig[2]:
            if any(padding) and not _grad_finite(g):
                # as the single-input op: a NaN/Inf gradient at an output whose tap reads padding (torch multiplies it)
                xc = torch.cat([x, x2], 1)
                with torch.enable_grad():
                    w_ = weight.detach().requires_grad_(True)
                    gw = torch.autograd.grad(rolling_conv_spectral(xc.detach(), w_, None, stride, padding, dilation,
                                                                   n_rolls), w_, g)[0]
            else:  # x and x2 read in place
                gw = _fused._call(torch.ops.medconv.rolling_conv_spectral_cat_grad_weight.default,
                                  g, x, x2, list(weight.shape), stride, padding, dilation, n_rolls)
        return gx, gx2, gw, gbias, gscale, gshift, None, None, None, None, None

    torch.library.register_autograd(_OPNAME, _backward, setup_context=_setup)

    # double backward: the weight gradient is bilinear in (grad_out, cat([x, x2])) (_common.register_grad_op_autograd)
    def _setup_gw(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])
        ctx.params = tuple(inputs[4:])

    def _backward_gw(ctx, u):
        g, x, x2 = ctx.saved_tensors
        s, p, d, n = ctx.params
        nig = ctx.needs_input_grad
        dg = dx = dx2 = None
        if nig[0]:
            dg = torch.ops.medconv.rolling_conv_spectral_cat(x, x2, u, None, None, None, False, s, p, d, n)
        if nig[1] or nig[2]:
            size = [x.shape[0], x.shape[1] + x2.shape[1]] + list(x.shape[2:])
            dx, dx2 = torch.ops.medconv.rolling_conv_spectral_grad_input(g, u, size, s, p, d, n).split(
                [x.shape[1], x2.shape[1]], dim=1)
        return dg, dx, dx2, None, None, None, None, None

    torch.library.register_autograd(_OPNAME + "_grad_weight", _backward_gw, setup_context=_setup_gw)

    # eager training's path: the registered setup and backward without torch.library's per-call Python layer
    _RollingConvSpectralCatFunction = make_eager_function(
        "_RollingConvSpectralCatFunction", torch.ops.medconv.rolling_conv_spectral_cat.default, _setup, _backward)


def _in_place_ok(x: torch.Tensor, x2: torch.Tensor) -> bool:
    """Whether x and x2 can be read in place as one concatenation (else torch.cat + the ordinary op runs,
    which also reports any mismatch with torch.cat's own error)."""
    return (isinstance(x, torch.Tensor) and isinstance(x2, torch.Tensor) and x.dim() in (4, 5)
            and x2.dim() == x.dim() and x.dtype == x2.dtype and x.device == x2.device and x.device.type == "cpu"
            and x.shape[0] == x2.shape[0] and x.shape[2:] == x2.shape[2:]
            and not torch.is_autocast_enabled("cpu"))


def rolling_conv_cat(x: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     stride=1, padding=0, dilation=1, n_rolls=None, backend: str = "auto", *,
                     scale=None, shift=None, relu: bool = False) -> torch.Tensor:
    """rolling_conv2d (4-D x) or rolling_conv3d (5-D x) of torch.cat([x, x2], 1), with the same arguments,
    epilogue and result. Where the fused spectral CPU kernel runs the layer, x and x2 are read in place
    (no concatenated copy); otherwise torch.cat runs first. The output has x's memory format."""
    dims = x.dim() - 2 if isinstance(x, torch.Tensor) else 0
    fn = rolling_conv3d if dims == 3 else rolling_conv2d
    if not (available() and _in_place_ok(x, x2)) or autodiff_transform_active():
        return fn(torch.cat([x, x2], 1), weight, bias, stride, padding, dilation, n_rolls, backend,
                  scale=scale, shift=shift, relu=relu)
    name = "rolling_conv_cat"
    # A stand-in of the concatenation for the checks and the backend choice: its shape, dtype, device, x's
    # memory format (the auto rule reads the layout) and whether a gradient flows to it (the rule reads that
    # too; torch.compile cannot trace a tensor created with requires_grad, so there the rule sees the weight's
    # alone). Never written, so its pages are never touched.
    xc = torch.empty((x.shape[0], x.shape[1] + x2.shape[1]) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device,
                     memory_format=_fused.out_memory_format(x))
    if (x.requires_grad or x2.requires_grad) and not torch.compiler.is_compiling():
        xc.requires_grad_(True)
    stride, padding, dilation, n_rolls, c_out = _check_common(
        name, xc, weight, bias, dims, stride, padding, dilation, n_rolls, transposed=False)
    check_kernel_fits(xc.shape[2:], weight.shape[2:], padding, dilation, name)
    check_epilogue(name, xc, c_out, scale, shift, relu)
    kernel, _ = _choose_kernel(OP, xc, weight, backend, False, n_rolls)
    if (kernel is not _fused.rolling_conv_spectral_cpu or x.shape[0] == 0
            or not _fused._weight_finite(weight) or not _fused._kernel_epilogue_exact(bias, scale)):
        return fn(torch.cat([x, x2], 1), weight, bias, stride, padding, dilation, n_rolls, backend,
                  scale=scale, shift=shift, relu=relu)
    args = (x, x2, weight, bias, scale, shift, bool(relu), list(stride), list(padding), list(dilation), n_rolls)
    return _fused.run_fused_op(torch.ops.medconv.rolling_conv_spectral_cat.default, _RollingConvSpectralCatFunction,
                               args, (x, x2, weight, bias, scale, shift))
