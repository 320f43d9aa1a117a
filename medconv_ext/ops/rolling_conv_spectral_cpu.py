"""Fused CPU kernels of the spectral rolling convolution (csrc/cpu/rolling_conv_spectral.cpp):
fake kernels, autograd, and their registration as the fused "spectral" backend for CPU tensors.

torch.ops.medconv.rolling_conv_spectral / rolling_conv_transpose_spectral compute
    y = relu?((rolling_conv(x, weight) + bias) * scale + shift)        (per output channel)
in one pass over the activations (channel DFT, per-frequency complex depthwise conv, inverse DFT
of the kept rolls, epilogue) and return y in the input's memory format (channels-last in,
channels-last out; otherwise NC(D)HW) and dtype (float32, float64, bfloat16: bfloat16 is computed in
float32 and rounded once at the store). The torch-op composition in rolling_conv_spectral.py stays
the reference of the algorithm. Their gradients are the
fused *_grad_input (the adjoint problem: same kernel, conjugate-free weights, transposed spatial
geometry) and *_grad_weight (per-frequency correlation of the transformed input and output
gradient, then the inverse transform to the base) ops.
"""
import functools
import os
import warnings
from typing import Callable, List, Optional

import torch

from .. import _ext
from ._common import (all_finite, apply_epilogue, autodiff_transform_active, conv_out_size, conv_transpose_out_size,
                      make_eager_function, out_memory_format, register_grad_op_autograd)
from ..backends import register_fused
from .rolling_conv_spectral import OP, OP_T, _grad_finite, rolling_conv_spectral, rolling_conv_transpose_spectral

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
ISAS = ("avx512", "avx2", "generic")  # widest first; see csrc/cpu/cpu_dispatch.h
_ISA_NAMES = ("auto",) + ISAS + ("scalar",)
# Above FUSED_MAX_C input channels the "spectral" backend runs the fused kernel only where its channel
# transforms are an FFT (even C_in whose half is a product of 2, 4, 8 and odd primes <= 13; see
# transform_for), up to FUSED_FFT_MAX_C, and the composition otherwise: the kernel's folded DFT GEMMs
# cost C^2/2 multiply-adds per pixel each way, the composition's rFFT C log C. Measurements:
# docs/rolling_conv_spectral.md ("The channel FFT").
FUSED_MAX_C = 256
FUSED_FFT_MAX_C = 1024
TRANSFORMS = ("auto", "gemm", "fft")
_SUM_DIMS = {4: [0, 2, 3], 5: [0, 2, 3, 4]}


def available() -> bool:
    return _ext.has_compiled_ops() and hasattr(torch.ops.medconv, "rolling_conv_spectral")


def supports(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> Optional[str]:
    """None when the fused CPU kernel runs this input, else why not (the composition runs it)."""
    if x.device.type != "cpu":
        return "not a CPU tensor"
    if x.dtype not in DTYPES:
        return "dtype %s (the fused CPU kernel has float32, float64 and bfloat16)" % x.dtype
    if x.dim() not in (4, 5):
        return "only 2D and 3D"
    c_in = x.shape[1]
    if c_in > FUSED_MAX_C and (c_in > FUSED_FFT_MAX_C or transform_for(c_in) != "fft"):
        return ("C_in = %d: above %d the fused kernel runs only with its channel FFT, up to %d (here: %s); the "
                "composition's rFFT (C log C) beats the DFT GEMM" % (c_in, FUSED_MAX_C, FUSED_FFT_MAX_C,
                                                                     transform_for(c_in)))
    return None


# The process-wide setting, mirrored here (read once from the extension, which reads
# MEDCONV_CHANNEL_TRANSFORM; kept in step by set_channel_transform) so that the dispatch rule can read it
# without calling an operator, e.g. while torch.compile traces.
_TRANSFORM_SETTING: List[str] = []
_FFT_MAX_ODD_PRIME = 13  # csrc/cpu/channel_fft.h kMaxOddRadix
# MEDCONV_SPECTRAL_NO_FOLD=1 (a debugging baseline: plain DFT GEMMs) turns the FFT off too; read once, as the
# extension does
_FOLD = os.environ.get("MEDCONV_SPECTRAL_NO_FOLD") != "1"


def channel_transform() -> str:
    """How the fused kernel computes its channel transforms: "auto" (the default: the channel FFT wherever
    C_in allows it, else the folded DFT GEMMs), "gemm" or "fft" (forced, for checks and benchmarks)."""
    if not _TRANSFORM_SETTING:
        _TRANSFORM_SETTING.append(torch.ops.medconv.channel_transform())
    return _TRANSFORM_SETTING[0]


def fft_supported(c_in: int) -> bool:
    """Whether the kernel has a channel FFT for c_in channels: c_in even and c_in / 2 a product of 2, 4, 8 and
    odd primes <= 13 (channel_fft::supported)."""
    if c_in < 2 or c_in % 2:
        return False
    n = c_in // 2
    while n % 2 == 0:
        n //= 2
    p = 3
    while n > 1:
        if p > _FFT_MAX_ODD_PRIME:
            return False
        while n % p == 0:
            n //= p
        p += 2
    return True


def transform_for(c_in: int) -> str:
    """"fft" or "gemm": what the fused kernel runs for a layer with c_in input channels under the current
    setting (the same answer as torch.ops.medconv.channel_transform_for, without calling an operator)."""
    return "fft" if _FOLD and channel_transform() != "gemm" and fft_supported(int(c_in)) else "gemm"


def set_channel_transform(name: str) -> str:
    """Sets the channel transform for the whole process ("auto", "gemm" or "fft"; the environment variable
    MEDCONV_CHANNEL_TRANSFORM sets it at start-up); returns the setting now in effect."""
    if name not in TRANSFORMS:
        raise ValueError("set_channel_transform: expected one of %s, got %r" % (", ".join(TRANSFORMS), name))
    from ..backends import clear_dispatch_cache
    clear_dispatch_cache()  # the backend choice depends on it (above FUSED_MAX_C; the 2D auto thresholds)
    now = torch.ops.medconv.set_channel_transform(name)
    _TRANSFORM_SETTING[:] = [now]
    return now


class _ProcessSetting:
    """Context manager over a process-wide setting: set `name` on entry, restore the previous value on exit."""
    get: Callable[[], str]
    put: Callable[[str], str]

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.prev = type(self).get()
        return type(self).put(self.name)

    def __exit__(self, *exc):
        type(self).put(self.prev)
        return False


class use_channel_transform(_ProcessSetting):
    """Context manager: run the fused kernel with channel transform `name`, then restore the previous one."""
    get = staticmethod(channel_transform)
    put = staticmethod(set_channel_transform)


def _bshape(t: torch.Tensor, dim: int):
    return (1, -1) + (1,) * (dim - 2)


def isa(c_in: Optional[int] = None, dtype: torch.dtype = torch.float32) -> str:
    """The instruction-set copy of the fused kernel's hot loops: "avx512", "avx2" or "generic".
    With c_in: the copy a layer with c_in input channels runs (under the default auto selection,
    AVX-512 gives way to AVX2 where its 16 float lanes would mostly pad the spectrum, e.g. c_in <= 16);
    without: the widest copy allowed (the CPU's widest, or the one MEDCONV_CPU_ISA / set_isa forced)."""
    if not available():
        return "none"
    if c_in is None:
        return torch.ops.medconv.cpu_isa_max() if isa_setting() == "auto" else isa_setting()
    return torch.ops.medconv.cpu_isa_for(int(c_in), torch.empty(0, dtype=dtype).element_size())


def isa_setting() -> str:
    """"auto" (the default) or the copy forced by MEDCONV_CPU_ISA / set_isa."""
    return torch.ops.medconv.cpu_isa()


def supported_isas() -> List[str]:
    """The copies this CPU can execute, widest first."""
    if not available():
        return []
    top = torch.ops.medconv.cpu_isa_max()
    return list(ISAS[ISAS.index(top):])


def set_isa(name: str) -> str:
    """Forces the copy of the hot loops for the whole process (clipped to what the CPU runs), or
    "auto" for the default selection; returns the setting now in effect. Same names as the
    environment variable MEDCONV_CPU_ISA."""
    if name not in _ISA_NAMES:
        raise ValueError("set_isa: expected one of %s, got %r" % (", ".join(_ISA_NAMES), name))
    return torch.ops.medconv.set_cpu_isa(name)


class use_isa(_ProcessSetting):
    """Context manager: run the CPU kernels with ISA setting `name`, then restore the previous one."""
    get = staticmethod(isa_setting)
    put = staticmethod(set_isa)


def _check_isa_env():
    v = os.environ.get("MEDCONV_CPU_ISA")
    if v and v not in _ISA_NAMES:
        warnings.warn("MEDCONV_CPU_ISA=%r is not one of %s; using the automatic selection"
                      % (v, ", ".join(_ISA_NAMES)))


_OP_FWD = _OP_FWD_T = None
if available():
    _OP_FWD = torch.ops.medconv.rolling_conv_spectral.default
    _OP_FWD_T = torch.ops.medconv.rolling_conv_transpose_spectral.default
    channel_transform()  # fills the mirror now: the dispatch rule may first read it while torch.compile traces

    @torch.library.register_fake("medconv::rolling_conv_spectral")
    def _(x, weight, bias, scale, shift, relu, stride, padding, dilation, n_rolls):
        out = [conv_out_size(n, k, s, p, d) for n, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
        return x.new_empty((x.shape[0], n_rolls * weight.shape[0], *out)).contiguous(
            memory_format=out_memory_format(x))

    @torch.library.register_fake("medconv::rolling_conv_transpose_spectral")
    def _(x, weight, bias, scale, shift, relu, stride, padding, output_padding, dilation, n_rolls):
        out = [conv_transpose_out_size(n, k, s, p, o, d) for n, k, s, p, o, d in
               zip(x.shape[2:], weight.shape[2:], stride, padding, output_padding, dilation)]
        return x.new_empty((x.shape[0], n_rolls * weight.shape[1], *out)).contiguous(
            memory_format=out_memory_format(x))

    def _fake_grad_input(grad_out, weight, input_size, stride, padding, dilation, n_rolls):
        return grad_out.new_empty(input_size).contiguous(memory_format=out_memory_format(grad_out))

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
        ctx.save_for_backward(x, weight, bias, scale, output if relu else None)  # None: not needed
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
        grad_input_op, grad_weight_op = _GRAD_OPS[transposed]
        if nig[0]:
            gx = _call(grad_input_op, g, weight, list(x.shape), stride, padding, dilation, n_rolls)
        if nig[1] and not transposed and any(padding) and not _grad_finite(g):
            # a NaN/Inf gradient at an output whose tap reads padding: the kernel skips the padding, torch multiplies
            # it (NaN * 0); the composition's weight gradient does too (rare: only such a gradient runs it)
            with torch.enable_grad():
                w_ = weight.detach().requires_grad_(True)
                gw = torch.autograd.grad(rolling_conv_spectral(x.detach(), w_, None, stride, padding, dilation, n_rolls),
                                         w_, g)[0]
        elif nig[1]:
            gw = _call(grad_weight_op, g, x, list(weight.shape), stride, padding, dilation, n_rolls)
        rest = [None] * (6 if transposed else 5)  # relu, stride, padding, [output_padding,] dilation, n_rolls
        return (gx, gw, gbias, gscale, gshift, *rest)

    _GRAD_OPS = {t: (getattr(torch.ops.medconv, pre + "_grad_input").default,
                     getattr(torch.ops.medconv, pre + "_grad_weight").default)
                 for t, pre in ((False, "rolling_conv_spectral"), (True, "rolling_conv_transpose_spectral"))}

    def _call(op, *args):
        """op(*args), below the autograd layer where nothing needs recording (the usual backward: no create_graph)."""
        if _eager_no_grad(*args[:2]):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)
        return op(*args)

    # Eager-mode training calls the ops through these autograd.Functions: the same setup and backward as the
    # torch.library registration below (which torch.compile, export and functorch use), without that layer's
    # Python cost per call (docs/rolling_conv_spectral.md, "Per-call cost").
    _RollingConvSpectralFunction = make_eager_function(
        "_RollingConvSpectralFunction", _OP_FWD,
        lambda ctx, args, out: _setup(ctx, args, out, False), lambda ctx, grad: _backward(ctx, grad, False))
    _RollingConvTransposeSpectralFunction = make_eager_function(
        "_RollingConvTransposeSpectralFunction", _OP_FWD_T,
        lambda ctx, args, out: _setup(ctx, args, out, True), lambda ctx, grad: _backward(ctx, grad, True))

    torch.library.register_autograd(
        "medconv::rolling_conv_spectral", lambda ctx, g: _backward(ctx, g, False),
        setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, False))
    torch.library.register_autograd(
        "medconv::rolling_conv_transpose_spectral", lambda ctx, g: _backward(ctx, g, True),
        setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, True))
    # double backward (gradients of the gradient ops: _common.register_grad_op_autograd)
    register_grad_op_autograd(
        "medconv::rolling_conv_spectral_grad_input", "medconv::rolling_conv_spectral_grad_weight",
        lambda x, w, s, p, op, d, n: torch.ops.medconv.rolling_conv_spectral(x, w, None, None, None, False, s, p, d, n),
        torch.ops.medconv.rolling_conv_spectral_grad_input, torch.ops.medconv.rolling_conv_spectral_grad_weight, False)
    register_grad_op_autograd(
        "medconv::rolling_conv_transpose_spectral_grad_input", "medconv::rolling_conv_transpose_spectral_grad_weight",
        lambda x, w, s, p, op, d, n: torch.ops.medconv.rolling_conv_transpose_spectral(x, w, None, None, None, False, s,
                                                                                     p, op, d, n),
        torch.ops.medconv.rolling_conv_transpose_spectral_grad_input,
        torch.ops.medconv.rolling_conv_transpose_spectral_grad_weight, True)


def _kernel_epilogue_exact(bias, scale) -> bool:
    """The kernel folds the bias into the shift (z * scale + (bias * scale + shift)), which equals torch's
    (z + bias) * scale + shift, non-finite values included, except where a scale is +-Inf and the bias is
    nonzero (Inf - Inf gives NaN where torch gives +-Inf). Such an epilogue runs as torch ops after the
    kernel (never the case for a BatchNorm fold of finite parameters)."""
    if bias is None or scale is None or torch.compiler.is_compiling():
        return True
    return all_finite(scale)


def _weight_finite(weight) -> bool:
    """The kernel's inverse transform is one GEMM over all bases, whose zero entries would carry a NaN or
    Inf of one base's weight into every base's outputs (torch's dense conv keeps it in its own base's
    outputs). A non-finite weight therefore runs the composition of torch ops (same algorithm, per base)."""
    return torch.compiler.is_compiling() or all_finite(weight)


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _eager() -> bool:
    """Eager mode: no torch.compile or torch.export, no jit trace, no functorch transform or forward-mode AD
    level (_common.autodiff_transform_active: the registered autograd layer must see those)."""
    return not (torch.compiler.is_compiling() or _is_exporting() or torch.jit.is_tracing()
                or autodiff_transform_active())


def _records_grad(tensors) -> bool:
    """Whether autograd records a call with these inputs: grad mode on and some input requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _eager_no_grad(*tensors) -> bool:
    """True where the op can be called below the autograd layer: eager mode and no input needs a gradient.
    torch.library's Python autograd wrapper then only redispatches below autograd itself; calling there
    directly saves its ~5 us per call and gives the same result."""
    return _eager() and not _records_grad(tensors)


def run_fused_op(op, eager_function, args, tensors):
    """op(*args) (an OpOverload of a fused op with registered autograd) the cheapest way that records the same
    graph: in eager mode below the autograd layer when nothing needs a gradient, else through eager_function
    (make_eager_function: the registered setup and backward); otherwise (compile, export, transforms) through
    the registered op."""
    if _eager():
        if not _records_grad(tensors):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)
        return eager_function.apply(*args)
    return op(*args)


def _ints(v):
    return v if type(v) is list else list(v)


def rolling_conv_spectral_cpu(x, weight, bias, stride, padding, dilation, n_rolls,
                              scale=None, shift=None, relu=False):
    """The fused CPU kernel (backend "spectral" on CPU tensors); epilogue in-kernel."""
    if not _weight_finite(weight):
        return apply_epilogue(rolling_conv_spectral(x, weight, bias, stride, padding, dilation, n_rolls),
                              scale, shift, relu)
    if not _kernel_epilogue_exact(bias, scale):
        return apply_epilogue(rolling_conv_spectral_cpu(x, weight, bias, stride, padding, dilation, n_rolls),
                              scale, shift, relu)
    args = (x, weight, bias, scale, shift, bool(relu), _ints(stride), _ints(padding), _ints(dilation), n_rolls)
    return run_fused_op(_OP_FWD, _RollingConvSpectralFunction, args, (x, weight, bias, scale, shift))


def rolling_conv_transpose_spectral_cpu(x, weight, bias, stride, padding, output_padding, dilation, n_rolls,
                                        scale=None, shift=None, relu=False):
    if not _weight_finite(weight):
        return apply_epilogue(rolling_conv_transpose_spectral(x, weight, bias, stride, padding, output_padding,
                                                              dilation, n_rolls), scale, shift, relu)
    if not _kernel_epilogue_exact(bias, scale):
        return apply_epilogue(rolling_conv_transpose_spectral_cpu(x, weight, bias, stride, padding, output_padding,
                                                                  dilation, n_rolls), scale, shift, relu)
    args = (x, weight, bias, scale, shift, bool(relu), _ints(stride), _ints(padding), _ints(output_padding),
            _ints(dilation), n_rolls)
    return run_fused_op(_OP_FWD_T, _RollingConvTransposeSpectralFunction, args, (x, weight, bias, scale, shift))


if available():
    _check_isa_env()
    # the fused kernel of backend "spectral" on CPU tensors, epilogue in-kernel
    register_fused(OP, "spectral", "cpu", rolling_conv_spectral_cpu, functools.partial(supports, transposed=False),
                   epilogue=True)
    register_fused(OP_T, "spectral", "cpu", rolling_conv_transpose_spectral_cpu,
                   functools.partial(supports, transposed=True), epilogue=True)
