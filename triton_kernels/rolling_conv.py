"""Triton kernels of rolling convolution (docs/design.md §1), installed as medconv_ext.triton_kernels.rolling_conv.

The six rolling ops reduce to two generic kernels over the logical dense weight
    G[o, c, t] = base[b, (c - r) mod C, t]   (conv, base (n_base, C, *k))
    G[o, c, t] = base[(c - r) mod C, b, t]   (transposed, base (C, n_base, *k)),   o = r * n_base + b
read from the base by index shift `b * SB + cc * SC + t` (never materialized). The same mapping as
csrc/cuda/rolling_conv.cu (see the table at its top):
    _rolling_gemm_kernel         out[n, a, q] = sum_e sum_t G(a|e, t) * in[n, e, src(q, t)]
                                 an implicit GEMM with tl.dot (tensor cores for fp16/bf16, IEEE fp32 for
                                 float32), weight tile gathered from the base by the roll index
    _rolling_grad_weight_kernel  gw[b, m, t] = sum_{n, p, r} R[n, r*n_base + b, .] * Cn[n, (m + r) mod C, .]
                                 gather form, per-split float32 partials summed by torch in a fixed order
                                 (no atomics: the same bits every run)
2D runs as 3D with depth 1. Accumulation is float32 for every input dtype.

Geometry is in conv terms: `lo` is the conv-output grid (y of a conv, x of a transposed conv), `hi` the
conv-input grid; hi = lo * stride + tap * dilation - padding.

Everything above the `triton` import (plans, launch chunks) is plain Python so that the launch and
index logic is testable, and this module imports, where triton is missing (TRITON_ERROR says why).
"""
import math
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from . import _configs

# Hardware grid limits (CUDA): axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65535.
MAX_GRID_X = 2 ** 31 - 1
MAX_GRID_YZ = 65535
INT32_MAX = 2 ** 31 - 1

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Geom:
    """3D geometry in conv terms (2D: depth 1, kernel depth 1, stride 1, padding 0, dilation 1)."""
    lo: Tuple[int, int, int]
    hi: Tuple[int, int, int]
    k: Tuple[int, int, int]
    s: Tuple[int, int, int]
    p: Tuple[int, int, int]
    d: Tuple[int, int, int]


@dataclass(frozen=True)
class RollW:
    """Where G[o, c, t] lives in the base: offset b * sb + ((c - r) mod C) * sc + t."""
    C: int
    nb: int
    n_rolls: int
    sb: int
    sc: int
    T: int


def _as3(v: Sequence[int], fill: int) -> Tuple[int, int, int]:
    v = [int(a) for a in v]
    return tuple([fill] * (3 - len(v)) + v)


def make_geom(lo, hi, k, stride, padding, dilation) -> Geom:
    return Geom(_as3(lo, 1), _as3(hi, 1), _as3(k, 1), _as3(stride, 1), _as3(padding, 0), _as3(dilation, 1))


def make_rollw(weight_shape: Sequence[int], transposed: bool, n_rolls: int) -> RollW:
    T = math.prod(int(a) for a in weight_shape[2:])
    if transposed:
        C, nb = int(weight_shape[0]), int(weight_shape[1])
        return RollW(C, nb, int(n_rolls), T, nb * T, T)
    nb, C = int(weight_shape[0]), int(weight_shape[1])
    return RollW(C, nb, int(n_rolls), C * T, T, T)


def weight_offset(o: int, c: int, t: int, rw: RollW) -> int:
    """Offset of G[o, c, t] in the base (the formula every kernel uses)."""
    r, b = divmod(o, rw.nb)
    return b * rw.sb + ((c - r) % rw.C) * rw.sc + t


def batch_chunks(n: int) -> List[Tuple[int, int]]:
    """(start, count) launches covering the batch: grid axis 1 holds at most 65535 samples."""
    return [(s, min(MAX_GRID_YZ, n - s)) for s in range(0, n, MAX_GRID_YZ)]


def gemm_grid(p_out: int, a_ch: int, n: int, block_p: int, block_a: int) -> List[Tuple[int, Tuple[int, int]]]:
    """[(n_start, grid)] for _rolling_gemm_kernel: axis 0 = pixel tiles x channel tiles, axis 1 = samples."""
    tiles = -(-p_out // block_p) * -(-a_ch // block_a)
    if tiles > MAX_GRID_X:
        raise RuntimeError("rolling_conv (triton): %d output tiles per sample exceed the grid limit %d"
                           % (tiles, MAX_GRID_X))
    return [(s, (tiles, c)) for s, c in batch_chunks(n)]


def max_offset(n: int, ch: int, spatial: Sequence[int]) -> int:
    """Largest element offset of a contiguous (n, ch, *spatial) tensor: the kernels form offsets up to it
    and compute them in int64 (program ids are cast to int64 before any multiplication)."""
    return n * ch * math.prod(spatial) - 1


def needs_int64(*shapes: Sequence[int]) -> bool:
    return any(math.prod(s) - 1 > INT32_MAX for s in shapes)


def grad_weight_splits(items: int, entry_blocks: int, interpret: bool = INTERPRET) -> Tuple[int, int]:
    """(n_splits, chunk): the (n, p) reduction of grad_weight is cut into n_splits fixed slices of
    `chunk` items. A constant target (not the GPU's SM count), so results are identical on every device."""
    if interpret:
        n_splits = 1  # the interpreter pays per program, not per item
    else:
        n_splits = max(1, -(-1056 // max(1, entry_blocks)))
        n_splits = min(n_splits, max(1, -(-items // 512)))
    n_splits = min(n_splits, MAX_GRID_YZ)
    chunk = max(1, -(-items // n_splits))
    return n_splits, chunk


try:
    import triton
    import triton.language as tl

    TRITON_ERROR = None
except Exception as e:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    TRITON_ERROR = "triton is not importable (%s: %s)" % (type(e).__name__, e)


# Configurations: autotuned on a GPU over these lists minus the ones pruned for its architecture
# (_configs.PRUNED); one config under the interpreter; MEDCONV_TRITON_CONFIG pins one (_configs.py).
GEMM_CONFIG_LIST = [  # (BLOCK_P, BLOCK_A, BLOCK_E, num_warps, num_stages)
    (64, 32, 16, 4, 2), (32, 64, 16, 4, 2), (64, 64, 16, 4, 2), (64, 64, 16, 8, 2), (32, 32, 32, 4, 2),
    (64, 32, 16, 4, 1), (32, 32, 16, 2, 2),
]
# (The per-tap index arithmetic makes the GEMM register-hungry: BLOCK_E = 32 with BLOCK_P * BLOCK_A >= 2048,
# and (128, ., .) tiles, spilled on sm_80 and sm_90; tests/test_triton_aot.py.)
GW_CONFIG_LIST = [  # (BLOCK_M, BLOCK_J, num_warps)
    (8, 128, 4), (16, 128, 4), (32, 64, 4), (8, 256, 8), (32, 128, 8),
]
# One config under the interpreter (CPU tests stay fast): it pays per operation, not per element, so
# blocks are large enough to cover a test shape in one or two programs.
INTERPRET_CONFIGS = {"gemm": (64, 16, 16, 1, 1), "gw": (16, 128, 1)}


if triton is not None:
    _GEMM_CONFIGS = [triton.Config({"BLOCK_P": bp, "BLOCK_A": ba, "BLOCK_E": be}, num_warps=nw, num_stages=ns)
                     for bp, ba, be, nw, ns in _configs.select("rolling_gemm", GEMM_CONFIG_LIST,
                                                               INTERPRET_CONFIGS["gemm"])]
    _GW_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_J": bj}, num_warps=nw)
                   for bm, bj, nw in _configs.select("rolling_grad_weight", GW_CONFIG_LIST, INTERPRET_CONFIGS["gw"])]

    @triton.jit
    def roll_row_offset(base, r, NB, P_R):
        """base + r * NB * P_R in int64: the roll-r rows of grad_out start r * n_base * P_R elements further,
        which passes 2^31 at e.g. 3D C=128, n_base=1, 256^3 (r, NB and P_R are 32-bit: widen first)."""
        return base + tl.cast(r, tl.int64) * NB * P_R

    @triton.autotune(configs=_GEMM_CONFIGS, key=["A_CH", "E_CH", "P_OUT", "P_IN", "T", "A_IS_ROLL", "INVERSE"])
    @triton.jit
    def _rolling_gemm_kernel(
        out_ptr, in_ptr, w_ptr, bias_ptr,
        A_CH, E_CH, C_ROLL, NB, SB, SC, T, P_OUT, P_IN,
        LO0, LO1, LO2, HI0, HI1, HI2, K0, K1, K2,
        S0, S1, S2, PD0, PD1, PD2, D0, D1, D2,
        n_start,
        A_IS_ROLL: tl.constexpr, INVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        DOT_F32: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        # int64 from the start: every offset below derives from these.
        pid = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1).to(tl.int64) + n_start
        a_tiles = tl.cdiv(A_CH, BLOCK_A)
        pid_p = pid // a_tiles  # neighbouring programs share a pixel tile (the same input rows)
        pid_a = pid % a_tiles
        if INVERSE:  # output on the hi grid, input on the lo grid
            OG1 = HI1
            OG2 = HI2
            IG1 = LO1
            IG2 = LO2
        else:
            OG1 = LO1
            OG2 = LO2
            IG1 = HI1
            IG2 = HI2
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
        mask_p = offs_p < P_OUT
        mask_a = offs_a < A_CH
        q2 = offs_p % OG2
        rest = offs_p // OG2
        q1 = rest % OG1
        q0 = rest // OG1
        if INVERSE:  # h = q + pad - t*d must be >= 0, divisible by s, and h / s < lo
            q0 = q0 + PD0
            q1 = q1 + PD1
            q2 = q2 + PD2
        else:  # i = q*s - pad + t*d must lie in [0, hi)
            q0 = q0 * S0 - PD0
            q1 = q1 * S1 - PD1
            q2 = q2 * S2 - PD2
        acc = tl.zeros((BLOCK_P, BLOCK_A), dtype=tl.float32)
        in_n = in_ptr + n * E_CH * P_IN
        for e0 in range(0, E_CH, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < E_CH
            x_base = in_n + offs_e[None, :].to(tl.int64) * P_IN
            # weight tile [BLOCK_E, BLOCK_A] gathered from the base by the roll index (+ t per tap)
            if A_IS_ROLL:
                o = offs_a[None, :]
                c = offs_e[:, None]
            else:
                o = offs_e[:, None]
                c = offs_a[None, :]
            r = o // NB
            b = o - r * NB
            cc = c - r
            cc = tl.where(cc < 0, cc + C_ROLL, cc)
            w_base = w_ptr + (b.to(tl.int64) * SB + cc.to(tl.int64) * SC)
            w_mask = mask_e[:, None] & mask_a[None, :]
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
                    t01 = (t0 * K1 + t1) * K2
                    for t2 in range(0, K2):
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
                        xt = tl.load(x_base + src[:, None], mask=ok[:, None] & mask_e[None, :], other=0.0)
                        wt = tl.load(w_base + (t01 + t2), mask=w_mask, other=0.0)
                        if DOT_F32:
                            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
                        elif IEEE:
                            acc = tl.dot(xt, wt, acc, input_precision="ieee")
                        else:
                            acc = tl.dot(xt, wt, acc)
        if HAS_BIAS:
            bv = tl.load(bias_ptr + offs_a, mask=mask_a, other=0.0).to(tl.float32)
            acc = acc + bv[None, :]
        out_offs = (n * A_CH + offs_a[None, :]) * P_OUT + offs_p[:, None]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_a[None, :])

    @triton.autotune(configs=_GW_CONFIGS, key=["C_ROLL", "NB", "N_ROLLS", "T", "ITEMS", "P_HI", "ROLL_IS_LO"])
    @triton.jit
    def _rolling_grad_weight_kernel(
        part_ptr, roll_ptr, chan_ptr,
        C_ROLL, NB, N_ROLLS, SB, SC, T, ENTRIES, ITEMS, CHUNK, P_LO, P_HI,
        LO1, LO2, HI0, HI1, HI2, K1, K2,
        S0, S1, S2, PD0, PD1, PD2, D0, D1, D2,
        ROLL_IS_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1).to(tl.int64)
        m_tiles = tl.cdiv(C_ROLL, BLOCK_M)
        mt = pid % m_tiles
        bt = pid // m_tiles
        t = bt % T
        b = bt // T
        t0 = t // (K1 * K2)
        t1 = (t // K2) % K1
        t2 = t % K2
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < C_ROLL
        if ROLL_IS_LO:  # conv: grad_out on the lo grid, x on the hi grid
            P_R = P_LO
            P_C = P_HI
        else:  # transposed: x on the lo grid, grad_out on the hi grid
            P_R = P_HI
            P_C = P_LO
        CR = N_ROLLS * NB
        acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
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
            # Torch's gradient multiplies the zero padding of the hi grid (x of a conv, the cropped border of a
            # transposed conv's grad_out): the lo-grid operand is read at every item, the hi-grid one only inside
            # (ok), zero outside, so a NaN or Inf lo value at a tap that reads padding gives NaN as in torch
            # (a finite one adds 0).
            jm = j < j_end
            ok = jm & (i0 >= 0) & (i0 < HI0) & (i1 >= 0) & (i1 < HI1) & (i2 >= 0) & (i2 < HI2)
            h = (i0 * HI1 + i1) * HI2 + i2
            if ROLL_IS_LO:
                r_offs = (n * CR + b) * P_R + p
                c_offs = n * C_ROLL * P_C + h
                r_ok = jm
                c_ok = ok
            else:
                r_offs = (n * CR + b) * P_R + h
                c_offs = n * C_ROLL * P_C + p
                r_ok = ok
                c_ok = jm
            r_offs = tl.where(r_ok, r_offs, 0)
            c_offs = tl.where(c_ok, c_offs, 0)[None, :]
            c_mask = mask_m[:, None] & c_ok[None, :]
            cm = offs_m  # (m + r) mod C, advanced by one per roll
            for r in range(0, N_ROLLS):
                rv = tl.load(roll_ptr + roll_row_offset(r_offs, r, NB, P_R), mask=r_ok, other=0.0).to(tl.float32)
                cv = tl.load(chan_ptr + (c_offs + cm[:, None] * P_C), mask=c_mask, other=0.0).to(tl.float32)
                acc += cv * rv[None, :]
                cm = tl.where(cm + 1 == C_ROLL, 0, cm + 1)
        res = tl.sum(acc, axis=1)
        tl.store(part_ptr + (split * ENTRIES + b * SB + offs_m * SC + t), res, mask=mask_m)


def _require_triton():
    if triton is None:
        raise RuntimeError("rolling_conv (triton): " + TRITON_ERROR)


def rolling_gemm(out: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias, g: Geom, rw: RollW,
                 a_is_roll: bool, inverse: bool) -> torch.Tensor:
    """Fill out (N, A, *out grid) from inp (N, E, *in grid); all contiguous, one dtype (see module doc)."""
    _require_triton()
    N, A, E = out.shape[0], out.shape[1], inp.shape[1]
    if out.numel() == 0:
        return out
    p_out = out[0, 0].numel()
    p_in = inp[0, 0].numel()
    ieee = out.dtype == torch.float32  # float32 stays float32 (no TF32)
    for n_start, n_count in batch_chunks(N):
        def grid(meta, n_count=n_count):
            return gemm_grid(p_out, A, n_count, meta["BLOCK_P"], meta["BLOCK_A"])[0][1]

        _rolling_gemm_kernel[grid](
            out, inp, weight, bias if bias is not None else out,
            A, E, rw.C, rw.nb, rw.sb, rw.sc, rw.T, p_out, p_in,
            *g.lo, *g.hi, *g.k, *g.s, *g.p, *g.d,
            n_start,
            A_IS_ROLL=a_is_roll, INVERSE=inverse, HAS_BIAS=bias is not None, IEEE=ieee,
            # the interpreter multiplies bfloat16 tiles as raw uint16 in tl.dot: upcast there only
            DOT_F32=INTERPRET and out.dtype == torch.bfloat16,
        )
    return out


def rolling_grad_weight(weight_shape, roll_t: torch.Tensor, chan_t: torch.Tensor, g: Geom, rw: RollW,
                        roll_is_lo: bool) -> torch.Tensor:
    """grad of the base (weight_shape) from roll_t (N, n_rolls*nb, ...) and chan_t (N, C, ...), contiguous."""
    _require_triton()
    N = roll_t.shape[0]
    p_lo = math.prod(g.lo)
    p_hi = math.prod(g.hi)
    items = N * p_lo
    entries = rw.nb * rw.C * rw.T
    n_splits, chunk = grad_weight_splits(items, rw.nb * rw.T * -(-rw.C // 16))
    partial = torch.empty((n_splits, entries), dtype=torch.float32, device=roll_t.device)

    def grid(meta):
        return (rw.nb * rw.T * triton.cdiv(rw.C, meta["BLOCK_M"]), n_splits)

    _rolling_grad_weight_kernel[grid](
        partial, roll_t, chan_t,
        rw.C, rw.nb, rw.n_rolls, rw.sb, rw.sc, rw.T, entries, items, chunk, p_lo, p_hi,
        g.lo[1], g.lo[2], *g.hi, g.k[1], g.k[2], *g.s, *g.p, *g.d,
        ROLL_IS_LO=roll_is_lo,
    )
    # fixed-order sum over the slices (a torch reduction: deterministic)
    return partial.sum(0).view(weight_shape).to(roll_t.dtype)
