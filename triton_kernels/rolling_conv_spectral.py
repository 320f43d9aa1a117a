"""Triton kernels of the spectral rolling convolution (docs/design.md §1), installed as
medconv_ext.triton_kernels.rolling_conv_spectral.

For a fixed tap the rolled bank is circulant over channels, so with the real channel DFT
S = x . D (D = [cos | -sin], (C, 2F), F = C // 2 + 1) every frequency f is an independent complex
depthwise convolution, and the output rows r < n_rolls are one real GEMM with the inverse DFT:

    Y_b[f](q) = sum_t conj(Wb[f, t]) * S[f](src(q, t))         Wb = rfft(w[b]) (weight-sized, by torch)
    y[:, r * n_base + b](q) = sum_f Re/Im Y_b[f](q) . Iinv[f, r]   (only the n_rolls columns needed)

Three kernels, each a single pass over its operands:
    _spec_gemm_kernel         channel transform as tl.dot: out[n, b, p, :] = sum_e in[n, e*E_STEP + b, p] M[e, :]
                              (forward: x . D; backward: grad_out rows r*n_base + b . Iinv^T)
    _spec_mix_kernel          per output tile: the complex depthwise conv over the float32 spectrum
                              (summed over NBS spectrum bases), then tl.dot with M2 (Iinv restricted to
                              n_rolls rows; D^T for grad_input), then the epilogue (bias, per-channel scale
                              and shift, ReLU) and the store. Gather form for the transposed geometry
                              (INVERSE), as in rolling_conv.py.
    _spec_grad_weight_kernel  dWb[f, t] = sum_{n, p} G_b[f](p) (x) S[f](p*s + t*d - pad) (complex), per
                              fixed-order split, summed by torch; D (C x 2F) maps it back to the base.
What is fused: the depthwise product, the inverse transform and the epilogue (one kernel); the forward
channel DFT is a separate GEMM kernel whose float32 spectrum (N, P, 2F) goes through global memory
(L2 on the GPU) once. The halo of a tile is re-read per tap from L1/L2 (Triton stages it), not kept
in shared memory explicitly.

Precision (constexpr PREC of each dot): float32 inputs use input_precision="tf32x3" (three TF32
products: float32-level error on the tensor cores). float16/bfloat16 inputs multiply the channel
transforms (forward DFT, adjoint inverse DFT) as two native 16-bit dots with a hi/lo split of the float32
matrix (split16: hi + lo carries 16 or 22 significant bits; the 16-bit products are exact in float32), so
the spectrum is as accurate as with a float32 matrix. The float32 spectrum products of the mix kernel run
in tf32x3 for float16 results and TF32 for bfloat16 results (the spectrum can exceed the float16 range;
TF32 has float32's range). Everything accumulates in float32. Under TRITON_INTERPRET=1 every dot is an
IEEE float32 product of the same operands (the interpreter mishandles bfloat16 dots): the hi/lo split is
kept there, so the interpreter sees the matrices the GPU multiplies.

Geometry in conv terms as in rolling_conv.py: `lo` the conv-output grid, `hi` the conv-input grid;
hi = lo * stride + tap * dilation - padding. 2D runs as 3D with depth 1. Offsets are int64 (program ids
are widened before any multiplication).
"""
import math
import os
from typing import Tuple

import torch

from . import _configs

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_GRID_X = 2 ** 31 - 1
MAX_GRID_YZ = 65535

try:
    import triton
    import triton.language as tl

    TRITON_ERROR = None
except Exception as e:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    TRITON_ERROR = "triton is not importable (%s: %s)" % (type(e).__name__, e)


# ------------------------------------------------------------------------------------------
# plain-Python parts (testable without triton): transform matrices, weight spectra, plans
# ------------------------------------------------------------------------------------------
def n_freq(c: int) -> int:
    return c // 2 + 1


def dft_matrix(c: int, device, dtype=torch.float32) -> torch.Tensor:
    """D (C, 2F): x (.., C) @ D = [Re X[0..F), Im X[0..F)] with X = rfft(x)."""
    ci = torch.arange(c, dtype=torch.float64)
    f = torch.arange(n_freq(c), dtype=torch.float64)
    ang = torch.outer(ci, f).remainder_(c) * (2 * math.pi / c)  # exact angle reduction first
    return torch.cat([torch.cos(ang), -torch.sin(ang)], 1).to(device=device, dtype=dtype)


def inverse_matrix(c: int, n_rows: int, device, dtype=torch.float32) -> torch.Tensor:
    """Iinv (2F, n_rows): [Re Y, Im Y] @ Iinv = irfft(Y, n=C)[:n_rows] (the imaginary parts of the
    f = 0 and f = C/2 bins are ignored, as irfft does: their sine rows are zero)."""
    f = torch.arange(n_freq(c), dtype=torch.float64)
    r = torch.arange(n_rows, dtype=torch.float64)
    ang = torch.outer(f, r).remainder_(c) * (2 * math.pi / c)
    wgt = torch.full((n_freq(c), 1), 2.0, dtype=torch.float64)
    wgt[0] = 1.0
    if c % 2 == 0:
        wgt[-1] = 1.0
    re = wgt * torch.cos(ang) / c
    im = -wgt * torch.sin(ang) / c
    return torch.cat([re, im], 0).to(device=device, dtype=dtype)


def weight_spectrum(base_c_first: torch.Tensor) -> torch.Tensor:
    """base (n_base, C, *k) -> (n_base, T, 2F) float32: [Re Wb[f, t], Im Wb[f, t]] with Wb = rfft(base[b], C)."""
    nb, c = base_c_first.shape[0], base_c_first.shape[1]
    spec = torch.fft.rfft(base_c_first.float().reshape(nb, c, -1), dim=1)  # (nb, F, T)
    return torch.cat([spec.real, spec.imag], 1).transpose(1, 2).contiguous()  # (nb, T, 2F)


def forward_coef(wspec: torch.Tensor) -> torch.Tensor:
    """(NG=n_base, NBS=1, T, 2F): conj(Wb) per output group b."""
    f = wspec.shape[-1] // 2
    c = wspec.clone()
    c[..., f:] = -c[..., f:]
    return c.unsqueeze(1).contiguous()


def adjoint_coef(wspec: torch.Tensor) -> torch.Tensor:
    """(NG=1, NBS=n_base, T, 2F): Wb (the adjoint of multiplying by conj(Wb)), summed over the bases."""
    return wspec.unsqueeze(0).contiguous()


def grid_1d(programs: int) -> Tuple[int]:
    if programs > MAX_GRID_X:
        raise RuntimeError("rolling_conv_spectral (triton): %d programs exceed the grid limit %d"
                           % (programs, MAX_GRID_X))
    return (max(1, programs),)


def grad_weight_splits(items: int, entry_blocks: int, interpret: bool = INTERPRET) -> Tuple[int, int]:
    """(n_splits, chunk) of the (n, p) reduction: a constant target, not the SM count, so the result is
    bit-identical on every device (no atomics)."""
    if interpret:
        n_splits = 1
    else:
        n_splits = max(1, -(-1056 // max(1, entry_blocks)))
        n_splits = min(n_splits, max(1, -(-items // 1024)))
    n_splits = min(n_splits, MAX_GRID_YZ)
    return n_splits, max(1, -(-items // n_splits))


# Configurations. On a GPU the kernels are autotuned over these lists, minus the ones pruned for the GPU's
# architecture (_configs.PRUNED); under the interpreter one config per kernel runs (tests call every config of
# the lists explicitly through `config=`). MEDCONV_TRITON_CONFIG pins one (_configs.py).
GEMM_CONFIG_LIST = [  # (BLOCK_P, BLOCK_K, BLOCK_E, num_warps, num_stages)
    (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (32, 32, 16, 2, 2),
]
MIX_CONFIG_LIST = [  # (BLOCK_P, BLOCK_F, BLOCK_A, num_warps, num_stages)
    (64, 16, 64, 4, 2), (64, 16, 32, 4, 2), (32, 32, 64, 4, 2), (64, 16, 64, 8, 2), (32, 16, 32, 2, 2),
]
GW_CONFIG_LIST = [  # (BLOCK_J, BLOCK_F, num_warps)
    (32, 32, 4), (64, 16, 4), (16, 32, 2), (32, 16, 2),
]
INTERPRET_CONFIGS = {"gemm": (64, 32, 16, 1, 1), "mix": (32, 16, 16, 1, 1), "gw": (64, 16, 1)}
# (Larger tiles spilled registers on sm_80 and sm_90: (64, 32, 128), (128, 32, 128) and (64, 32, 256) of the
# mix kernel, BLOCK_J * BLOCK_F >= 2048 of grad_weight; tests/test_triton_aot.py.)


if triton is not None:
    def _gemm_cfg(c):
        return triton.Config({"BLOCK_P": c[0], "BLOCK_K": c[1], "BLOCK_E": c[2]}, num_warps=c[3], num_stages=c[4])

    def _mix_cfg(c):
        return triton.Config({"BLOCK_P": c[0], "BLOCK_F": c[1], "BLOCK_A": c[2]}, num_warps=c[3], num_stages=c[4])

    def _gw_cfg(c):
        return triton.Config({"BLOCK_J": c[0], "BLOCK_F": c[1]}, num_warps=c[2])

    _GEMM_CONFIGS = [_gemm_cfg(c) for c in _configs.select("spec_gemm", GEMM_CONFIG_LIST, INTERPRET_CONFIGS["gemm"])]
    _MIX_CONFIGS = [_mix_cfg(c) for c in _configs.select("spec_mix", MIX_CONFIG_LIST, INTERPRET_CONFIGS["mix"])]
    _GW_CONFIGS = [_gw_cfg(c) for c in _configs.select("spec_grad_weight", GW_CONFIG_LIST, INTERPRET_CONFIGS["gw"])]

    @triton.jit
    def _spec_gemm_body(out_ptr, in_ptr, m_ptr, E, K2, NBO, E_STEP, C_TOT, P,
                        PREC: tl.constexpr, A_F32: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        k_tiles = tl.cdiv(K2, BLOCK_K)
        p_tiles = tl.cdiv(P, BLOCK_P)
        kt = pid % k_tiles
        rest = pid // k_tiles
        pt = rest % p_tiles
        nb = rest // p_tiles  # n * NBO + b
        n = nb // NBO
        b = nb % NBO
        offs_p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_p = offs_p < P
        mask_k = offs_k < K2
        acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
        in_n = in_ptr + n * C_TOT * P + b * P
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < E
            a = tl.load(in_n + offs_e[None, :].to(tl.int64) * E_STEP * P + offs_p[:, None],
                        mask=mask_p[:, None] & mask_e[None, :], other=0.0)
            m_offs = offs_e[:, None] * K2 + offs_k[None, :]
            mask_m = mask_e[:, None] & mask_k[None, :]
            m = tl.load(m_ptr + m_offs, mask=mask_m, other=0.0)
            if A_F32:
                acc = tl.dot(a.to(tl.float32), m.to(tl.float32), acc, input_precision=PREC)
            else:
                acc = tl.dot(a, m, acc, input_precision=PREC)
            if SPLIT:  # the low half of the 16-bit hi/lo split matrix (stored after the high half)
                m_lo = tl.load(m_ptr + E * K2 + m_offs, mask=mask_m, other=0.0)
                if A_F32:
                    acc = tl.dot(a.to(tl.float32), m_lo.to(tl.float32), acc, input_precision=PREC)
                else:
                    acc = tl.dot(a, m_lo, acc, input_precision=PREC)
        out_offs = (nb * P + offs_p[:, None]) * K2 + offs_k[None, :]
        tl.store(out_ptr + out_offs, acc, mask=mask_p[:, None] & mask_k[None, :])

    @triton.autotune(configs=_GEMM_CONFIGS, key=["E", "K2", "NBO", "P"])
    @triton.jit
    def _spec_gemm_kernel(out_ptr, in_ptr, m_ptr, E, K2, NBO, E_STEP, C_TOT, P,
                          PREC: tl.constexpr, A_F32: tl.constexpr, SPLIT: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
        _spec_gemm_body(out_ptr, in_ptr, m_ptr, E, K2, NBO, E_STEP, C_TOT, P, PREC, A_F32, SPLIT,
                        BLOCK_P, BLOCK_K, BLOCK_E)

    @triton.jit
    def _spec_mix_body(
        out_ptr, s_ptr, coef_ptr, m_ptr, bias_ptr, scale_ptr, shift_ptr,
        F, K2, A, NG, NBS, OUT_C, OUT_CSTEP, T, P_OUT, P_IN,
        LO0, LO1, LO2, HI0, HI1, HI2, K0, K1, KK2,
        S0, S1, S2, PD0, PD1, PD2, D0, D1, D2,
        INVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        RELU: tl.constexpr, PREC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_A: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        a_tiles = tl.cdiv(A, BLOCK_A)
        p_tiles = tl.cdiv(P_OUT, BLOCK_P)
        at = pid % a_tiles
        rest = pid // a_tiles
        pt = rest % p_tiles
        ng = rest // p_tiles  # n * NG + g
        n = ng // NG
        g = ng % NG
        if INVERSE:  # output on the hi grid, spectrum on the lo grid
            OG1 = HI1
            OG2 = HI2
            IG1 = LO1
            IG2 = LO2
        else:
            OG1 = LO1
            OG2 = LO2
            IG1 = HI1
            IG2 = HI2
        offs_p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_a = at * BLOCK_A + tl.arange(0, BLOCK_A)
        mask_p = offs_p < P_OUT
        mask_a = offs_a < A
        q2 = offs_p % OG2
        rest_p = offs_p // OG2
        q1 = rest_p % OG1
        q0 = rest_p // OG1
        if INVERSE:  # h = q + pad - t*d must be >= 0, divisible by s, and h / s < lo
            q0 = q0 + PD0
            q1 = q1 + PD1
            q2 = q2 + PD2
        else:  # i = q*s - pad + t*d must lie in [0, hi)
            q0 = q0 * S0 - PD0
            q1 = q1 * S1 - PD1
            q2 = q2 * S2 - PD2
        acc = tl.zeros((BLOCK_P, BLOCK_A), dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mask_f = offs_f < F
            zr = tl.zeros((BLOCK_P, BLOCK_F), dtype=tl.float32)
            zi = tl.zeros((BLOCK_P, BLOCK_F), dtype=tl.float32)
            for b in range(0, NBS):
                s_base = s_ptr + (n * NBS + b) * P_IN * K2 + offs_f[None, :]
                c_base = coef_ptr + ((g * NBS + b) * T) * K2 + offs_f
                for t0 in range(0, K0):
                    if INVERSE:
                        h0 = q0 - t0 * D0
                        ok0 = mask_p & (h0 >= 0)
                        h0 = tl.where(ok0, h0, 0)
                        i0 = h0 // S0
                        ok0 = ok0 & (i0 * S0 == h0) & (i0 < LO0)
                    else:
                        i0 = q0 + t0 * D0
                        ok0 = mask_p & (i0 >= 0) & (i0 < HI0)
                    for t1 in range(0, K1):
                        if INVERSE:
                            h1 = q1 - t1 * D1
                            ok1 = ok0 & (h1 >= 0)
                            h1 = tl.where(ok1, h1, 0)
                            i1 = h1 // S1
                            ok1 = ok1 & (i1 * S1 == h1) & (i1 < LO1)
                        else:
                            i1 = q1 + t1 * D1
                            ok1 = ok0 & (i1 >= 0) & (i1 < HI1)
                        base1 = (i0 * IG1 + i1) * IG2
                        t01 = (t0 * K1 + t1) * KK2
                        for t2 in range(0, KK2):
                            if INVERSE:
                                h2 = q2 - t2 * D2
                                ok = ok1 & (h2 >= 0)
                                h2 = tl.where(ok, h2, 0)
                                i2 = h2 // S2
                                ok = ok & (i2 * S2 == h2) & (i2 < LO2)
                            else:
                                i2 = q2 + t2 * D2
                                ok = ok1 & (i2 >= 0) & (i2 < HI2)
                            src = tl.where(ok, base1 + i2, 0)
                            smask = ok[:, None] & mask_f[None, :]
                            sp = s_base + src[:, None] * K2
                            sr = tl.load(sp, mask=smask, other=0.0)
                            si = tl.load(sp + F, mask=smask, other=0.0)
                            cp = c_base + (t01 + t2) * K2
                            cr = tl.load(cp, mask=mask_f, other=0.0)[None, :]
                            ci = tl.load(cp + F, mask=mask_f, other=0.0)[None, :]
                            zr += cr * sr - ci * si
                            zi += cr * si + ci * sr
            mf = mask_f[:, None] & mask_a[None, :]
            mp = m_ptr + offs_f[:, None] * A + offs_a[None, :]
            mr = tl.load(mp, mask=mf, other=0.0)
            mi = tl.load(mp + F * A, mask=mf, other=0.0)
            acc = tl.dot(zr, mr, acc, input_precision=PREC)
            acc = tl.dot(zi, mi, acc, input_precision=PREC)
        ch = offs_a * OUT_CSTEP + g  # output channel
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ch, mask=mask_a, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + ch, mask=mask_a, other=0.0).to(tl.float32)[None, :]
        if HAS_SHIFT:
            acc += tl.load(shift_ptr + ch, mask=mask_a, other=0.0).to(tl.float32)[None, :]
        if RELU:
            acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as torch.relu
        out_offs = (n * OUT_C + ch[None, :].to(tl.int64)) * P_OUT + offs_p[:, None]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_a[None, :])

    @triton.autotune(configs=_MIX_CONFIGS, key=["F", "A", "NG", "NBS", "T", "P_OUT", "P_IN"])
    @triton.jit
    def _spec_mix_kernel(
        out_ptr, s_ptr, coef_ptr, m_ptr, bias_ptr, scale_ptr, shift_ptr,
        F, K2, A, NG, NBS, OUT_C, OUT_CSTEP, T, P_OUT, P_IN,
        LO0, LO1, LO2, HI0, HI1, HI2, K0, K1, KK2,
        S0, S1, S2, PD0, PD1, PD2, D0, D1, D2,
        INVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        RELU: tl.constexpr, PREC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_A: tl.constexpr,
    ):
        _spec_mix_body(out_ptr, s_ptr, coef_ptr, m_ptr, bias_ptr, scale_ptr, shift_ptr,
                       F, K2, A, NG, NBS, OUT_C, OUT_CSTEP, T, P_OUT, P_IN,
                       LO0, LO1, LO2, HI0, HI1, HI2, K0, K1, KK2,
                       S0, S1, S2, PD0, PD1, PD2, D0, D1, D2,
                       INVERSE, HAS_BIAS, HAS_SCALE, HAS_SHIFT, RELU, PREC, BLOCK_P, BLOCK_F, BLOCK_A)

    @triton.jit
    def _spec_grad_weight_body(
        part_ptr, g_ptr, s_ptr,
        F, K2, NB, T, ITEMS, CHUNK, P_LO, P_HI,
        LO1, LO2, HI0, HI1, HI2, K1, KK2,
        S0, S1, S2, PD0, PD1, PD2, D0, D1, D2,
        G_IS_LO: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1).to(tl.int64)
        f_tiles = tl.cdiv(F, BLOCK_F)
        ft = pid % f_tiles
        bt = pid // f_tiles  # b * T + t
        t = bt % T
        b = bt // T
        t0 = t // (K1 * KK2)
        t1 = (t // KK2) % K1
        t2 = t % KK2
        offs_f = ft * BLOCK_F + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        if G_IS_LO:  # conv: grad spectrum on the lo grid, x spectrum on the hi grid
            P_G = P_LO
            P_S = P_HI
        else:  # transposed: x on the lo grid, grad_out on the hi grid
            P_G = P_HI
            P_S = P_LO
        acc_a = tl.zeros((BLOCK_J, BLOCK_F), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_J, BLOCK_F), dtype=tl.float32)
        j_begin = split * CHUNK
        j_end = tl.minimum(j_begin + CHUNK, ITEMS)
        for j0 in range(j_begin, j_end, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            n = j // P_LO
            p = j - n * P_LO
            l2 = p % LO2
            rest = p // LO2
            l1 = rest % LO1
            l0 = rest // LO1
            i0 = l0 * S0 + (t0 * D0 - PD0)
            i1 = l1 * S1 + (t1 * D1 - PD1)
            i2 = l2 * S2 + (t2 * D2 - PD2)
            ok = (j < j_end) & (i0 >= 0) & (i0 < HI0) & (i1 >= 0) & (i1 < HI1) & (i2 >= 0) & (i2 < HI2)
            h = (i0 * HI1 + i1) * HI2 + i2
            if G_IS_LO:
                g_pix = p
                s_pix = h
            else:
                g_pix = h
                s_pix = p
            g_row = ((n * NB + b) * P_G + g_pix) * K2
            s_row = (n * P_S + s_pix) * K2
            g_row = tl.where(ok, g_row, 0)[:, None] + offs_f[None, :]
            s_row = tl.where(ok, s_row, 0)[:, None] + offs_f[None, :]
            m = ok[:, None] & mask_f[None, :]
            gr = tl.load(g_ptr + g_row, mask=m, other=0.0)
            gi = tl.load(g_ptr + g_row + F, mask=m, other=0.0)
            sr = tl.load(s_ptr + s_row, mask=m, other=0.0)
            si = tl.load(s_ptr + s_row + F, mask=m, other=0.0)
            # Y = conj(W) S with W = a + ib: dL/da = Gr Sr + Gi Si, dL/db = Gr Si - Gi Sr
            acc_a += gr * sr + gi * si
            acc_b += gr * si - gi * sr
        out = part_ptr + (split * NB * T + bt) * K2 + offs_f
        tl.store(out, tl.sum(acc_a, axis=0), mask=mask_f)
        tl.store(out + F, tl.sum(acc_b, axis=0), mask=mask_f)

    @triton.autotune(configs=_GW_CONFIGS, key=["F", "NB", "T", "ITEMS", "P_HI", "G_IS_LO"])
    @triton.jit
    def _spec_grad_weight_kernel(
        part_ptr, g_ptr, s_ptr,
        F, K2, NB, T, ITEMS, CHUNK, P_LO, P_HI,
        LO1, LO2, HI0, HI1, HI2, K1, KK2,
        S0, S1, S2, PD0, PD1, PD2, D0, D1, D2,
        G_IS_LO: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        _spec_grad_weight_body(part_ptr, g_ptr, s_ptr, F, K2, NB, T, ITEMS, CHUNK, P_LO, P_HI,
                               LO1, LO2, HI0, HI1, HI2, K1, KK2, S0, S1, S2, PD0, PD1, PD2, D0, D1, D2,
                               G_IS_LO, BLOCK_J, BLOCK_F)


def _require_triton():
    if triton is None:
        raise RuntimeError("rolling_conv_spectral (triton): " + TRITON_ERROR)


def precision(dtype: torch.dtype) -> str:
    """input_precision of the float32 dots for results of `dtype`: tf32x3 keeps float32 accuracy on the
    tensor cores (float32, and float16, whose tolerance a TF32 product's 2^-11 relative error would use up);
    bfloat16 results get TF32 (its error is ~16x below bfloat16's own rounding)."""
    if INTERPRET:
        return "ieee"
    return "tf32" if dtype == torch.bfloat16 else "tf32x3"


def _launch(kernel, body_meta, config, grid_fn, args, kwargs):
    """Launch `kernel` (autotuned) or, with `config` = (block sizes..., num_warps[, num_stages]) given,
    the kernel body with exactly that configuration (tests run every configuration this way)."""
    if config is None:
        kernel[grid_fn](*args, **kwargs)
        return
    meta = dict(zip(body_meta, config[:len(body_meta)]))
    extra = config[len(body_meta):]
    opts = {"num_warps": extra[0]} if extra else {}
    if len(extra) > 1:
        opts["num_stages"] = extra[1]
    kernel.fn[grid_fn](*args, **kwargs, **meta, **opts)


def split16(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(2, E, K2) in the 16-bit `dtype`: hi = m rounded to dtype, lo = (m - hi) rounded to dtype, so that
    hi + lo carries ~16 (bfloat16) or ~22 (float16) significant bits of the float32 matrix m. Two native
    16-bit dots with float32 accumulation then transform a 16-bit input as accurately as a float32 matrix:
    a 16-bit product is exact in float32. (A matrix rounded once to 16 bits makes errors proportional to the
    whole spectrum's magnitude, not each element's: the small entries of a weight gradient summed over
    every pixel fall outside the 16-bit tolerances.)"""
    m = m.float()
    hi = m.to(dtype)
    lo = (m - hi.float()).to(dtype)
    return torch.stack([hi, lo]).contiguous()


def channel_transform(inp: torch.Tensor, m: torch.Tensor, nbo: int, e_step: int, config=None) -> torch.Tensor:
    """out (N, nbo, P, K2) float32 = sum_e inp[n, e*e_step + b, p] M[e, :], inp (N, C_tot, *S) contiguous.
    m: (E, K2) float32 = M, or for 16-bit inputs (2, E, K2) of the input's dtype = split16(M, dtype)
    (hi + lo = M; two native 16-bit dots)."""
    _require_triton()
    N, c_tot = inp.shape[0], inp.shape[1]
    P = math.prod(inp.shape[2:])
    split = m.dim() == 3
    if split and (m.shape[0] != 2 or m.dtype != inp.dtype):
        raise ValueError("channel_transform: a split matrix must be (2, E, K2) of the input's dtype %s, got %s %s"
                         % (inp.dtype, tuple(m.shape), m.dtype))
    if not split and m.dtype != torch.float32:
        raise ValueError("channel_transform: the matrix must be float32 (or a 16-bit hi/lo split), got %s" % m.dtype)
    E, K2 = m.shape[-2:]
    out = torch.empty((N, nbo, P, K2), dtype=torch.float32, device=inp.device)
    if out.numel() == 0:
        return out
    # 16-bit inputs with a split matrix of the same dtype: native 16-bit dots (input_precision is ignored there)
    a_f32 = INTERPRET or not split
    prec = precision(inp.dtype if split else torch.float32)

    def grid(meta):
        return grid_1d(N * nbo * triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(K2, meta["BLOCK_K"]))

    _launch(_spec_gemm_kernel, ("BLOCK_P", "BLOCK_K", "BLOCK_E"), config, grid,
            (out, inp, m, E, K2, nbo, e_step, c_tot, P), dict(PREC=prec, A_F32=a_f32, SPLIT=split))
    return out


def spectral_mix(out: torch.Tensor, spec: torch.Tensor, coef: torch.Tensor, m2: torch.Tensor, g, inverse: bool,
                 bias=None, scale=None, shift=None, relu=False, config=None) -> torch.Tensor:
    """Fill out (N, OUT_C, *out grid): out[n, a*OUT_CSTEP + grp] = epilogue(sum_f Z_grp[f] . m2[f, a]) with
    Z_grp[f] = sum_b sum_t coef[grp, b, t, f] (x) spec[n, b, src(q, t), f] (complex)."""
    _require_triton()
    N, out_c = out.shape[0], out.shape[1]
    p_out = math.prod(out.shape[2:])
    ng, nbs, T, K2 = coef.shape
    F = K2 // 2
    A = m2.shape[1]
    if out.numel() == 0:
        return out
    assert spec.shape == (N, nbs, spec.shape[2], K2) and m2.shape[0] == K2 and out_c == A * ng
    p_in = spec.shape[2]
    dummy = m2

    def grid(meta):
        return grid_1d(N * ng * triton.cdiv(p_out, meta["BLOCK_P"]) * triton.cdiv(A, meta["BLOCK_A"]))

    _launch(_spec_mix_kernel, ("BLOCK_P", "BLOCK_F", "BLOCK_A"), config, grid,
            (out, spec, coef, m2, bias if bias is not None else dummy, scale if scale is not None else dummy,
             shift if shift is not None else dummy,
             F, K2, A, ng, nbs, out_c, ng, T, p_out, p_in, *g.lo, *g.hi, *g.k, *g.s, *g.p, *g.d),
            dict(INVERSE=inverse, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
                 HAS_SHIFT=shift is not None, RELU=bool(relu), PREC=precision(out.dtype)))
    return out


def spectral_grad_weight(gspec: torch.Tensor, xspec: torch.Tensor, g, T: int, g_is_lo: bool,
                         config=None) -> torch.Tensor:
    """(NB, T, 2F) float32: [dL/da, dL/db] of the weight spectra, from the grad spectrum gspec
    (N, NB, P_G, 2F) and the input spectrum xspec (N, 1, P_S, 2F)."""
    _require_triton()
    N, NB, _, K2 = gspec.shape
    F = K2 // 2
    p_lo, p_hi = math.prod(g.lo), math.prod(g.hi)
    items = N * p_lo
    n_splits, chunk = grad_weight_splits(items, NB * T * -(-F // 32))
    part = torch.empty((n_splits, NB, T, K2), dtype=torch.float32, device=gspec.device)
    if items == 0:
        return part.zero_().sum(0)

    def grid(meta):
        return (NB * T * triton.cdiv(F, meta["BLOCK_F"]), n_splits)

    _launch(_spec_grad_weight_kernel, ("BLOCK_J", "BLOCK_F"), config, grid,
            (part, gspec, xspec, F, K2, NB, T, items, chunk, p_lo, p_hi,
             g.lo[1], g.lo[2], *g.hi, g.k[1], g.k[2], *g.s, *g.p, *g.d),
            dict(G_IS_LO=g_is_lo))
    return part.sum(0)  # fixed-order sum over the splits: deterministic
