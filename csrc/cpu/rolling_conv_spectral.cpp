// Fused CPU kernels of the spectral rolling convolution (docs/design.md §1, docs/rolling_conv_spectral.md):
// forward, grad_input and grad_weight of the rolling conv and of the transposed rolling conv,
// 2D and 3D, float32, float64 and bfloat16 (computed in float32), any input strides, the output in
// the input's memory format; hot loops compiled per ISA (AVX-512, AVX2+FMA, generic; cpu_dispatch.h).
//
// A rolling layer is block-circulant over channels: a DFT along the channel axis turns it into one
// complex depthwise spatial convolution per channel frequency. Per output row (2D) or slice (3D):
//   1. the channel DFT of the input rows the row needs (a real FFT over channels, vectorized over pixels,
//      for even C whose half has no prime factor above 13: channel_fft.h; else a folded GEMM with a
//      precomputed real DFT matrix, any C), kept in a small per-thread ring of transformed rows ("slabs"), so every input row is
//      transformed once per thread chunk and stays in cache while the k0 output rows that read it
//      are computed;
//   2. the per-frequency complex depthwise convolution over the slabs (SIMD over frequencies,
//      a register tile of 4 output pixels);
//   3. the inverse DFT restricted to the n_rolls rows that are kept (the inverse FFT, or a GEMM), with the epilogue
//      (bias, per-channel scale and shift, ReLU) applied to the accumulators, stored directly into
//      a channels-last float output, or through a small block buffer (NC(D)HW, bfloat16).
// Spectra are stored "packed real": C values per pixel and base. Slot f < H = ceil(C/2) holds
// [Re X[f]] in the first half and [Im X[f]] in the second half (padded to Hp lanes each); the
// imaginary slot of f = 0 (always 0 for real input) holds the Nyquist bin Re X[C/2] (C even).
// A complex product with a spectral weight is then out_re += A*xr + B*xi, out_im += Cc*xi + D*xr
// with four weight vectors per tap (slot 0 uses A = W[0], Cc = W[C/2], B = D = 0).
//
// Every op is one driver with two choices:
//  * spatial: "direct" (stride s, padding p) or "transposed" (zero insertion by s, flipped taps,
//    stride 1): the conv and the transposed conv, and each other's input gradients;
//  * channel: "forward" (Y_b = conj(W_b) X, one input spectrum, n_base output spectra, inverse to
//    the n_rolls * n_base output channels) or "adjoint" (DX = sum_b W_b DY_b, DY_b the DFT of the
//    n_rolls channels of base b, inverse to all C_in channels): the conv and its input gradient.
// grad_weight: dW_b[f, t] = sum_{n, p} conj(A_b[f](p)) B[f](p*s + t*d - pad) (conv: A = DY, B = X;
// transposed: the roles swap), summed per block of rows (fixed blocks, independent of the thread
// count), the blocks added in double in a fixed order, then the inverse DFT to the base.
// Threads own disjoint output rows or row ranges (weight gradient: disjoint row blocks); every sum has a fixed
// order: results are bit-identical for any thread count (no atomics).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/channel_fft.h"
#include "cpu/cpu_dispatch.h"
#include "cpu/rolling_conv_geometry.h"

namespace medconv {
namespace {

using i64 = int64_t;
using cpu_geom::A3;
using simd::lane_int_t;
using simd::load_transposed;
using simd::store_transposed;
using simd::transpose_tile;
using simd::VecOf;

i64 round_up(i64 v, i64 m) { return (v + m - 1) / m * m; }
i64 ceil_div(i64 a, i64 b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// Vector bytes of an ISA copy: spectra, DFT and inverse matrices are padded to it per row.
i64 isa_vbytes(int isa) { return isa == kIsaAvx512 ? 64 : isa == kIsaAvx2 ? 32 : 16; }

// The copy a call runs: the selected one; under auto selection AVX-512 gives way to AVX2 when the
// H = ceil(C/2) frequency slots padded to 64 bytes exceed their padding to 32 bytes by more than a
// quarter (C_in <= 16 in float32: half the lanes would be padding; measured 1.2-1.4x faster on AVX2).
int call_isa(i64 C, i64 elem) {
  const int isa = cpu_isa();
  if (isa != kIsaAvx512 || cpu_isa_forced()) return isa;
  const i64 H = (C + 1) / 2;
  return round_up(H, 64 / elem) * 4 > round_up(H, 32 / elem) * 5 ? (int)kIsaAvx2 : isa;
}

// ------------------------------------------------------------------------------------------
// DFT tables (double precision, cast once)
// ------------------------------------------------------------------------------------------
// Packed real spectrum of C values: H = ceil(C/2) slots, Hp = H rounded up to the vector width.
// cs/sn: cos and sin of 2 pi k / C, k < C (C trigonometric calls per table, not C^2).
struct Spec {
  i64 C, H, Hp;
  std::vector<double> cs, sn;
};

Spec make_spec(i64 C, i64 elem, i64 vbytes) {
  Spec s;
  s.C = C;
  s.H = (C + 1) / 2;
  s.Hp = round_up(s.H, vbytes / elem);
  s.cs.resize((size_t)C);
  s.sn.resize((size_t)C);
  for (i64 k = 0; k < C; ++k) {
    s.cs[k] = std::cos(2.0 * M_PI * (double)k / (double)C);
    s.sn[k] = std::sin(2.0 * M_PI * (double)k / (double)C);
  }
  return s;
}

// D[c][j], j < 2Hp: forward DFT of channel c into the packed slots.
double dft_entry(const Spec& s, i64 c, i64 j) {
  const i64 C = s.C;
  if (j < s.Hp) {
    if (j >= s.H) return 0.0;
    return s.cs[(c * j) % C];
  }
  const i64 f = j - s.Hp;
  if (f >= s.H) return 0.0;
  if (f == 0) return (C % 2 == 0) ? ((c % 2) ? -1.0 : 1.0) : 0.0;
  return -s.sn[(c * f) % C];
}

// G[j][r]: inverse real DFT, y[r] = sum_j spec[j] G[j][r] (includes 1/C and the Hermitian weights).
double idft_entry(const Spec& s, i64 j, i64 r) {
  const i64 C = s.C;
  const double inv = 1.0 / (double)C;
  if (j < s.Hp) {
    if (j >= s.H) return 0.0;
    if (j == 0) return inv;
    return 2.0 * inv * s.cs[(j * r) % C];
  }
  const i64 f = j - s.Hp;
  if (f >= s.H) return 0.0;
  if (f == 0) return (C % 2 == 0) ? ((r % 2) ? -inv : inv) : 0.0;
  return -2.0 * inv * s.sn[(f * r) % C];
}

// ------------------------------------------------------------------------------------------
// the plan of one driver call
// ------------------------------------------------------------------------------------------
template <typename T>
struct Plan {
  // source operand of the spectra: element (n, ch, m0, m1, m2) at src[n*sN + ch*sC + sum m_i*sS_i]
  // (bfloat16 input: src16 holds the bits, converted to T = float one row at a time)
  const T* src = nullptr;
  const uint16_t* src16 = nullptr;
  i64 sN = 0, sC = 0;
  A3 sS{0, 0, 0}, S{1, 1, 1};
  i64 Csrc = 0, N = 0;
  // Two sources (C1 > 0): channels [0, C1) from src/src16 above, [C1, Csrc) from src2/src2_16 (the channel
  // concatenation of two tensors read in place: a UNet decoder's up-sampled tensor and skip, no torch.cat)
  i64 C1 = 0;
  const T* src2 = nullptr;
  const uint16_t* src2_16 = nullptr;
  i64 sN2 = 0, sC2 = 0;
  A3 sS2{0, 0, 0};
  // buffer coordinate j <-> source index m = (j + off) / su (when divisible and in range, else 0)
  A3 L{1, 1, 1}, off{0, 0, 0}, su{1, 1, 1};
  A3 k{1, 1, 1}, ks{1, 1, 1}, d{1, 1, 1}, O{1, 1, 1};
  i64 Hp = 0, NBi = 1, NBo = 1, nbw = 1;
  bool adjoint = false;
  const T* Dm = nullptr;  // (Csrc, NBi*2Hp)
  const T* Wpk = nullptr;  // (nbw, taps, 4, Hp)
  i64 taps = 1;
  const T* Gm = nullptr;  // (NBo*2Hp, Np)
  i64 Cout = 0, Np = 0;
  const T* sc = nullptr;  // (Np,)
  const T* sh = nullptr;
  bool relu = false;
  // output (N, Cout, *O): channels-last of type T is written in place (out); any other layout or
  // type (NC(D)HW, bfloat16) goes through a per-thread block buffer and store_block (out_any).
  T* out = nullptr;
  void* out_any = nullptr;
  bool out_cl = true, out_bf16 = false;
  int isa = kIsaGeneric;
  // work items: `parts` ranges of dim 1 (3D: rows of a slice) per output row, item = part*rows + row
  i64 parts = 1;
  // Folded channel DFT (x[c] +- x[C-c] first: half the multiply-adds): per base, Rn input channels
  // (channel of roll r of base b: r*NBi + b), C the transform length.
  bool fold_in = false;
  i64 C = 0, Rn = 0, h = 0, Ku = 0, Kv = 0;
  const T* Bu = nullptr;  // (Ku, Hp): [x0, u_1..u_h, x_{C/2}] -> Re slots
  const T* Bv = nullptr;  // (Kv, Hp): [v_1..v_h, nyq] -> Im slots (slot 0: Nyquist)
  // Folded inverse: E (even part, K = Hp + 1) and O (odd part, K = Hp - 1) for r = 0..C/2, then
  // y[r] = E[r] + O[r], y[C - r] = E[r] - O[r]; out channel r*NBo + bo, r < Rout.
  bool fold_out = false;
  i64 Rout = 0, NpE = 0;
  const T* Ge = nullptr;  // (Hp + 1, NpE)
  const T* Go = nullptr;  // (Hp - 1, NpE)
  // The AVX-512 copy runs these two GEMMs with 32-byte tiles where that pads the C/2 + 1 columns
  // less (C = 64: 40 columns instead of 48).
  bool e_narrow = false;
  // The channel FFT (channel_fft.h) in place of the folded forward GEMMs (fft_in) and/or of the inverse
  // GEMMs (fft_out: all C outputs of a base, the first Rout kept); same C, Rn, Rout as the folded form.
  const channel_fft::Tables<T>* fft = nullptr;
  bool fft_in = false, fft_out = false;
  i64 SP() const { return NBi * 2 * Hp; }
};

// ------------------------------------------------------------------------------------------
// register-blocked GEMM: C[m][n] = sum_k A[m*ams + k*aks] B[k*ldb + n] (+ epilogue)
// ------------------------------------------------------------------------------------------
// A tile of MR rows x NV vectors: MR*NV accumulators, NV loads of B and MR broadcasts of A per k
// (6 x 2 on AVX2: 12 of the 16 vector registers hold accumulators).
template <typename T, int VB, int MR, int NV, bool EPI>
MEDCONV_INLINE void gemm_tile(i64 K, const T* A, i64 ams, i64 aks, const T* B, i64 ldb, T* C, i64 ldc, i64 n0,
                              i64 nvalid, const T* sc, const T* sh, bool relu) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int NL = VB / sizeof(T);
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[m][v] = V{};
  const T* b = B + n0;
  const T* a = A;
  for (i64 kk = 0; kk < K; ++kk, a += aks, b += ldb) {
    V bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + v * NL, sizeof(V));
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const V av = a[m * ams] - V{};  // a broadcast (x - 0 folds to x; a lane loop became inserts)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[m][v] += av * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const i64 col = n0 + v * NL;
      V r = acc[m][v];
      if (EPI) {
        V s, h;
        std::memcpy(&s, sc + col, sizeof(V));
        std::memcpy(&h, sh + col, sizeof(V));
        r = r * s + h;
        if (relu) {
#pragma GCC unroll 16
          for (int l = 0; l < NL; ++l) r[l] = r[l] < T(0) ? T(0) : r[l];  // NaN stays NaN, as torch.relu
        }
      }
      T* dst = C + m * ldc + col;
      if (col + NL <= nvalid) {
        std::memcpy(dst, &r, sizeof(V));
      } else {
        for (int l = 0; l < NL && col + l < nvalid; ++l) dst[l] = r[l];
      }
    }
}

// Each register tile is its own (not inlined) function: inlined into the large row drivers, the
// accumulators were spilled to the stack.
#define MEDCONV_GEMM_ARGS i64 K, const T *A, i64 ams, i64 aks, const T *B, i64 ldb, T *C, i64 ldc, i64 n0, \
    i64 nvalid, const T *sc, const T *sh, bool relu
#define MEDCONV_GEMM_PASS K, A, ams, aks, B, ldb, C, ldc, n0, nvalid, sc, sh, relu
template <typename T, int MR, int NV, bool EPI>
__attribute__((noinline)) void gemm_tile16(MEDCONV_GEMM_ARGS) {
  gemm_tile<T, 16, MR, NV, EPI>(MEDCONV_GEMM_PASS);
}
#ifdef MEDCONV_X86_DISPATCH
template <typename T, int MR, int NV, bool EPI>
__attribute__((noinline)) MEDCONV_TARGET_AVX2 void gemm_tile32(MEDCONV_GEMM_ARGS) {
  gemm_tile<T, 32, MR, NV, EPI>(MEDCONV_GEMM_PASS);
}
template <typename T, int MR, int NV, bool EPI>
__attribute__((noinline)) MEDCONV_TARGET_AVX512 void gemm_tile64(MEDCONV_GEMM_ARGS) {
  gemm_tile<T, 64, MR, NV, EPI>(MEDCONV_GEMM_PASS);
}
#endif

template <typename T, int VB, int MR, int NV, bool EPI>
MEDCONV_INLINE void gemm_tile_call(MEDCONV_GEMM_ARGS) {
#ifdef MEDCONV_X86_DISPATCH
  if constexpr (VB == 64) {
    gemm_tile64<T, MR, NV, EPI>(MEDCONV_GEMM_PASS);
    return;
  }
  if constexpr (VB == 32) {
    gemm_tile32<T, MR, NV, EPI>(MEDCONV_GEMM_PASS);
    return;
  }
#endif
  gemm_tile16<T, MR, NV, EPI>(MEDCONV_GEMM_PASS);
}

template <typename T, int VB, int MR, bool EPI>
MEDCONV_INLINE void gemm_rows(i64 K, const T* A, i64 ams, i64 aks, const T* B, i64 ldb, T* C, i64 ldc, i64 n0,
                              int nv, i64 nvalid, const T* sc, const T* sh, bool relu) {
  if (nv == 2) gemm_tile_call<T, VB, MR, 2, EPI>(K, A, ams, aks, B, ldb, C, ldc, n0, nvalid, sc, sh, relu);
  else gemm_tile_call<T, VB, MR, 1, EPI>(K, A, ams, aks, B, ldb, C, ldc, n0, nvalid, sc, sh, relu);
}

// Np: columns of B (a multiple of the vector width), nvalid <= Np: columns stored.
template <typename T, int VB, bool EPI>
MEDCONV_INLINE void gemm(i64 M, i64 K, const T* A, i64 ams, i64 aks, const T* B, i64 ldb, i64 Np, T* C, i64 ldc,
                         i64 nvalid, const T* sc, const T* sh, bool relu) {
  // 6 x 2 vectors with 16 vector registers (AVX2), 12 x 2 with 32 (AVX-512): the accumulators
  // fill about three quarters of the register file. Every element's sum runs over k in order, so
  // the tile shape does not change the result.
  constexpr int NL = VB / sizeof(T), MR = VB == 64 ? 12 : 6, NV = 2;
  for (i64 n0 = 0; n0 < Np; n0 += NV * NL) {
    const int nv = (int)std::min<i64>(NV, (Np - n0) / NL);
    i64 m0 = 0;
    for (; m0 + MR <= M; m0 += MR)
      gemm_rows<T, VB, MR, EPI>(K, A + m0 * ams, ams, aks, B, ldb, C + m0 * ldc, ldc, n0, nv, nvalid, sc, sh, relu);
#define MEDCONV_GEMM_REM(R)                                                                                    \
  if (M - m0 >= R) {                                                                                         \
    gemm_rows<T, VB, R, EPI>(K, A + m0 * ams, ams, aks, B, ldb, C + m0 * ldc, ldc, n0, nv, nvalid, sc, sh, relu); \
    m0 += R;                                                                                                 \
  }
    if constexpr (MR > 8) {
      MEDCONV_GEMM_REM(8)
    }
    MEDCONV_GEMM_REM(4)
    MEDCONV_GEMM_REM(2)
    MEDCONV_GEMM_REM(1)
#undef MEDCONV_GEMM_REM
  }
}

// ------------------------------------------------------------------------------------------
// ring of transformed input rows ("slabs") of one thread
// ------------------------------------------------------------------------------------------
template <typename T>
struct Ring {
  i64 span = 1, slab = 0;
  std::vector<T> data;
  std::vector<i64> tag;  // (n * L0 + j0) held by each slot, -1 if none
  std::vector<T> fold;   // folded input of one row of pixels (fold_in)
  std::vector<T> xs;     // one row of a bfloat16 input, converted to float
  std::vector<T> fftbuf;  // channel FFT scratch (fft_scratch: 64-byte aligned)
};

// The channel FFT's per-thread scratch: 4N + 2Hp vectors, 64-byte aligned.
template <typename T, int VB>
MEDCONV_INLINE typename VecOf<T, VB>::type* fft_scratch(const Plan<T>& p, Ring<T>& ring) {
  constexpr i64 NL = VB / sizeof(T);
  const i64 need = (4 * p.fft->N + 2 * p.Hp) * NL + 64 / (i64)sizeof(T);
  if ((i64)ring.fftbuf.size() < need) ring.fftbuf.assign((size_t)need, T(0));
  const uintptr_t a = (reinterpret_cast<uintptr_t>(ring.fftbuf.data()) + 63) & ~uintptr_t(63);
  return reinterpret_cast<typename VecOf<T, VB>::type*>(a);
}

MEDCONV_INLINE float bf16_to_float(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even; NaN stays NaN (quiet), as c10::BFloat16.
MEDCONV_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)(nan ? ((u >> 16) | 0x40u) : r);
}

// source index of buffer coordinate j, or -1
MEDCONV_INLINE i64 src_index(i64 j, i64 off, i64 su, i64 size) {
  const i64 m = j + off;
  if (m < 0 || m % su != 0) return -1;
  const i64 q = m / su;
  return q < size ? q : -1;
}

// Channel DFT of source row m0 of batch n into a slab (positions never written stay zero).
// Folded input of M pixels: per pixel and base, [x0, u_1..u_h, (x_{C/2})] then [v_1..v_h, nyq].
// a: pixel m, channel ch at a[m*ps + ch*cs].
template <typename T>
MEDCONV_INLINE void fold_pixels(const Plan<T>& p, const T* a, i64 ps, i64 cs, i64 M, T* F) {
  const i64 C = p.C, Rn = p.Rn, h = p.h, nb = p.NBi, K = p.Ku + p.Kv;
  const bool even = C % 2 == 0;
  if (nb == 1 && Rn == C && cs == 1) {  // contiguous channels (channels-last input): plain loops
    for (i64 m = 0; m < M; ++m) {
      const T* px = a + m * ps;
      T* f = F + m * K;
      T* fv = f + p.Ku - 1;
      f[0] = px[0];
      for (i64 c = 1; c <= h; ++c) {
        const T lo = px[c], hi = px[C - c];
        f[c] = lo + hi;
        fv[c] = lo - hi;
      }
      T nyq = T(0);
      if (even) {
        f[h + 1] = px[C / 2];
        T se = T(0), so = T(0);
        for (i64 c = 0; c < C; c += 2) se += px[c];
        for (i64 c = 1; c < C; c += 2) so += px[c];
        nyq = se - so;
      }
      f[p.Ku + h] = nyq;
    }
    return;
  }
  for (i64 m = 0; m < M; ++m) {
    const T* px = a + m * ps;
    for (i64 b = 0; b < nb; ++b) {
      T* f = F + (m * nb + b) * K;
      auto xc = [&](i64 c) -> T { return c < Rn ? px[(c * nb + b) * cs] : T(0); };
      const T x0 = xc(0);
      T nyq = x0;
      f[0] = x0;
      for (i64 c = 1; c <= h; ++c) {
        const T lo = xc(c), hi = xc(C - c);
        f[c] = lo + hi;
        f[p.Ku + c - 1] = lo - hi;
        if (even) nyq += (c % 2) ? -(lo + hi) : (lo + hi);
      }
      if (even) {
        const T xm = xc(C / 2);
        f[h + 1] = xm;
        nyq += ((C / 2) % 2) ? -xm : xm;
      }
      f[p.Ku + h] = even ? nyq : T(0);
    }
  }
}

// Folded input of M pixels from a channel-major row (channel ch's pixels contiguous at a + ch*cs:
// NC(D)HW input read in place, no transposition pass): per base b the K = Ku + Kv folded rows of M
// pixels, F[(b*K + k)*M + m] (the GEMM then reads A with pixel stride 1 and k stride M).
template <typename T>
MEDCONV_INLINE void fold_channels(const Plan<T>& p, const T* a, i64 cs, i64 M, T* F) {
  const i64 C = p.C, Rn = p.Rn, h = p.h, nb = p.NBi, Ku = p.Ku, K = p.Ku + p.Kv;
  const bool even = C % 2 == 0;
  for (i64 b = 0; b < nb; ++b) {
    T* Fb = F + b * K * M;
    auto row = [&](i64 c) -> const T* { return c < Rn ? a + (c * nb + b) * cs : nullptr; };
    T* nyq = Fb + (Ku + h) * M;
    const T* x0 = row(0);
    for (i64 m = 0; m < M; ++m) Fb[m] = x0[m];
    for (i64 m = 0; m < M; ++m) nyq[m] = even ? x0[m] : T(0);
    for (i64 c = 1; c <= h; ++c) {
      const T* lo = row(c);
      const T* hi = row(C - c);
      T* u = Fb + c * M;
      T* v = Fb + (Ku + c - 1) * M;
      if (lo && hi) {
        for (i64 m = 0; m < M; ++m) {
          u[m] = lo[m] + hi[m];
          v[m] = lo[m] - hi[m];
        }
      } else if (lo) {
        for (i64 m = 0; m < M; ++m) u[m] = v[m] = lo[m];
      } else if (hi) {
        for (i64 m = 0; m < M; ++m) {
          u[m] = hi[m];
          v[m] = -hi[m];
        }
      } else {
        for (i64 m = 0; m < M; ++m) u[m] = v[m] = T(0);
      }
      if (even) {
        if (c % 2)
          for (i64 m = 0; m < M; ++m) nyq[m] -= u[m];
        else
          for (i64 m = 0; m < M; ++m) nyq[m] += u[m];
      }
    }
    if (even) {
      const T* xm = row(C / 2);
      T* f = Fb + (h + 1) * M;
      for (i64 m = 0; m < M; ++m) f[m] = xm ? xm[m] : T(0);
      if ((C / 2) % 2)
        for (i64 m = 0; m < M; ++m) nyq[m] -= f[m];
      else
        for (i64 m = 0; m < M; ++m) nyq[m] += f[m];
    }
  }
}

// Channels [c0, c1) of one row of M pixels of a source (channel ch - c0, pixel m at s[ch*cs + m*ps]; float,
// double or bfloat16 bits) into the gathered row xs of Ctot channels: channel-major xs[ch*M + m] or
// pixel-major xs[m*Ctot + ch].
template <typename T, typename S>
MEDCONV_INLINE void gather_row(const S* s, i64 cs, i64 ps, i64 c0, i64 c1, i64 M, i64 Ctot, bool chmaj, T* xs) {
  auto cvt = [](S v) -> T {
    if constexpr (std::is_same<S, uint16_t>::value) return (T)bf16_to_float(v);
    else return (T)v;
  };
  if (chmaj) {
    for (i64 ch = c0; ch < c1; ++ch) {
      const S* r = s + (ch - c0) * cs;
      T* d = xs + ch * M;
      if (ps == 1)
        for (i64 m = 0; m < M; ++m) d[m] = cvt(r[m]);
      else
        for (i64 m = 0; m < M; ++m) d[m] = cvt(r[m * ps]);
    }
    return;
  }
  for (i64 m = 0; m < M; ++m) {
    const S* px = s + m * ps;
    T* d = xs + m * Ctot + c0;
    if (cs == 1) {
      if constexpr (std::is_same<S, T>::value) std::memcpy(d, px, (size_t)(c1 - c0) * sizeof(T));
      else
        for (i64 ch = 0; ch < c1 - c0; ++ch) d[ch] = cvt(px[ch]);
    } else {
      for (i64 ch = 0; ch < c1 - c0; ++ch) d[ch] = cvt(px[ch * cs]);
    }
  }
}

// Channel FFT of one row of M pixels (element (m, ch) at a[m*ps + ch*cs]; per base b the Rn channels
// r*NBi + b, zero beyond) into the spectra dst[m*dstride + b*2Hp + slot], NL pixels at a time: the
// channels are loaded as vectors over pixels (channel-major rows directly, channels-last rows through
// in-register NL x NL transposes), transformed, and the slot vectors transposed back into the slab.
template <typename T, int VB>
MEDCONV_INLINE void fft_row_in(const Plan<T>& p, Ring<T>& ring, const T* a, i64 ps, i64 cs, i64 M, T* dst,
                               i64 dstride) {
  typedef typename VecOf<T, VB>::type V;
  constexpr i64 NL = VB / sizeof(T);
  const channel_fft::Tables<T>& t = *p.fft;
  const i64 N = t.N, Hp = p.Hp, C = p.C, nb = p.NBi, Rn = p.Rn;
  V* zr = fft_scratch<T, VB>(p, ring);
  V* zi = zr + N;
  V* tr = zi + N;
  V* ti = tr + N;
  V* S = ti + N;
  const bool chmaj = cs != 1 && ps == 1;
  const bool cl = !chmaj && cs == 1 && nb == 1;
  auto put = [&](i64 c, const V& v) { (c & 1 ? zi : zr)[c >> 1] = v; };
  for (i64 m0 = 0; m0 < M; m0 += NL) {
    const i64 np = std::min<i64>(NL, M - m0);
    for (i64 b = 0; b < nb; ++b) {
      if (chmaj && np == NL) {
        for (i64 c = 0; c < C; ++c) {
          V v = V{};
          if (c < Rn) std::memcpy(&v, a + (c * nb + b) * cs + m0, sizeof(V));
          put(c, v);
        }
      } else if (cl) {  // NL pixels x NL channels at a time
        for (i64 c0 = 0; c0 < C; c0 += NL) {
          V r[NL];
          load_transposed<T, VB>(a + m0 * ps + c0, ps, np, std::max<i64>(0, std::min<i64>(NL, Rn - c0)), r);
#pragma GCC unroll 16
          for (i64 j = 0; j < NL; ++j)  // constant indices: r stays in registers
            if (c0 + j < C) put(c0 + j, r[j]);
        }
      } else {  // any other strides, several bases, a partial block: element by element
        for (i64 c = 0; c < C; ++c) {
          V v = V{};
          if (c < Rn)
            for (i64 i = 0; i < np; ++i) v[i] = a[(m0 + i) * ps + (c * nb + b) * cs];
          put(c, v);
        }
      }
      channel_fft::rfft<T, VB>(t, Hp, zr, zi, tr, ti, S);
      T* d = dst + m0 * dstride + b * 2 * Hp;
      for (i64 j0 = 0; j0 < 2 * Hp; j0 += NL)
        transpose_tile<T, VB>(reinterpret_cast<const T*>(S + j0), NL, NL, np, d + j0, dstride);
    }
  }
}

// Only the buffer rows j1 in [j1lo, j1hi) of dim 1 are filled (the others are not read by the caller).
template <typename T, int VB>
MEDCONV_INLINE void fill_slab(const Plan<T>& p, Ring<T>& ring, i64 n, i64 m0, T* slab, i64 j1lo, i64 j1hi) {
  const i64 SP = p.SP();
  const i64 m2lo = std::max<i64>(0, ceil_div(p.off[2], p.su[2]));
  const i64 m2hi = std::min<i64>(p.S[2], ceil_div(p.L[2] + p.off[2], p.su[2]));
  if (m2hi <= m2lo) return;
  const i64 j2lo = m2lo * p.su[2] - p.off[2];
  const i64 M = m2hi - m2lo, K = p.Ku + p.Kv;
  for (i64 m1 = 0; m1 < p.S[1]; ++m1) {
    const i64 j1 = m1 * p.su[1] - p.off[1];
    if (j1 < std::max<i64>(0, j1lo) || j1 >= std::min(p.L[1], j1hi)) continue;
    T* dst = slab + (j1 * p.L[2] + j2lo) * SP;
    // the row as a (M pixels) x (Csrc channels) operand: element (m, ch) at a[m*ps + ch*cs]
    const T* a;
    i64 ps = p.sS[2], cs = p.sC;
    const i64 base = n * p.sN + m0 * p.sS[0] + m1 * p.sS[1] + m2lo * p.sS[2];
    if (p.src16 || p.C1 > 0) {  // bfloat16 and/or two sources: gathered into one float row, in the
      // orientation of the source(s): channel-major when every source is, else pixel-major
      if ((i64)ring.xs.size() < M * p.Csrc) ring.xs.resize(M * p.Csrc);
      T* xs = ring.xs.data();
      const bool two = p.C1 > 0;
      const i64 C1 = two ? p.C1 : p.Csrc;
      const bool chmaj = p.sC != 1 && p.sS[2] == 1 && (!two || (p.sC2 != 1 && p.sS2[2] == 1));
      if (p.src16) gather_row<T>(p.src16 + base, p.sC, p.sS[2], 0, C1, M, p.Csrc, chmaj, xs);
      else gather_row<T>(p.src + base, p.sC, p.sS[2], 0, C1, M, p.Csrc, chmaj, xs);
      if (two) {
        const i64 base2 = n * p.sN2 + m0 * p.sS2[0] + m1 * p.sS2[1] + m2lo * p.sS2[2];
        if (p.src2_16) gather_row<T>(p.src2_16 + base2, p.sC2, p.sS2[2], C1, p.Csrc, M, p.Csrc, chmaj, xs);
        else gather_row<T>(p.src2 + base2, p.sC2, p.sS2[2], C1, p.Csrc, M, p.Csrc, chmaj, xs);
      }
      ps = chmaj ? 1 : p.Csrc;
      cs = chmaj ? M : 1;
      a = xs;
    } else {
      a = p.src + base;
    }
    if (p.fft_in) {
      fft_row_in<T, VB>(p, ring, a, ps, cs, M, dst, p.su[2] * SP);
      continue;
    }
    if (!p.fold_in) {
      gemm<T, VB, false>(M, p.Csrc, a, ps, cs, p.Dm, SP, SP, dst, p.su[2] * SP, SP, nullptr, nullptr, false);
      continue;
    }
    if ((i64)ring.fold.size() < M * p.NBi * K) ring.fold.resize(M * p.NBi * K);
    // channel-major rows (NC(D)HW) fold along the pixels, pixel-major ones along the channels
    const bool chmajor = cs != 1 && ps == 1;
    if (chmajor)
      fold_channels<T>(p, a, cs, M, ring.fold.data());
    else
      fold_pixels<T>(p, a, ps, cs, M, ring.fold.data());
    for (i64 b = 0; b < p.NBi; ++b) {
      const T* F = ring.fold.data() + (chmajor ? b * K * M : b * K);
      const i64 fm = chmajor ? 1 : p.NBi * K, fk = chmajor ? M : 1;
      gemm<T, VB, false>(M, p.Ku, F, fm, fk, p.Bu, p.Hp, p.Hp, dst + b * 2 * p.Hp, p.su[2] * SP, p.Hp, nullptr,
                         nullptr, false);
      gemm<T, VB, false>(M, p.Kv, F + p.Ku * fk, fm, fk, p.Bv, p.Hp, p.Hp, dst + b * 2 * p.Hp + p.Hp, p.su[2] * SP,
                         p.Hp, nullptr, nullptr, false);
    }
  }
}

// Slab of buffer row j0 (source row m0) of batch n, transformed on first use.
// part: the dim-1 range [j1lo, j1hi) it covers (part 0 of 1: everything).
template <typename T, int VB>
MEDCONV_INLINE const T* get_slab(const Plan<T>& p, Ring<T>& ring, i64 n, i64 j0, i64 m0, i64 part = 0, i64 j1lo = 0,
                                 i64 j1hi = INT64_MAX) {
  const i64 slot = j0 % ring.span, key = (part * p.N + n) * p.L[0] + j0;
  T* s = ring.data.data() + slot * ring.slab;
  if (ring.tag[slot] != key) {
    fill_slab<T, VB>(p, ring, n, m0, s, j1lo, j1hi);
    ring.tag[slot] = key;
  }
  return s;
}

struct TapRef {
  i64 off;  // element offset into the slab (inner tap position)
  i64 slot;  // ring slot index
  i64 wt;    // weight tap index
};

// ------------------------------------------------------------------------------------------
// per-frequency complex depthwise convolution: MP output pixels (consecutive along dim 2)
// ------------------------------------------------------------------------------------------
template <typename T, int VB, int MP>
MEDCONV_INLINE void dw_tile(const Plan<T>& p, const T* const* slabs, const TapRef* taps, i64 ntaps, i64 pxo, T* Y,
                            i64 ystride) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int NL = VB / sizeof(T);
  const i64 Hp = p.Hp, pxs = p.ks[2] * p.SP();
  const i64 npairs = p.adjoint ? p.nbw : 1;
  for (i64 bo = 0; bo < p.NBo; ++bo) {
    for (i64 jv = 0; jv < Hp; jv += NL) {
      V ar[MP], ai[MP];
#pragma GCC unroll 16
      for (int q = 0; q < MP; ++q) ar[q] = ai[q] = V{};
      for (i64 pr = 0; pr < npairs; ++pr) {
        const i64 bi = p.adjoint ? pr : 0, wb = p.adjoint ? pr : bo;
        const T* wbase = p.Wpk + wb * p.taps * 4 * Hp + jv;
        const i64 xoff = pxo + bi * 2 * Hp + jv;
        for (i64 e = 0; e < ntaps; ++e) {
          const T* w = wbase + taps[e].wt * 4 * Hp;
          V wa, wb_, wc, wd;
          std::memcpy(&wa, w, sizeof(V));
          std::memcpy(&wb_, w + Hp, sizeof(V));
          std::memcpy(&wc, w + 2 * Hp, sizeof(V));
          std::memcpy(&wd, w + 3 * Hp, sizeof(V));
          const T* x = slabs[taps[e].slot] + taps[e].off + xoff;
#pragma GCC unroll 16
          for (int q = 0; q < MP; ++q) {
            V xr, xi;
            std::memcpy(&xr, x + q * pxs, sizeof(V));
            std::memcpy(&xi, x + q * pxs + Hp, sizeof(V));
            ar[q] += wa * xr;
            ar[q] += wb_ * xi;
            ai[q] += wc * xi;
            ai[q] += wd * xr;
          }
        }
      }
#pragma GCC unroll 16
      for (int q = 0; q < MP; ++q) {
        T* y = Y + q * ystride + bo * 2 * Hp + jv;
        std::memcpy(y, &ar[q], sizeof(V));
        std::memcpy(y + Hp, &ai[q], sizeof(V));
      }
    }
  }
}

#define MEDCONV_DW_ARGS const Plan<T>&p, const T *const *slabs, const TapRef *taps, i64 ntaps, i64 pxo, T *Y, \
    i64 ystride
#define MEDCONV_DW_PASS p, slabs, taps, ntaps, pxo, Y, ystride
template <typename T, int MP>
__attribute__((noinline)) void dw_tile16(MEDCONV_DW_ARGS) {
  dw_tile<T, 16, MP>(MEDCONV_DW_PASS);
}
#ifdef MEDCONV_X86_DISPATCH
template <typename T, int MP>
__attribute__((noinline)) MEDCONV_TARGET_AVX2 void dw_tile32(MEDCONV_DW_ARGS) {
  dw_tile<T, 32, MP>(MEDCONV_DW_PASS);
}
template <typename T, int MP>
__attribute__((noinline)) MEDCONV_TARGET_AVX512 void dw_tile64(MEDCONV_DW_ARGS) {
  dw_tile<T, 64, MP>(MEDCONV_DW_PASS);
}
#endif

template <typename T, int VB, int MP>
MEDCONV_INLINE void dw_tile_call(MEDCONV_DW_ARGS) {
#ifdef MEDCONV_X86_DISPATCH
  if constexpr (VB == 64) {
    dw_tile64<T, MP>(MEDCONV_DW_PASS);
    return;
  }
  if constexpr (VB == 32) {
    dw_tile32<T, MP>(MEDCONV_DW_PASS);
    return;
  }
#endif
  dw_tile16<T, MP>(MEDCONV_DW_PASS);
}

// Stores a block of npx consecutive output pixels (first pixel pix0 of sample n), held channels-last
// in Z (row stride ldz), into the output: NC(D)HW and/or bfloat16 (rounded to nearest even).
template <typename T, typename To>
MEDCONV_INLINE To cvt_out(T v) {
  if constexpr (std::is_same<To, uint16_t>::value) return float_to_bf16((float)v);
  else return (To)v;
}

// NC(D)HW float store of a block: NL x NL tiles (NL pixels x NL channels of Z) transposed (in registers where
// full) and stored as NL contiguous pixels per channel.
template <typename T, int VB>
MEDCONV_INLINE void store_block_nchw(const T* Z, i64 ldz, i64 npx, i64 Co, i64 P, T* dst) {
  constexpr i64 NL = VB / sizeof(T);
  for (i64 q0 = 0; q0 < npx; q0 += NL)
    for (i64 c0 = 0; c0 < Co; c0 += NL)
      transpose_tile<T, VB>(Z + q0 * ldz + c0, ldz, std::min(NL, npx - q0), std::min(NL, Co - c0), dst + c0 * P + q0,
                            P);
}

// n floats rounded to bfloat16 (nearest even, NaN kept quiet: float_to_bf16), 2 * VB / 4 at a time: each
// rounded in 32-bit lanes, then the low halves of two vectors packed into one (a two-source shuffle;
// GCC 12 refuses __builtin_convertvector on these template-dependent vector types).
template <size_t... L>
MEDCONV_INLINE auto even_halves_mask(std::index_sequence<L...>) {
  constexpr int NH = sizeof...(L);  // 16-bit lanes per vector
  typedef int16_t M __attribute__((vector_size(NH * 2)));
  return M{(int16_t)((int)L < NH / 2 ? 2 * (int)L : 2 * ((int)L - NH / 2) + NH)...};
}

template <int VB>
MEDCONV_INLINE void floats_to_bf16(const float* s, uint16_t* d, i64 n) {
  typedef uint32_t U __attribute__((vector_size(VB)));
  typedef uint16_t H __attribute__((vector_size(VB)));
  constexpr i64 NL = VB / 4;
  const auto mask = even_halves_mask(std::make_index_sequence<2 * NL>{});
  auto round = [](const float* p) {
    U u;
    std::memcpy(&u, p, sizeof(U));
    const U r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const U m = (U)((u & 0x7fffffffu) > 0x7f800000u);
    const U v = (r & ~m) | (((u >> 16) | 0x40u) & m);
    H h;
    std::memcpy(&h, &v, sizeof(H));
    return h;
  };
  i64 i = 0;
  for (; i + 2 * NL <= n; i += 2 * NL) {
    const H h = __builtin_shuffle(round(s + i), round(s + i + NL), mask);
    std::memcpy(d + i, &h, sizeof(H));
  }
  for (; i < n; ++i) d[i] = float_to_bf16(s[i]);
}

template <typename T, typename To, int VB>
MEDCONV_INLINE void store_block_t(const Plan<T>& p, const T* Z, i64 ldz, i64 npx, i64 n, i64 pix0) {
  const i64 P = p.O[0] * p.O[1] * p.O[2], Co = p.Cout;
  To* o = (To*)p.out_any;
  constexpr bool f2b = std::is_same<T, float>::value && std::is_same<To, uint16_t>::value;
  if (p.out_cl) {
    To* dst = o + (n * P + pix0) * Co;
    for (i64 q = 0; q < npx; ++q) {
      if constexpr (f2b) floats_to_bf16<VB>(Z + q * ldz, dst + q * Co, Co);
      else
        for (i64 c = 0; c < Co; ++c) dst[q * Co + c] = cvt_out<T, To>(Z[q * ldz + c]);
    }
    return;
  }
  To* dst = o + n * Co * P + pix0;
  if constexpr (std::is_same<To, T>::value) {
    store_block_nchw<T, VB>(Z, ldz, npx, Co, P, dst);
    return;
  }
  if constexpr (f2b) {  // transposed in float tiles (per thread), then each channel's pixels rounded in vectors
    thread_local std::vector<float> tz;
    if ((i64)tz.size() < Co * npx) tz.resize(Co * npx);
    store_block_nchw<T, VB>(Z, ldz, npx, Co, npx, tz.data());
    for (i64 c = 0; c < Co; ++c) floats_to_bf16<VB>(tz.data() + c * npx, dst + c * P, npx);
    return;
  }
  constexpr i64 QB = 16;  // 16 rows of Z stay in L1 while every channel's 16 pixels are written
  for (i64 q0 = 0; q0 < npx; q0 += QB) {
    const i64 q1 = std::min(npx, q0 + QB);
    for (i64 c = 0; c < Co; ++c) {
      To* d = dst + c * P;
      for (i64 q = q0; q < q1; ++q) d[q] = cvt_out<T, To>(Z[q * ldz + c]);
    }
  }
}

template <typename T, int VB>
MEDCONV_INLINE void store_block(const Plan<T>& p, const T* Z, i64 ldz, i64 npx, i64 n, i64 pix0) {
  if (p.out_bf16) store_block_t<T, uint16_t, VB>(p, Z, ldz, npx, n, pix0);
  else store_block_t<T, T, VB>(p, Z, ldz, npx, n, pix0);
}

// The folded inverse of one pixel and one base with contiguous output channels, with the epilogue:
// y[r] = epi(e[r] + o[r]) for r < r1, y[r] = epi(e[C - r] - o[C - r]) for r1 <= r < Rout. The second
// range reads e and o backwards: vectors loaded forwards and reversed in registers (a scalar loop
// with a strided store here cost about as much as the inverse GEMM at C = 64).
template <typename T, int VB, size_t... L>
MEDCONV_INLINE auto lane_reverse_mask(std::index_sequence<L...>) {
  typedef lane_int_t<T> M __attribute__((vector_size(VB)));
  return M{(lane_int_t<T>)(sizeof...(L) - 1 - L)...};
}

// One range [r0, r1) of combine_even_odd in vectors of VB bytes; the last vector overlaps the one
// before it (it rewrites the same values) instead of a scalar tail; a range shorter than a vector
// takes half-width vectors, then scalars.
template <typename T, int VB, bool BACKWARD>
MEDCONV_INLINE void combine_range(const T* e, const T* o, i64 C, i64 r0, i64 r1, const T* sc, const T* sh, bool relu,
                                  T* y) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int NL = VB / sizeof(T);
  if (r1 - r0 < NL) {
    if constexpr (VB > 16) {
      combine_range<T, VB / 2, BACKWARD>(e, o, C, r0, r1, sc, sh, relu, y);
    } else {
      for (i64 r = r0; r < r1; ++r) {
        T z = (BACKWARD ? e[C - r] - o[C - r] : e[r] + o[r]) * sc[r] + sh[r];
        y[r] = relu && z < T(0) ? T(0) : z;  // NaN stays NaN, as torch.relu
      }
    }
    return;
  }
  const auto rev = lane_reverse_mask<T, VB>(std::make_index_sequence<NL>{});
  for (i64 i = r0;; i += NL) {
    const i64 r = std::min(i, r1 - NL);
    V ev, ov, z, s, h;
    if (BACKWARD) {  // lanes r..r+NL-1 read C-r..C-r-NL+1
      std::memcpy(&ev, e + (C - r - NL + 1), sizeof(V));
      std::memcpy(&ov, o + (C - r - NL + 1), sizeof(V));
      z = __builtin_shuffle(ev - ov, rev);
    } else {
      std::memcpy(&ev, e + r, sizeof(V));
      std::memcpy(&ov, o + r, sizeof(V));
      z = ev + ov;
    }
    std::memcpy(&s, sc + r, sizeof(V));
    std::memcpy(&h, sh + r, sizeof(V));
    z = z * s + h;
    if (relu) z = z < V{} ? V{} : z;  // NaN stays NaN, as torch.relu
    std::memcpy(y + r, &z, sizeof(V));
    if (r == r1 - NL) break;
  }
}

template <typename T, int VB>
MEDCONV_INLINE void combine_even_odd(const T* e, const T* o, i64 C, i64 r1, i64 Rout, const T* sc, const T* sh,
                                     bool relu, T* y) {
  combine_range<T, VB, false>(e, o, C, 0, r1, sc, sh, relu, y);
  combine_range<T, VB, true>(e, o, C, r1, Rout, sc, sh, relu, y);
}

// The inverse channel FFT of npx pixels' spectra (pixel q, base bo at Y[q*ystride + bo*2Hp + slot]) with
// the epilogue, into out[q*ldo + r*NBo + bo] for r < Rout: NL pixels at a time, the slots transposed into
// vectors over pixels, the output channels transposed back (NBo = 1) or scattered (NBo > 1). With nchw set
// (an NC(D)HW output whose npx pixels are consecutive, channel stride P) the vectors over pixels are
// stored there as they are, with no transposition.
template <typename T, int VB>
MEDCONV_INLINE void fft_rows_out(const Plan<T>& p, Ring<T>& ring, const T* Y, i64 ystride, i64 npx, T* out,
                                 i64 ldo, T* nchw = nullptr, i64 P = 0) {
  typedef typename VecOf<T, VB>::type V;
  constexpr i64 NL = VB / sizeof(T);
  const channel_fft::Tables<T>& t = *p.fft;
  const i64 N = t.N, Hp = p.Hp, nbo = p.NBo, Rout = p.Rout;
  V* S = fft_scratch<T, VB>(p, ring);
  V* a = S + 2 * Hp;
  V* b = a + N;
  V* c = b + N;
  V* d = c + N;
  for (i64 q0 = 0; q0 < npx; q0 += NL) {
    const i64 np = std::min<i64>(NL, npx - q0);
    for (i64 bo = 0; bo < nbo; ++bo) {
      if (np < NL) std::fill(reinterpret_cast<T*>(S), reinterpret_cast<T*>(S + 2 * Hp), T(0));
      const T* yb = Y + q0 * ystride + bo * 2 * Hp;
      for (i64 j0 = 0; j0 < 2 * Hp; j0 += NL)
        transpose_tile<T, VB>(yb + j0, ystride, np, NL, reinterpret_cast<T*>(S + j0), NL);
      const V* xe;
      const V* xo;
      channel_fft::irfft<T, VB>(t, Hp, S, a, b, c, d, &xe, &xo);
      auto epi = [&](i64 r) {
        const V x = (r & 1) ? -xo[r >> 1] : xe[r >> 1];
        V z = x * (V{} + p.sc[r * nbo + bo]) + (V{} + p.sh[r * nbo + bo]);
        if (p.relu) z = z < V{} ? V{} : z;  // NaN stays NaN, as torch.relu
        return z;
      };
      if (nchw) {
        for (i64 r = 0; r < Rout; ++r) {
          const V z = epi(r);
          T* dr = nchw + (r * nbo + bo) * P + q0;
          if (np == NL) {
            std::memcpy(dr, &z, sizeof(V));
          } else {
            for (i64 q = 0; q < np; ++q) dr[q] = z[q];
          }
        }
        continue;
      }
      for (i64 r0 = 0; r0 < Rout; r0 += NL) {
        const i64 cc = std::min<i64>(NL, Rout - r0);
        V z[NL];
#pragma GCC unroll 16
        for (i64 r = 0; r < NL; ++r)  // constant indices: z stays in registers
          if (r < cc) z[r] = epi(r0 + r);
        store_transposed<T, VB>(z, cc, np, out + q0 * ldo + r0 * nbo + bo, ldo, nbo);
      }
    }
  }
}

// One output row (n, o0): depthwise over the slabs, inverse GEMM with epilogue into the output.
// Output rows [q1lo, q1hi) of dim 1 (part `part` of the row).
template <typename T, int VB>
MEDCONV_INLINE void conv_row(const Plan<T>& p, Ring<T>& ring, i64 n, i64 o0, i64 q1lo, i64 q1hi, i64 part,
                             std::vector<TapRef>& taps, std::vector<T>& Y, std::vector<T>& E, std::vector<T>& Z) {
  // 4 pixels x (re, im) accumulators with 16 vector registers, 8 pixels with 32
  constexpr int MP = VB == 64 ? 8 : 4;
  const i64 SP = p.SP(), L2 = p.L[2];
  std::vector<const T*> slabs(ring.span, nullptr);
  taps.clear();
  for (i64 t0 = 0; t0 < p.k[0]; ++t0) {
    const i64 j0 = o0 * p.ks[0] + t0 * p.d[0];
    const i64 m0 = src_index(j0, p.off[0], p.su[0], p.S[0]);
    if (m0 < 0) continue;  // a zero row (padding or zero insertion): no contribution
    const i64 slot = j0 % ring.span;
    slabs[slot] = get_slab<T, VB>(p, ring, n, j0, m0, part, q1lo * p.ks[1], (q1hi - 1) * p.ks[1] + (p.k[1] - 1) * p.d[1] + 1);
    for (i64 t1 = 0; t1 < p.k[1]; ++t1)
      for (i64 t2 = 0; t2 < p.k[2]; ++t2)
        taps.push_back(TapRef{(t1 * p.d[1] * L2 + t2 * p.d[2]) * SP, slot, (t0 * p.k[1] + t1) * p.k[2] + t2});
  }
  const i64 ystride = p.NBo * 2 * p.Hp;
  const i64 O1 = p.O[1], O2 = p.O[2];
  // blocks of ~128 output pixels (whole rows of dim 2; rows longer than 256 in 256-pixel pieces):
  // the block's spectra, inverse and output buffers stay in L2 whatever the image width
  const i64 rows_per_block = std::max<i64>(1, 128 / O2);
  const i64 CB = O2 <= 256 ? O2 : 256;
  const bool direct = p.out != nullptr;
  T* outrow = direct ? p.out + (n * p.O[0] + o0) * O1 * O2 * p.Cout : nullptr;
  for (i64 qb = q1lo; qb < q1hi; qb += rows_per_block)
  for (i64 c2b = 0; c2b < O2; c2b += CB) {
    const i64 qe = std::min(q1hi, qb + rows_per_block);
    const i64 c2e = std::min(O2, c2b + CB), W2 = c2e - c2b;
    const i64 npx = (qe - qb) * W2;
    if ((i64)Y.size() < npx * ystride) Y.resize(npx * ystride);
    if (taps.empty()) {
      std::fill(Y.begin(), Y.begin() + npx * ystride, T(0));
    } else {
      for (i64 q1 = qb; q1 < qe; ++q1) {
        const i64 rowo = q1 * p.ks[1] * L2 * SP;
        T* yrow = Y.data() + (q1 - qb) * W2 * ystride;  // pixel q2 at yrow + (q2 - c2b) * ystride
        i64 q2 = c2b;
        for (; q2 + MP <= c2e; q2 += MP)
          dw_tile_call<T, VB, MP>(p, slabs.data(), taps.data(), (i64)taps.size(), rowo + q2 * p.ks[2] * SP,
                             yrow + (q2 - c2b) * ystride, ystride);
#define MEDCONV_DW_REM(R)                                                                                     \
  if (c2e - q2 >= R) {                                                                                        \
    dw_tile_call<T, VB, R>(p, slabs.data(), taps.data(), (i64)taps.size(), rowo + q2 * p.ks[2] * SP,           \
                           yrow + (q2 - c2b) * ystride, ystride);                                                     \
    q2 += R;                                                                                                  \
  }
        if constexpr (MP > 4) {
          MEDCONV_DW_REM(4)
        }
        MEDCONV_DW_REM(2)
        MEDCONV_DW_REM(1)
#undef MEDCONV_DW_REM
      }
    }
    T* orow;
    i64 ldo;
    if (direct) {
      orow = outrow + (qb * O2 + c2b) * p.Cout;
      ldo = p.Cout;
    } else {
      if ((i64)Z.size() < npx * p.Np) Z.resize(npx * p.Np);
      orow = Z.data();
      ldo = p.Np;
    }
    if (p.fft_out) {
      if (!direct && !p.out_cl && !p.out_bf16) {  // NC(D)HW float: the block's pixels are consecutive there
        const i64 P = p.O[0] * O1 * O2;
        T* dst = static_cast<T*>(p.out_any) + n * p.Cout * P + (o0 * O1 + qb) * O2 + c2b;
        fft_rows_out<T, VB>(p, ring, Y.data(), ystride, npx, nullptr, 0, dst, P);
        continue;
      }
      fft_rows_out<T, VB>(p, ring, Y.data(), ystride, npx, orow, ldo);
      if (!direct) store_block<T, VB>(p, orow, ldo, npx, n, (o0 * O1 + qb) * O2 + c2b);
      continue;
    }
    if (!p.fold_out) {
      gemm<T, VB, true>(npx, ystride, Y.data(), ystride, 1, p.Gm, p.Np, p.Np, orow, ldo, p.Cout, p.sc, p.sh,
                        p.relu);
      if (!direct) store_block<T, VB>(p, orow, ldo, npx, n, (o0 * O1 + qb) * O2 + c2b);
      continue;
    }
    const i64 NpE = p.NpE, Hp = p.Hp, half = p.C / 2;
    const i64 ldE = NpE;
    if ((i64)E.size() < 2 * npx * ldE) E.resize(2 * npx * ldE);
    T* Eb = E.data();
    T* Ob = E.data() + npx * ldE;
    for (i64 bo = 0; bo < p.NBo; ++bo) {
      const T* Yb = Y.data() + bo * 2 * Hp;
      if (VB == 64 && p.e_narrow) {
        gemm<T, 32, false>(npx, Hp + 1, Yb, ystride, 1, p.Ge, NpE, NpE, Eb, ldE, NpE, nullptr, nullptr, false);
        gemm<T, 32, false>(npx, Hp - 1, Yb + Hp + 1, ystride, 1, p.Go, NpE, NpE, Ob, ldE, NpE, nullptr, nullptr, false);
      } else {
        gemm<T, VB, false>(npx, Hp + 1, Yb, ystride, 1, p.Ge, NpE, NpE, Eb, ldE, NpE, nullptr, nullptr, false);
        gemm<T, VB, false>(npx, Hp - 1, Yb + Hp + 1, ystride, 1, p.Go, NpE, NpE, Ob, ldE, NpE, nullptr, nullptr, false);
      }
      const i64 r1 = std::min(p.Rout, half + 1), nbo = p.NBo;
      const T* scb = p.sc + bo;
      const T* shb = p.sh + bo;
      if (nbo == 1) {  // one base: contiguous output channels, vector loops
        for (i64 q = 0; q < npx; ++q)
          combine_even_odd<T, VB>(Eb + q * ldE, Ob + q * ldE, p.C, r1, p.Rout, scb, shb, p.relu, orow + q * ldo);
        continue;
      }
      for (i64 q = 0; q < npx; ++q) {
        const T* e = Eb + q * ldE;
        const T* o = Ob + q * ldE;
        T* y = orow + q * ldo + bo;
        for (i64 r = 0; r < r1; ++r) {
          const T z = (e[r] + o[r]) * scb[r * nbo] + shb[r * nbo];
          y[r * nbo] = p.relu && z < T(0) ? T(0) : z;  // NaN stays NaN
        }
        for (i64 r = r1; r < p.Rout; ++r) {
          const T z = (e[p.C - r] - o[p.C - r]) * scb[r * nbo] + shb[r * nbo];
          y[r * nbo] = p.relu && z < T(0) ? T(0) : z;  // NaN stays NaN
        }
      }
    }
    if (!direct) store_block<T, VB>(p, orow, ldo, npx, n, (o0 * O1 + qb) * O2 + c2b);
  }
}

template <typename T, int VB>
MEDCONV_INLINE void conv_rows(const Plan<T>& p, i64 begin, i64 end) {
  Ring<T> ring;
  ring.span = (p.k[0] - 1) * p.d[0] + 1;
  ring.slab = p.L[1] * p.L[2] * p.SP();
  ring.data.assign(ring.span * ring.slab, T(0));
  ring.tag.assign(ring.span, -1);
  std::vector<TapRef> taps;
  std::vector<T> Y, E, Z;
  const i64 rows = p.N * p.O[0];
  for (i64 it = begin; it < end; ++it) {
    const i64 part = it / rows, row = it % rows;
    const i64 q1lo = part * p.O[1] / p.parts, q1hi = (part + 1) * p.O[1] / p.parts;
    if (q1lo < q1hi) conv_row<T, VB>(p, ring, row / p.O[0], row % p.O[0], q1lo, q1hi, part, taps, Y, E, Z);
  }
}

template <typename T>
void conv_rows_default(const Plan<T>& p, i64 begin, i64 end) {
  conv_rows<T, 16>(p, begin, end);
}

#ifdef MEDCONV_X86_DISPATCH
template <typename T>
MEDCONV_TARGET_AVX2 void conv_rows_avx2(const Plan<T>& p, i64 begin, i64 end) {
  conv_rows<T, 32>(p, begin, end);
}
template <typename T>
MEDCONV_TARGET_AVX512 void conv_rows_avx512(const Plan<T>& p, i64 begin, i64 end) {
  conv_rows<T, 64>(p, begin, end);
}
#endif

// Threads: work items are output rows (2D: rows, 3D: depth slices, over the batch), one contiguous
// chunk per thread, so every transformed input row is reused by the k0 output rows that read it and
// a thread transforms only (k0 - 1) * d0 rows more than its share. With fewer than 2 items per thread
// (3D with many cores: 16-24 slices for 16-64 threads) every slice is also cut into `parts` ranges of
// its rows (dim 1, at least 4 output rows each), ordered part-major so that a thread's chunk still
// runs consecutive slices of one range; a range transforms its (k1 - 1) * d1 halo rows again. Each
// output element is computed by the same sums whatever the partition: bit-identical results.
template <typename T>
void run_conv(const Plan<T>& pin) {
  const i64 rows = pin.N * pin.O[0];
  if (rows == 0) return;
  Plan<T> p = pin;
  const i64 nt = at::get_num_threads();
  p.parts = 1;
  if (rows < 2 * nt) p.parts = std::max<i64>(1, std::min(ceil_div(2 * nt, rows), p.O[1] / 4));
  at::parallel_for(0, rows * p.parts, 1, [&](i64 begin, i64 end) {
#ifdef MEDCONV_X86_DISPATCH
    if (p.isa == kIsaAvx512) {
      conv_rows_avx512<T>(p, begin, end);
      return;
    }
    if (p.isa == kIsaAvx2) {
      conv_rows_avx2<T>(p, begin, end);
      return;
    }
#endif
    conv_rows_default<T>(p, begin, end);
  });
}

// ------------------------------------------------------------------------------------------
// weight gradient: dW_b[f, t] = sum_{n, p} conj(DY_b[f](p)) X[f](p*s + t*d - pad)   (conv)
// ------------------------------------------------------------------------------------------
// "small" operand: indexed by p on the output grid (conv: grad_out, transposed: x), transformed
// one row at a time; "big" operand: indexed by p*s + t*d - pad through the ring (conv: x,
// transposed: grad_out). Sums S1 = sr*br, S2 = si*bi, S3 = sr*bi, S4 = si*br per frequency lane.
template <typename T>
struct GwPlan {
  Plan<T> big;  // ring geometry; big.O is the small operand's grid
  const T* ssrc = nullptr;
  i64 sN = 0, sC = 0;
  A3 sS{0, 0, 0};
  i64 Cs = 0, NBs = 1, nb = 1;
  Plan<T> sfft;  // the small operand's transform: its driver's tables (the FFT if fft_in, else Dm (Cs, NBs*2Hp))
  bool conv = true;
};

template <typename T, int VB, int TT>
MEDCONV_INLINE void gw_group(const GwPlan<T>& g, const T* srow, const T* slab, i64 t1, i64 t2, i64 tbase,
                             double* accd) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int NL = VB / sizeof(T);
  const Plan<T>& p = g.big;
  const i64 Hp = p.Hp, SPs = g.NBs * 2 * Hp, SPb = p.SP(), L2 = p.L[2];
  const i64 P1 = p.O[1], P2 = p.O[2], taps = p.taps;
  const i64 bstep = p.ks[2] * SPb, ustep = p.d[2] * SPb;
  for (i64 b = 0; b < g.nb; ++b) {
    const i64 bs = g.conv ? b : 0, bb = g.conv ? 0 : b;
    for (i64 jv = 0; jv < Hp; jv += NL) {
      V acc[TT][4];
#pragma GCC unroll 16
      for (int u = 0; u < TT; ++u)
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) acc[u][c] = V{};
      for (i64 q1 = 0; q1 < P1; ++q1) {
        const T* sp = srow + q1 * P2 * SPs + bs * 2 * Hp + jv;
        const T* xp = slab + ((q1 * p.ks[1] + t1 * p.d[1]) * L2 + t2 * p.d[2]) * SPb + bb * 2 * Hp + jv;
        for (i64 q2 = 0; q2 < P2; ++q2) {
          V sr, si;
          std::memcpy(&sr, sp + q2 * SPs, sizeof(V));
          std::memcpy(&si, sp + q2 * SPs + Hp, sizeof(V));
          const T* xq = xp + q2 * bstep;
#pragma GCC unroll 16
          for (int u = 0; u < TT; ++u) {
            V br, bi;
            std::memcpy(&br, xq + u * ustep, sizeof(V));
            std::memcpy(&bi, xq + u * ustep + Hp, sizeof(V));
            acc[u][0] += sr * br;
            acc[u][1] += si * bi;
            acc[u][2] += sr * bi;
            acc[u][3] += si * br;
          }
        }
      }
      for (int u = 0; u < TT; ++u)
        for (int c = 0; c < 4; ++c) {
          double* a = accd + ((b * taps + tbase + u) * 4 + c) * Hp + jv;
          for (int l = 0; l < NL; ++l) a[l] += (double)acc[u][c][l];
        }
    }
  }
}

template <typename T, int VB>
MEDCONV_INLINE void gw_row(const GwPlan<T>& g, Ring<T>& ring, i64 n, i64 p0, std::vector<T>& srow, double* accd) {
  const Plan<T>& p = g.big;
  const i64 SPs = g.NBs * 2 * p.Hp, P1 = p.O[1], P2 = p.O[2];
  const i64 need = P1 * P2 * SPs;
  if ((i64)srow.size() < need) srow.resize(need);
  for (i64 q1 = 0; q1 < P1; ++q1) {
    const T* a = g.ssrc + n * g.sN + p0 * g.sS[0] + q1 * g.sS[1];
    if (g.sfft.fft_in)
      fft_row_in<T, VB>(g.sfft, ring, a, g.sS[2], g.sC, P2, srow.data() + q1 * P2 * SPs, SPs);
    else
      gemm<T, VB, false>(P2, g.Cs, a, g.sS[2], g.sC, g.sfft.Dm, SPs, SPs, srow.data() + q1 * P2 * SPs, SPs, SPs, nullptr,
                         nullptr, false);
  }
  for (i64 t0 = 0; t0 < p.k[0]; ++t0) {
    const i64 j0 = p0 * p.ks[0] + t0 * p.d[0];
    const i64 m0 = src_index(j0, p.off[0], p.su[0], p.S[0]);
    if (m0 < 0) continue;
    const T* slab = get_slab<T, VB>(p, ring, n, j0, m0);
    for (i64 t1 = 0; t1 < p.k[1]; ++t1) {
      // output pixels whose tap (t1, t2) falls into padding read the zero border of the slab
      i64 t2 = 0;
      const i64 tb = (t0 * p.k[1] + t1) * p.k[2];
      for (; t2 + 3 <= p.k[2]; t2 += 3) gw_group<T, VB, 3>(g, srow.data(), slab, t1, t2, tb + t2, accd);
      switch (p.k[2] - t2) {
        case 2: gw_group<T, VB, 2>(g, srow.data(), slab, t1, t2, tb + t2, accd); break;
        case 1: gw_group<T, VB, 1>(g, srow.data(), slab, t1, t2, tb + t2, accd); break;
        default: break;
      }
    }
  }
}

// Rows [row_begin, row_end) of one block, accumulated into accd.
template <typename T, int VB>
MEDCONV_INLINE void gw_block(const GwPlan<T>& g, i64 row_begin, i64 row_end, double* accd) {
  const Plan<T>& p = g.big;
  Ring<T> ring;
  ring.span = (p.k[0] - 1) * p.d[0] + 1;
  ring.slab = p.L[1] * p.L[2] * p.SP();
  ring.data.assign(ring.span * ring.slab, T(0));
  ring.tag.assign(ring.span, -1);
  std::vector<T> srow;
  for (i64 row = row_begin; row < row_end; ++row) gw_row<T, VB>(g, ring, row / p.O[0], row % p.O[0], srow, accd);
}

template <typename T>
void gw_block_default(const GwPlan<T>& g, i64 rb, i64 re, double* accd) {
  gw_block<T, 16>(g, rb, re, accd);
}

#ifdef MEDCONV_X86_DISPATCH
template <typename T>
MEDCONV_TARGET_AVX2 void gw_block_avx2(const GwPlan<T>& g, i64 rb, i64 re, double* accd) {
  gw_block<T, 32>(g, rb, re, accd);
}
template <typename T>
MEDCONV_TARGET_AVX512 void gw_block_avx512(const GwPlan<T>& g, i64 rb, i64 re, double* accd) {
  gw_block<T, 64>(g, rb, re, accd);
}
#endif

// ------------------------------------------------------------------------------------------
// geometry and tables
// ------------------------------------------------------------------------------------------
using cpu_geom::check_convt_out;
using cpu_geom::check_float_cpu;
using cpu_geom::conv_out;
using cpu_geom::convt_out_base;
using cpu_geom::Geom;
using cpu_geom::shape_str;

// Internal 3-dim position of spatial dim i of a `dims`-dim tensor: 3D (D, H, W) -> 0, 1, 2;
// 2D (H, W) -> 0, 2 (the middle dim has size 1), so that the outer dim (rows of the ring) is H.
int pos3(int dims, int i) { return dims == 3 ? i : (i == 0 ? 0 : 2); }

A3 expand3(at::IntArrayRef v, int dims, i64 fill, const char* name, const char* op) {
  return cpu_geom::expand3(v, dims, fill, name, op, pos3);
}

A3 spatial3(at::IntArrayRef sizes, int dims) { return cpu_geom::spatial3(sizes, dims, pos3); }

std::vector<i64> full_sizes(i64 N, i64 C, const A3& S, int dims) {
  std::vector<i64> r{N, C};
  for (int i = 0; i < dims; ++i) r.push_back(S[pos3(dims, i)]);
  return r;
}

void check_pair(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb_, const char* op) {
  check_float_cpu(a, na, op, /*allow_bf16=*/true);
  check_float_cpu(b, nb_, op, /*allow_bf16=*/true);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", na, " has dtype ", a.scalar_type(), " but ", nb_,
              " has dtype ", b.scalar_type());
}

Geom make_geom(const char* op, int rank, at::IntArrayRef wsz, bool transposed, i64 C, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation, i64 n_rolls) {
  TORCH_CHECK(rank == 4 || rank == 5, op, ": expected 4 or 5 dims (N, C, *spatial), got ", rank);
  return cpu_geom::make_geom(op, rank, wsz, transposed, C, stride, padding, dilation, n_rolls, pos3);
}

void check_vec(const std::optional<at::Tensor>& v, const at::Tensor& x, i64 Cq, const char* name, const char* op) {
  if (!v.has_value()) return;
  check_float_cpu(*v, name, op, /*allow_bf16=*/true);
  TORCH_CHECK(v->scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", v->scalar_type(), " but x has ",
              x.scalar_type());
  TORCH_CHECK(v->dim() == 1 && v->size(0) == Cq, op, ": ", name, " must have shape [n_rolls * n_base] = [", Cq,
              "], got ", shape_str(v->sizes()));
}

// How the channel transforms run: "auto" and "fft" (the FFT wherever channel_fft::supported(C), else the
// folded GEMMs; measured at least as fast on every benchmarked layer but the smallest, where the two are
// within noise: docs/rolling_conv_spectral.md) or "gemm" (always the folded GEMMs). One
// process-wide value: the environment variable MEDCONV_CHANNEL_TRANSFORM at the first call, or
// torch.ops.medconv.set_channel_transform (tests run both paths; benchmarks compare them).
enum ChannelTransform : int { kTransformAuto = 0, kTransformGemm = 1, kTransformFft = 2 };
const char* transform_name(int v) { return v == kTransformGemm ? "gemm" : v == kTransformFft ? "fft" : "auto"; }
int transform_parse(const std::string& s) {
  return s == "auto" ? kTransformAuto : s == "gemm" ? kTransformGemm : s == "fft" ? kTransformFft : -1;
}
std::atomic<int>& transform_state() {
  static std::atomic<int> v{[] {
    const char* e = std::getenv("MEDCONV_CHANNEL_TRANSFORM");
    const int t = e ? transform_parse(e) : kTransformAuto;
    return t < 0 ? (int)kTransformAuto : t;
  }()};
  return v;
}

bool use_fft(i64 C) {
  return transform_state().load(std::memory_order_relaxed) != kTransformGemm && channel_fft::supported(C);
}

// MEDCONV_SPECTRAL_NO_FOLD=1 computes the channel transforms as plain GEMMs (a check and a baseline).
bool fold_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("MEDCONV_SPECTRAL_NO_FOLD");
    return !(e && e[0] == '1');
  }();
  return on;
}

at::MemoryFormat cl_format(int dims) { return dims == 3 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast; }

// Base weight of spectral base b, channel c, tap t (layout (nb, C, *k) or, transposed, (C, nb, *k)).
template <typename T>
struct BaseW {
  const T* w;
  i64 C, nb, taps;
  bool tr;
  double at(i64 b, i64 c, i64 t) const { return (double)w[(tr ? c * nb + b : b * C + c) * taps + t]; }
};

void gemm_f64(int isa, i64 M, i64 K, const double* A, const double* B, i64 Np, double* C, i64 nvalid);

// Packed spectral weights (nb, taps, 4, Hp): forward mode uses conj(W), adjoint mode W. The DFT of every
// (base, tap) row is one GEMM in double on the ISA copy's tiles (a scalar loop was ~0.3 ms per call at C = 256,
// 27 taps: most of a small layer's call).
template <typename T>
std::vector<T> make_wpk(const BaseW<T>& bw, const Spec& sp, const std::vector<double>& D, bool adjoint, bool flip,
                        int isa) {
  const i64 C = sp.C, Hp = sp.Hp, nt = bw.taps, nb = bw.nb;
  std::vector<double> A((size_t)(nb * nt * C)), spec((size_t)(nb * nt * 2 * Hp));
  for (i64 b = 0; b < nb; ++b)
    for (i64 t = 0; t < nt; ++t) {
      const i64 ts = flip ? nt - 1 - t : t;
      for (i64 c = 0; c < C; ++c) A[(b * nt + t) * C + c] = bw.at(b, c, ts);
    }
  gemm_f64(isa, nb * nt, C, A.data(), D.data(), 2 * Hp, spec.data(), 2 * Hp);
  std::vector<T> out((size_t)(nb * nt * 4 * Hp), T(0));
  for (i64 bt = 0; bt < nb * nt; ++bt) {
    const double* sr = spec.data() + bt * 2 * Hp;
    T* o = out.data() + bt * 4 * Hp;
    for (i64 f = 0; f < sp.H; ++f) {
      const double re = sr[f], im = sr[Hp + f];
      if (f == 0) {
        o[0] = (T)re;               // A: DC
        o[2 * Hp] = (T)im;          // Cc: Nyquist (0 for odd C)
        continue;
      }
      o[f] = (T)re;                           // A
      o[Hp + f] = (T)(adjoint ? -im : im);    // B
      o[2 * Hp + f] = (T)re;                  // Cc
      o[3 * Hp + f] = (T)(adjoint ? im : -im);  // D
    }
  }
  return out;
}

// Forward DFT matrix of the source channels: forward mode (C, 2Hp); adjoint mode the n_rolls*nb
// channels q = r*nb + b of the gradient to nb spectra: (n_rolls*nb, nb*2Hp).
template <typename T>
std::vector<T> make_dm(const Spec& sp, bool adjoint, i64 nb, i64 n_rolls) {
  const i64 Hp2 = 2 * sp.Hp;
  if (!adjoint) {
    std::vector<T> D((size_t)(sp.C * Hp2));
    for (i64 c = 0; c < sp.C; ++c)
      for (i64 j = 0; j < Hp2; ++j) D[c * Hp2 + j] = (T)dft_entry(sp, c, j);
    return D;
  }
  std::vector<T> D((size_t)(n_rolls * nb * nb * Hp2), T(0));
  for (i64 r = 0; r < n_rolls; ++r)
    for (i64 b = 0; b < nb; ++b)
      for (i64 j = 0; j < Hp2; ++j) D[(r * nb + b) * nb * Hp2 + b * Hp2 + j] = (T)dft_entry(sp, r, j);
  return D;
}

// Inverse matrix: forward mode (nb*2Hp, Np) to channels r*nb + b (r < n_rolls); adjoint (2Hp, Np) to C.
template <typename T>
std::vector<T> make_gm(const Spec& sp, bool adjoint, i64 nb, i64 n_rolls, i64 Np) {
  const i64 Hp2 = 2 * sp.Hp;
  const i64 NBo = adjoint ? 1 : nb;
  std::vector<T> G((size_t)(NBo * Hp2 * Np), T(0));
  if (adjoint) {
    for (i64 j = 0; j < Hp2; ++j)
      for (i64 c = 0; c < sp.C; ++c) G[j * Np + c] = (T)idft_entry(sp, j, c);
  } else {
    for (i64 b = 0; b < nb; ++b)
      for (i64 j = 0; j < Hp2; ++j)
        for (i64 r = 0; r < n_rolls; ++r) G[(b * Hp2 + j) * Np + r * nb + b] = (T)idft_entry(sp, j, r);
  }
  return G;
}

// Folded forward DFT tables (see fold_pixels); Rn input channels per base (rolls beyond are zero).
template <typename T>
void set_fold_in(Plan<T>& p, const Spec& sp, i64 Rn, std::vector<T>& Bu, std::vector<T>& Bv) {
  const i64 C = sp.C, Hp = sp.Hp, H = sp.H;
  p.fold_in = true;
  p.C = C;
  p.Rn = Rn;
  p.h = (C - 1) / 2;  // pure complex bins 1..h
  const bool even = C % 2 == 0;
  p.Ku = 1 + p.h + (even ? 1 : 0);
  p.Kv = p.h + 1;
  Bu.assign((size_t)(p.Ku * Hp), T(0));
  Bv.assign((size_t)(p.Kv * Hp), T(0));
  for (i64 f = 0; f < H; ++f) {
    Bu[f] = T(1);
    for (i64 c = 1; c <= p.h; ++c) {
      Bu[c * Hp + f] = (T)dft_entry(sp, c, f);
      if (f > 0) Bv[(c - 1) * Hp + f] = (T)dft_entry(sp, c, Hp + f);
    }
    if (even) Bu[(p.h + 1) * Hp + f] = (T)((f % 2) ? -1.0 : 1.0);
  }
  Bv[p.h * Hp + 0] = T(1);
  p.Bu = Bu.data();
  p.Bv = Bv.data();
}

// Folded inverse tables, used when more than C/2 + 1 rolls are kept.
template <typename T>
void set_fold_out(Plan<T>& p, const Spec& sp, i64 Rout, std::vector<T>& Ge, std::vector<T>& Go) {
  const i64 Hp = sp.Hp, half = sp.C / 2, NL = isa_vbytes(p.isa) / (i64)sizeof(T), NL2 = 32 / (i64)sizeof(T);
  p.fold_out = true;
  p.C = sp.C;
  p.Rout = Rout;
  p.e_narrow = p.isa == kIsaAvx512 && round_up(half + 1, NL2) < round_up(half + 1, NL);
  p.NpE = round_up(half + 1, p.e_narrow ? NL2 : NL);
  Ge.assign((size_t)((Hp + 1) * p.NpE), T(0));
  Go.assign((size_t)((Hp - 1) * p.NpE), T(0));
  for (i64 r = 0; r <= half; ++r) {
    for (i64 j = 0; j <= Hp; ++j) Ge[j * p.NpE + r] = (T)idft_entry(sp, j, r);
    for (i64 j = 0; j < Hp - 1; ++j) Go[j * p.NpE + r] = (T)idft_entry(sp, Hp + 1 + j, r);
  }
  p.Ge = Ge.data();
  p.Go = Go.data();
}

// Source operand, with any strides (no copy), as 3 internal dims.
template <typename T>
void set_source(Plan<T>& p, const at::Tensor& src, int dims) {
  if (src.scalar_type() == at::kBFloat16)
    p.src16 = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
  else
    p.src = src.data_ptr<T>();
  p.N = src.size(0);
  p.Csrc = src.size(1);
  p.sN = src.stride(0);
  p.sC = src.stride(1);
  p.S = A3{1, 1, 1};
  p.sS = A3{0, 0, 0};
  for (int i = 0; i < dims; ++i) {
    p.S[pos3(dims, i)] = src.size(2 + i);
    p.sS[pos3(dims, i)] = src.stride(2 + i);
  }
}

// The second source of a two-source call (channels [C1, C1 + src2.size(1)) of the concatenation).
template <typename T>
void set_source2(Plan<T>& p, const at::Tensor& src2, int dims) {
  if (src2.scalar_type() == at::kBFloat16)
    p.src2_16 = reinterpret_cast<const uint16_t*>(src2.data_ptr<at::BFloat16>());
  else
    p.src2 = src2.data_ptr<T>();
  p.C1 = p.Csrc;
  p.Csrc += src2.size(1);
  p.sN2 = src2.stride(0);
  p.sC2 = src2.stride(1);
  for (int i = 0; i < dims; ++i) p.sS2[pos3(dims, i)] = src2.stride(2 + i);
}

// The weight-independent tables of a driver call (DFT matrices, folded tables, inverse), built once
// per (dtype, C_in, n_base, n_rolls, adjoint, ISA, fold) and kept: building them costs ~C^2 table
// entries, a fixed per-call cost that small layers felt. plan holds the table fields of a Plan
// (pointers into this object, which is never moved).
template <typename T>
struct TableSet {
  Spec sp;
  std::vector<double> D;  // (C, 2Hp) forward DFT in double, for the spectral weights
  std::vector<T> Dm, Gm, Bu, Bv, Ge, Go;
  channel_fft::Tables<T> fft;
  Plan<T> plan;
};

template <typename T>
std::shared_ptr<const TableSet<T>> get_tables(i64 C, i64 nb, i64 n_rolls, bool adjoint, int isa) {
  using Key = std::tuple<i64, i64, i64, bool, int, bool, bool>;
  static std::mutex mu;
  static std::map<Key, std::shared_ptr<const TableSet<T>>> cache;
  const bool fold = fold_enabled();
  const bool fft = fold && use_fft(C);
  const Key key{C, nb, n_rolls, adjoint, isa, fold, fft};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto ts = std::make_shared<TableSet<T>>();
  ts->sp = make_spec(C, sizeof(T), isa_vbytes(isa));
  const Spec& sp = ts->sp;
  const i64 Hp2 = 2 * sp.Hp;
  ts->D.resize((size_t)(C * Hp2));
  for (i64 c = 0; c < C; ++c)
    for (i64 j = 0; j < Hp2; ++j) ts->D[c * Hp2 + j] = dft_entry(sp, c, j);
  Plan<T>& p = ts->plan;
  p.isa = isa;
  p.Hp = sp.Hp;
  p.Cout = adjoint ? C : n_rolls * nb;
  p.Np = round_up(p.Cout, isa_vbytes(isa) / (i64)sizeof(T));
  const i64 rn = adjoint ? n_rolls : C, rout = adjoint ? C : n_rolls;
  if (fft) {  // the FFT does both transforms: no DFT matrices
    ts->fft = channel_fft::make_tables<T>(C);
    p.fft = &ts->fft;
    p.fft_in = p.fft_out = true;
    p.C = C;
    p.Rn = rn;
    p.Rout = rout;
  } else {
    ts->Dm = make_dm<T>(sp, adjoint, nb, n_rolls);
    ts->Gm = make_gm<T>(sp, adjoint, nb, n_rolls, p.Np);
    p.Dm = ts->Dm.data();
    p.Gm = ts->Gm.data();
    if (fold) {
      set_fold_in<T>(p, sp, rn, ts->Bu, ts->Bv);
      if (rout > C / 2 + 1) set_fold_out<T>(p, sp, rout, ts->Ge, ts->Go);
    }
  }
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() >= 64) cache.clear();  // bounded: layers of a model share a few entries
  cache.emplace(key, ts);
  return ts;
}

// Large outputs are fresh memory on every call (glibc maps blocks above 32 MB anew): their first
// touch costs a page fault per 4 KB page, ~27 ms for a 67 MB output (2D C=64 at 512^2), about a
// third of the whole call. Asking for transparent huge pages on the 2 MB-aligned interior (a hint:
// honoured where THP is enabled, "madvise" or "always") cut that to ~8 ms.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t n = t.numel() * t.element_size();
  if (n < 8 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + n) & ~(kHuge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// Memory format of an op's output: the source's (channels-last in, channels-last out; anything else
// gives NC(D)HW), as torch's convolutions do (suggest_memory_format).
at::MemoryFormat out_format(const at::Tensor& src, int dims) {
  const auto f = src.suggest_memory_format();
  return (f == at::MemoryFormat::ChannelsLast || f == at::MemoryFormat::ChannelsLast3d) ? cl_format(dims)
                                                                                          : at::MemoryFormat::Contiguous;
}

// The computing type of a tensor's dtype: bfloat16 is read and written as such, computed in float.
#define MEDCONV_DISPATCH_SPECTRAL(st, name, ...)                                  \
  [&] {                                                                          \
    if ((st) == at::kDouble) {                                                   \
      using T = double;                                                          \
      __VA_ARGS__();                                                             \
    } else {                                                                     \
      using T = float;                                                           \
      __VA_ARGS__();                                                             \
    }                                                                            \
  }()

// Inverse real DFT table of the weight gradient, G[j][m] = idft_entry(j, m) in double, (2Hp, Cp) with the
// columns m >= C zero; built once per (C, Hp).
std::shared_ptr<const std::vector<double>> gw_inverse_table(const Spec& sp, i64 Cp) {
  using Key = std::tuple<i64, i64, i64>;
  static std::mutex mu;
  static std::map<Key, std::shared_ptr<const std::vector<double>>> cache;
  const Key key{sp.C, sp.Hp, Cp};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto G = std::make_shared<std::vector<double>>((size_t)(2 * sp.Hp * Cp), 0.0);
  for (i64 j = 0; j < 2 * sp.Hp; ++j)
    for (i64 m = 0; m < sp.C; ++m) (*G)[j * Cp + m] = idft_entry(sp, j, m);
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() >= 64) cache.clear();
  cache.emplace(key, G);
  return G;
}

// C (M x Np, the first nvalid columns stored) = A (M x K, row-major) B (K x Np) in double, on the ISA copy's
// register tiles (Np a multiple of 8).
void gemm_f64(int isa, i64 M, i64 K, const double* A, const double* B, i64 Np, double* C, i64 nvalid) {
#ifdef MEDCONV_X86_DISPATCH
  if (isa == kIsaAvx512) {
    gemm<double, 64, false>(M, K, A, K, 1, B, Np, Np, C, Np, nvalid, nullptr, nullptr, false);
    return;
  }
  if (isa == kIsaAvx2) {
    gemm<double, 32, false>(M, K, A, K, 1, B, Np, Np, C, Np, nvalid, nullptr, nullptr, false);
    return;
  }
#endif
  gemm<double, 16, false>(M, K, A, K, 1, B, Np, Np, C, Np, nvalid, nullptr, nullptr, false);
}

// The driver. transposed_spatial: zero insertion by s, flipped taps; adjoint: channel adjoint.
// src: (N, Csrc, *S); returns (N, Cout, *O) in src's memory format (out_format) and dtype.
at::Tensor spectral_driver(const at::Tensor& src, const at::Tensor& weight, const Geom& g, bool weight_transposed,
                           bool transposed_spatial, bool adjoint, const A3& O,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift, bool relu, const at::Tensor* src2 = nullptr) {
  const i64 N = src.size(0);
  const i64 Cout = adjoint ? g.C : g.n_rolls * g.nb;
  const at::MemoryFormat fmt = out_format(src, g.dims);
  at::Tensor out = at::empty(full_sizes(N, Cout, O, g.dims), src.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  const bool bf16 = src.scalar_type() == at::kBFloat16;
  const int isa = call_isa(g.C, src.scalar_type() == at::kDouble ? 8 : 4);
  MEDCONV_DISPATCH_SPECTRAL(src.scalar_type(), "rolling_conv_spectral_cpu", [&] {
    const at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
    const auto tables = get_tables<T>(g.C, g.nb, g.n_rolls, adjoint, isa);
    const Spec& sp = tables->sp;
    Plan<T> p = tables->plan;
    set_source<T>(p, src, g.dims);
    if (src2) set_source2<T>(p, *src2, g.dims);
    for (int i = 0; i < 3; ++i) {
      if (!transposed_spatial) {
        p.L[i] = (O[i] - 1) * g.s[i] + g.d[i] * (g.k[i] - 1) + 1;
        p.off[i] = -g.p[i];
        p.su[i] = 1;
        p.ks[i] = g.s[i];
      } else {
        p.L[i] = O[i] + g.d[i] * (g.k[i] - 1);
        p.off[i] = g.p[i] - g.d[i] * (g.k[i] - 1);
        p.su[i] = g.s[i];
        p.ks[i] = 1;
      }
    }
    p.k = g.k;
    p.d = g.d;
    p.O = O;
    p.adjoint = adjoint;
    p.NBi = adjoint ? g.nb : 1;
    p.NBo = adjoint ? 1 : g.nb;
    p.nbw = g.nb;
    p.taps = g.taps();
    auto wc = weight.to(ct).contiguous();
    BaseW<T> bw{wc.data_ptr<T>(), g.C, g.nb, g.taps(), weight_transposed};
    std::vector<T> Wpk = make_wpk<T>(bw, sp, tables->D, adjoint, transposed_spatial, isa);
    TORCH_INTERNAL_ASSERT(p.Cout == Cout);
    std::vector<T> sc((size_t)p.Np, T(1)), sh((size_t)p.Np, T(0));
    at::Tensor bc, scc, shc;
    if (bias.has_value()) bc = bias->to(ct).contiguous();
    if (scale.has_value()) scc = scale->to(ct).contiguous();
    if (shift.has_value()) shc = shift->to(ct).contiguous();
    for (i64 o = 0; o < Cout; ++o) {
      const T s = scale.has_value() ? scc.data_ptr<T>()[o] : T(1);
      const T b = bias.has_value() ? bc.data_ptr<T>()[o] : T(0);
      const T h = shift.has_value() ? shc.data_ptr<T>()[o] : T(0);
      sc[o] = s;
      sh[o] = scale.has_value() ? b * s + h : b + h;
    }
    p.Wpk = Wpk.data();
    p.sc = sc.data();
    p.sh = sh.data();
    p.relu = relu;
    p.out_cl = fmt != at::MemoryFormat::Contiguous;
    p.out_bf16 = bf16;
    p.out_any = out.data_ptr();
    p.out = (!bf16 && p.out_cl) ? static_cast<T*>(p.out_any) : nullptr;
    run_conv<T>(p);
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// the ops: forward and grad_input
// ------------------------------------------------------------------------------------------
at::Tensor rolling_conv_spectral_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                                     bool relu, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_spectral";
  check_pair(x, "x", weight, "weight", op);
  Geom g = make_geom(op, (int)x.dim(), weight.sizes(), false, x.size(1), stride, padding, dilation, n_rolls);
  const i64 Cq = g.n_rolls * g.nb;
  check_vec(bias, x, Cq, "bias", op);
  check_vec(scale, x, Cq, "scale", op);
  check_vec(shift, x, Cq, "shift", op);
  const A3 O = conv_out(g, spatial3(x.sizes(), g.dims), op);
  return spectral_driver(x, weight, g, false, false, false, O, bias, scale, shift, relu);
}

// The two tensors of a channel concatenation: same dtype as ref (the weight or grad_out), same batch and
// spatial sizes.
void check_cat_pair(const at::Tensor& x, const at::Tensor& x2, const at::Tensor& ref, const char* nref,
                    const char* op) {
  check_pair(x, "x", ref, nref, op);
  check_pair(x2, "x2", ref, nref, op);
  TORCH_CHECK(x.dim() == x2.dim() && x.size(0) == x2.size(0) && x.sizes().slice(2) == x2.sizes().slice(2), op,
              ": x and x2 must have the same batch and spatial sizes (they are concatenated along the channels), got ",
              x.sizes(), " and ", x2.sizes());
}

// rolling_conv_spectral of the channel concatenation cat([x, x2], 1), both read in place (no copy of the
// concatenation): the output has x's memory format.
at::Tensor rolling_conv_spectral_cat_cpu(const at::Tensor& x, const at::Tensor& x2, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                         const std::optional<at::Tensor>& shift, bool relu, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_spectral_cat";
  check_cat_pair(x, x2, weight, "weight", op);
  Geom g = make_geom(op, (int)x.dim(), weight.sizes(), false, x.size(1) + x2.size(1), stride, padding, dilation,
                     n_rolls);
  const i64 Cq = g.n_rolls * g.nb;
  check_vec(bias, x, Cq, "bias", op);
  check_vec(scale, x, Cq, "scale", op);
  check_vec(shift, x, Cq, "shift", op);
  const A3 O = conv_out(g, spatial3(x.sizes(), g.dims), op);
  return spectral_driver(x, weight, g, false, false, false, O, bias, scale, shift, relu, &x2);
}

at::Tensor rolling_conv_transpose_spectral_cpu(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& scale,
                                               const std::optional<at::Tensor>& shift, bool relu,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef output_padding, at::IntArrayRef dilation,
                                               int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_transpose_spectral";
  check_pair(x, "x", weight, "weight", op);
  Geom g = make_geom(op, (int)x.dim(), weight.sizes(), true, x.size(1), stride, padding, dilation, n_rolls);
  const i64 Cq = g.n_rolls * g.nb;
  check_vec(bias, x, Cq, "bias", op);
  check_vec(scale, x, Cq, "scale", op);
  check_vec(shift, x, Cq, "shift", op);
  const A3 opad = expand3(output_padding, g.dims, 0, "output_padding", op);
  A3 O = convt_out_base(g, spatial3(x.sizes(), g.dims));
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(opad[i] >= 0 && opad[i] < std::max(g.s[i], g.d[i]), op,
                ": output_padding must satisfy 0 <= output_padding < max(stride, dilation), got ", output_padding);
    O[i] += opad[i];
    TORCH_CHECK(O[i] >= 1, op, ": the output would be empty (spatial size ", O[i], "); reduce padding");
  }
  return spectral_driver(x, weight, g, true, true, false, O, bias, scale, shift, relu);
}

at::Tensor rolling_conv_spectral_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& weight,
                                                at::IntArrayRef input_size, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_spectral_grad_input";
  check_pair(grad_out, "grad_out", weight, "weight", op);
  TORCH_CHECK(input_size.size() == (size_t)grad_out.dim(), op, ": input_size ", input_size, " must have ",
              grad_out.dim(), " values like grad_out");
  Geom g = make_geom(op, (int)grad_out.dim(), weight.sizes(), false, input_size[1], stride, padding, dilation, n_rolls);
  TORCH_CHECK(input_size[0] == grad_out.size(0), op, ": grad_out has batch ", grad_out.size(0), " but input_size is ",
              input_size);
  const A3 S = spatial3(input_size, g.dims);
  const A3 O = conv_out(g, S, op);
  const auto want = full_sizes(input_size[0], g.n_rolls * g.nb, O, g.dims);
  TORCH_CHECK(grad_out.sizes().vec() == want, op, ": grad_out has shape ", shape_str(grad_out.sizes()),
              " but the sizes given imply ", shape_str(want));
  // dx = the transposed spatial conv of the channel adjoint; the input rows that the forward conv
  // never read (stride leftovers) get zero gradient by the zero-insertion geometry.
  return spectral_driver(grad_out, weight, g, false, true, true, S, std::nullopt, std::nullopt, std::nullopt, false);
}

at::Tensor rolling_conv_transpose_spectral_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& weight,
                                                          at::IntArrayRef input_size, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                                          int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_transpose_spectral_grad_input";
  check_pair(grad_out, "grad_out", weight, "weight", op);
  TORCH_CHECK(input_size.size() == (size_t)grad_out.dim(), op, ": input_size ", input_size, " must have ",
              grad_out.dim(), " values like grad_out");
  Geom g = make_geom(op, (int)grad_out.dim(), weight.sizes(), true, input_size[1], stride, padding, dilation, n_rolls);
  TORCH_CHECK(input_size[0] == grad_out.size(0) && grad_out.size(1) == g.n_rolls * g.nb, op, ": grad_out has shape ",
              shape_str(grad_out.sizes()), ", expected batch ", input_size[0], " and n_rolls * n_base = ",
              g.n_rolls * g.nb, " channels");
  const A3 S = spatial3(input_size, g.dims);
  check_convt_out(g, S, spatial3(grad_out.sizes(), g.dims), op);
  // The direct conv over grad_out reads exactly the S positions (output_padding rows are read by no
  // input position beyond S: conv_out of the padded size may exceed S, so the output size is S).
  return spectral_driver(grad_out, weight, g, true, false, true, S, std::nullopt, std::nullopt, std::nullopt, false);
}

// ------------------------------------------------------------------------------------------
// the ops: grad_weight
// ------------------------------------------------------------------------------------------
// small: (N, Cs, *P) indexed by p; big: (N, Cb, *B) indexed by p*s + t*d - pad.
// conv: small = grad_out (adjoint DFT, nb spectra), big = x; transposed: small = x, big = grad_out.
// big2: the second source of a two-source big operand (the conv's x read as cat([big, big2], 1)).
at::Tensor spectral_gw(const at::Tensor& small, const at::Tensor& big, const Geom& g, bool conv,
                       const at::Tensor* big2 = nullptr) {
  const i64 taps = g.taps();
  std::vector<i64> wshape = conv ? std::vector<i64>{g.nb, g.C} : std::vector<i64>{g.C, g.nb};
  for (int i = 0; i < g.dims; ++i) wshape.push_back(g.k[pos3(g.dims, i)]);
  at::Tensor out = at::zeros(wshape, small.options());
  const i64 N = small.size(0);
  if (N == 0 || small.numel() == 0) return out;
  // bfloat16: the operands in float (one conversion each; the sums run in float and double anyway)
  if (small.scalar_type() == at::kBFloat16) {
    const at::Tensor big2f = big2 ? big2->to(at::kFloat) : at::Tensor();
    return spectral_gw(small.to(at::kFloat), big.to(at::kFloat), g, conv, big2 ? &big2f : nullptr).to(at::kBFloat16);
  }
  const int isa = call_isa(g.C, small.element_size());
  AT_DISPATCH_FLOATING_TYPES(small.scalar_type(), "rolling_conv_spectral_grad_weight_cpu", [&] {
    using T = scalar_t;
    // the channel transforms of both operands: the cached tables of the forward / adjoint drivers (built per
    // call, their ~C^2 entries were a fixed cost that small volumes felt); the big operand's plan starts as
    // its driver's (transform tables and flags), the small one's transform is the other driver's
    const auto tb = get_tables<T>(g.C, g.nb, g.n_rolls, !conv, isa);
    const auto ts = get_tables<T>(g.C, g.nb, g.n_rolls, conv, isa);
    const Spec& sp = tb->sp;
    TORCH_INTERNAL_ASSERT(ts->sp.Hp == sp.Hp);
    GwPlan<T> q;
    q.big = tb->plan;
    Plan<T>& p = q.big;
    set_source<T>(p, big, g.dims);
    if (big2) set_source2<T>(p, *big2, g.dims);
    const A3 P = [&] {
      A3 r{1, 1, 1};
      for (int i = 0; i < g.dims; ++i) r[pos3(g.dims, i)] = small.size(2 + i);
      return r;
    }();
    for (int i = 0; i < 3; ++i) {
      p.L[i] = (P[i] - 1) * g.s[i] + g.d[i] * (g.k[i] - 1) + 1;
      p.off[i] = -g.p[i];
      p.su[i] = 1;
      p.ks[i] = g.s[i];
    }
    p.k = g.k;
    p.d = g.d;
    p.O = P;
    p.NBi = conv ? 1 : g.nb;
    p.taps = taps;
    q.sfft = ts->plan;
    q.sfft.NBi = conv ? g.nb : 1;
    q.ssrc = small.data_ptr<T>();
    q.sN = small.stride(0);
    q.sC = small.stride(1);
    for (int i = 0; i < g.dims; ++i) q.sS[pos3(g.dims, i)] = small.stride(2 + i);
    q.Cs = small.size(1);
    q.NBs = conv ? g.nb : 1;
    q.nb = g.nb;
    q.conv = conv;
    // fixed blocks of rows (independent of the thread count), summed in a fixed order
    const i64 rows = N * P[0];
    const i64 span = (g.k[0] - 1) * g.d[0] + 1;
    const i64 brows = std::max<i64>(ceil_div(rows, 64), std::min<i64>(rows, 2 * span));
    const i64 nblocks = ceil_div(rows, brows);
    const i64 per = g.nb * taps * 4 * sp.Hp;
    std::vector<double> acc((size_t)(nblocks * per), 0.0);
    at::parallel_for(0, nblocks, 1, [&](i64 begin, i64 end) {
      for (i64 blk = begin; blk < end; ++blk) {
        const i64 rb = blk * brows, re = std::min(rows, rb + brows);
        double* a = acc.data() + blk * per;
#ifdef MEDCONV_X86_DISPATCH
        if (p.isa == kIsaAvx512) {
          gw_block_avx512<T>(q, rb, re, a);
          continue;
        }
        if (p.isa == kIsaAvx2) {
          gw_block_avx2<T>(q, rb, re, a);
          continue;
        }
#endif
        gw_block_default<T>(q, rb, re, a);
      }
    });
    for (i64 blk = 1; blk < nblocks; ++blk)
      for (i64 i = 0; i < per; ++i) acc[i] += acc[blk * per + i];
    // packed spectra of dW_b[., t] (one row per (b, t)), then the inverse DFT to the base channels m: one GEMM
    // in double with a cached table (a scalar loop over the table's columns cost ~7x the forward op at C = 256
    // on 2x2^3 volumes)
    const i64 Hp = sp.Hp, Cp = round_up(g.C, 8);
    const auto G = gw_inverse_table(sp, Cp);
    const double sgn = conv ? 1.0 : -1.0;
    std::vector<double> S((size_t)(g.nb * taps * 2 * Hp), 0.0), Wd((size_t)(g.nb * taps * Cp));
    for (i64 bt = 0; bt < g.nb * taps; ++bt) {
      const double* a = acc.data() + bt * 4 * Hp;
      double* spec = S.data() + bt * 2 * Hp;
      for (i64 f = 0; f < sp.H; ++f) {
        const double s1 = a[f], s2 = a[Hp + f], s3 = a[2 * Hp + f], s4 = a[3 * Hp + f];
        if (f == 0) {
          spec[0] = s1;
          spec[Hp] = s2;  // Nyquist (zero lanes for odd C)
        } else {
          spec[f] = s1 + s2;
          spec[Hp + f] = sgn * (s3 - s4);
        }
      }
    }
    gemm_f64(isa, g.nb * taps, 2 * Hp, S.data(), G->data(), Cp, Wd.data(), g.C);
    T* o = out.data_ptr<T>();
    for (i64 b = 0; b < g.nb; ++b)
      for (i64 t = 0; t < taps; ++t)
        for (i64 m = 0; m < g.C; ++m)
          o[(conv ? b * g.C + m : m * g.nb + b) * taps + t] = (T)Wd[(b * taps + t) * Cp + m];
  });
  return out;
}

at::Tensor rolling_conv_spectral_grad_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                 at::IntArrayRef weight_size, at::IntArrayRef stride,
                                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_spectral_grad_weight";
  check_pair(grad_out, "grad_out", x, "x", op);
  TORCH_CHECK(grad_out.dim() == x.dim(), op, ": grad_out has ", grad_out.dim(), " dims but x has ", x.dim());
  Geom g = make_geom(op, (int)x.dim(), weight_size, false, x.size(1), stride, padding, dilation, n_rolls);
  const A3 O = conv_out(g, spatial3(x.sizes(), g.dims), op);
  const auto want = full_sizes(x.size(0), g.n_rolls * g.nb, O, g.dims);
  TORCH_CHECK(grad_out.sizes().vec() == want, op, ": grad_out has shape ", shape_str(grad_out.sizes()),
              " but the sizes given imply ", shape_str(want));
  return spectral_gw(grad_out, x, g, true);
}

// The weight gradient of rolling_conv_spectral_cat: x read as cat([x, x2], 1) in place.
at::Tensor rolling_conv_spectral_cat_grad_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& x2, at::IntArrayRef weight_size,
                                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                                     at::IntArrayRef dilation, int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_spectral_cat_grad_weight";
  check_cat_pair(x, x2, grad_out, "grad_out", op);
  TORCH_CHECK(grad_out.dim() == x.dim(), op, ": grad_out has ", grad_out.dim(), " dims but x has ", x.dim());
  Geom g = make_geom(op, (int)x.dim(), weight_size, false, x.size(1) + x2.size(1), stride, padding, dilation,
                     n_rolls);
  const A3 O = conv_out(g, spatial3(x.sizes(), g.dims), op);
  const auto want = full_sizes(x.size(0), g.n_rolls * g.nb, O, g.dims);
  TORCH_CHECK(grad_out.sizes().vec() == want, op, ": grad_out has shape ", shape_str(grad_out.sizes()),
              " but the sizes given imply ", shape_str(want));
  return spectral_gw(grad_out, x, g, true, &x2);
}

at::Tensor rolling_conv_transpose_spectral_grad_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                           at::IntArrayRef weight_size, at::IntArrayRef stride,
                                                           at::IntArrayRef padding, at::IntArrayRef dilation,
                                                           int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_transpose_spectral_grad_weight";
  check_pair(grad_out, "grad_out", x, "x", op);
  TORCH_CHECK(grad_out.dim() == x.dim(), op, ": grad_out has ", grad_out.dim(), " dims but x has ", x.dim());
  Geom g = make_geom(op, (int)x.dim(), weight_size, true, x.size(1), stride, padding, dilation, n_rolls);
  TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) == g.n_rolls * g.nb, op, ": grad_out has shape ",
              shape_str(grad_out.sizes()), ", expected batch ", x.size(0), " and n_rolls * n_base = ",
              g.n_rolls * g.nb, " channels");
  check_convt_out(g, spatial3(x.sizes(), g.dims), spatial3(grad_out.sizes(), g.dims), op);
  return spectral_gw(x, grad_out, g, false);
}

}  // namespace
}  // namespace medconv

namespace medconv {
namespace {
std::string cpu_isa_op() { return cpu_isa_forced() ? cpu_isa_name(cpu_isa()) : "auto"; }
std::string cpu_isa_max_op() { return cpu_isa_name(cpu_isa_max()); }
std::string cpu_isa_for_op(int64_t c_in, int64_t elem_bytes) {
  TORCH_CHECK(c_in >= 1 && (elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8),
              "medconv::cpu_isa_for: expected c_in >= 1 and elem_bytes 2, 4 or 8, got ", c_in, ", ", elem_bytes);
  return cpu_isa_name(call_isa(c_in, elem_bytes == 8 ? 8 : 4));
}
std::string channel_transform_op() { return transform_name(transform_state().load()); }
std::string channel_transform_for_op(int64_t c_in) {
  TORCH_CHECK(c_in >= 1, "medconv::channel_transform_for: expected c_in >= 1, got ", c_in);
  return use_fft(c_in) && fold_enabled() ? "fft" : "gemm";
}
std::string set_channel_transform_op(const std::string& name) {
  const int v = transform_parse(name);
  TORCH_CHECK(v >= 0, "medconv::set_channel_transform: expected one of 'auto', 'gemm', 'fft', got '", name, "'");
  transform_state().store(v);
  return channel_transform_op();
}
std::string set_cpu_isa_op(const std::string& name) {
  const int v = cpu_isa_parse(name.c_str());
  TORCH_CHECK(v >= 0, "medconv::set_cpu_isa: expected one of 'auto', 'avx512', 'avx2', 'generic' ('scalar'), got '",
              name, "'");
  cpu_isa_set(v);
  return cpu_isa_op();
}
}  // namespace
}  // namespace medconv

// The ISA copy of the CPU kernels' hot loops (cpu/cpu_dispatch.h): the selection ("auto" or the
// forced copy), the widest this CPU runs, and a setter (a forced copy is clipped to the widest;
// returns the selection now in effect).
TORCH_LIBRARY_FRAGMENT(medconv, m) {
  m.def("cpu_isa() -> str", &medconv::cpu_isa_op);
  m.def("cpu_isa_max() -> str", &medconv::cpu_isa_max_op);
  m.def("cpu_isa_for(int c_in, int elem_bytes) -> str", &medconv::cpu_isa_for_op);
  m.def("set_cpu_isa(str isa) -> str", &medconv::set_cpu_isa_op);
  m.def("channel_transform() -> str", &medconv::channel_transform_op);
  m.def("set_channel_transform(str mode) -> str", &medconv::set_channel_transform_op);
  m.def("channel_transform_for(int c_in) -> str", &medconv::channel_transform_for_op);
}

TORCH_LIBRARY_IMPL(medconv, CPU, m) {
  m.impl("rolling_conv_spectral", &medconv::rolling_conv_spectral_cpu);
  m.impl("rolling_conv_spectral_cat", &medconv::rolling_conv_spectral_cat_cpu);
  m.impl("rolling_conv_spectral_cat_grad_weight", &medconv::rolling_conv_spectral_cat_grad_weight_cpu);
  m.impl("rolling_conv_spectral_grad_input", &medconv::rolling_conv_spectral_grad_input_cpu);
  m.impl("rolling_conv_transpose_spectral", &medconv::rolling_conv_transpose_spectral_cpu);
  m.impl("rolling_conv_transpose_spectral_grad_input", &medconv::rolling_conv_transpose_spectral_grad_input_cpu);
  m.impl("rolling_conv_spectral_grad_weight", &medconv::rolling_conv_spectral_grad_weight_cpu);
  m.impl("rolling_conv_transpose_spectral_grad_weight", &medconv::rolling_conv_transpose_spectral_grad_weight_cpu);
}
