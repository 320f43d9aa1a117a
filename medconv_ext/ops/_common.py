"""Argument checks shared by the operators: once, in Python, with clear messages."""
from typing import List, Sequence, Tuple, Union

import torch

IntOrSeq = Union[int, Sequence[int]]


def ntuple(value: IntOrSeq, dims: int, name: str, op: str) -> List[int]:
    """Expand an int or a sequence of `dims` ints; bools and floats are refused."""
    if isinstance(value, bool):
        raise TypeError("%s: %s must be an int or a sequence of %d ints, got %r" % (op, name, dims, value))
    if isinstance(value, int):
        return [value] * dims
    try:
        vals = list(value)
    except TypeError:
        raise TypeError("%s: %s must be an int or a sequence of %d ints, got %r" % (op, name, dims, value)) from None
    if len(vals) == 1:
        vals = vals * dims
    if len(vals) != dims or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise ValueError("%s: %s must be an int or a sequence of %d ints, got %r" % (op, name, dims, value))
    return [int(v) for v in vals]


def check_rank(t: torch.Tensor, rank: int, name: str, layout: str, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError("%s: %s must be a torch.Tensor, got %s" % (op, name, type(t).__name__))
    if t.dim() != rank:
        raise ValueError("%s: %s must have %d dims %s, got shape %s" % (op, name, rank, layout, tuple(t.shape)))


def check_same_dtype_device(op: str, **tensors) -> Tuple[torch.dtype, torch.device]:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    name0, t0 = items[0]
    if not t0.is_floating_point():
        raise TypeError("%s: %s must be a floating-point tensor, got dtype %s" % (op, name0, t0.dtype))
    for k, v in items[1:]:
        if v.dtype != t0.dtype:
            raise TypeError("%s: %s has dtype %s but %s has dtype %s; they must match" % (op, k, v.dtype, name0, t0.dtype))
        if v.device != t0.device:
            raise ValueError("%s: %s is on %s but %s is on %s; they must be on the same device" % (op, k, v.device, name0, t0.device))
    return t0.dtype, t0.device


def autocast_inputs(*tensors):
    """Under torch.autocast, cast the floating inputs to the autocast dtype, as torch does for its
    own convolutions (they are on autocast's lower-precision list); float64 and non-floating
    tensors are left alone, as autocast does. Outside autocast the inputs come back unchanged."""
    t0 = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if t0 is None or t0.device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(t0.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(t0.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def check_positive(vals: Sequence[int], name: str, op: str, minimum: int = 1) -> None:
    if any(v < minimum for v in vals):
        raise ValueError("%s: %s must be >= %d, got %s" % (op, name, minimum, list(vals)))


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_transpose_out_size(size: int, k: int, s: int, p: int, op_: int, d: int) -> int:
    return (size - 1) * s - 2 * p + d * (k - 1) + op_ + 1


def check_kernel_fits(spatial: Sequence[int], ksize: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], op: str) -> None:
    for i, (n, k, p, d) in enumerate(zip(spatial, ksize, padding, dilation)):
        if n + 2 * p < d * (k - 1) + 1:
            raise ValueError(
                "%s: the kernel (size %d, dilation %d: extent %d) is larger than the padded input "
                "along spatial dim %d (size %d + 2*padding %d = %d)" % (op, k, d, d * (k - 1) + 1, i, n, p, n + 2 * p)
            )


def check_epilogue(op: str, x: torch.Tensor, c_out: int, scale, shift, relu) -> None:
    """The optional epilogue y = relu?((conv + bias) * scale + shift): scale and shift are None or
    (C_out,) tensors of x's dtype and device; relu a bool."""
    if not isinstance(relu, bool):
        raise TypeError("%s: relu must be a bool, got %r" % (op, relu))
    for name, v in (("scale", scale), ("shift", shift)):
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError("%s: %s must be a tensor of shape (C_out,) or None, got %s" % (op, name, type(v).__name__))
        if v.dim() != 1 or v.shape[0] != c_out:
            raise ValueError("%s: %s must have shape (C_out,) = (%d,), got %s" % (op, name, c_out, tuple(v.shape)))
        if v.dtype != x.dtype:
            raise TypeError("%s: %s has dtype %s but x has dtype %s; they must match" % (op, name, v.dtype, x.dtype))
        if v.device != x.device:
            raise ValueError("%s: %s is on %s but x is on %s; they must be on the same device" % (op, name, v.device, x.device))


def apply_epilogue(y: torch.Tensor, scale, shift, relu: bool) -> torch.Tensor:
    """y * scale + shift (per channel, dim 1), then ReLU: the epilogue of the backends that do not
    fuse it. It defines the epilogue's semantics, non-finite values included, which the fused kernels
    reproduce in-kernel: torch.relu keeps NaN (`v < 0 ? 0 : v`, never `max(v, 0)`), Inf * 0 is NaN,
    and the bias is added before the scale ((conv + bias) * scale + shift; tests/test_nonfinite.py)."""
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if scale is not None:  # in y's dtype: a float32 BatchNorm fold must not promote a bf16 output
        y = y * scale.to(y.dtype).view(shape)
    if shift is not None:
        y = y + shift.to(y.dtype).view(shape)
    if relu:
        y = torch.relu(y)
    return y


def run_with_epilogue(fn, args, scale, shift, relu: bool) -> torch.Tensor:
    """fn(*args) followed by the epilogue: in the kernel where fn takes it (fn.supports_epilogue),
    else by apply_epilogue after it."""
    if scale is None and shift is None and not relu:
        return fn(*args)
    if getattr(fn, "supports_epilogue", False):
        return fn(*args, scale=scale, shift=shift, relu=relu)
    return apply_epilogue(fn(*args), scale, shift, relu)
