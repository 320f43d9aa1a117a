"""Backend "triton" of rolling convolution: the Triton kernels of medconv_ext.triton_kernels.rolling_conv
wrapped as torch.library custom ops (fake kernels and autograd registered, so they trace under
torch.compile), and registered in the backend registry for "rolling_conv" and "rolling_conv_transpose".

Custom ops (the same argument lists as the compiled ops in csrc/ops.cpp):
    medconv::rolling_conv_triton, medconv::rolling_conv_triton_grad_input, medconv::rolling_conv_triton_grad_weight
    medconv::rolling_conv_transpose_triton, ..._grad_input, ..._grad_weight
The mapping of the six ops onto the two generic kernels mirrors csrc/cuda/rolling_conv.cu line by line
(the table at the top of that file), so the CPU tests of this path (TRITON_INTERPRET=1) also check the
index plan the CUDA kernels use.

Runs on CUDA tensors (float32, float16, bfloat16; float32 accumulation), and on CPU tensors only under
TRITON_INTERPRET=1 (slow: tests only). The triton import is deferred to the first call, so importing
medconv_ext never imports triton. Double backward is not supported (the grad ops have no autograd).
"""
import contextlib
import os
from typing import List, Optional

import torch
from torch import Tensor

from ..backends import register_impl
from ._common import (conv_out_size, conv_transpose_out_size, make_rolling_backward, make_rolling_setup,
                      register_grad_op_autograd, rolling_out_shape)

OP = "rolling_conv"
OP_T = "rolling_conv_transpose"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    from ..triton_kernels import rolling_conv as k  # imports triton on first use

    return k


def _check_device(name: str, t: Tensor) -> None:
    if t.device.type == "cuda":
        pass
    elif t.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("%s: CPU tensors run only in Triton interpreter mode (TRITON_INTERPRET=1); got a CPU "
                               "tensor without it" % name)
    else:
        raise RuntimeError("%s: runs on CUDA tensors, got a tensor on %s" % (name, t.device))
    if t.dtype not in TRITON_DTYPES:
        raise TypeError("%s: dtype %s is not supported (supported: %s)" % (name, t.dtype, ", ".join(map(str, TRITON_DTYPES))))


def device_guard(t: Tensor):
    """Makes t's GPU the current device while a kernel launches: Triton launches on the current device,
    which for a tensor on another GPU (cuda:1 while cuda:0 is current) would read foreign memory."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# the six ops: the same mapping as csrc/cuda/rolling_conv.cu
# --------------------------------------------------------------------------------------
@torch.library.custom_op("medconv::rolling_conv_triton", mutates_args=())
def rolling_conv_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                        dilation: List[int], n_rolls: int) -> Tensor:
    _check_device("rolling_conv_triton", x)
    k = _kernels()
    x, weight = x.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    hi = list(x.shape[2:])
    lo = [conv_out_size(n, kk, s, p, d) for n, kk, s, p, d in zip(hi, weight.shape[2:], stride, padding, dilation)]
    g = k.make_geom(lo, hi, weight.shape[2:], stride, padding, dilation)
    rw = k.make_rollw(weight.shape, False, n_rolls)
    out = torch.empty((x.shape[0], n_rolls * rw.nb, *lo), dtype=x.dtype, device=x.device)
    with device_guard(x):
        return k.rolling_gemm(out, x, weight, bias, g, rw, a_is_roll=True, inverse=False)


@torch.library.custom_op("medconv::rolling_conv_triton_grad_input", mutates_args=())
def rolling_conv_triton_grad_input(grad_out: Tensor, weight: Tensor, input_size: List[int], stride: List[int],
                                   padding: List[int], dilation: List[int], n_rolls: int) -> Tensor:
    _check_device("rolling_conv_triton_grad_input", grad_out)
    k = _kernels()
    grad_out, weight = grad_out.contiguous(), weight.contiguous()
    g = k.make_geom(grad_out.shape[2:], input_size[2:], weight.shape[2:], stride, padding, dilation)
    rw = k.make_rollw(weight.shape, False, n_rolls)
    gx = torch.empty(input_size, dtype=grad_out.dtype, device=grad_out.device)
    with device_guard(grad_out):
        return k.rolling_gemm(gx, grad_out, weight, None, g, rw, a_is_roll=False, inverse=True)


@torch.library.custom_op("medconv::rolling_conv_triton_grad_weight", mutates_args=())
def rolling_conv_triton_grad_weight(grad_out: Tensor, x: Tensor, weight_size: List[int], stride: List[int],
                                    padding: List[int], dilation: List[int], n_rolls: int) -> Tensor:
    _check_device("rolling_conv_triton_grad_weight", x)
    k = _kernels()
    grad_out, x = grad_out.contiguous(), x.contiguous()
    g = k.make_geom(grad_out.shape[2:], x.shape[2:], weight_size[2:], stride, padding, dilation)
    rw = k.make_rollw(weight_size, False, n_rolls)
    with device_guard(x):
        return k.rolling_grad_weight(weight_size, grad_out, x, g, rw, roll_is_lo=True)


@torch.library.custom_op("medconv::rolling_conv_transpose_triton", mutates_args=())
def rolling_conv_transpose_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                                  padding: List[int], output_padding: List[int], dilation: List[int],
                                  n_rolls: int) -> Tensor:
    _check_device("rolling_conv_transpose_triton", x)
    k = _kernels()
    x, weight = x.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    lo = list(x.shape[2:])
    hi = [conv_transpose_out_size(n, kk, s, p, o, d)
          for n, kk, s, p, o, d in zip(lo, weight.shape[2:], stride, padding, output_padding, dilation)]
    g = k.make_geom(lo, hi, weight.shape[2:], stride, padding, dilation)
    rw = k.make_rollw(weight.shape, True, n_rolls)
    out = torch.empty((x.shape[0], n_rolls * rw.nb, *hi), dtype=x.dtype, device=x.device)
    with device_guard(x):
        return k.rolling_gemm(out, x, weight, bias, g, rw, a_is_roll=True, inverse=True)


@torch.library.custom_op("medconv::rolling_conv_transpose_triton_grad_input", mutates_args=())
def rolling_conv_transpose_triton_grad_input(grad_out: Tensor, weight: Tensor, input_size: List[int],
                                             stride: List[int], padding: List[int], dilation: List[int],
                                             n_rolls: int) -> Tensor:
    _check_device("rolling_conv_transpose_triton_grad_input", grad_out)
    k = _kernels()
    grad_out, weight = grad_out.contiguous(), weight.contiguous()
    g = k.make_geom(input_size[2:], grad_out.shape[2:], weight.shape[2:], stride, padding, dilation)
    rw = k.make_rollw(weight.shape, True, n_rolls)
    gx = torch.empty(input_size, dtype=grad_out.dtype, device=grad_out.device)
    with device_guard(grad_out):
        return k.rolling_gemm(gx, grad_out, weight, None, g, rw, a_is_roll=False, inverse=False)


@torch.library.custom_op("medconv::rolling_conv_transpose_triton_grad_weight", mutates_args=())
def rolling_conv_transpose_triton_grad_weight(grad_out: Tensor, x: Tensor, weight_size: List[int],
                                              stride: List[int], padding: List[int], dilation: List[int],
                                              n_rolls: int) -> Tensor:
    _check_device("rolling_conv_transpose_triton_grad_weight", x)
    k = _kernels()
    grad_out, x = grad_out.contiguous(), x.contiguous()
    g = k.make_geom(x.shape[2:], grad_out.shape[2:], weight_size[2:], stride, padding, dilation)
    rw = k.make_rollw(weight_size, True, n_rolls)
    with device_guard(x):
        return k.rolling_grad_weight(weight_size, grad_out, x, g, rw, roll_is_lo=False)


# --------------------------------------------------------------------------------------
# fake kernels (shapes only)
# --------------------------------------------------------------------------------------
@rolling_conv_triton.register_fake
def _(x, weight, bias, stride, padding, dilation, n_rolls):
    return x.new_empty(rolling_out_shape(x.shape, weight.shape, stride, padding, dilation, n_rolls))


@rolling_conv_transpose_triton.register_fake
def _(x, weight, bias, stride, padding, output_padding, dilation, n_rolls):
    return x.new_empty(rolling_out_shape(x.shape, weight.shape, stride, padding, dilation, n_rolls, True, output_padding))


for _op in (rolling_conv_triton_grad_input, rolling_conv_transpose_triton_grad_input):
    _op.register_fake(lambda grad_out, weight, input_size, stride, padding, dilation, n_rolls: grad_out.new_empty(input_size))
for _op in (rolling_conv_triton_grad_weight, rolling_conv_transpose_triton_grad_weight):
    _op.register_fake(lambda grad_out, x, weight_size, stride, padding, dilation, n_rolls: grad_out.new_empty(weight_size))


# --------------------------------------------------------------------------------------
# autograd (paper eq. 7 and 8 through the grad kernels; bias grad is a torch sum)
# --------------------------------------------------------------------------------------
rolling_conv_triton.register_autograd(
    make_rolling_backward(rolling_conv_triton_grad_input, rolling_conv_triton_grad_weight, 4),
    setup_context=make_rolling_setup(3))
rolling_conv_transpose_triton.register_autograd(
    make_rolling_backward(rolling_conv_transpose_triton_grad_input, rolling_conv_transpose_triton_grad_weight, 5),
    setup_context=make_rolling_setup(3))
# double backward (gradients of the gradient ops: _common.register_grad_op_autograd)
register_grad_op_autograd(
    "medconv::rolling_conv_triton_grad_input", "medconv::rolling_conv_triton_grad_weight",
    lambda x, w, s, p, op, d, n: rolling_conv_triton(x, w, None, s, p, d, n),
    rolling_conv_triton_grad_input, rolling_conv_triton_grad_weight, False)
register_grad_op_autograd(
    "medconv::rolling_conv_transpose_triton_grad_input", "medconv::rolling_conv_transpose_triton_grad_weight",
    lambda x, w, s, p, op, d, n: rolling_conv_transpose_triton(x, w, None, s, p, op, d, n),
    rolling_conv_transpose_triton_grad_input, rolling_conv_transpose_triton_grad_weight, True)


# --------------------------------------------------------------------------------------
# backend registry
# --------------------------------------------------------------------------------------
def _supports(device, dtype, **ctx) -> Optional[str]:
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "CPU tensors run only in Triton interpreter mode (TRITON_INTERPRET=1)"
    elif device.type != "cuda":
        return "it runs on CUDA tensors, the input is on %s" % device
    if dtype not in TRITON_DTYPES:
        return "dtype %s is not supported (supported: %s)" % (dtype, ", ".join(str(d) for d in TRITON_DTYPES))
    return None


def _conv(x, weight, bias, stride, padding, dilation, n_rolls):
    return rolling_conv_triton(x, weight, bias, list(stride), list(padding), list(dilation), n_rolls)


def _conv_t(x, weight, bias, stride, padding, output_padding, dilation, n_rolls):
    return rolling_conv_transpose_triton(x, weight, bias, list(stride), list(padding), list(output_padding),
                                         list(dilation), n_rolls)


register_impl(OP, "triton", _conv, _supports)
register_impl(OP_T, "triton", _conv_t, _supports)
