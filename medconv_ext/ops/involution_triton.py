"""Backend "triton" of involution: the Triton kernels of medconv_ext.triton_kernels.involution,
wrapped as torch.library custom ops so they trace under torch.compile and have autograd:

    medconv::involution_triton(x, weight, kernel_size, stride, padding, dilation) -> out
    medconv::involution_triton_grad_input(grad_out, weight, input_size, kernel_size, stride, padding, dilation)
    medconv::involution_triton_grad_weight(grad_out, x, kernel_size, stride, padding, dilation, groups)

Registered for the registry op "involution" (2D and 3D; dims from x.dim()) with
`fn(x, weight, kernel_size, stride, padding, dilation)`. Runs on CUDA tensors (float32, float16,
bfloat16 with float32 accumulation; float64 too, for gradcheck), and on CPU tensors only under
TRITON_INTERPRET=1 (slow: tests only). Importing this module never imports triton: the kernels
are imported on first use, and the backend registry reports triton's absence with its reason.
"""
import os
from typing import List, Optional

import torch

from ..backends import register_impl
from ._common import conv_out_size
from .involution import register_grad_op_autograd

OP = "involution"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _kernels():
    from ..triton_kernels import involution as k  # imports triton

    return k


@torch.library.custom_op("medconv::involution_triton", mutates_args=())
def involution_triton(x: torch.Tensor, weight: torch.Tensor, kernel_size: List[int], stride: List[int],
                      padding: List[int], dilation: List[int]) -> torch.Tensor:
    return _kernels().involution_forward(x, weight, kernel_size, stride, padding, dilation)


@torch.library.custom_op("medconv::involution_triton_grad_input", mutates_args=())
def involution_triton_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, input_size: List[int],
                                 kernel_size: List[int], stride: List[int], padding: List[int],
                                 dilation: List[int]) -> torch.Tensor:
    return _kernels().involution_grad_input(grad_out, weight, input_size, kernel_size, stride, padding, dilation)


@torch.library.custom_op("medconv::involution_triton_grad_weight", mutates_args=())
def involution_triton_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, kernel_size: List[int],
                                  stride: List[int], padding: List[int], dilation: List[int],
                                  groups: int) -> torch.Tensor:
    return _kernels().involution_grad_weight(grad_out, x, kernel_size, stride, padding, dilation, groups)


# ---- fake kernels: shapes only (torch.compile, opcheck) ----
def _out_spatial(sizes, kernel_size, stride, padding, dilation):
    return [conv_out_size(n, k, s, p, d) for n, k, s, p, d in zip(sizes, kernel_size, stride, padding, dilation)]


@involution_triton.register_fake
def _(x, weight, kernel_size, stride, padding, dilation):
    out = _out_spatial(x.shape[2:], kernel_size, stride, padding, dilation)
    return x.new_empty([x.shape[0], x.shape[1]] + out)


@involution_triton_grad_input.register_fake
def _(grad_out, weight, input_size, kernel_size, stride, padding, dilation):
    return grad_out.new_empty(list(input_size))


@involution_triton_grad_weight.register_fake
def _(grad_out, x, kernel_size, stride, padding, dilation, groups):
    return x.new_empty([x.shape[0], groups] + list(kernel_size) + list(grad_out.shape[2:]))


# ---- autograd: both gradients by the gather-form Triton kernels ----
def _setup(ctx, inputs, output):
    x, weight, kernel_size, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.params = (list(kernel_size), list(stride), list(padding), list(dilation))


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    kernel_size, stride, padding, dilation = ctx.params
    gx = gw = None
    if ctx.needs_input_grad[0]:
        gx = involution_triton_grad_input(grad, weight, list(x.shape), kernel_size, stride, padding, dilation)
    if ctx.needs_input_grad[1]:
        gw = involution_triton_grad_weight(grad, x, kernel_size, stride, padding, dilation, weight.shape[1])
    return gx, gw, None, None, None, None


involution_triton.register_autograd(_backward, setup_context=_setup)


# double backward: the gradient ops' own autograd, as for the compiled ops (ops/involution.py)
register_grad_op_autograd("medconv::involution_triton_grad_input", "medconv::involution_triton_grad_weight",
                          involution_triton, involution_triton_grad_input, involution_triton_grad_weight)


# ---- registry ----
def _supports(device, dtype, **ctx) -> Optional[str]:
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "Triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), the input is on cpu"
    elif device.type != "cuda":
        return "Triton runs on CUDA tensors, the input is on %s" % device
    if dtype not in DTYPES:
        return "dtype %s is not supported (supported: %s)" % (dtype, ", ".join(str(d) for d in DTYPES))
    return None


def _triton_involution(x, weight, kernel_size, stride, padding, dilation):
    return involution_triton(x, weight, list(kernel_size), list(stride), list(padding), list(dilation))


register_impl(OP, "triton", _triton_involution, _supports)
