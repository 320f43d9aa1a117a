"""Fused CPU kernels of the spectral rolling convolution (csrc/cpu/rolling_conv_spectral.cpp):
fake kernels, autograd, and their registration as the fused "spectral" backend for CPU tensors.

torch.ops.medconv.rolling_conv_spectral / rolling_conv_transpose_spectral compute
    y = relu?((rolling_conv(x, weight) + bias) * scale + shift)        (per output channel)
in one pass over the activations (channel DFT, per-frequency complex depthwise conv, inverse DFT
of the kept rolls, epilogue) and return y in channels-last memory, like the torch-op composition
in rolling_conv_spectral.py, which stays the reference of the algorithm. Their gradients are the
fused *_grad_input (the adjoint problem: same kernel, conjugate-free weights, transposed spatial
geometry) and *_grad_weight (per-frequency correlation of the transformed input and output
gradient, then the inverse transform to the base) ops.
"""
from typing import List, Optional

import torch

from .. import _ext
from ._common import apply_epilogue, conv_out_size, conv_transpose_out_size
from .rolling_conv_spectral import (_grad_finite, register_fused_spectral, rolling_conv_spectral,
                                    rolling_conv_transpose_spectral)

DTYPES = (torch.float32, torch.float64)
# The channel transforms are GEMMs (C^2/2 multiply-adds per pixel each way after folding); the
# composition's rFFT costs C log C. Measured forward, 2 threads (lightly loaded machine): fused vs
# composition 2D 3x3 C=256 at 48^2 29.9 vs 80.6 ms, 3D 5^3 C=256 at 8^3 28.0 vs 19.5 ms, 2D 3x3
# C=512 at 32^2 26.6 vs 5.9 ms. Above this C_in the "spectral" backend runs the composition.
FUSED_MAX_C = 256
_SUM_DIMS = {4: [0, 2, 3], 5: [0, 2, 3, 4]}


def available() -> bool:
    return _ext.has_compiled_ops() and hasattr(torch.ops.medconv, "rolling_conv_spectral")


def supports(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> Optional[str]:
    """None when the fused CPU kernel runs this input, else why not (the composition runs it)."""
    if x.device.type != "cpu":
        return "not a CPU tensor"
    if x.dtype not in DTYPES:
        return "dtype %s (the fused CPU kernel has float32 and float64)" % x.dtype
    if x.dim() not in (4, 5):
        return "only 2D and 3D"
    if x.shape[1] > FUSED_MAX_C:
        return "C_in = %d > %d: the composition's rFFT (C log C) beats the DFT GEMM there" % (x.shape[1], FUSED_MAX_C)
    return None


def _bshape(t: torch.Tensor, dim: int):
    return (1, -1) + (1,) * (dim - 2)


if available():
    @torch.library.register_fake("medconv::rolling_conv_spectral")
    def _(x, weight, bias, scale, shift, relu, stride, padding, dilation, n_rolls):
        out = [conv_out_size(n, k, s, p, d) for n, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.new_empty((x.shape[0], n_rolls * weight.shape[0], *out)).contiguous(memory_format=fmt)

    @torch.library.register_fake("medconv::rolling_conv_transpose_spectral")
    def _(x, weight, bias, scale, shift, relu, stride, padding, output_padding, dilation, n_rolls):
        out = [conv_transpose_out_size(n, k, s, p, o, d) for n, k, s, p, o, d in
               zip(x.shape[2:], weight.shape[2:], stride, padding, output_padding, dilation)]
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.new_empty((x.shape[0], n_rolls * weight.shape[1], *out)).contiguous(memory_format=fmt)

    def _fake_grad_input(grad_out, weight, input_size, stride, padding, dilation, n_rolls):
        fmt = torch.channels_last if grad_out.dim() == 4 else torch.channels_last_3d
        return grad_out.new_empty(input_size).contiguous(memory_format=fmt)

    def _fake_grad_weight(grad_out, x, weight_size, stride, padding, dilation, n_rolls):
        return grad_out.new_empty(weight_size)

    torch.library.register_fake("medconv::rolling_conv_spectral_grad_input")(_fake_grad_input)
    torch.library.register_fake("medconv::rolling_conv_transpose_spectral_grad_input")(_fake_grad_input)
    torch.library.register_fake("medconv::rolling_conv_spectral_grad_weight")(_fake_grad_weight)
    torch.library.register_fake("medconv::rolling_conv_transpose_spectral_grad_weight")(_fake_grad_weight)

    # ---- autograd, epilogue included ----
    # y = relu?(z * scale + shift), z = conv + bias. With relu the gradient passes where y is not <= 0 (saved y); the
    # scale gradient needs z, recomputed by the fused forward without epilogue (only when asked for).
    def _epilogue_backward(ctx, grad, y, recompute_z):
        g = grad
        if ctx.relu:  # torch.relu's backward: 0 where y <= 0, the gradient elsewhere (NaN outputs included)
            g = torch.ops.aten.threshold_backward(g, y, 0)
        dims = _SUM_DIMS[g.dim()]
        gscale = gshift = None
        if ctx.has_shift and ctx.needs_shift:
            gshift = g.sum(dim=dims)
        if ctx.has_scale:
            if ctx.needs_scale:
                gscale = (g * recompute_z()).sum(dim=dims)
            g = g * ctx.scale.view(_bshape(g, g.dim()))
        gbias = g.sum(dim=dims) if ctx.has_bias and ctx.needs_bias else None
        return g, gbias, gscale, gshift

    def _setup(ctx, inputs, output, transposed):
        if transposed:
            x, weight, bias, scale, shift, relu, stride, padding, output_padding, dilation, n_rolls = inputs
            ctx.output_padding = output_padding
        else:
            x, weight, bias, scale, shift, relu, stride, padding, dilation, n_rolls = inputs
        ctx.has_bias, ctx.has_scale, ctx.has_shift, ctx.relu = bias is not None, scale is not None, shift is not None, relu
        saved = [x, weight]
        saved.append(bias if bias is not None else x.new_empty(0))
        saved.append(scale if scale is not None else x.new_empty(0))
        saved.append(output if relu else x.new_empty(0))
        ctx.save_for_backward(*saved)
        ctx.params = (stride, padding, dilation, n_rolls)

    def _backward(ctx, grad, transposed):
        x, weight, bias, scale, y = ctx.saved_tensors
        stride, padding, dilation, n_rolls = ctx.params
        nig = ctx.needs_input_grad
        ctx.needs_bias, ctx.needs_scale, ctx.needs_shift = nig[2], nig[3], nig[4]
        ctx.scale = scale

        def recompute_z():
            b = bias if ctx.has_bias else None
            if transposed:
                return torch.ops.medconv.rolling_conv_transpose_spectral(
                    x, weight, b, None, None, False, stride, padding, ctx.output_padding, dilation, n_rolls)
            return torch.ops.medconv.rolling_conv_spectral(x, weight, b, None, None, False, stride, padding, dilation, n_rolls)

        g, gbias, gscale, gshift = _epilogue_backward(ctx, grad, y, recompute_z)
        gx = gw = None
        pre = "rolling_conv_transpose_spectral" if transposed else "rolling_conv_spectral"
        if nig[0]:
            gx = getattr(torch.ops.medconv, pre + "_grad_input")(g, weight, list(x.shape), stride, padding, dilation, n_rolls)
        if nig[1] and not transposed and any(padding) and not _grad_finite(g):
            # a NaN/Inf gradient at an output whose tap reads padding: the kernel skips the padding, torch multiplies
            # it (NaN * 0); the composition's weight gradient does too (rare: only such a gradient runs it)
            with torch.enable_grad():
                w_ = weight.detach().requires_grad_(True)
                gw = torch.autograd.grad(rolling_conv_spectral(x.detach(), w_, None, stride, padding, dilation, n_rolls),
                                         w_, g)[0]
        elif nig[1]:
            gw = getattr(torch.ops.medconv, pre + "_grad_weight")(g, x, list(weight.shape), stride, padding, dilation, n_rolls)
        rest = [None] * (6 if transposed else 5)  # relu, stride, padding, [output_padding,] dilation, n_rolls
        return (gx, gw, gbias, gscale, gshift, *rest)

    torch.library.register_autograd(
        "medconv::rolling_conv_spectral", lambda ctx, g: _backward(ctx, g, False),
        setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, False))
    torch.library.register_autograd(
        "medconv::rolling_conv_transpose_spectral", lambda ctx, g: _backward(ctx, g, True),
        setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, True))


def _kernel_epilogue_exact(bias, scale) -> bool:
    """The kernel folds the bias into the shift (z * scale + (bias * scale + shift)), which equals torch's
    (z + bias) * scale + shift, non-finite values included, except where a scale is +-Inf and the bias is
    nonzero (Inf - Inf gives NaN where torch gives +-Inf). Such an epilogue runs as torch ops after the
    kernel (never the case for a BatchNorm fold of finite parameters)."""
    if bias is None or scale is None or torch.compiler.is_compiling():
        return True
    return bool(torch.isfinite(scale).all())


def _weight_finite(weight) -> bool:
    """The kernel's inverse transform is one GEMM over all bases, whose zero entries would carry a NaN or
    Inf of one base's weight into every base's outputs (torch's dense conv keeps it in its own base's
    outputs). A non-finite weight therefore runs the composition of torch ops (same algorithm, per base)."""
    return torch.compiler.is_compiling() or bool(torch.isfinite(weight).all())


def rolling_conv_spectral_cpu(x, weight, bias, stride, padding, dilation, n_rolls,
                              scale=None, shift=None, relu=False):
    """The fused CPU kernel (backend "spectral" on CPU tensors); epilogue in-kernel."""
    if not _weight_finite(weight):
        return apply_epilogue(rolling_conv_spectral(x, weight, bias, stride, padding, dilation, n_rolls),
                              scale, shift, relu)
    if not _kernel_epilogue_exact(bias, scale):
        return apply_epilogue(rolling_conv_spectral_cpu(x, weight, bias, stride, padding, dilation, n_rolls),
                              scale, shift, relu)
    return torch.ops.medconv.rolling_conv_spectral(x, weight, bias, scale, shift, bool(relu), list(stride),
                                                   list(padding), list(dilation), n_rolls)


def rolling_conv_transpose_spectral_cpu(x, weight, bias, stride, padding, output_padding, dilation, n_rolls,
                                        scale=None, shift=None, relu=False):
    if not _weight_finite(weight):
        return apply_epilogue(rolling_conv_transpose_spectral(x, weight, bias, stride, padding, output_padding,
                                                              dilation, n_rolls), scale, shift, relu)
    if not _kernel_epilogue_exact(bias, scale):
        return apply_epilogue(rolling_conv_transpose_spectral_cpu(x, weight, bias, stride, padding, output_padding,
                                                                  dilation, n_rolls), scale, shift, relu)
    return torch.ops.medconv.rolling_conv_transpose_spectral(x, weight, bias, scale, shift, bool(relu), list(stride),
                                                             list(padding), list(output_padding), list(dilation),
                                                             n_rolls)


rolling_conv_spectral_cpu.supports_epilogue = True
rolling_conv_transpose_spectral_cpu.supports_epilogue = True

if available():
    register_fused_spectral("cpu", rolling_conv_spectral_cpu, rolling_conv_transpose_spectral_cpu, supports)
