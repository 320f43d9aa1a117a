"""Backend "spectral" of rolling convolution (docs/design.md §1): channel rFFT, per-frequency
depthwise complex convolution, inverse rFFT. Exact (same result as the dense bank up to
floating-point rounding), on any device, for 2D and 3D, forward and transposed.

For a fixed tap the rolled bank is circulant over channels, so with X = rfft(x, channel) and
Wb = rfft(w[b], channel) every frequency f is an independent depthwise convolution:

    Y_b[f] = conv(X[f], conj(Wb[f]))       y[:, r*n_base + b] = irfft(Y_b, n=C_in)[r], r < n_rolls

The complex product (a - ib)(c + id) = (ca + db) + i(da - cb) is computed with ONE real
depthwise convolution (groups == channels): the input holds [c, d] and the swapped [d, c] of
every frequency (two halves of the channel axis), the weights [a, a] and [b, -b], and the two
halves of the output are added.
Why this shape (measured on a 2-vCPU x86-64 virtual machine, see docs/rolling_conv_spectral.md):
  * plain depthwise convolution (multiplier 1) is oneDNN's fast path; a grouped conv with 2
    in/2 out channels per group (the obvious real form of a complex conv) was ~9x slower
    (3D 5^3 C=128 at 16^3: 33.8 ms vs 3.8 ms for 2F channels), a depthwise conv with channel
    multiplier 2 ~11x slower, torch's complex conv ~3.5x slower;
  * channels-last layout: the channel FFT then runs along the contiguous last axis (5x faster
    than a strided rfft over dim 1) and oneDNN's depthwise kernel prefers it (1.5x);
  * the channel DFT as one GEMM (which also writes the swapped half) beats transposition + rFFT
    + cat up to C_in = 128 (GEMM_MAX_C); the rFFT wins above.
  * the output stays in channels-last memory (see _finish).
Backward: autograd through this composition, which is itself spectral (irfft^T, depthwise
conv adjoints, rfft^T): it never builds the dense bank, and it traces under
torch.compile(fullgraph=True). float16/bfloat16 are computed in float32 and cast back.
On CUDA the same composition runs on cuFFT and cuDNN's depthwise kernels.
"""
import functools
import math
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from ..backends import _IMPLS, register_impl
from ._common import all_finite, conv_transpose_out_size, over_padded_3d, pad_explicitly
from ..reference import rolling_conv as _ref

OP = "rolling_conv"
OP_T = "rolling_conv_transpose"

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# depthwise convolution with fast adjoints on the CPU
# --------------------------------------------------------------------------------------
# oneDNN's forward depthwise conv (channels-last) is its fast path; its depthwise backward-data
# and transposed conv are ~10x slower than the forward in 3D, and backward-weight ~3.5x
# (3D 5^3, 260 channels at 16^3; contiguous NCDHW backward-weight was ~20x slower still). So on
# the CPU the adjoint of a depthwise conv is computed as a FORWARD depthwise conv with flipped
# taps over the (zero-interleaved, for stride > 1) gradient, and the transposed conv likewise.

def _cl_format(dims: int):
    return torch.channels_last if dims == 2 else torch.channels_last_3d


def _conv_adjoint(g: torch.Tensor, w: torch.Tensor, in_size: List[int], stride: List[int], padding: List[int],
                  dilation: List[int]) -> torch.Tensor:
    """Adjoint (w.r.t. the input) of the depthwise conv(u, w, stride, padding, dilation, groups=G)
    for an input of spatial size in_size, applied to g: sum_{p, t: p*s + t*d - pad = i} g[p] w[t]."""
    dims = g.dim() - 2
    ks = w.shape[2:]
    if any(s > 1 for s in stride):
        up = [(n - 1) * s + 1 for n, s in zip(g.shape[2:], stride)]
        g_up = g.new_zeros((g.shape[0], g.shape[1], *up)).contiguous(memory_format=_cl_format(dims))
        g_up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)] = g
        g = g_up
    conv_pad, extra, need_pad = [], [], False
    for n_in, n_up, k, p, d in zip(in_size, g.shape[2:], ks, padding, dilation):
        left = (k - 1) * d - p
        right = n_in + (k - 1) * d - n_up - left
        sym = min(left, right)
        if sym < 0:  # cropping: let F.pad do it all
            conv_pad.append(0)
            extra.append((left, right))
            need_pad = True
        else:
            conv_pad.append(sym)
            extra.append((left - sym, right - sym))
            need_pad = need_pad or left != right
    if need_pad:
        flat = []
        for lr in reversed(extra):
            flat.extend(lr)
        g = F.pad(g, flat)
    return _CONV[dims](g, w.flip(list(range(2, 2 + dims))), None, 1, conv_pad, dilation, g.shape[1])


def _conv_weight_grad(grad_out: torch.Tensor, inp: torch.Tensor, w: torch.Tensor, stride, padding, dilation):
    dims = inp.dim() - 2
    return torch.ops.aten.convolution_backward(grad_out, inp, w, None, stride, padding, dilation, False,
                                               [0] * dims, inp.shape[1], [False, True, False])[1]


def _grad_finite(g: torch.Tensor) -> bool:
    """Whether the gradient g is finite, by one sum (a NaN or Inf anywhere makes it non-finite; a sum that
    overflows only takes the exact path below needlessly): a vectorized reduction, ~1% of the backward
    (a check of the border bands alone, by strided slices, cost more). Under torch.compile, or traced by AOT
    autograd: True (no data-dependent branch in the graph; the compiled backward keeps the finite border sum)."""
    if torch.compiler.is_compiling() or (type(g) is not torch.Tensor and is_fake(g)):  # a plain tensor is not fake
        return True
    return math.isfinite(g.sum().item())


def _conv_weight_grad_padded(grad_out, inp, w, stride, padding, dilation):
    """The weight gradient with torch's semantics at the border: oneDNN's depthwise weight gradient skips the
    zero padding, where torch's dense conv multiplies it (NaN * 0 = NaN for a NaN or Inf incoming gradient at
    an output whose tap reads padding). Explicit zeros are multiplied; used when such a gradient is there, and
    for 3D kernels padded above "same", where oneDNN's weight gradient with the padding was wrong
    (over_padded_3d)."""
    if not any(padding) or (not over_padded_3d(w.shape[2:], padding, dilation) and _grad_finite(grad_out)):
        return _conv_weight_grad(grad_out, inp, w, stride, padding, dilation)
    return _conv_weight_grad(grad_out, pad_explicitly(inp, padding), w, stride, [0] * len(padding), dilation)


class _DepthwiseConvCPU(torch.autograd.Function):
    """y = depthwise conv (transposed=False) or its adjoint, the transposed conv (transposed=True),
    forward and backward both by forward depthwise convs (see above)."""

    @staticmethod
    def forward(ctx, u, w, stride, padding, dilation, out_size, transposed):
        ctx.save_for_backward(u, w)
        ctx.params = (stride, padding, dilation, transposed)
        if transposed:
            return _conv_adjoint(u, w, out_size, stride, padding, dilation)
        return _CONV[u.dim() - 2](u, w, None, stride, padding, dilation, u.shape[1])

    @staticmethod
    def backward(ctx, g):
        u_in, w_in = ctx.saved_tensors
        stride, padding, dilation, transposed = ctx.params
        # Under autocast the forward's conv ran in the autocast dtype on (u, w) of different dtypes
        # (u: bf16 from the matmul, w: float32); the backward runs outside autocast: compute it in
        # the wider dtype and return each gradient in its input's dtype.
        cdt = torch.promote_types(torch.promote_types(u_in.dtype, w_in.dtype), g.dtype)
        u, w = u_in.to(cdt), w_in.to(cdt)
        g = g.to(cdt).contiguous(memory_format=_cl_format(g.dim() - 2))
        gu = gw = None
        if transposed:
            # <convT(u, w), g> = <u, conv(g, w)>. With output_padding >= stride (allowed when
            # dilation > stride) conv(g, w) has floor(output_padding / stride) more positions than u
            # per axis; they belong to no input: crop them from the input gradient, and give them a
            # zero "grad_output" in the weight gradient.
            dims = g.dim() - 2
            conv_g = _CONV[dims](g, w, None, stride, padding, dilation, g.shape[1])
            if ctx.needs_input_grad[0]:
                gu = conv_g[(slice(None), slice(None)) + tuple(slice(0, n) for n in u.shape[2:])]
            if ctx.needs_input_grad[1]:
                extra = []
                for n_conv, n_u in zip(reversed(conv_g.shape[2:]), reversed(u.shape[2:])):
                    extra.extend([0, n_conv - n_u])
                u_full = F.pad(u, extra) if any(extra) else u
                if over_padded_3d(w.shape[2:], padding, dilation):  # see _conv_weight_grad_padded
                    gw = _conv_weight_grad(u_full, pad_explicitly(g, padding), w, stride, [0] * dims, dilation)
                else:
                    gw = _conv_weight_grad(u_full, g, w, stride, padding, dilation)
        else:
            if ctx.needs_input_grad[0]:
                gu = _conv_adjoint(g, w, list(u.shape[2:]), stride, padding, dilation)
            if ctx.needs_input_grad[1]:
                gw = _conv_weight_grad_padded(g, u, w, stride, padding, dilation)
        gu = gu.to(u_in.dtype) if gu is not None else None
        gw = gw.to(w_in.dtype) if gw is not None else None
        return gu, gw, None, None, None, None, None


def _use_cpu_adjoints(u: torch.Tensor) -> bool:
    # Elsewhere (CUDA: cuDNN) the native depthwise conv / conv_transpose and their autograd are used.
    return u.device.type == "cpu" and u.dim() in (4, 5)


def _depthwise(u, w, stride, padding, dilation):
    if _use_cpu_adjoints(u):
        return _DepthwiseConvCPU.apply(u, w, stride, padding, dilation, None, False)
    return _CONV[u.dim() - 2](u, w, None, stride, padding, dilation, u.shape[1])


def _depthwise_transpose(u, w, stride, padding, output_padding, dilation):
    if _use_cpu_adjoints(u):
        out_size = [conv_transpose_out_size(n, k, s, p, op_, d) for n, k, s, p, op_, d in
                    zip(u.shape[2:], w.shape[2:], stride, padding, output_padding, dilation)]
        return _DepthwiseConvCPU.apply(u, w, stride, padding, dilation, out_size, True)
    return _CONV_T[u.dim() - 2](u, w, None, stride, padding, output_padding, u.shape[1], dilation)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Transforms and accumulation in float32 for 16-bit inputs (docs/design.md §1).
    return torch.float32 if dtype in _LOW_PRECISION else dtype


# Channel DFT as a GEMM below this C_in, rFFT above. The GEMM reads NC(D)HW x through a transposed
# view and writes the depthwise input (swapped copy included) in one call, where the FFT path needs
# a transposition copy, the rFFT and a cat (1 thread, thread CPU time: C=32 at 24^3: 1.6 vs 4.6 ms;
# C=64 at 16^3: 1.3 vs 2.7; C=128 at 16^3: 4.7 vs 5.9; C=512 at 32^2: 13.5 vs 9.0).
GEMM_MAX_C = 128


def _dft4_matrix(c_in: int, device, dtype) -> torch.Tensor:
    """(C, 4F) real matrix: x (.., C) @ M = [Re X, Im X] interleaved per f, then [Im X, Re X]."""
    c = torch.arange(c_in, device=device, dtype=torch.float64)
    f = torch.arange(c_in // 2 + 1, device=device, dtype=torch.float64)
    ang = torch.outer(c, f).remainder_(c_in) * (2 * math.pi / c_in)  # exact angle reduction first
    re, im = torch.cos(ang), -torch.sin(ang)
    m = torch.stack([torch.stack([re, im], -1), torch.stack([im, re], -1)], 1)  # (C, 2, F, 2)
    return m.reshape(c_in, -1).to(dtype)


_DFT_CACHE = {}


def _dft4(c_in: int, device, dtype) -> torch.Tensor:
    if torch.compiler.is_compiling():  # built in the graph (constant-folded), no Python-side cache
        return _dft4_matrix(c_in, device, dtype)
    key = (c_in, str(device), dtype)
    m = _DFT_CACHE.get(key)
    if m is None:
        # A matrix made under torch.inference_mode() would be an inference tensor, which autograd
        # refuses to save for backward in a later training call: make the cached one a normal tensor.
        with torch.inference_mode(False):
            m = _DFT_CACHE[key] = _dft4_matrix(c_in, device, dtype)
    return m


def _spectrum_channels_last(x: torch.Tensor, n_base: int) -> torch.Tensor:
    """x (N, C, *S) -> real depthwise-conv input (N, 4*n_base*F, *S) in channels-last memory:
    channel ((b*2 + j)*F + f)*2 + i holds [Re X[f], Im X[f]] (j=0) or [Im X[f], Re X[f]] (j=1),
    repeated for every base b (a depthwise conv has one filter per input channel)."""
    n, c_in, spatial = x.shape[0], x.shape[1], x.shape[2:]
    xl = x.movedim(1, -1)  # (N, *S, C)
    if c_in <= GEMM_MAX_C:
        u = torch.matmul(xl, _dft4(c_in, x.device, x.dtype))  # (N, *S, 4F)
    else:
        # the FFT runs along the contiguous axis (a strided rFFT over dim 1 was 5x slower)
        spec = torch.view_as_real(torch.fft.rfft(xl.contiguous(), dim=-1))  # (N, *S, F, 2)
        # [Re, Im] and the swapped [Im, Re] written by three strided copies into one buffer:
        # 2.8x faster than flip + cat at C_in=512, 32^2 (3 vs 8 ms with the rFFT, 2 threads)
        u = spec.new_empty((n, *spatial, 2, spec.shape[-2], 2))
        u[..., 0, :, :] = spec
        u[..., 1, :, 0] = spec[..., 1]
        u[..., 1, :, 1] = spec[..., 0]
        u = u.reshape(n, *spatial, -1)
    if n_base > 1:
        u = u.unsqueeze(-2).expand(*u.shape[:-1], n_base, u.shape[-1])
    u = u.reshape(n, *spatial, -1)
    return u.movedim(-1, 1)


def _spectral_weight(wb: torch.Tensor) -> torch.Tensor:
    """wb (n_base, C, *k) real -> depthwise weight (4*n_base*F, 1, *k) for _spectrum_channels_last:
    with Wb = a + ib, the pairs are (a, a) on [c, d] and (b, -b) on [d, c], so that summing the two
    gives conj(Wb) * (c + id) = (ca + db) + i(da - cb)."""
    k = wb.shape[2:]
    spec = torch.fft.rfft(wb, dim=1)  # (n_base, F, *k)
    a, b = spec.real, spec.imag
    w4 = torch.stack([torch.stack([a, a], dim=2), torch.stack([b, -b], dim=2)], dim=1)  # (B, 2, F, 2, *k)
    return w4.reshape(-1, 1, *k)


def _inverse(out: torch.Tensor, c_in: int, n_base: int, n_rolls: int) -> torch.Tensor:
    """Depthwise-conv output (N, 4*n_base*F, *S') channels-last -> y (N, n_rolls*n_base, *S')."""
    n, spatial = out.shape[0], out.shape[2:]
    o = out.movedim(1, -1).reshape(n, *spatial, n_base, 2, -1)  # (N, *S', B, 2, 2F), channels-last
    # the two halves add up to [Re, Im] of Y_b[f] (a strided add; a sum over a size-2 axis was 15x slower)
    o = (o[..., 0, :] + o[..., 1, :]).reshape(n, *spatial, n_base, -1, 2).contiguous()
    y = torch.fft.irfft(torch.view_as_complex(o), n=c_in, dim=-1)  # (N, *S', B, C)
    if n_rolls < c_in:
        y = y[..., :n_rolls]
    # channel o = r*n_base + b
    y = y.transpose(-1, -2).reshape(n, *spatial, n_rolls * n_base)
    # reshape may return a view into the larger FFT output (partial rolls): a dense channels-last tensor
    y = y.movedim(-1, 1)
    return y.contiguous(memory_format=_cl_format(y.dim() - 2)) if y.dim() in (4, 5) else y.contiguous()


def _finish(y: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    # The result is left in channels-last memory (its natural layout here), as torch's convs do for
    # channels-last inputs: converting to NC(D)HW would cost a full transposition (~3 ms of ~12 at
    # 3x3 C=512 32^2, 1 thread), and a following spectral layer, BatchNorm or ReLU takes it as is.
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, *([1] * (y.dim() - 2)))
    return y.to(x.dtype)


def _outside_autocast(fn):
    """The composition computes 16-bit inputs in float32 (_compute_dtype); under torch.autocast its
    matmuls and convolutions would be cast back to the autocast dtype, so autocast is off inside."""
    @functools.wraps(fn)
    def wrapper(x, *args):
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return fn(x, *args)
        return fn(x, *args)
    return wrapper


def _nonfinite_weight(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A NaN or Inf in the base, on a CPU tensor (outside torch.compile): such a layer runs torch's dense conv
    of the bank instead. The depthwise convolutions skip their zero padding (and the transposed conv of a
    stride > 1 multiplies the zero-interleaved gaps), so a non-finite weight would give finite border
    outputs where torch's conv gives NaN (Inf * 0), and NaN at the outputs a transposed tap never reaches.
    The check reads only the small base; on CUDA it would cost a host synchronization per call, so there
    the composition runs as is (docs/rolling_conv_spectral.md, "Non-finite values")."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(weight)
            and not all_finite(weight))


def _dense(fn, x, weight, bias, *args):
    """torch's conv of the bank (the reference backend) in the compute dtype, cast back like _finish."""
    cdt = _compute_dtype(x.dtype)
    b = bias.to(cdt) if bias is not None else None
    return fn(x.to(cdt), weight.to(cdt), b, *args).to(x.dtype)


@_outside_autocast
def rolling_conv_spectral(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          stride: List[int], padding: List[int], dilation: List[int], n_rolls: int) -> torch.Tensor:
    """Rolling convolution by the channel FFT. weight = base (n_base, C_in, *k)."""
    if x.numel() == 0:  # oneDNN/MKL FFT refuse empty transforms; nothing to compute anyway
        return _ref.rolling_conv(x, weight, bias, stride, padding, dilation, n_rolls)
    if _nonfinite_weight(x, weight):
        return _dense(_ref.rolling_conv, x, weight, bias, stride, padding, dilation, n_rolls)
    cdt = _compute_dtype(x.dtype)
    n_base, c_in = weight.shape[0], weight.shape[1]
    u = _spectrum_channels_last(x.to(cdt), n_base)
    w4 = _spectral_weight(weight.to(cdt))
    out = _depthwise(u, w4, stride, padding, dilation)
    return _finish(_inverse(out, c_in, n_base, n_rolls), bias, x)


@_outside_autocast
def rolling_conv_transpose_spectral(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                    stride: List[int], padding: List[int], output_padding: List[int],
                                    dilation: List[int], n_rolls: int) -> torch.Tensor:
    """Transposed rolling convolution by the channel FFT. weight = base (C_in, n_base, *k).
    W_t[c, r*n_base + b] = w[(c - r) mod C_in, b]: the same circular correlation over channels,
    so each frequency is a depthwise transposed conv with conj(rfft(w[:, b])[f])."""
    if x.numel() == 0:
        return _ref.rolling_conv_transpose(x, weight, bias, stride, padding, output_padding, dilation, n_rolls)
    if _nonfinite_weight(x, weight):
        return _dense(_ref.rolling_conv_transpose, x, weight, bias, stride, padding, output_padding, dilation,
                      n_rolls)
    cdt = _compute_dtype(x.dtype)
    c_in, n_base = weight.shape[0], weight.shape[1]
    u = _spectrum_channels_last(x.to(cdt), n_base)
    w4 = _spectral_weight(weight.to(cdt).transpose(0, 1))
    out = _depthwise_transpose(u, w4, stride, padding, output_padding, dilation)
    return _finish(_inverse(out, c_in, n_base, n_rolls), bias, x)


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _supports(device, dtype, **ctx) -> Optional[str]:
    if dtype not in _DTYPES:
        return "dtype %s is not supported (supported: %s)" % (dtype, ", ".join(str(d) for d in _DTYPES))
    return None


# --------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------
# "spectral" runs a fused kernel (one pass over the activations each way) where one is registered for the
# input's device type and supports the input, and the composition above everywhere else; "spectral_unfused"
# always runs the composition. The fused kernels register themselves on the "spectral" entry of the one
# backend registry (backends.register_fused): ops/rolling_conv_spectral_cpu.py for CPU tensors,
# ops/rolling_conv_spectral_triton.py for CUDA tensors; the choice is backends.Impl.kernel.
register_impl(OP, "spectral", rolling_conv_spectral, _supports)
register_impl(OP_T, "spectral", rolling_conv_transpose_spectral, _supports)
register_impl(OP, "spectral_unfused", rolling_conv_spectral, _supports)
register_impl(OP_T, "spectral_unfused", rolling_conv_transpose_spectral, _supports)


def _fused_for(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> Optional[Callable]:
    """The fused kernel the "spectral" backend runs for this input, or None where it runs the composition."""
    f = _IMPLS[OP_T if transposed else OP]["spectral"].fused_for(x, weight)
    return None if f is None else f.fn
