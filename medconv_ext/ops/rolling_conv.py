"""Rolling convolution: functional API, argument checks, backend choice, and the
torch.library registrations (fake kernels, autograd) of the compiled ops.

Definition (docs/design.md §1): base `weight` (n_base, C_in, *k); output channel o = r * n_base + b
(0 <= r < n_rolls) is base b rolled by r along its channel axis:
    W[o, c] = weight[b, (c - r) mod C_in]
Transposed: base (C_in, n_base, *k), W_t[c, o] = weight[(c - r) mod C_in, b], then an ordinary
transposed convolution with W_t.
"""
from typing import List

import torch
import torch.nn.functional as F

from .. import _ext
from ..backends import (DISPATCH_CACHE, backend_override, forced_backend_name, register_impl, resolve, run_kernel,
                        supports_any, supports_device_dtypes)
from ._common import (
    autocast_inputs,
    autodiff_transform_active,
    check_epilogue,
    check_kernel_fits,
    check_positive,
    check_rank,
    check_same_dtype_device,
    conv_out_size,  # noqa: F401  (re-exported: other modules and tests use rolling_conv.conv_out_size)
    conv_transpose_out_size,
    make_rolling_backward,
    make_rolling_setup,
    ntuple,
    out_memory_format,
    over_padded_3d,
    pad_explicitly,
    register_grad_op_autograd,
    rolling_out_shape,
)

OP = "rolling_conv"
OP_T = "rolling_conv_transpose"
_LAYOUT = {2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}
_W_LAYOUT = {2: "(n_base, C_in, kH, kW)", 3: "(n_base, C_in, kD, kH, kW)"}
_WT_LAYOUT = {2: "(C_in, n_base, kH, kW)", 3: "(C_in, n_base, kD, kH, kW)"}


# --------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------
def _check_common(name, x, weight, bias, dims, stride, padding, dilation, n_rolls, transposed):
    check_rank(x, dims + 2, "x", _LAYOUT[dims], name)
    check_rank(weight, dims + 2, "weight", (_WT_LAYOUT if transposed else _W_LAYOUT)[dims], name)
    if bias is not None:
        check_rank(bias, 1, "bias", "(C_out,)", name)
    if bias is not None or x.dtype != weight.dtype or x.device != weight.device or not x.is_floating_point():
        check_same_dtype_device(name, x=x, weight=weight, bias=bias)
    stride = ntuple(stride, dims, "stride", name)
    padding = ntuple(padding, dims, "padding", name)
    dilation = ntuple(dilation, dims, "dilation", name)
    check_positive(stride, "stride", name)
    check_positive(dilation, "dilation", name)
    check_positive(padding, "padding", name, minimum=0)
    c_in = x.shape[1]
    if transposed:
        w_cin, n_base = weight.shape[0], weight.shape[1]
    else:
        n_base, w_cin = weight.shape[0], weight.shape[1]
    if w_cin != c_in:
        raise ValueError("%s: x has C_in=%d channels but weight %s has C_in=%d (weight shape %s)"
                         % (name, c_in, (_WT_LAYOUT if transposed else _W_LAYOUT)[dims], w_cin, tuple(weight.shape)))
    if c_in < 1 or n_base < 1 or any(k < 1 for k in weight.shape[2:]):
        raise ValueError("%s: weight must have C_in >= 1, n_base >= 1 and kernel sizes >= 1, got shape %s"
                         % (name, tuple(weight.shape)))
    if any(s < 1 for s in x.shape[2:]):
        # torch's convolutions (the reference backend) refuse it; the compiled kernels would return the bias
        raise ValueError("%s: x must have non-empty spatial dims, got shape %s" % (name, tuple(x.shape)))
    if n_rolls is None:
        n_rolls = int(c_in)  # int(): under torch.jit.trace sizes are 0-dim tensors
    if isinstance(n_rolls, bool) or not isinstance(n_rolls, int):
        raise TypeError("%s: n_rolls must be an int, got %r" % (name, n_rolls))
    if not 1 <= n_rolls <= c_in:
        raise ValueError("%s: n_rolls must satisfy 1 <= n_rolls <= C_in=%d, got %d" % (name, c_in, n_rolls))
    c_out = n_rolls * n_base
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError("%s: bias must have n_rolls * n_base = %d * %d = %d values (one per output channel), got %d"
                         % (name, n_rolls, n_base, c_out, bias.shape[0]))
    return stride, padding, dilation, n_rolls, c_out


def _choose(op, x, weight, backend, transposed, n_rolls):
    """(backend name, backends.Impl) for this input. Calling the Impl runs it: the backend's fused kernel for the
    input's device type where one is registered and supports the input, else the backend's own function; the
    epilogue in-kernel where that function's registration says so (epilogue=True), else as torch ops."""
    hit = _auto_memo(op, x, weight, backend, transposed, n_rolls)
    if hit is not None:
        return hit[0], hit[1]
    return _choose_uncached(op, x, weight, backend, transposed, n_rolls)


def _choose_uncached(op, x, weight, backend, transposed, n_rolls):
    if autodiff_transform_active():
        # forward-mode AD and torch.func transforms need torch ops (_common.autodiff_transform_active); decided
        # before the auto rule, which queries memory formats that vmap does not support
        return resolve(op, "reference", x.device, x.dtype, [])
    name, impl = resolve(op, backend, x.device, x.dtype, _auto_candidates(x, weight, transposed, n_rolls),
                         ctx={"transposed": transposed, "x_shape": tuple(x.shape), "w_shape": tuple(weight.shape)})
    if (name.startswith("spectral") and _bank_for_export()) or (name != "reference" and plain_onnx_export()):
        # exporters do not translate the channel FFT, and plain torch.onnx.export has no translation of the
        # package's operators: the same function as the bank + conv (medconv_ext.export)
        return resolve(op, "reference", x.device, x.dtype, [])
    return name, impl


def _choose_kernel(op, x, weight, backend, transposed, n_rolls):
    """(function, epilogue flag) that runs this input: _choose, then the Impl's kernel for it."""
    hit = _auto_memo(op, x, weight, backend, transposed, n_rolls)
    if hit is not None:
        return hit[2], hit[3]
    return _choose_uncached(op, x, weight, backend, transposed, n_rolls)[1].kernel(x, weight)


def _auto_memo(op, x, weight, backend, transposed, n_rolls):
    """A CPU tensor in eager mode, backend "auto" or one of the other _MEMO_BACKENDS: (name, impl, fn, epilogue)
    memoised per input signature (op, backend, dtype, shape and strides of x, weight shape, n_rolls, training
    or not), so a layer called again skips the rule and the registry look-ups. The choice depends only on these
    (the rule reads shapes, dtype, layout, grad mode; these backends' availability is fixed for the process).
    Not memoised, decided per call as before: "triton", MEDCONV_BACKEND set, forced_backend(), exporting or
    tracing, torch.compile, other devices. Returns None where the call is not memoised."""
    if backend not in _MEMO_BACKENDS or x.device.type != "cpu" or forced_backend_name() is not None:
        return None
    if backend_override() is not None:
        return None
    if (torch.compiler.is_compiling() or _EXPORT_DEPTH[0] > 0 or torch.jit.is_tracing() or _onnx_exporting()
            or autodiff_transform_active()):
        return None
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    key = (op, backend, x.dtype, x.shape, x.stride(), weight.shape, n_rolls, training)
    hit = DISPATCH_CACHE.get(key)
    if hit is None:
        name, impl = _choose_uncached(op, x, weight, backend, transposed, n_rolls)
        fn, epilogue = impl.kernel(x, weight)
        hit = (name, impl, fn, epilogue)
        _remember(key, hit)
    return hit


_EXPORT_DEPTH = [0]  # > 0 inside medconv_ext.export.exporting()


def _onnx_export_public() -> bool:
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except Exception:  # pragma: no cover - torch.onnx unavailable in this torch build
        return False


def _make_onnx_probe():
    """torch.onnx.is_in_onnx_export() without its two imports per call (read on every layer call): the flags it
    reads, where this torch has them (the public function under torch.compile, which traces only that one)."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        if isinstance(_flags._is_onnx_exporting, bool) and isinstance(GLOBALS.in_onnx_export, bool):
            def probe():
                if torch.compiler.is_compiling():
                    return _onnx_export_public()
                return GLOBALS.in_onnx_export or _flags._is_onnx_exporting
            return probe
    except Exception:  # pragma: no cover - another torch layout: the public function
        pass
    return _onnx_export_public


_onnx_exporting = _make_onnx_probe()


def plain_onnx_export() -> bool:
    """True while torch.onnx.export runs outside medconv_ext.export.exporting() (that is, without the
    package's ONNX translations): every layer then computes with its pure-PyTorch "reference" backend,
    which both exporters translate (the dynamo-based one and the TorchScript-based one)."""
    if _EXPORT_DEPTH[0] > 0:
        return False
    return _onnx_exporting()


def _bank_for_export() -> bool:
    """True while a model is exported or traced: medconv_ext.export.exporting(), a torch.onnx export
    (its torch.export step included) or a torch.jit trace."""
    return _EXPORT_DEPTH[0] > 0 or torch.jit.is_tracing() or _onnx_exporting()


# --------------------------------------------------------------------------------------
# backend choice for backend="auto"
# --------------------------------------------------------------------------------------
def _auto_candidates(x: torch.Tensor, weight: torch.Tensor, transposed: bool, n_rolls: int) -> List[str]:
    """Ordered backends to try for backend="auto"; "reference" is always the last resort."""
    if x.device.type == "cuda":
        # CUDA: measured, never predicted (ops/_cuda_auto.py). "reference" (bank + cuDNN) everywhere, except
        # where the GPU benchmark committed for this GPU (bench/results/<gpu>/, turned into the package's
        # table by bench/make_cuda_auto_table.py) measured another backend faster for this kind of layer
        # (dims, channels, taps, dtype, TF32 flag, training or inference). The shipped table is empty until
        # such a benchmark exists, so today every CUDA layer runs "reference". (The operation-count model
        # of the fused spectral kernel, which overestimates it against TF32 cuDNN and ignores memory
        # traffic, is documentation only: docs/rolling_conv_gpu.md.)
        from ._cuda_auto import cuda_auto_candidates

        cands = cuda_auto_candidates(x, weight, transposed, n_rolls)
        if cands[0] == "spectral":
            # measured as the fused Triton kernel: on CUDA without it "spectral" is the composition of
            # ~10 torch kernels, not what was measured
            from .rolling_conv_spectral import _fused_for

            if _fused_for(x, weight, transposed) is None:
                return ["reference"]
        return cands
    return _cpu_auto_candidates(x, weight, transposed, n_rolls)


# CPU rule. The measurements behind every threshold are in docs/rolling_conv_spectral.md ("When
# backend="auto" picks it on the CPU"); bench/bench_rolling_conv_cpu.py repeats them (columns ref_*,
# spec_*, auto_*).
# Without the fused kernel (float16, C_in > 256, no compiled extension): the composition.
_CPU_SPECTRAL_MIN_C = {(2, False): 128, (2, True): 128, (3, False): 16, (3, True): 64}
_CPU_SPECTRAL_MIN_TAPS = {2: 9, 3: 27}
_CPU_SPECTRAL_MIN_C_OUT_2D = 256  # composition, 2D inference: partial rolls shrink the bank, not the FFTs
# With the fused kernel (float32/float64/bfloat16, C_in <= 256):
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_FUSED_MIN_C_2D = 16  # 2D inference, >= 9 taps: spectral from C_in >= 16 ...
_FUSED_SMALL_WORK_2D = 16 * 32 * 32  # ... and for C_in >= 8 when C_in * pixels is at most this (any dtype, training
# too): there the per-call cost of building the bank (reference) exceeds the fused kernel's whole run
_FUSED_CL_MAX_PIXELS_2D = 64 * 64  # ... except channels-last input with C_in < 32 above this many pixels, where
# oneDNN's channels-last dense conv (reference) is faster (its NCHW conv is not: there spectral stays)
_FUSED_MIN_C_TRAIN_2D = 32  # 2D training: C_in >= 32 and C_out >= 32 (the weight gradient is dearer)
_FUSED_MIN_C_OUT_FRACTION = 4  # C_out >= C_in / 4: the transforms cost ~C_in^2, the bank C_in * C_out
_FUSED_BF16_MIN_C_2D = 64  # bfloat16 2D: oneDNN's bf16 conv (AVX512-BF16) runs ~2x its float32 rate: any size
# from C_in >= 64 (C_out >= 64 in training) ...
_FUSED_BF16_MID_C_2D = 32  # ... in inference from C_in >= 32 up to this many pixels
_FUSED_BF16_MID_PIXELS_2D = 64 * 64
_FUSED_BF16_MIN_C_3D_27 = 16  # bfloat16 3D with 27 taps (3x3x3); 5x5x5 and up: any C_in
# With the kernel's channel FFT (even C_in; transform_for) and C_out >= C_in the 2D thresholds are lower: from
# C_in >= 16 in float32/64 (any layout, training too) and, in bfloat16, for NC(D)HW input; bfloat16
# channels-last input from C_in >= 32 in inference, or C_in >= 16 up to 64^2 pixels (training: as without)
_FFT_MIN_C_2D = 16
_FFT_BF16_CL_MIN_C_2D = 32
_FFT_BF16_CL_MAX_PIXELS_2D = 64 * 64
# The 2D transposed up-sampling (2x2, stride 2: 4 taps) with the channel FFT: the fused kernel from C_in >= 128
# in inference, C_in >= 64 in training (the bank's transposed-conv backward is slow there)
_FFT_UP_MIN_TAPS_2D = 4
_FFT_UP_MIN_C_2D = {False: 128, True: 64}


def _cpu_auto_candidates_fused(dims: int, c_in: int, c_out: int, taps: int, training: bool, pixels: int = 1 << 30,
                               bf16: bool = False, channels_last: bool = False, fft: bool = False,
                               transposed: bool = False) -> List[str]:
    if c_out * _FUSED_MIN_C_OUT_FRACTION < c_in:
        return ["reference"]
    if taps < _CPU_SPECTRAL_MIN_TAPS[dims]:
        up = transposed and dims == 2 and fft and taps >= _FFT_UP_MIN_TAPS_2D
        return ["spectral"] if up and c_in >= _FFT_UP_MIN_C_2D[training] else ["reference"]
    if dims == 3:
        if bf16 and taps < 125 and c_in < _FUSED_BF16_MIN_C_3D_27:
            return ["reference"]
        return ["spectral"]
    small = c_in >= 8 and c_in * pixels <= _FUSED_SMALL_WORK_2D
    if fft and c_in >= _FFT_MIN_C_2D and c_out >= c_in:  # measured with full rolls; partial ones: below
        if not bf16 or not channels_last:
            return ["spectral"]
        if not training and (c_in >= _FFT_BF16_CL_MIN_C_2D or pixels <= _FFT_BF16_CL_MAX_PIXELS_2D):
            return ["spectral"]
    if bf16:
        big = c_in >= _FUSED_BF16_MIN_C_2D and (not training or c_out >= _FUSED_BF16_MIN_C_2D)
        mid = not training and c_in >= _FUSED_BF16_MID_C_2D and pixels <= _FUSED_BF16_MID_PIXELS_2D
        return ["spectral"] if big or mid or small else ["reference"]
    if training:
        big = c_in >= _FUSED_MIN_C_TRAIN_2D and c_out >= _FUSED_MIN_C_TRAIN_2D
    else:
        big = c_in >= _FUSED_MIN_C_2D and (c_in >= _FUSED_MIN_C_TRAIN_2D or not channels_last
                                           or pixels <= _FUSED_CL_MAX_PIXELS_2D)
    return ["spectral"] if big or small else ["reference"]


def _cpu_auto_candidates(x: torch.Tensor, weight: torch.Tensor, transposed: bool, n_rolls=None) -> List[str]:
    dims = weight.dim() - 2
    c_in = x.shape[1]
    taps = 1
    for k in weight.shape[2:]:
        taps *= int(k)
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    n_base = weight.shape[1] if transposed else weight.shape[0]
    c_out = (c_in if n_rolls is None else n_rolls) * n_base
    if x.dtype in _FUSED_DTYPES and _fused_spectral_cpu_runs(x, weight, transposed):
        pixels = 1
        for s in x.shape[2:]:
            pixels *= int(s)
        cl = dims == 2 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        from .rolling_conv_spectral_cpu import transform_for
        fft = dims == 2 and transform_for(c_in) == "fft"
        return _cpu_auto_candidates_fused(dims, c_in, c_out, taps, training, pixels, x.dtype == torch.bfloat16, cl,
                                          fft, transposed)
    # without the fused kernel (float16, C_in > 256, no compiled extension): the composition
    min_c = _CPU_SPECTRAL_MIN_C.get((dims, training))
    if dims == 2 and not training and c_out < _CPU_SPECTRAL_MIN_C_OUT_2D:
        return ["reference"]  # partial rolls: the bank shrinks with C_out, the spectral cost does not
    if min_c is not None and c_in >= min_c and taps >= _CPU_SPECTRAL_MIN_TAPS[dims]:
        return ["spectral"]
    return ["reference"]


def _fused_spectral_cpu_runs(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> bool:
    from . import rolling_conv_spectral_cpu as fused  # imported late: it registers itself on import
    return fused.available() and fused.supports(x, weight, transposed) is None


# --------------------------------------------------------------------------------------
# public functional API
# --------------------------------------------------------------------------------------
# Per-call memo (eager, CPU tensors, the same conditions as _auto_memo): a call whose signature (backend,
# shapes, strides, dtypes, devices of the tensors, the geometry arguments as given with their exact types,
# n_rolls, the epilogue's presence, training or not) was seen before passed the same argument checks and gets
# the same backend, so it skips both and only the kernel runs (what the kernel checks per call, e.g. a weight
# turned non-finite, it still checks). Any other call (errors included) takes the full path each time.
_NOKEY = object()


def _int_key(v):
    """v when it is an int or a tuple/list of ints (exact types: True and 1.0 must still be refused), else _NOKEY."""
    t = type(v)
    if t is int or v is None:
        return v
    if t is tuple or t is list:
        for e in v:
            if type(e) is not int:
                return _NOKEY
        return (t, *v)
    return _NOKEY


def _meta(t):
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return (t.shape, t.dtype, t.is_cpu)
    return _NOKEY


# backends whose availability on CPU tensors cannot change while the process runs ("triton" depends on
# TRITON_INTERPRET): their calls are memoised, "auto" among them
_MEMO_BACKENDS = ("auto", "reference", "spectral", "spectral_unfused", "cpu")


def _call_key(op, x, weight, bias, stride, padding, output_padding, dilation, n_rolls, backend, scale, shift, relu):
    if (backend not in _MEMO_BACKENDS or not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor)
            or not x.is_cpu or type(relu) is not bool or not (n_rolls is None or type(n_rolls) is int)):
        return None
    if (forced_backend_name() is not None or torch.compiler.is_compiling() or _EXPORT_DEPTH[0] > 0
            or torch.is_autocast_enabled("cpu") or backend_override() is not None or torch.jit.is_tracing()
            or _onnx_exporting() or autodiff_transform_active()):
        return None
    s, p, o, d = _int_key(stride), _int_key(padding), _int_key(output_padding), _int_key(dilation)
    if s is _NOKEY or p is _NOKEY or o is _NOKEY or d is _NOKEY:
        return None
    b = None if bias is None else _meta(bias)
    sc = None if scale is None else _meta(scale)
    sh = None if shift is None else _meta(shift)
    if b is _NOKEY or sc is _NOKEY or sh is _NOKEY:
        return None
    return ("call", op, backend, s, p, o, d, n_rolls, b, sc, sh, relu, x.shape, x.stride(), x.dtype, weight.shape,
            weight.dtype, weight.is_cpu, torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def _remember(key, value):
    if key is not None:
        if len(DISPATCH_CACHE) > 4096:  # many shapes (e.g. a sweep): start over rather than grow
            DISPATCH_CACHE.clear()
        DISPATCH_CACHE[key] = value


def _rolling_conv_nd(dims, x, weight, bias, stride, padding, dilation, n_rolls, backend,
                     scale=None, shift=None, relu=False):
    key = _call_key(OP, x, weight, bias, stride, padding, None, dilation, n_rolls, backend, scale, shift, relu)
    hit = DISPATCH_CACHE.get(key) if key is not None else None
    if hit is not None:
        stride, padding, dilation, n_rolls, fn, epilogue = hit
        return run_kernel(fn, epilogue, (x, weight, bias, stride, padding, dilation, n_rolls), scale, shift, relu)
    name = "rolling_conv%dd" % dims
    x, weight, bias, scale, shift = autocast_inputs(x, weight, bias, scale, shift)
    stride, padding, dilation, n_rolls, c_out = _check_common(
        name, x, weight, bias, dims, stride, padding, dilation, n_rolls, transposed=False)
    check_kernel_fits(x.shape[2:], weight.shape[2:], padding, dilation, name)
    check_epilogue(name, x, c_out, scale, shift, relu)
    fn, epilogue = _choose_kernel(OP, x, weight, backend, False, n_rolls)
    _remember(key, (stride, padding, dilation, n_rolls, fn, epilogue))
    return run_kernel(fn, epilogue, (x, weight, bias, stride, padding, dilation, n_rolls), scale, shift, relu)


def _rolling_conv_transpose_nd(dims, x, weight, bias, stride, padding, output_padding, dilation, n_rolls, backend,
                               scale=None, shift=None, relu=False):
    key = _call_key(OP_T, x, weight, bias, stride, padding, output_padding, dilation, n_rolls, backend, scale, shift,
                    relu)
    hit = DISPATCH_CACHE.get(key) if key is not None else None
    if hit is not None:
        stride, padding, output_padding, dilation, n_rolls, fn, epilogue = hit
        return run_kernel(fn, epilogue, (x, weight, bias, stride, padding, output_padding, dilation, n_rolls), scale,
                          shift, relu)
    name = "rolling_conv_transpose%dd" % dims
    x, weight, bias, scale, shift = autocast_inputs(x, weight, bias, scale, shift)
    stride, padding, dilation, n_rolls, c_out = _check_common(
        name, x, weight, bias, dims, stride, padding, dilation, n_rolls, transposed=True)
    check_epilogue(name, x, c_out, scale, shift, relu)
    output_padding = ntuple(output_padding, dims, "output_padding", name)
    check_positive(output_padding, "output_padding", name, minimum=0)
    for op_, s, d in zip(output_padding, stride, dilation):
        if op_ >= max(s, d):
            raise ValueError("%s: output_padding must be smaller than stride or dilation, got output_padding=%s, "
                             "stride=%s, dilation=%s" % (name, output_padding, stride, dilation))
    out = [conv_transpose_out_size(n, k, s, p, o, d)
           for n, k, s, p, o, d in zip(x.shape[2:], weight.shape[2:], stride, padding, output_padding, dilation)]
    if any(o < 1 for o in out):
        raise ValueError("%s: the output would be empty (computed spatial size %s); reduce padding" % (name, out))
    fn, epilogue = _choose_kernel(OP_T, x, weight, backend, True, n_rolls)
    _remember(key, (stride, padding, output_padding, dilation, n_rolls, fn, epilogue))
    return run_kernel(fn, epilogue, (x, weight, bias, stride, padding, output_padding, dilation, n_rolls), scale,
                      shift, relu)


def rolling_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, n_rolls=None, backend="auto", *,
                   scale=None, shift=None, relu=False):
    """2D rolling convolution. x (N, C_in, H, W), weight = base (n_base, C_in, kH, kW),
    bias (n_rolls * n_base,) or None. Returns (N, n_rolls * n_base, H_out, W_out); output
    channel r * n_base + b is base b rolled by r along its channel axis. n_rolls defaults to C_in.
    Epilogue (keyword-only, per output channel): y = relu?((conv + bias) * scale + shift), fused into
    the kernel by the backends that can (the spectral CPU kernel), applied after the op otherwise."""
    return _rolling_conv_nd(2, x, weight, bias, stride, padding, dilation, n_rolls, backend, scale, shift, relu)


def rolling_conv3d(x, weight, bias=None, stride=1, padding=0, dilation=1, n_rolls=None, backend="auto", *,
                   scale=None, shift=None, relu=False):
    """3D rolling convolution; as rolling_conv2d with x (N, C_in, D, H, W), weight (n_base, C_in, kD, kH, kW)."""
    return _rolling_conv_nd(3, x, weight, bias, stride, padding, dilation, n_rolls, backend, scale, shift, relu)


def rolling_conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, n_rolls=None,
                             backend="auto", dilation=1, *, scale=None, shift=None, relu=False):
    """2D transposed rolling convolution. x (N, C_in, H, W), weight = base (C_in, n_base, kH, kW);
    W_t[c, r * n_base + b] = weight[(c - r) mod C_in, b], then conv_transpose2d with W_t.
    Epilogue keywords as in rolling_conv2d."""
    return _rolling_conv_transpose_nd(2, x, weight, bias, stride, padding, output_padding, dilation, n_rolls, backend,
                                      scale, shift, relu)


def rolling_conv_transpose3d(x, weight, bias=None, stride=1, padding=0, output_padding=0, n_rolls=None,
                             backend="auto", dilation=1, *, scale=None, shift=None, relu=False):
    """3D transposed rolling convolution; as rolling_conv_transpose2d with one more spatial axis."""
    return _rolling_conv_transpose_nd(3, x, weight, bias, stride, padding, output_padding, dilation, n_rolls, backend,
                                      scale, shift, relu)


# --------------------------------------------------------------------------------------
# backend "reference": pure PyTorch, materialized bank
# --------------------------------------------------------------------------------------
# The same function as reference/rolling_conv.py (the readable ground truth: roll index, gather, transpose),
# with the bank built by ONE index_select from an index cached per (C_in, n_base, n_rolls, device): 4x less
# per-call cost at C=16-256 (4.8 vs 19.9 us at C=16, 181 vs 781 us at C=256, 3x3, 1 thread), which is what a
# small layer pays on top of torch's conv.
_BANK_INDEX = {}


def _bank_index_build(c_in: int, n_base: int, n_rolls: int, transposed: bool, device) -> torch.Tensor:
    r = torch.arange(n_rolls, device=device).view(1, n_rolls, 1)
    c = torch.arange(c_in, device=device).view(c_in, 1, 1)
    b = torch.arange(n_base, device=device).view(1, 1, n_base)
    src = (c - r) % c_in  # (C_in, n_rolls, 1): the base channel read by channel c at roll r
    if transposed:  # rows of weight (C_in, n_base, K): W_t[c, r * n_base + b] = weight[(c - r) mod C_in, b]
        return (src * n_base + b).reshape(-1)
    # rows of weight (n_base, C_in, K): W[r * n_base + b, c] = weight[b, (c - r) mod C_in]
    return (b * c_in + src).permute(1, 2, 0).reshape(-1)


def _bank_index(c_in: int, n_base: int, n_rolls: int, transposed: bool, weight: torch.Tensor) -> torch.Tensor:
    # Cached per shape and device. Under torch.jit.trace the cached index is recorded as a constant, as the
    # aranges would be; under torch.compile / torch.export it is built in the graph (no Python-side cache).
    if torch.compiler.is_compiling():
        return _bank_index_build(c_in, n_base, n_rolls, transposed, weight.device)
    key = (c_in, n_base, n_rolls, transposed, None if weight.is_cpu else weight.device)
    idx = _BANK_INDEX.get(key)
    if idx is None:
        if len(_BANK_INDEX) > 256:
            _BANK_INDEX.clear()
        # a normal tensor even under inference_mode: index_select saves it for a later training call's backward
        with torch.inference_mode(False):
            idx = _BANK_INDEX[key] = _bank_index_build(c_in, n_base, n_rolls, transposed, weight.device)
    return idx


def expand_bank(weight: torch.Tensor, n_rolls: int, transposed: bool = False) -> torch.Tensor:
    """The dense bank of a base, by one gather: (n_rolls * n_base, C_in, *k) from (n_base, C_in, *k), or for a
    transposed layer (C_in, n_rolls * n_base, *k) from (C_in, n_base, *k). Equals
    reference.rolling_conv.expand_rolling_weight(_transpose)."""
    shape = weight.shape
    if transposed:
        c_in, n_base = shape[0], shape[1]
        out = (c_in, n_rolls * n_base, *shape[2:])
    else:
        n_base, c_in = shape[0], shape[1]
        out = (n_rolls * n_base, c_in, *shape[2:])
    idx = _bank_index(c_in, n_base, n_rolls, transposed, weight)
    return torch.index_select(weight.reshape(c_in * n_base, -1), 0, idx).view(out)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _over_padded_3d_cpu(x, weight, padding, dilation) -> bool:
    """A 3D layer on the CPU that needs a weight gradient and is padded above "same" (over_padded_3d): torch's
    conv3d / conv_transpose3d must not see that padding. Explicit zero padding before the convolution, or
    padding 0 and a crop after the transposed one, is the same function without that case."""
    if weight.dim() != 5 or x.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or weight.requires_grad):
        return False
    return over_padded_3d(weight.shape[2:], padding, dilation)


def _reference_conv(x, weight, bias, stride, padding, dilation, n_rolls):
    bank = expand_bank(weight, n_rolls)
    if _over_padded_3d_cpu(x, weight, padding, dilation):
        return F.conv3d(pad_explicitly(x, padding), bank, bias, stride, 0, dilation)
    return _CONV[weight.dim() - 2](x, bank, bias, stride, padding, dilation)


def _reference_conv_t(x, weight, bias, stride, padding, output_padding, dilation, n_rolls):
    bank = expand_bank(weight, n_rolls, True)
    if _over_padded_3d_cpu(x, weight, padding, dilation):
        y = F.conv_transpose3d(x, bank, bias, stride, 0, output_padding, 1, dilation)
        y = y[(slice(None), slice(None)) + tuple(slice(p, y.shape[2 + i] - p) for i, p in enumerate(padding))]
        return y.contiguous(memory_format=out_memory_format(x))
    return _CONV_T[weight.dim() - 2](x, bank, bias, stride, padding, output_padding, 1, dilation)


register_impl(OP, "reference", _reference_conv, supports_any)
register_impl(OP_T, "reference", _reference_conv_t, supports_any)


# --------------------------------------------------------------------------------------
# backends "cpu" / "cuda": the compiled ops torch.ops.medconv.rolling_conv*
# --------------------------------------------------------------------------------------
def _compiled_conv(x, weight, bias, stride, padding, dilation, n_rolls):
    return torch.ops.medconv.rolling_conv(x, weight, bias, stride, padding, dilation, n_rolls)


def _compiled_conv_t(x, weight, bias, stride, padding, output_padding, dilation, n_rolls):
    return torch.ops.medconv.rolling_conv_transpose(x, weight, bias, stride, padding, output_padding, dilation, n_rolls)


CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

if _ext.has_compiled_ops():
    register_impl(OP, "cpu", _compiled_conv, supports_device_dtypes("cpu", CPU_DTYPES))
    register_impl(OP_T, "cpu", _compiled_conv_t, supports_device_dtypes("cpu", CPU_DTYPES))
    register_impl(OP, "cuda", _compiled_conv, supports_device_dtypes("cuda", CUDA_DTYPES))
    register_impl(OP_T, "cuda", _compiled_conv_t, supports_device_dtypes("cuda", CUDA_DTYPES))

    # ---- fake kernels (shapes only), so the ops trace under torch.compile ----
    @torch.library.register_fake("medconv::rolling_conv")
    def _(x, weight, bias, stride, padding, dilation, n_rolls):
        return x.new_empty(rolling_out_shape(x.shape, weight.shape, stride, padding, dilation, n_rolls))

    @torch.library.register_fake("medconv::rolling_conv_transpose")
    def _(x, weight, bias, stride, padding, output_padding, dilation, n_rolls):
        return x.new_empty(rolling_out_shape(x.shape, weight.shape, stride, padding, dilation, n_rolls, True,
                                             output_padding))

    for _name in ("rolling_conv_grad_input", "rolling_conv_transpose_grad_input"):
        torch.library.register_fake("medconv::" + _name)(
            lambda grad_out, weight, input_size, stride, padding, dilation, n_rolls: grad_out.new_empty(input_size))
    for _name in ("rolling_conv_grad_weight", "rolling_conv_transpose_grad_weight"):
        torch.library.register_fake("medconv::" + _name)(
            lambda grad_out, x, weight_size, stride, padding, dilation, n_rolls: grad_out.new_empty(weight_size))

    # ---- autograd: gradients by the compiled grad kernels (paper eq. 7 and 8) ----
    _ops = torch.ops.medconv
    torch.library.register_autograd(
        "medconv::rolling_conv",
        make_rolling_backward(lambda *a: _ops.rolling_conv_grad_input(*a), lambda *a: _ops.rolling_conv_grad_weight(*a), 4),
        setup_context=make_rolling_setup(3))
    torch.library.register_autograd(
        "medconv::rolling_conv_transpose",
        make_rolling_backward(lambda *a: _ops.rolling_conv_transpose_grad_input(*a),
                              lambda *a: _ops.rolling_conv_transpose_grad_weight(*a), 5),
        setup_context=make_rolling_setup(3))
    # double backward (gradients of the gradient ops: _common.register_grad_op_autograd)
    register_grad_op_autograd(
        "medconv::rolling_conv_grad_input", "medconv::rolling_conv_grad_weight",
        lambda x, w, s, p, op, d, n: _ops.rolling_conv(x, w, None, s, p, d, n),
        lambda *a: _ops.rolling_conv_grad_input(*a), lambda *a: _ops.rolling_conv_grad_weight(*a), False)
    register_grad_op_autograd(
        "medconv::rolling_conv_transpose_grad_input", "medconv::rolling_conv_transpose_grad_weight",
        lambda x, w, s, p, op, d, n: _ops.rolling_conv_transpose(x, w, None, s, p, op, d, n),
        lambda *a: _ops.rolling_conv_transpose_grad_input(*a), lambda *a: _ops.rolling_conv_transpose_grad_weight(*a),
        True)
