"""Triton kernels of involution (docs/design.md §2), 2D and 3D: forward, grad_input, grad_weight.

    out[n, c, p] = sum_t weight[n, g(c), t, p] * x[n, c, p*s + t*d - pad],   g(c) = c // (C // G)

x (N, C, *S), weight (N, G, *K, *S_out), out (N, C, *S_out); 2D runs as 3D with a depth of 1.

Program layout (one flattened grid axis, so no grid-dimension limit applies; int64 offsets):
- forward: a program owns BLOCK_P output positions of one (n, group) and BLOCK_C channels of
  that group. Per tap it loads the BLOCK_P weight values once and applies them to all BLOCK_C
  channels (the weight value is reused by the channels of its group); the x window of
  neighbouring outputs overlaps from tap to tap and is served from L1/L2 (Triton manages the
  on-chip staging itself).
- grad_input (gather form): a program owns BLOCK_P input positions and BLOCK_C channels; an
  output p reaches input i through tap t iff p*s == i + pad - t*d, checked per lane.
- grad_weight (gather form): a program owns BLOCK_P output positions of one (n, group, tap) and
  reduces over the C/G channels of the group in chunks of BLOCK_C.
Every output element is written by exactly one program: no atomics, deterministic.
Accumulation in float32 (float64 for float64 inputs).

On a GPU the block sizes are autotuned; under TRITON_INTERPRET=1 (CPU tensors, tests) one small
fixed configuration is used. Only Triton APIs present in both 3.6 and 3.8 are used.
"""
import os
from typing import List, Sequence

import torch
import triton
import triton.language as tl

from . import _configs as _cfg

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# (BLOCK_P, BLOCK_C, num_warps), shared by the three kernels; autotuned on a GPU minus the ones pruned for
# its architecture (_configs.PRUNED); one config under the interpreter; MEDCONV_TRITON_CONFIG pins one.
CONFIG_LIST = [(128, 16, 4), (256, 16, 8), (64, 16, 4), (128, 8, 4), (256, 8, 4), (256, 4, 4),
               (512, 2, 4), (512, 1, 4), (256, 1, 2)]
INTERPRET_CONFIG = (128, 8, 1)


def _configs(kernel):
    return [triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=nw)
            for bp, bc, nw in _cfg.select(kernel, CONFIG_LIST, INTERPRET_CONFIG)]


_KEY = ["Cg", "So", "Si", "KD", "KH", "KW", "SH", "SW"]


@triton.jit
def tap_offset(t, So):
    """t * So in int64: the weight rows of tap t start t * S_out elements into a sample's (n, g) block,
    which passes 2^31 when K^d * S_out does (t and So are 32-bit: widen first)."""
    return tl.cast(t, tl.int64) * So


@triton.autotune(configs=_configs("involution_fwd"), key=_KEY)
@triton.jit
def _involution_fwd_kernel(
    x_ptr, w_ptr, out_ptr,
    C, G, Cg, D, H, W, Do, Ho, Wo, So, Si,
    KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    npb = tl.cdiv(So, BLOCK_P)
    ncb = tl.cdiv(Cg, BLOCK_C)
    pb = pid % npb
    rest = pid // npb
    cb = rest % ncb
    ng = rest // ncb                      # n * G + g
    n = ng // G
    g = ng % G

    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_p = offs_p < So
    ow = offs_p % Wo
    oh = (offs_p // Wo) % Ho
    od = offs_p // (Wo * Ho)
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = cc < Cg
    chan = n * C + g * Cg + cc            # global channel row, int64
    x_rows = x_ptr + chan[:, None] * Si
    w_row = w_ptr + ng * (KD * KH * KW) * So + offs_p

    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for a in range(0, KD):
        idd = od * SD - PD + a * DD
        md = mask_p & (idd >= 0) & (idd < D)
        for b in range(0, KH):
            ih = oh * SH - PH + b * DH
            mh = md & (ih >= 0) & (ih < H)
            for e in range(0, KW):
                iw = ow * SW - PW + e * DW
                m = mh & (iw >= 0) & (iw < W)
                t = (a * KH + b) * KW + e
                wv = tl.load(w_row + tap_offset(t, So), mask=mask_p, other=0.0).to(ACC)
                xv = tl.load(x_rows + ((idd * H + ih) * W + iw)[None, :],
                             mask=mask_c[:, None] & m[None, :], other=0.0).to(ACC)
                acc += wv[None, :] * xv
    out_ptrs = out_ptr + chan[:, None] * So + offs_p[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


@triton.autotune(configs=_configs("involution_grad_input"), key=_KEY)
@triton.jit
def _involution_grad_input_kernel(
    gy_ptr, w_ptr, gx_ptr,
    C, G, Cg, D, H, W, Do, Ho, Wo, So, Si,
    KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    npb = tl.cdiv(Si, BLOCK_P)
    ncb = tl.cdiv(Cg, BLOCK_C)
    pb = pid % npb
    rest = pid // npb
    cb = rest % ncb
    ng = rest // ncb
    n = ng // G
    g = ng % G

    offs_i = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_i = offs_i < Si
    iw = offs_i % W
    ih = (offs_i // W) % H
    idd = offs_i // (W * H)
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = cc < Cg
    chan = n * C + g * Cg + cc
    gy_rows = gy_ptr + chan[:, None] * So
    w_base = w_ptr + ng * (KD * KH * KW) * So

    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for a in range(0, KD):
        qd = idd + PD - a * DD
        # qd >= 0 is tested first: for negative qd the remainder's sign differs between the
        # interpreter (numpy) and the GPU, but such lanes are masked either way.
        qd_c = tl.where(qd >= 0, qd, 0)
        pd_ = qd_c // SD
        md = mask_i & (qd >= 0) & (qd_c - pd_ * SD == 0) & (pd_ < Do)
        for b in range(0, KH):
            qh = ih + PH - b * DH
            qh_c = tl.where(qh >= 0, qh, 0)
            ph_ = qh_c // SH
            mh = md & (qh >= 0) & (qh_c - ph_ * SH == 0) & (ph_ < Ho)
            for e in range(0, KW):
                qw = iw + PW - e * DW
                qw_c = tl.where(qw >= 0, qw, 0)
                pw_ = qw_c // SW
                m = mh & (qw >= 0) & (qw_c - pw_ * SW == 0) & (pw_ < Wo)
                p = (pd_ * Ho + ph_) * Wo + pw_
                p = tl.where(m, p, 0)
                t = (a * KH + b) * KW + e
                wv = tl.load(w_base + tap_offset(t, So) + p, mask=m, other=0.0).to(ACC)
                gv = tl.load(gy_rows + p[None, :], mask=mask_c[:, None] & m[None, :], other=0.0).to(ACC)
                acc += wv[None, :] * gv
    gx_ptrs = gx_ptr + chan[:, None] * Si + offs_i[None, :]
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_i[None, :])


@triton.autotune(configs=_configs("involution_grad_weight"), key=_KEY)
@triton.jit
def _involution_grad_weight_kernel(
    gy_ptr, x_ptr, gw_ptr,
    C, G, Cg, D, H, W, Do, Ho, Wo, So, Si,
    KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    KT = KD * KH * KW
    npb = tl.cdiv(So, BLOCK_P)
    pb = pid % npb
    rest = pid // npb
    t = rest % KT
    ng = rest // KT
    n = ng // G
    g = ng % G
    e = t % KW
    b = (t // KW) % KH
    a = t // (KW * KH)

    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_p = offs_p < So
    ow = offs_p % Wo
    oh = (offs_p // Wo) % Ho
    od = offs_p // (Wo * Ho)
    idd = od * SD - PD + a * DD
    ih = oh * SH - PH + b * DH
    iw = ow * SW - PW + e * DW
    m = mask_p & (idd >= 0) & (idd < D) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    x_off = (idd * H + ih) * W + iw

    acc = tl.zeros((BLOCK_P,), dtype=ACC)
    for c0 in range(0, Cg, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask_c = cc < Cg
        chan = n * C + g * Cg + cc
        gv = tl.load(gy_ptr + chan[:, None] * So + offs_p[None, :],
                     mask=mask_c[:, None] & mask_p[None, :], other=0.0).to(ACC)
        xv = tl.load(x_ptr + chan[:, None] * Si + x_off[None, :],
                     mask=mask_c[:, None] & m[None, :], other=0.0).to(ACC)
        acc += tl.sum(gv * xv, axis=0)
    tl.store(gw_ptr + (ng * KT + t) * So + offs_p, acc.to(gw_ptr.dtype.element_ty), mask=mask_p)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def geometry(op: str, in_size: Sequence[int], groups: int, kernel_size, stride, padding, dilation) -> dict:
    """The 3D geometry (2D gets a depth of 1) with the checks a direct call needs so that no
    kernel can read out of bounds."""
    in_size = [int(v) for v in in_size]
    dims = len(in_size) - 2
    if dims not in (2, 3):
        raise ValueError("%s: the input must be (N, C, H, W) or (N, C, D, H, W), got size %s" % (op, in_size))
    lists = {}
    for name, val, lo in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                          ("dilation", dilation, 1)):
        val = [int(v) for v in val]
        if len(val) != dims or any(v < lo for v in val):
            raise ValueError("%s: %s must be %d ints >= %d, got %s" % (op, name, dims, lo, val))
        lists[name] = val
    N, C = in_size[0], in_size[1]
    if groups < 1 or C % groups != 0:
        raise ValueError("%s: C=%d channels must be divisible by G=%d groups (G >= 1)" % (op, C, groups))
    pad3 = lambda v, fill: [fill] * (3 - dims) + v  # noqa: E731
    S = pad3(in_size[2:], 1)
    K, St, P, Dl = (pad3(lists["kernel_size"], 1), pad3(lists["stride"], 1), pad3(lists["padding"], 0),
                    pad3(lists["dilation"], 1))
    for i in range(3 - dims, 3):
        if S[i] + 2 * P[i] < Dl[i] * (K[i] - 1) + 1:
            raise ValueError("%s: the kernel (size %d, dilation %d) is larger than the padded input along spatial "
                             "dim %d (size %d + 2*padding %d)" % (op, K[i], Dl[i], i - (3 - dims), S[i], P[i]))
    O = [_out_size(S[i], K[i], St[i], P[i], Dl[i]) for i in range(3)]
    return dict(dims=dims, N=N, C=C, G=groups, Cg=C // groups, S=S, K=K, St=St, P=P, Dl=Dl, O=O,
                So=O[0] * O[1] * O[2], Si=S[0] * S[1] * S[2],
                out_size=[N, C] + O[3 - dims:], weight_size=[N, groups] + K[3 - dims:] + O[3 - dims:])


def _check_tensor(op, name, t, device=None, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError("%s: %s must be a tensor, got %s" % (op, name, type(t).__name__))
    if t.dtype not in DTYPES:
        raise TypeError("%s: %s must be float32, float16, bfloat16 or float64, got %s" % (op, name, t.dtype))
    if dtype is not None and t.dtype != dtype:
        raise TypeError("%s: %s has dtype %s, expected %s" % (op, name, t.dtype, dtype))
    if device is not None and t.device != device:
        raise ValueError("%s: %s is on %s, expected %s" % (op, name, t.device, device))


def _args(g):
    D, H, W = g["S"]
    Do, Ho, Wo = g["O"]
    (KD, KH, KW), (SD, SH, SW), (PD, PH, PW), (DD, DH, DW) = g["K"], g["St"], g["P"], g["Dl"]
    return (g["C"], g["G"], g["Cg"], D, H, W, Do, Ho, Wo, g["So"], g["Si"],
            KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW)


def _empty(size, like: torch.Tensor) -> torch.Tensor:
    """Every output buffer comes from here (tests replace it to poison outputs with NaN)."""
    return torch.empty([int(v) for v in size], dtype=like.dtype, device=like.device)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _on_device:
    """Makes the tensor's GPU current while Triton launches (it launches on the current one)."""

    def __init__(self, t):
        self.ctx = torch.cuda.device(t.device) if t.is_cuda else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def involution_forward(x: torch.Tensor, weight: torch.Tensor, kernel_size: List[int], stride: List[int],
                       padding: List[int], dilation: List[int]) -> torch.Tensor:
    op = "involution_triton"
    _check_tensor(op, "x", x)
    _check_tensor(op, "weight", weight, x.device, x.dtype)
    if weight.dim() != 2 * x.dim() - 2:
        raise ValueError("%s: weight must be (N, G, *kernel_size, *output_size), got shape %s"
                         % (op, tuple(weight.shape)))
    g = geometry(op, x.shape, weight.shape[1], kernel_size, stride, padding, dilation)
    if list(weight.shape) != g["weight_size"]:
        raise ValueError("%s: weight must have shape %s for these arguments, got %s"
                         % (op, tuple(g["weight_size"]), tuple(weight.shape)))
    out = _empty(g["out_size"], x)
    if out.numel() == 0:
        return out
    xc, wc = x.contiguous(), weight.contiguous()
    grid = lambda meta: (g["N"] * g["G"] * triton.cdiv(g["Cg"], meta["BLOCK_C"])  # noqa: E731
                         * triton.cdiv(g["So"], meta["BLOCK_P"]),)
    with _on_device(x):
        _involution_fwd_kernel[grid](xc, wc, out, *_args(g), ACC=_acc(x.dtype))
    return out


def involution_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, input_size: List[int],
                          kernel_size: List[int], stride: List[int], padding: List[int],
                          dilation: List[int]) -> torch.Tensor:
    op = "involution_triton_grad_input"
    _check_tensor(op, "grad_out", grad_out)
    _check_tensor(op, "weight", weight, grad_out.device, grad_out.dtype)
    g = geometry(op, input_size, weight.shape[1] if weight.dim() > 1 else 0, kernel_size, stride, padding, dilation)
    if list(weight.shape) != g["weight_size"] or list(grad_out.shape) != g["out_size"]:
        raise ValueError("%s: expected weight %s and grad_out %s, got %s and %s"
                         % (op, tuple(g["weight_size"]), tuple(g["out_size"]), tuple(weight.shape),
                            tuple(grad_out.shape)))
    gx = _empty(input_size, grad_out)
    if gx.numel() == 0:
        return gx
    gyc, wc = grad_out.contiguous(), weight.contiguous()
    grid = lambda meta: (g["N"] * g["G"] * triton.cdiv(g["Cg"], meta["BLOCK_C"])  # noqa: E731
                         * triton.cdiv(g["Si"], meta["BLOCK_P"]),)
    with _on_device(grad_out):
        _involution_grad_input_kernel[grid](gyc, wc, gx, *_args(g), ACC=_acc(grad_out.dtype))
    return gx


def involution_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, kernel_size: List[int], stride: List[int],
                           padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    op = "involution_triton_grad_weight"
    _check_tensor(op, "grad_out", grad_out)
    _check_tensor(op, "x", x, grad_out.device, grad_out.dtype)
    g = geometry(op, x.shape, int(groups), kernel_size, stride, padding, dilation)
    if list(grad_out.shape) != g["out_size"]:
        raise ValueError("%s: grad_out must have shape %s, got %s" % (op, tuple(g["out_size"]), tuple(grad_out.shape)))
    gw = _empty(g["weight_size"], x)
    if gw.numel() == 0:
        return gw
    if g["Cg"] == 0:
        return gw.zero_()
    gyc, xc = grad_out.contiguous(), x.contiguous()
    KT = g["K"][0] * g["K"][1] * g["K"][2]
    grid = lambda meta: (g["N"] * g["G"] * KT * triton.cdiv(g["So"], meta["BLOCK_P"]),)  # noqa: E731
    with _on_device(x):
        _involution_grad_weight_kernel[grid](gyc, xc, gw, *_args(g), ACC=_acc(x.dtype))
    return gw
