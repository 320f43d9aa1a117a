"""Argument checks shared by the operators: once, in Python, with clear messages."""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch.autograd import forward_ad as _forward_ad

IntOrSeq = Union[int, Sequence[int]]


def ntuple(value: IntOrSeq, dims: int, name: str, op: str) -> List[int]:
    """Expand an int or a sequence of `dims` ints; bools and floats are refused."""
    if type(value) is int:  # the common cases first (per-call cost): a plain int, a tuple or list of ints
        return [value] * dims
    if (type(value) is tuple or type(value) is list) and len(value) == dims and all(type(v) is int for v in value):
        return list(value)
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
    t0 = tensors[0] if isinstance(tensors[0], torch.Tensor) else next(
        (t for t in tensors if isinstance(t, torch.Tensor)), None)
    if t0 is None or t0.device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(t0.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(t0.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def check_positive(vals: Sequence[int], name: str, op: str, minimum: int = 1) -> None:
    if vals and min(vals) < minimum:
        raise ValueError("%s: %s must be >= %d, got %s" % (op, name, minimum, list(vals)))


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_transpose_out_size(size: int, k: int, s: int, p: int, op_: int, d: int) -> int:
    return (size - 1) * s - 2 * p + d * (k - 1) + op_ + 1


def out_memory_format(x: torch.Tensor):
    """The output memory format for input x: channels-last when torch would call x channels-last
    (torch.suggest_memory_format, as its convolutions do), else contiguous."""
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(x)


def over_padded_3d(ksize: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> bool:
    """A 3D kernel padded above "same" ((k - 1) * dilation // 2) in some dimension. There torch's CPU
    conv3d / conv_transpose3d weight gradient (oneDNN, torch 2.14) came out wrong, hung or corrupted the heap
    (docs/rolling_conv_cpu.md, "Over-padded 3D layers"); callers pad explicitly instead (pad_explicitly)."""
    return len(ksize) == 3 and any(p > (int(k) - 1) * d // 2 for k, p, d in zip(ksize, padding, dilation))


def pad_explicitly(t: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    """t with `padding` zeros on both sides of each spatial dimension (what a convolution's padding reads)."""
    return torch.nn.functional.pad(t, [q for p in reversed(padding) for q in (p, p)])


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


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of t is finite: one sum first (a NaN or Inf anywhere makes it non-finite), the exact
    elementwise test only where the sum is not finite (a NaN/Inf, or finite values whose sum overflows). Same
    answer as bool(torch.isfinite(t).all()) at about a quarter of its per-call cost on a small base."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def apply_epilogue(y: torch.Tensor, scale, shift, relu: bool) -> torch.Tensor:
    """y * scale + shift (per channel, dim 1), then ReLU: the epilogue of the backends that do not
    fuse it. It defines the epilogue's semantics, non-finite values included, which the fused kernels
    reproduce in-kernel (backends.Impl.__call__ chooses between them): torch.relu keeps NaN (`v < 0 ? 0 : v`, never `max(v, 0)`), Inf * 0 is NaN,
    and the bias is added before the scale ((conv + bias) * scale + shift; tests/test_nonfinite.py)."""
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if scale is not None:  # in y's dtype: a float32 BatchNorm fold must not promote a bf16 output
        y = y * scale.to(y.dtype).view(shape)
    if shift is not None:
        y = y + shift.to(y.dtype).view(shape)
    if relu:
        y = torch.relu(y)
    return y


# --------------------------------------------------------------------------------------
# shared by the custom ops of every rolling-conv backend: output shape and autograd
# --------------------------------------------------------------------------------------
def rolling_out_shape(x_shape, w_shape, stride, padding, dilation, n_rolls: int, transposed: bool = False,
                      output_padding=None) -> Tuple[int, ...]:
    """(N, n_rolls * n_base, *spatial) of a rolling conv (weight (n_base, C_in, *k)) or transposed rolling
    conv (weight (C_in, n_base, *k), with output_padding): the fake kernels' shape formula, once."""
    ks = list(w_shape[2:])
    if transposed:
        n_base = w_shape[1]
        sp = [conv_transpose_out_size(n, k, s, p, o, d)
              for n, k, s, p, o, d in zip(x_shape[2:], ks, stride, padding, output_padding, dilation)]
    else:
        n_base = w_shape[0]
        sp = [conv_out_size(n, k, s, p, d) for n, k, s, p, d in zip(x_shape[2:], ks, stride, padding, dilation)]
    return (x_shape[0], n_rolls * n_base, *sp)


def make_rolling_setup(geom_start: int, epilogue: bool = False):
    """setup_context of a rolling-conv custom op whose inputs are (x, weight, bias, [scale, shift, relu,]
    stride, padding, [output_padding,] dilation, n_rolls): saves x and weight, and (stride, padding, dilation,
    n_rolls) taken from inputs[geom_start], inputs[geom_start + 1], inputs[-2], inputs[-1]."""
    def setup(ctx, inputs, output):
        x, weight, bias = inputs[:3]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.epilogue = epilogue and (inputs[3] is not None or inputs[4] is not None or bool(inputs[5]))
        ctx.params = (inputs[geom_start], inputs[geom_start + 1], inputs[-2], inputs[-1])
    return setup


def make_rolling_backward(grad_input_op, grad_weight_op, n_nondiff: int, backward_op=None, op_name: str = ""):
    """The autograd backward of a rolling-conv custom op (paper eq. 7 and 8 through its grad ops; the bias
    gradient is a torch sum). grad_input_op(grad, weight, input_size, stride, padding, dilation, n_rolls),
    grad_weight_op(grad, x, weight_size, ...), and optionally backward_op(grad, x, weight, ...) -> (gx, gw)
    used when both gradients are needed (it shares work between them). n_nondiff: the number of inputs
    after bias. An op whose setup recorded a fused epilogue refuses the gradient with a clear error."""
    def backward(ctx, grad):
        if getattr(ctx, "epilogue", False):
            raise RuntimeError("%s: no gradient through the fused epilogue (scale, shift, relu); call it without "
                               "the epilogue and apply it with torch ops when training" % op_name)
        x, weight = ctx.saved_tensors
        stride, padding, dilation, n_rolls = ctx.params
        gx = gw = gb = None
        if backward_op is not None and ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
            gx, gw = backward_op(grad, x, weight, stride, padding, dilation, n_rolls)
        else:
            if ctx.needs_input_grad[0]:
                gx = grad_input_op(grad, weight, list(x.shape), stride, padding, dilation, n_rolls)
            if ctx.needs_input_grad[1]:
                gw = grad_weight_op(grad, x, list(weight.shape), stride, padding, dilation, n_rolls)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(dim=[0] + list(range(2, grad.dim())))
        return (gx, gw, gb) + (None,) * n_nondiff
    return backward


def make_eager_function(name: str, op, setup, backward):
    """A torch.autograd.Function named `name` that runs op(*args) below the autograd layer and records
    setup(ctx, args, output) / backward(ctx, grad): the functions a custom op registered with
    torch.library.register_autograd, for eager-mode training without that layer's Python cost per call.
    Only for eager mode: torch.compile, export and functorch need the registered op."""
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
        setup(ctx, args, out)
        return out

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                    "backward": staticmethod(backward)})


# --------------------------------------------------------------------------------------
# double backward: the gradient ops of a rolling convolution are bilinear, so their own gradients are
# the forward op and the other gradient op. With A_w the layer (x -> y, no bias; a transposed layer's
# A_w included) and g the incoming gradient:
#   grad_input(g, w)  = A_w^T g:  <v, A_w^T g> = <A_w v, g>   ->  d/dg = A_w v,  d/dw = grad_weight(g, v)
#   grad_weight(g, x):            <u, grad_weight(g, x)> = <g, A_u x>  ->  d/dg = A_u x,  d/dx = grad_input(g, u)
# Without this registration a gradient of a gradient (create_graph=True: gradient penalties) would treat
# the gradient ops as constants, a silently wrong result.
# --------------------------------------------------------------------------------------
def _output_padding(y_shape, x_shape, w_shape, stride, padding, dilation):
    """The output_padding with which a transposed layer maps x_shape to y_shape."""
    return [ys - conv_transpose_out_size(xs, k, s, p, 0, d)
            for ys, xs, k, s, p, d in zip(y_shape[2:], x_shape[2:], w_shape[2:], stride, padding, dilation)]


def register_grad_op_autograd(grad_input_name: str, grad_weight_name: str, conv, grad_input_op, grad_weight_op,
                              transposed: bool, backward_name: Optional[str] = None):
    """Registers the autograd of the ops grad_input_name(grad_out, weight, input_size, stride, padding, dilation,
    n_rolls) and grad_weight_name(grad_out, x, weight_size, ...) (qualified names), and of backward_name(grad_out,
    x, weight, ...) -> (grad_input, grad_weight) if given, by the identities above. conv(x, w, stride, padding,
    output_padding, dilation, n_rolls) is the layer without bias (output_padding: None unless transposed)."""
    def layer(x, w, y_shape, stride, padding, dilation, n_rolls):
        op = _output_padding(y_shape, x.shape, w.shape, stride, padding, dilation) if transposed else None
        return conv(x, w, stride, padding, op, dilation, n_rolls)

    def setup(ctx, inputs, output):  # inputs (g, w or x, size, stride, padding, dilation, n_rolls)
        ctx.save_for_backward(*inputs[:2])
        ctx.params = tuple(inputs[3:])

    def make_backward(of_grad_input: bool):
        # grad_input's inputs (g, w, input_size, ...), cotangent v shaped like x; grad_weight's (g, x,
        # weight_size, ...), cotangent u shaped like w: either way d/dg is the layer of (x, w)
        def backward(ctx, cot):
            g, t = ctx.saved_tensors
            s, p, d, n = ctx.params
            x, w = (cot, t) if of_grad_input else (t, cot)
            nig = ctx.needs_input_grad
            dg = layer(x, w, g.shape, s, p, d, n) if nig[0] else None
            dt = None
            if nig[1]:
                dt = (grad_weight_op(g, x, list(w.shape), s, p, d, n) if of_grad_input
                      else grad_input_op(g, w, list(x.shape), s, p, d, n))
            return dg, dt, None, None, None, None, None
        return backward

    torch.library.register_autograd(grad_input_name, make_backward(True), setup_context=setup)
    torch.library.register_autograd(grad_weight_name, make_backward(False), setup_context=setup)
    if backward_name is None:
        return

    def setup_both(ctx, inputs, output):  # inputs (g, x, w, stride, padding, dilation, n_rolls)
        ctx.save_for_backward(*inputs[:3])
        ctx.params = tuple(inputs[3:])

    def backward_both(ctx, v, u):  # v: cotangent of grad_input, u: of grad_weight (None where unused)
        g, x, w = ctx.saved_tensors
        s, p, d, n = ctx.params
        nig = ctx.needs_input_grad
        dg = dx = dw = None
        if nig[0]:
            if v is not None:
                dg = layer(v, w, g.shape, s, p, d, n)
            if u is not None:
                dg = layer(x, u, g.shape, s, p, d, n) if dg is None else dg + layer(x, u, g.shape, s, p, d, n)
        if nig[1] and u is not None:
            dx = grad_input_op(g, u, list(x.shape), s, p, d, n)
        if nig[2] and v is not None:
            dw = grad_weight_op(g, v, list(w.shape), s, p, d, n)
        return dg, dx, dw, None, None, None, None

    torch.library.register_autograd(backward_name, backward_both, setup_context=setup_both)


def autodiff_transform_active() -> bool:
    """True under forward-mode AD (a torch.autograd.forward_ad dual level) or a torch.func transform (grad, jvp,
    vmap, jacrev, ...) in eager mode. The package's compiled and Triton ops have reverse-mode formulas only, and
    torch.library's autograd layer does not run under torch.func, so there every layer computes with its
    pure-PyTorch "reference" backend (the same function; these transforms support it). Without this, a tangent
    through a compiled op came out zero or missing, silently."""
    if torch.compiler.is_compiling():
        return False
    return _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()
