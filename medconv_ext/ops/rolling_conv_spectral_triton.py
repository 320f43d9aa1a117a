"""The fused spectral rolling convolution on CUDA: the Triton kernels of
medconv_ext.triton_kernels.rolling_conv_spectral wrapped as torch.library custom ops (fake kernels and
autograd registered, so they trace under torch.compile), and registered as the fused kernel of the
"spectral" backend for CUDA tensors (backends.register_fused, at the end of this module).

Custom ops:
    medconv::rolling_conv_spectral_triton(x, weight, bias, scale, shift, relu, stride, padding, dilation, n_rolls)
    medconv::rolling_conv_spectral_triton_grad_input(grad_out, weight, input_size, stride, padding, dilation, n_rolls)
    medconv::rolling_conv_spectral_triton_grad_weight(grad_out, x, weight_size, stride, padding, dilation, n_rolls)
    medconv::rolling_conv_transpose_spectral_triton(x, weight, bias, scale, shift, relu, stride, padding,
                                                    output_padding, dilation, n_rolls)
    medconv::rolling_conv_transpose_spectral_triton_grad_input / _grad_weight (as above)
    medconv::rolling_conv_spectral_triton_backward(grad_out, x, weight, stride, padding, dilation, n_rolls)
        -> (grad_input, grad_weight), sharing the grad spectrum (used by autograd when both are needed);
        medconv::rolling_conv_transpose_spectral_triton_backward likewise
The epilogue y = relu((conv + bias) * scale + shift) (scale, shift per output channel, each optional)
runs inside the kernel. Its gradient is not: when autograd needs gradients and an epilogue is asked for,
the wrapper runs the kernel without it and applies it with torch ops.

Runs on CUDA tensors (float32, float16, bfloat16; float32 accumulation), and on CPU tensors only under
TRITON_INTERPRET=1 (slow: tests only). Importing this module never imports triton.
"""
import functools
import math
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ._common import (apply_epilogue, conv_out_size, conv_transpose_out_size, make_rolling_backward,
                      make_rolling_setup, register_grad_op_autograd, rolling_out_shape)
from ..backends import register_fused
from .rolling_conv_spectral import OP, OP_T
from .rolling_conv_triton import device_guard

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_16BIT = (torch.float16, torch.bfloat16)


def _kernels():
    from ..triton_kernels import rolling_conv_spectral as k  # imports triton on first use

    return k


def _geom(lo, hi, k, stride, padding, dilation):
    from ..triton_kernels.rolling_conv import make_geom

    return make_geom(lo, hi, k, stride, padding, dilation)


def _check(name: str, t: Tensor) -> None:
    if t.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("%s: CPU tensors run only in Triton interpreter mode (TRITON_INTERPRET=1)" % name)
    elif t.device.type != "cuda":
        raise RuntimeError("%s: runs on CUDA tensors, got a tensor on %s" % (name, t.device))
    if t.dtype not in DTYPES:
        raise TypeError("%s: dtype %s is not supported (supported: %s)" % (name, t.dtype, ", ".join(map(str, DTYPES))))


# ---- transform matrices, cached per (C, rows, device, dtype) ----
_CACHE: Dict[Tuple, Tensor] = {}


def _cached(key, make):
    m = _CACHE.get(key)
    if m is None:
        with torch.inference_mode(False):
            m = _CACHE[key] = make()
    return m


def _dft(c, device, dtype):
    """The forward channel DFT for inputs of `dtype`: float32 (C, 2F), or for 16-bit inputs its hi/lo split
    (2, C, 2F) in that dtype (triton_kernels.rolling_conv_spectral.split16: two native 16-bit dots as accurate
    as a float32 matrix; a matrix rounded once to 16 bits put grad_weight outside the 16-bit tolerances)."""
    def make():
        m = _kernels().dft_matrix(c, device, torch.float32).contiguous()
        return _kernels().split16(m, dtype) if dtype in _16BIT else m
    return _cached(("D", c, str(device), dtype), make)


def _dft_t(c, device):
    return _cached(("DT", c, str(device)), lambda: _kernels().dft_matrix(c, device).t().contiguous())


def _inv(c, n_rolls, device):
    return _cached(("I", c, n_rolls, str(device)), lambda: _kernels().inverse_matrix(c, n_rolls, device).contiguous())


def _inv_t(c, n_rolls, device, dtype):
    """The adjoint of the inverse transform (n_rolls, 2F): float32, or its hi/lo split for 16-bit grads."""
    def make():
        m = _kernels().inverse_matrix(c, n_rolls, device).t().contiguous()
        return _kernels().split16(m, dtype) if dtype in _16BIT else m
    return _cached(("IT", c, n_rolls, str(device), dtype), make)


def _base(weight: Tensor, transposed: bool) -> Tensor:
    """The base as (n_base, C, *k) (the transposed layer's base is (C, n_base, *k))."""
    return weight.transpose(0, 1) if transposed else weight


def _vec(t: Optional[Tensor], c_out: int, name: str) -> Optional[Tensor]:
    if t is None:
        return None
    if t.dim() != 1 or t.shape[0] != c_out:
        raise ValueError("rolling_conv_spectral_triton: %s must have shape (%d,), got %s" % (name, c_out, tuple(t.shape)))
    return t.contiguous()


# ---- implementations shared by the plain and the transposed ops ----
def _forward(x, weight, bias, scale, shift, relu, stride, padding, output_padding, dilation, n_rolls, transposed):
    k = _kernels()
    x = x.contiguous()
    base = _base(weight, transposed)
    nb, c = base.shape[0], base.shape[1]
    ks = list(base.shape[2:])
    if transposed:
        lo = list(x.shape[2:])
        hi = [conv_transpose_out_size(n, kk, s, p, o, d)
              for n, kk, s, p, o, d in zip(lo, ks, stride, padding, output_padding, dilation)]
        out_sp = hi
    else:
        hi = list(x.shape[2:])
        lo = [conv_out_size(n, kk, s, p, d) for n, kk, s, p, d in zip(hi, ks, stride, padding, dilation)]
        out_sp = lo
    c_out = n_rolls * nb
    out = torch.empty((x.shape[0], c_out, *out_sp), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if x.numel() == 0:
        return out.zero_()
    g = _geom(lo, hi, ks, stride, padding, dilation)
    with device_guard(x):
        spec = k.channel_transform(x, _dft(c, x.device, x.dtype), 1, 1)
        coef = k.forward_coef(k.weight_spectrum(base))
        k.spectral_mix(out, spec, coef, _inv(c, n_rolls, x.device), g, inverse=transposed,
                       bias=_vec(bias, c_out, "bias"), scale=_vec(scale, c_out, "scale"),
                       shift=_vec(shift, c_out, "shift"), relu=relu)
    return out


def _grad_geom(grad_out, other_size, ks, stride, padding, dilation, transposed):
    if transposed:  # x on the lo grid, grad_out on the hi grid
        return _geom(other_size, grad_out.shape[2:], ks, stride, padding, dilation)
    return _geom(grad_out.shape[2:], other_size, ks, stride, padding, dilation)


def _grad_spectrum(k, gy, c, nb, n_rolls):
    """(N, n_base, P, 2F): the adjoint of the inverse transform applied to grad_out rows r*n_base + b."""
    return k.channel_transform(gy, _inv_t(c, n_rolls, gy.device, gy.dtype), nb, nb)


def _grad_input(grad_out, weight, input_size, stride, padding, dilation, n_rolls, transposed, gspec=None):
    k = _kernels()
    gy = grad_out.contiguous()
    base = _base(weight, transposed)
    nb, c = base.shape[0], base.shape[1]
    gx = torch.empty(list(input_size), dtype=gy.dtype, device=gy.device)
    if gx.numel() == 0:
        return gx
    if gy.numel() == 0:
        return gx.zero_()
    g = _grad_geom(gy, list(input_size[2:]), list(base.shape[2:]), stride, padding, dilation, transposed)
    with device_guard(gy):
        if gspec is None:
            gspec = _grad_spectrum(k, gy, c, nb, n_rolls)
        coef = k.adjoint_coef(k.weight_spectrum(base))
        k.spectral_mix(gx, gspec, coef, _dft_t(c, gy.device), g, inverse=not transposed)
    return gx


def _grad_weight(grad_out, x, weight_size, stride, padding, dilation, n_rolls, transposed, gspec=None):
    k = _kernels()
    gy, x = grad_out.contiguous(), x.contiguous()
    c = x.shape[1]
    nb = weight_size[1] if transposed else weight_size[0]
    ks = list(weight_size[2:])
    T = math.prod(ks)
    if gy.numel() == 0 or x.numel() == 0:
        return torch.zeros(list(weight_size), dtype=x.dtype, device=x.device)
    g = _grad_geom(gy, list(x.shape[2:]), ks, stride, padding, dilation, transposed)
    with device_guard(x):
        xspec = k.channel_transform(x, _dft(c, x.device, x.dtype), 1, 1)
        if gspec is None:
            gspec = _grad_spectrum(k, gy, c, nb, n_rolls)
        part = k.spectral_grad_weight(gspec, xspec, g, T, g_is_lo=not transposed)  # (nb, T, 2F)
        # back to the base: w -> rfft(w) is x . D along C, so its adjoint is D applied to [dL/da, dL/db]
        gw = torch.einsum("ck,btk->bct", _dft(c, x.device, torch.float32), part)  # (nb, C, T)
    gw = gw.reshape(nb, c, *ks)
    if transposed:
        gw = gw.transpose(0, 1)
    return gw.contiguous().to(x.dtype)


def _backward(grad_out, x, weight, stride, padding, dilation, n_rolls, transposed):
    """Both gradients, the grad spectrum G (one pass over grad_out) computed once for the two."""
    gy = grad_out.contiguous()
    base = _base(weight, transposed)
    gspec = None
    if gy.numel() > 0 and x.numel() > 0:
        with device_guard(gy):
            gspec = _grad_spectrum(_kernels(), gy, base.shape[1], base.shape[0], n_rolls)
    gx = _grad_input(gy, weight, list(x.shape), stride, padding, dilation, n_rolls, transposed, gspec)
    gw = _grad_weight(gy, x, list(weight.shape), stride, padding, dilation, n_rolls, transposed, gspec)
    return gx, gw


# ---- the custom ops ----
@torch.library.custom_op("medconv::rolling_conv_spectral_triton", mutates_args=())
def rolling_conv_spectral_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                                 shift: Optional[Tensor], relu: bool, stride: List[int], padding: List[int],
                                 dilation: List[int], n_rolls: int) -> Tensor:
    _check("rolling_conv_spectral_triton", x)
    return _forward(x, weight, bias, scale, shift, relu, stride, padding, None, dilation, n_rolls, False)


@torch.library.custom_op("medconv::rolling_conv_spectral_triton_grad_input", mutates_args=())
def rolling_conv_spectral_triton_grad_input(grad_out: Tensor, weight: Tensor, input_size: List[int],
                                            stride: List[int], padding: List[int], dilation: List[int],
                                            n_rolls: int) -> Tensor:
    _check("rolling_conv_spectral_triton_grad_input", grad_out)
    return _grad_input(grad_out, weight, input_size, stride, padding, dilation, n_rolls, False)


@torch.library.custom_op("medconv::rolling_conv_spectral_triton_grad_weight", mutates_args=())
def rolling_conv_spectral_triton_grad_weight(grad_out: Tensor, x: Tensor, weight_size: List[int],
                                             stride: List[int], padding: List[int], dilation: List[int],
                                             n_rolls: int) -> Tensor:
    _check("rolling_conv_spectral_triton_grad_weight", x)
    return _grad_weight(grad_out, x, weight_size, stride, padding, dilation, n_rolls, False)


@torch.library.custom_op("medconv::rolling_conv_transpose_spectral_triton", mutates_args=())
def rolling_conv_transpose_spectral_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                                           shift: Optional[Tensor], relu: bool, stride: List[int],
                                           padding: List[int], output_padding: List[int], dilation: List[int],
                                           n_rolls: int) -> Tensor:
    _check("rolling_conv_transpose_spectral_triton", x)
    return _forward(x, weight, bias, scale, shift, relu, stride, padding, output_padding, dilation, n_rolls, True)


@torch.library.custom_op("medconv::rolling_conv_transpose_spectral_triton_grad_input", mutates_args=())
def rolling_conv_transpose_spectral_triton_grad_input(grad_out: Tensor, weight: Tensor, input_size: List[int],
                                                      stride: List[int], padding: List[int], dilation: List[int],
                                                      n_rolls: int) -> Tensor:
    _check("rolling_conv_transpose_spectral_triton_grad_input", grad_out)
    return _grad_input(grad_out, weight, input_size, stride, padding, dilation, n_rolls, True)


@torch.library.custom_op("medconv::rolling_conv_transpose_spectral_triton_grad_weight", mutates_args=())
def rolling_conv_transpose_spectral_triton_grad_weight(grad_out: Tensor, x: Tensor, weight_size: List[int],
                                                       stride: List[int], padding: List[int], dilation: List[int],
                                                       n_rolls: int) -> Tensor:
    _check("rolling_conv_transpose_spectral_triton_grad_weight", x)
    return _grad_weight(grad_out, x, weight_size, stride, padding, dilation, n_rolls, True)


@torch.library.custom_op("medconv::rolling_conv_spectral_triton_backward", mutates_args=())
def rolling_conv_spectral_triton_backward(grad_out: Tensor, x: Tensor, weight: Tensor, stride: List[int],
                                          padding: List[int], dilation: List[int],
                                          n_rolls: int) -> Tuple[Tensor, Tensor]:
    """(grad_input, grad_weight) sharing the grad spectrum."""
    _check("rolling_conv_spectral_triton_backward", x)
    return _backward(grad_out, x, weight, stride, padding, dilation, n_rolls, False)


@torch.library.custom_op("medconv::rolling_conv_transpose_spectral_triton_backward", mutates_args=())
def rolling_conv_transpose_spectral_triton_backward(grad_out: Tensor, x: Tensor, weight: Tensor, stride: List[int],
                                                    padding: List[int], dilation: List[int],
                                                    n_rolls: int) -> Tuple[Tensor, Tensor]:
    _check("rolling_conv_transpose_spectral_triton_backward", x)
    return _backward(grad_out, x, weight, stride, padding, dilation, n_rolls, True)


# ---- fake kernels (shapes only) ----
@rolling_conv_spectral_triton.register_fake
def _(x, weight, bias, scale, shift, relu, stride, padding, dilation, n_rolls):
    return x.new_empty(rolling_out_shape(x.shape, weight.shape, stride, padding, dilation, n_rolls))


@rolling_conv_transpose_spectral_triton.register_fake
def _(x, weight, bias, scale, shift, relu, stride, padding, output_padding, dilation, n_rolls):
    return x.new_empty(rolling_out_shape(x.shape, weight.shape, stride, padding, dilation, n_rolls, True, output_padding))


for _op in (rolling_conv_spectral_triton_grad_input, rolling_conv_transpose_spectral_triton_grad_input):
    _op.register_fake(lambda grad_out, weight, input_size, stride, padding, dilation, n_rolls: grad_out.new_empty(input_size))
for _op in (rolling_conv_spectral_triton_grad_weight, rolling_conv_transpose_spectral_triton_grad_weight):
    _op.register_fake(lambda grad_out, x, weight_size, stride, padding, dilation, n_rolls: x.new_empty(weight_size))
for _op in (rolling_conv_spectral_triton_backward, rolling_conv_transpose_spectral_triton_backward):
    _op.register_fake(lambda grad_out, x, weight, stride, padding, dilation, n_rolls:
                      (x.new_empty(x.shape), x.new_empty(weight.shape)))


# ---- autograd: grad_input and grad_weight kernels (one shared op when both are needed); bias grad a torch sum.
# The gradient does not go through a fused epilogue (the entry points below apply it with torch ops then).
rolling_conv_spectral_triton.register_autograd(
    make_rolling_backward(rolling_conv_spectral_triton_grad_input, rolling_conv_spectral_triton_grad_weight, 7,
                          rolling_conv_spectral_triton_backward, "rolling_conv_spectral_triton"),
    setup_context=make_rolling_setup(6, epilogue=True))
rolling_conv_transpose_spectral_triton.register_autograd(
    make_rolling_backward(rolling_conv_transpose_spectral_triton_grad_input,
                          rolling_conv_transpose_spectral_triton_grad_weight, 8,
                          rolling_conv_transpose_spectral_triton_backward, "rolling_conv_transpose_spectral_triton"),
    setup_context=make_rolling_setup(6, epilogue=True))
# double backward (gradients of the gradient ops: _common.register_grad_op_autograd)
register_grad_op_autograd(
    "medconv::rolling_conv_spectral_triton_grad_input", "medconv::rolling_conv_spectral_triton_grad_weight",
    lambda x, w, s, p, op, d, n: rolling_conv_spectral_triton(x, w, None, None, None, False, s, p, d, n),
    rolling_conv_spectral_triton_grad_input, rolling_conv_spectral_triton_grad_weight, False,
    "medconv::rolling_conv_spectral_triton_backward")
register_grad_op_autograd(
    "medconv::rolling_conv_transpose_spectral_triton_grad_input",
    "medconv::rolling_conv_transpose_spectral_triton_grad_weight",
    lambda x, w, s, p, op, d, n: rolling_conv_transpose_spectral_triton(x, w, None, None, None, False, s, p, op, d, n),
    rolling_conv_transpose_spectral_triton_grad_input, rolling_conv_transpose_spectral_triton_grad_weight, True,
    "medconv::rolling_conv_transpose_spectral_triton_backward")


# ---- the entry points registered with the "spectral" backend ----
def _wants_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def conv(x, weight, bias, stride, padding, dilation, n_rolls, *, scale=None, shift=None, relu=False):
    """Same arguments as rolling_conv_spectral (plus the epilogue), by the fused Triton kernels."""
    args = (list(stride), list(padding), list(dilation), int(n_rolls))
    if (scale is not None or shift is not None or relu) and _wants_grad(x, weight, bias, scale, shift):
        y = rolling_conv_spectral_triton(x, weight, bias, None, None, False, *args)
        return apply_epilogue(y, scale, shift, relu)
    return rolling_conv_spectral_triton(x, weight, bias, scale, shift, bool(relu), *args)


def conv_transpose(x, weight, bias, stride, padding, output_padding, dilation, n_rolls, *, scale=None, shift=None,
                   relu=False):
    """Same arguments as rolling_conv_transpose_spectral (plus the epilogue), by the fused Triton kernels."""
    args = (list(stride), list(padding), list(output_padding), list(dilation), int(n_rolls))
    if (scale is not None or shift is not None or relu) and _wants_grad(x, weight, bias, scale, shift):
        y = rolling_conv_transpose_spectral_triton(x, weight, bias, None, None, False, *args)
        return apply_epilogue(y, scale, shift, relu)
    return rolling_conv_transpose_spectral_triton(x, weight, bias, scale, shift, bool(relu), *args)


def supports(x: Tensor, weight: Tensor, transposed: bool) -> Optional[str]:
    """None when the fused kernel runs this input, else the reason (the composition runs it then)."""
    from ..backends import available_backends

    ok, why = available_backends()["triton"]
    if not ok:
        return "triton is not available: %s" % why
    if x.device.type != "cuda" and not (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return "it runs on CUDA tensors, the input is on %s" % x.device
    if x.dtype not in DTYPES:
        return "dtype %s is not supported (supported: %s)" % (x.dtype, ", ".join(str(d) for d in DTYPES))
    if x.dim() not in (4, 5):
        return "2D and 3D only (input of %d dims)" % x.dim()
    if x.numel() == 0:
        return "empty input"
    return None


# ---- the operation-count model of the fused kernel (documentation only) ----
# NOT the CUDA `auto` rule: that rule follows GPU measurements only (ops/_cuda_auto.py). The count ignores
# memory traffic (the float32 spectrum of 2D C=256 at 128^2, N=8 is ~135 MB, more than an H100's L2) and
# weights the dense float32 conv at the FMA rate, while cuDNN runs it in TF32 by default
# (torch.backends.cudnn.allow_tf32), where the predicted 10x of 2D 3x3 C=256 falls to ~1.4x.
# Relative cost of one multiply-add, in units of a bfloat16 tensor-core multiply-add, from the H100/H200
# SXM peak rates (dense): bf16 tensor cores 990 TFLOP/s, TF32 495, float32 FMA 67 (and tf32x3 is three
# TF32 products). cuDNN's float32 conv with TF32 off runs on the FMA units.
COST_BF16_TC, COST_TF32_TC, COST_TF32X3_TC, COST_FP32_FMA = 1.0, 2.0, 6.0, 15.0


def predicted_speedup(c_in: int, n_base: int, n_rolls: int, taps: int, dtype: torch.dtype) -> float:
    """Dense conv cost / fused spectral cost per output pixel (stride 1, weighted multiply-adds):
        dense     C_out * C_in * T                      on the tensor cores (16-bit) or FMA (float32)
        spectral  C_in * 2F          (channel DFT GEMM)     16-bit: native dot; float32: tf32x3
                + n_base * 2F * n_rolls (inverse GEMM)  TF32 (16-bit) or tf32x3 (float32)
                + n_base * 4F * T    (complex depthwise)    FMA units, float32
    with F = C_in // 2 + 1 and C_out = n_rolls * n_base. Memory traffic is not in the model."""
    f2 = 2 * (c_in // 2 + 1)
    c_out = n_rolls * n_base
    dw = n_base * 2 * f2 * taps * COST_FP32_FMA
    if dtype in _16BIT:
        dense = c_out * c_in * taps * COST_BF16_TC
        spec = c_in * f2 * COST_BF16_TC + n_base * f2 * n_rolls * COST_TF32_TC + dw
    else:
        dense = c_out * c_in * taps * COST_FP32_FMA
        spec = (c_in * f2 + n_base * f2 * n_rolls) * COST_TF32X3_TC + dw
    return dense / spec


# the fused kernel of backend "spectral" on CUDA tensors, epilogue in-kernel
register_fused(OP, "spectral", "cuda", conv, functools.partial(supports, transposed=False), epilogue=True)
register_fused(OP_T, "spectral", "cuda", conv_transpose, functools.partial(supports, transposed=True), epilogue=True)
