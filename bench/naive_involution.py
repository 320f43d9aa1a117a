"""Baseline `naive_per_output` of the GPU involution benchmark.

Stands for the published CuPy involution kernels (Li et al. 2021): one thread per output element,
no shared memory, no reuse of a weight value across the channels of its group, and the same
one-thread-per-element design for the two gradients (grad_input: one thread per input element
gathering over the taps; grad_weight: one thread per weight element summing over the C/G
channels of its group). Written in Triton so that it runs wherever the benchmark runs (no
runtime nvcc compile); each lane of a program is one "thread" of the published design.
The published kernels only handle float/double; this one also takes float16/bfloat16 (loaded,
computed in float32) so the bf16 rows of the benchmark have a baseline.

    from naive_involution import naive_involution_forward   # alias: naive_per_output
    out = naive_involution_forward(x, weight, kernel_size, stride, padding, dilation)  # differentiable
"""
import os
import sys
from typing import List

import torch
import triton
import triton.language as tl

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from medconv_ext.triton_kernels.involution import _on_device, geometry  # noqa: E402

BLOCK = 256  # "threads" per program


@triton.jit
def _naive_fwd(x_ptr, w_ptr, out_ptr, total, C, G, Cg, D, H, W, Do, Ho, Wo, So, Si,
               KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < total
    p = offs % So
    nc = offs // So
    c = nc % C
    n = nc // C
    g = c // Cg
    ow = p % Wo
    oh = (p // Wo) % Ho
    od = p // (Wo * Ho)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for a in range(0, KD):
        for b in range(0, KH):
            for e in range(0, KW):
                idd = od * SD - PD + a * DD
                ih = oh * SH - PH + b * DH
                iw = ow * SW - PW + e * DW
                m = mask & (idd >= 0) & (idd < D) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                t = (a * KH + b) * KW + e
                wv = tl.load(w_ptr + ((n * G + g) * (KD * KH * KW) + t) * So + p, mask=mask, other=0.0)
                xv = tl.load(x_ptr + nc * Si + (idd * H + ih) * W + iw, mask=m, other=0.0)
                acc += wv.to(tl.float32) * xv.to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _naive_grad_input(gy_ptr, w_ptr, gx_ptr, total, C, G, Cg, D, H, W, Do, Ho, Wo, So, Si,
                      KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < total
    i = offs % Si
    nc = offs // Si
    c = nc % C
    n = nc // C
    g = c // Cg
    iw = i % W
    ih = (i // W) % H
    idd = i // (W * H)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for a in range(0, KD):
        for b in range(0, KH):
            for e in range(0, KW):
                qd = idd + PD - a * DD
                qh = ih + PH - b * DH
                qw = iw + PW - e * DW
                qd_c = tl.where(qd >= 0, qd, 0)
                qh_c = tl.where(qh >= 0, qh, 0)
                qw_c = tl.where(qw >= 0, qw, 0)
                od = qd_c // SD
                oh = qh_c // SH
                ow = qw_c // SW
                m = (mask & (qd >= 0) & (qh >= 0) & (qw >= 0) & (od * SD == qd_c) & (oh * SH == qh_c)
                     & (ow * SW == qw_c) & (od < Do) & (oh < Ho) & (ow < Wo))
                p = tl.where(m, (od * Ho + oh) * Wo + ow, 0)
                t = (a * KH + b) * KW + e
                wv = tl.load(w_ptr + ((n * G + g) * (KD * KH * KW) + t) * So + p, mask=m, other=0.0)
                gv = tl.load(gy_ptr + nc * So + p, mask=m, other=0.0)
                acc += wv.to(tl.float32) * gv.to(tl.float32)
    tl.store(gx_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _naive_grad_weight(gy_ptr, x_ptr, gw_ptr, total, C, G, Cg, D, H, W, Do, Ho, Wo, So, Si,
                       KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < total
    KT = KD * KH * KW
    p = offs % So
    t = (offs // So) % KT
    ng = offs // (So * KT)
    n = ng // G
    g = ng % G
    e = t % KW
    b = (t // KW) % KH
    a = t // (KW * KH)
    ow = p % Wo
    oh = (p // Wo) % Ho
    od = p // (Wo * Ho)
    idd = od * SD - PD + a * DD
    ih = oh * SH - PH + b * DH
    iw = ow * SW - PW + e * DW
    m = mask & (idd >= 0) & (idd < D) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for cc in range(0, Cg):
        chan = n * C + g * Cg + cc
        gv = tl.load(gy_ptr + chan * So + p, mask=mask, other=0.0)
        xv = tl.load(x_ptr + chan * Si + (idd * H + ih) * W + iw, mask=m, other=0.0)
        acc += gv.to(tl.float32) * xv.to(tl.float32)
    tl.store(gw_ptr + offs, acc.to(gw_ptr.dtype.element_ty), mask=mask)


def _args(g):
    D, H, W = g["S"]
    Do, Ho, Wo = g["O"]
    (KD, KH, KW), (SD, SH, SW), (PD, PH, PW), (DD, DH, DW) = g["K"], g["St"], g["P"], g["Dl"]
    return (g["C"], g["G"], g["Cg"], D, H, W, Do, Ho, Wo, g["So"], g["Si"],
            KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW)


def _launch(kernel, a, b, out, g):
    total = out.numel()
    if total == 0:
        return out
    with _on_device(out):
        kernel[(triton.cdiv(total, BLOCK),)](a.contiguous(), b.contiguous(), out, total, *_args(g), BLOCK=BLOCK)
    return out


class _NaiveInvolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, kernel_size, stride, padding, dilation):
        g = geometry("naive_involution", x.shape, weight.shape[1], kernel_size, stride, padding, dilation)
        if list(weight.shape) != g["weight_size"]:
            raise ValueError("naive_involution: weight must have shape %s, got %s"
                             % (tuple(g["weight_size"]), tuple(weight.shape)))
        ctx.save_for_backward(x, weight)
        ctx.g = g
        return _launch(_naive_fwd, x, weight, x.new_empty(g["out_size"]), g)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = ctx.g
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _launch(_naive_grad_input, grad, weight, x.new_empty(x.shape), g)
        if ctx.needs_input_grad[1]:
            gw = _launch(_naive_grad_weight, grad, x, weight.new_empty(weight.shape), g)
        return gx, gw, None, None, None, None


def naive_involution_forward(x: torch.Tensor, weight: torch.Tensor, kernel_size: List[int], stride: List[int],
                             padding: List[int], dilation: List[int]) -> torch.Tensor:
    """Involution by the one-thread-per-element baseline; differentiable (autograd.Function)."""
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError("naive_involution: x and weight must share dtype and device, got %s/%s and %s/%s"
                         % (x.dtype, x.device, weight.dtype, weight.device))
    return _NaiveInvolution.apply(x, weight, list(kernel_size), list(stride), list(padding), list(dilation))


# The name the benchmark (bench/bench_involution.py) looks up: its impl column says "naive_per_output".
naive_per_output = naive_involution_forward
