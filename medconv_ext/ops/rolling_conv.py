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

from .. import _ext
from ..backends import register_impl, resolve, supports_any, supports_device_dtypes
from ..reference import rolling_conv as _ref
from ._common import (
    autocast_inputs,
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
    name, impl = resolve(op, backend, x.device, x.dtype, _auto_candidates(x, weight, transposed, n_rolls),
                       ctx={"transposed": transposed, "x_shape": tuple(x.shape), "w_shape": tuple(weight.shape)})
    if (name.startswith("spectral") and _bank_for_export()) or (name != "reference" and plain_onnx_export()):
        # exporters do not translate the channel FFT, and plain torch.onnx.export has no translation of the
        # package's operators: the same function as the bank + conv (medconv_ext.export)
        return resolve(op, "reference", x.device, x.dtype, [])
    return name, impl


_EXPORT_DEPTH = [0]  # > 0 inside medconv_ext.export.exporting()


def plain_onnx_export() -> bool:
    """True while torch.onnx.export runs outside medconv_ext.export.exporting() (that is, without the
    package's ONNX translations): every layer then computes with its pure-PyTorch "reference" backend,
    which both exporters translate (the dynamo-based one and the TorchScript-based one)."""
    if _EXPORT_DEPTH[0] > 0:
        return False
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except Exception:  # pragma: no cover - torch.onnx unavailable in this torch build
        return False


def _bank_for_export() -> bool:
    """True while a model is exported or traced: medconv_ext.export.exporting(), a torch.onnx export
    (its torch.export step included) or a torch.jit trace."""
    if _EXPORT_DEPTH[0] > 0 or torch.jit.is_tracing():
        return True
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except Exception:  # pragma: no cover - torch.onnx unavailable in this torch build
        return False


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
_FUSED_MIN_C_2D = 32  # 2D, >= 9 taps: spectral from C_in >= 32 ...
_FUSED_SMALL_WORK_2D = 16 * 32 * 32  # ... and for C_in >= 8 when C_in * pixels is at most this: there the
# per-call cost of building the bank (reference) exceeds the fused kernel's whole run
_FUSED_MIN_C_OUT_TRAIN_2D = 32  # 2D training also needs C_out >= 32 (the weight gradient is dearer)
_FUSED_MIN_C_OUT_FRACTION = 4  # C_out >= C_in / 4: the transforms cost ~C_in^2, the bank C_in * C_out
_FUSED_BF16_MIN_C_2D = 64  # bfloat16: oneDNN's bf16 conv (AVX512-BF16) runs ~2x its float32 rate
_FUSED_BF16_MIN_C_3D_27 = 32  # bfloat16 3D with 27 taps (3x3x3); 5x5x5 and up: any C_in


def _cpu_auto_candidates_fused(dims: int, c_in: int, c_out: int, taps: int, training: bool, pixels: int = 1 << 30,
                               bf16: bool = False) -> List[str]:
    if taps < _CPU_SPECTRAL_MIN_TAPS[dims] or c_out * _FUSED_MIN_C_OUT_FRACTION < c_in:
        return ["reference"]
    if dims == 3:
        if bf16 and taps < 125 and c_in < _FUSED_BF16_MIN_C_3D_27:
            return ["reference"]
        return ["spectral"]
    if bf16:
        return ["spectral"] if c_in >= _FUSED_BF16_MIN_C_2D and c_out >= _FUSED_BF16_MIN_C_2D else ["reference"]
    small = c_in >= 8 and c_in * pixels <= _FUSED_SMALL_WORK_2D
    if training:
        big = c_in >= _FUSED_MIN_C_2D and c_out >= _FUSED_MIN_C_OUT_TRAIN_2D
    else:
        big = c_in >= _FUSED_MIN_C_2D
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
        return _cpu_auto_candidates_fused(dims, c_in, c_out, taps, training, pixels, x.dtype == torch.bfloat16)
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
def _rolling_conv_nd(dims, x, weight, bias, stride, padding, dilation, n_rolls, backend,
                     scale=None, shift=None, relu=False):
    name = "rolling_conv%dd" % dims
    x, weight, bias, scale, shift = autocast_inputs(x, weight, bias, scale, shift)
    stride, padding, dilation, n_rolls, c_out = _check_common(
        name, x, weight, bias, dims, stride, padding, dilation, n_rolls, transposed=False)
    check_kernel_fits(x.shape[2:], weight.shape[2:], padding, dilation, name)
    check_epilogue(name, x, c_out, scale, shift, relu)
    _, impl = _choose(OP, x, weight, backend, transposed=False, n_rolls=n_rolls)
    return impl(x, weight, bias, stride, padding, dilation, n_rolls, scale=scale, shift=shift, relu=relu)


def _rolling_conv_transpose_nd(dims, x, weight, bias, stride, padding, output_padding, dilation, n_rolls, backend,
                               scale=None, shift=None, relu=False):
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
    _, impl = _choose(OP_T, x, weight, backend, transposed=True, n_rolls=n_rolls)
    return impl(x, weight, bias, stride, padding, output_padding, dilation, n_rolls, scale=scale, shift=shift,
                relu=relu)


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
register_impl(OP, "reference", _ref.rolling_conv, supports_any)
register_impl(OP_T, "reference", _ref.rolling_conv_transpose, supports_any)


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
