// The channel transforms of the fused spectral CPU kernel as a real FFT (docs/rolling_conv_spectral.md,
// "The channel FFT"), vectorized over pixels: one SIMD lane per pixel, NL pixels per block, so every
// butterfly is a plain vector add or multiply and the twiddles are broadcast scalars.
//
// A real sequence x of even length C is transformed as the complex sequence z[n] = x[2n] + i x[2n+1] of
// length N = C/2 (a mixed-radix Stockham FFT: radix 4, 2, and small odd primes as direct DFTs), then
// split into the real spectrum: with E = (Z[k] + conj Z[N-k])/2 and O = (Z[k] - conj Z[N-k])/2,
// X[k] = E - i e^{-2 pi i k/C} O. The inverse runs the same steps backwards (the inverse complex FFT as
// the conjugate of the forward FFT of the conjugate). Cost per pixel ~ 2.5 C log2 C flops instead of the
// folded DFT GEMM's C^2 multiply-adds. Spectra use the kernel's packed layout: Re X[f] in slots f < C/2,
// the Nyquist bin in slot Hp, Im X[f] in slot Hp + f (f >= 1), zeros in the padding slots.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/cpu_dispatch.h"

namespace medconv {
namespace simd {

using i64 = int64_t;

template <typename T, int VB>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
};

template <typename T>
using lane_int_t = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// In-register transposition of NL vectors of NL lanes (r[c] becomes column c) built from the cheap
// shuffles: first K x K transposes inside each 128-bit lane (K = 16 / sizeof(T); unpack-type
// shuffles), then a transposition of the 128-bit blocks (vshuff32x4 / vperm2f128-type). Measured on an
// AMD EPYC (AVX-512): the 2D C=64 256^2 forward with the channel FFT went from 11.3 to 10.4 ms (1 thread)
// against log2(NL) stages of general two-source permutations (vpermt2ps).
template <typename T, int VB, int KIND>
constexpr int fast_mask_index(int l) {
  constexpr int K = 16 / (int)sizeof(T), NL = VB / (int)sizeof(T);
  const int lane = l / K, e = l % K, ol = lane;
  switch (KIND) {
    case 0: return (e % 2 ? NL : 0) + lane * K + e / 2;                   // unpacklo
    case 1: return (e % 2 ? NL : 0) + lane * K + K / 2 + e / 2;           // unpackhi
    case 2: return (e < 2 ? 0 : NL) + lane * K + e % 2;                   // unpacklo of 64-bit pairs (K = 4)
    case 3: return (e < 2 ? 0 : NL) + lane * K + 2 + e % 2;               // unpackhi of 64-bit pairs
    case 4: return (ol < 2 ? 0 : NL) + K * (2 * (ol % 2)) + e;            // 128-bit lanes 0, 2 of a then b
    case 5: return (ol < 2 ? 0 : NL) + K * (2 * (ol % 2) + 1) + e;        // 128-bit lanes 1, 3 of a then b
    case 6: return (ol ? NL : 0) + e;                                     // 128-bit lane 0 of a and of b
    default: return (ol ? NL : 0) + K + e;                                // 128-bit lane 1 of a and of b
  }
}

template <typename T, int VB, int KIND, size_t... L>
MEDCONV_INLINE auto fast_mask(std::index_sequence<L...>) {
  typedef lane_int_t<T> M __attribute__((vector_size(VB)));
  return M{(lane_int_t<T>)fast_mask_index<T, VB, KIND>((int)L)...};
}

template <typename T, int VB, int KIND, typename V>
MEDCONV_INLINE V shuf(const V& a, const V& b) {
  return __builtin_shuffle(a, b, fast_mask<T, VB, KIND>(std::make_index_sequence<VB / sizeof(T)>{}));
}

template <typename T, int VB>
MEDCONV_INLINE void transpose_regs(typename VecOf<T, VB>::type* r) {
  typedef typename VecOf<T, VB>::type V;
  constexpr int NL = VB / sizeof(T), K = 16 / (int)sizeof(T), NB = NL / K;
  static_assert(NB == 1 || NB == 2 || NB == 4, "128-, 256- or 512-bit vectors");
#pragma GCC unroll 16
  for (int b = 0; b < NL; b += K) {
    if constexpr (K == 4) {
      const V t0 = shuf<T, VB, 0>(r[b], r[b + 1]), t1 = shuf<T, VB, 1>(r[b], r[b + 1]);
      const V t2 = shuf<T, VB, 0>(r[b + 2], r[b + 3]), t3 = shuf<T, VB, 1>(r[b + 2], r[b + 3]);
      r[b] = shuf<T, VB, 2>(t0, t2), r[b + 1] = shuf<T, VB, 3>(t0, t2);
      r[b + 2] = shuf<T, VB, 2>(t1, t3), r[b + 3] = shuf<T, VB, 3>(t1, t3);
    } else {
      const V t0 = shuf<T, VB, 0>(r[b], r[b + 1]), t1 = shuf<T, VB, 1>(r[b], r[b + 1]);
      r[b] = t0, r[b + 1] = t1;
    }
  }
  // r[K*g + j], lane L: column K*L + j of rows K*g .. K*g + K - 1
  if constexpr (NB == 1) return;
  V o[NL];
#pragma GCC unroll 4
  for (int j = 0; j < K; ++j) {
    if constexpr (NB == 2) {
      o[j] = shuf<T, VB, 6>(r[j], r[K + j]);
      o[K + j] = shuf<T, VB, 7>(r[j], r[K + j]);
    } else {
      const V u0 = shuf<T, VB, 4>(r[j], r[K + j]), u1 = shuf<T, VB, 5>(r[j], r[K + j]);
      const V u2 = shuf<T, VB, 4>(r[2 * K + j], r[3 * K + j]), u3 = shuf<T, VB, 5>(r[2 * K + j], r[3 * K + j]);
      o[j] = shuf<T, VB, 4>(u0, u2);
      o[2 * K + j] = shuf<T, VB, 5>(u0, u2);
      o[K + j] = shuf<T, VB, 4>(u1, u3);
      o[3 * K + j] = shuf<T, VB, 5>(u1, u3);
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < NL; ++c) r[c] = o[c];
}

// dst[j*ldd + i] = src[i*lds + j] for i < rows, j < cols (rows, cols <= NL): full NL x NL tiles in
// registers, partial ones element by element (the missing part of a partial tile is not touched).
template <typename T, int VB>
MEDCONV_INLINE void transpose_tile(const T* src, i64 lds, i64 rows, i64 cols, T* dst, i64 ldd) {
  typedef typename VecOf<T, VB>::type V;
  constexpr int NL = VB / sizeof(T);
  if (rows == NL && cols == NL) {
    V r[NL];
#pragma GCC unroll 16
    for (int i = 0; i < NL; ++i) std::memcpy(&r[i], src + i * lds, sizeof(V));
    transpose_regs<T, VB>(r);
#pragma GCC unroll 16
    for (int j = 0; j < NL; ++j) std::memcpy(dst + j * ldd, &r[j], sizeof(V));
    return;
  }
  for (i64 j = 0; j < cols; ++j)
    for (i64 i = 0; i < rows; ++i) dst[j * ldd + i] = src[i * lds + j];
}

// r[j] = column j of the rows x cols block at src (row i at src + i*lds), zero outside the block
// (rows, cols <= NL): a full tile is loaded and transposed in registers, a partial one element by element.
template <typename T, int VB>
MEDCONV_INLINE void load_transposed(const T* src, i64 lds, i64 rows, i64 cols, typename VecOf<T, VB>::type* r) {
  typedef typename VecOf<T, VB>::type V;
  constexpr int NL = VB / sizeof(T);
  if (rows == NL && cols == NL) {
#pragma GCC unroll 16
    for (int i = 0; i < NL; ++i) std::memcpy(&r[i], src + i * lds, sizeof(V));
    transpose_regs<T, VB>(r);
    return;
  }
  for (int j = 0; j < NL; ++j) {
    r[j] = V{};
    if (j < cols)
      for (i64 i = 0; i < rows; ++i) r[j][i] = src[i * lds + j];
  }
}

// The transpose of the vectors r[i], i < rows, stored: dst[j*ldd + i*ist] = r[i][j] for j < cols (rows,
// cols <= NL; r is overwritten). A full tile with ist = 1 is transposed in registers.
template <typename T, int VB>
MEDCONV_INLINE void store_transposed(typename VecOf<T, VB>::type* r, i64 rows, i64 cols, T* dst, i64 ldd,
                                     i64 ist = 1) {
  typedef typename VecOf<T, VB>::type V;
  constexpr int NL = VB / sizeof(T);
  if (rows == NL && cols == NL && ist == 1) {
    transpose_regs<T, VB>(r);
#pragma GCC unroll 16
    for (int j = 0; j < NL; ++j) std::memcpy(dst + j * ldd, &r[j], sizeof(V));
    return;
  }
  for (i64 i = 0; i < rows; ++i)
    for (i64 j = 0; j < cols; ++j) dst[j * ldd + i * ist] = r[i][j];
}

}  // namespace simd

namespace channel_fft {

using i64 = int64_t;

// Largest odd prime factor the FFT runs as a direct DFT stage; C/2 with a larger one keeps the GEMM.
constexpr int kMaxOddRadix = 13;

// The radices of N (8s first, then a 4 and/or a 2, then odd primes), or empty when a prime factor exceeds
// kMaxOddRadix (N = 1: no stage).
inline std::vector<int> radices(i64 N) {
  std::vector<int> r;
  while (N % 8 == 0) r.push_back(8), N /= 8;
  if (N % 4 == 0) r.push_back(4), N /= 4;
  if (N % 2 == 0) {  // 8 * 2 as 4 * 4: a radix-2 pass costs a whole pass over the data for little work
    if (!r.empty() && r.back() == 8) r.back() = 4, r.push_back(4);
    else r.push_back(2);
    N /= 2;
  }
  for (int p = 3; N > 1; p += 2) {
    if (p > kMaxOddRadix) return {};
    while (N % p == 0) r.push_back(p), N /= p;
  }
  return r;
}

// Whether a channel count has an FFT here: even, and C/2 a product of 2, 4 and odd primes <= 13.
inline bool supported(i64 C) { return C >= 2 && C % 2 == 0 && (C == 2 || !radices(C / 2).empty()); }

template <typename T>
struct Tables {
  i64 C = 0, N = 0;
  std::vector<int> radix;
  std::vector<i64> ns;                // sub-transform length before each stage
  std::vector<std::vector<T>> tw;     // per stage: [(k*R + r)*2] cos, sin of -2 pi r k / (Ns R), k < Ns
  std::vector<std::vector<T>> dft;    // per odd stage: [(q*R + m)*2] cos, sin of -2 pi q m / R
  std::vector<T> cs, sn;              // k <= N/2: cos, sin of 2 pi k / C
};

template <typename T>
Tables<T> make_tables(i64 C) {
  Tables<T> t;
  t.C = C;
  t.N = C / 2;
  t.radix = radices(t.N);
  i64 Ns = 1;
  for (int R : t.radix) {
    t.ns.push_back(Ns);
    std::vector<T> w((size_t)(Ns * R * 2));
    for (i64 k = 0; k < Ns; ++k)
      for (int r = 0; r < R; ++r) {
        const double a = -2.0 * M_PI * (double)(r * k) / (double)(Ns * R);
        w[(k * R + r) * 2] = (T)std::cos(a);
        w[(k * R + r) * 2 + 1] = (T)std::sin(a);
      }
    t.tw.push_back(std::move(w));
    std::vector<T> d;
    if (R % 2 == 1) {
      d.resize((size_t)(R * R * 2));
      for (int q = 0; q < R; ++q)
        for (int m = 0; m < R; ++m) {
          const double a = -2.0 * M_PI * (double)((q * m) % R) / (double)R;
          d[(q * R + m) * 2] = (T)std::cos(a);
          d[(q * R + m) * 2 + 1] = (T)std::sin(a);
        }
    }
    t.dft.push_back(std::move(d));
    Ns *= R;
  }
  t.cs.resize((size_t)(t.N / 2 + 1));
  t.sn.resize((size_t)(t.N / 2 + 1));
  for (i64 k = 0; k <= t.N / 2; ++k) {
    t.cs[k] = (T)std::cos(2.0 * M_PI * (double)k / (double)C);
    t.sn[k] = (T)std::sin(2.0 * M_PI * (double)k / (double)C);
  }
  return t;
}

// Forward complex FFT of N vectors (re, im), natural order in and out. Stockham autosort: stage s reads
// one buffer and writes the other; returns the buffer index (0: re/im, 1: tr/ti) that holds the result.
// In-place 4-point DFT (forward, e^{-2 pi i / 4} = -i) of (r[0..3], i[0..3]), natural order.
template <typename V>
MEDCONV_INLINE void dft4(V* r, V* i) {
  const V ar = r[0] + r[2], ai = i[0] + i[2], br = r[0] - r[2], bi = i[0] - i[2];
  const V cr = r[1] + r[3], ci = i[1] + i[3], dr = r[1] - r[3], di = i[1] - i[3];
  r[0] = ar + cr, i[0] = ai + ci;
  r[2] = ar - cr, i[2] = ai - ci;
  r[1] = br + di, i[1] = bi - dr;  // b - i d
  r[3] = br - di, i[3] = bi + dr;  // b + i d
}

// In-place 8-point DFT of (r[0..7], i[0..7]), natural order: even outputs are the 4-point DFT of
// v[k] + v[k+4], odd ones that of (v[k] - v[k+4]) e^{-2 pi i k / 8}.
template <typename T, typename V>
MEDCONV_INLINE void dft8(V* r, V* i) {
  const V h = V{} + (T)0.70710678118654752440;
  V ar[4], ai[4], br[4], bi[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    ar[k] = r[k] + r[k + 4], ai[k] = i[k] + i[k + 4];
    br[k] = r[k] - r[k + 4], bi[k] = i[k] - i[k + 4];
  }
  V t;
  t = br[1], br[1] = (t + bi[1]) * h, bi[1] = (bi[1] - t) * h;     // (1 - i) / sqrt 2
  t = br[2], br[2] = bi[2], bi[2] = -t;                           // -i
  t = br[3], br[3] = (bi[3] - t) * h, bi[3] = -(t + bi[3]) * h;  // (-1 - i) / sqrt 2
  dft4(ar, ai);
  dft4(br, bi);
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) r[2 * m] = ar[m], i[2 * m] = ai[m], r[2 * m + 1] = br[m], i[2 * m + 1] = bi[m];
}

template <typename T, int VB>
MEDCONV_INLINE int cfft(const Tables<T>& t, typename simd::VecOf<T, VB>::type* re, typename simd::VecOf<T, VB>::type* im,
                        typename simd::VecOf<T, VB>::type* tr, typename simd::VecOf<T, VB>::type* ti) {
  typedef typename simd::VecOf<T, VB>::type V;
  const i64 N = t.N;
  V* ir = re;
  V* ii = im;
  V* orr = tr;
  V* oi = ti;
  int cur = 0;
  for (size_t s = 0; s < t.radix.size(); ++s) {
    const int R = t.radix[s];
    const i64 Ns = t.ns[s], step = N / R, nb = N / (R * Ns);
    const T* w = t.tw[s].data();
    if (R == 8) {
      for (i64 jb = 0; jb < nb; ++jb)
        for (i64 k = 0; k < Ns; ++k) {
          const i64 j = jb * Ns + k, o = jb * Ns * 8 + k;
          V vr[8], vi[8];
#pragma GCC unroll 8
          for (int r = 0; r < 8; ++r) vr[r] = ir[j + r * step], vi[r] = ii[j + r * step];
          if (Ns > 1) {
            const T* wk = w + k * 16;
#pragma GCC unroll 8
            for (int r = 1; r < 8; ++r) {
              const V c = V{} + wk[2 * r], sn = V{} + wk[2 * r + 1], x = vr[r];
              vr[r] = x * c - vi[r] * sn;
              vi[r] = x * sn + vi[r] * c;
            }
          }
          dft8<T>(vr, vi);
#pragma GCC unroll 8
          for (int r = 0; r < 8; ++r) orr[o + r * Ns] = vr[r], oi[o + r * Ns] = vi[r];
        }
    } else if (R == 4) {
      for (i64 jb = 0; jb < nb; ++jb)
        for (i64 k = 0; k < Ns; ++k) {
          const i64 j = jb * Ns + k, o = jb * Ns * 4 + k;
          V r0 = ir[j], i0 = ii[j], r1 = ir[j + step], i1 = ii[j + step];
          V r2 = ir[j + 2 * step], i2 = ii[j + 2 * step], r3 = ir[j + 3 * step], i3 = ii[j + 3 * step];
          if (Ns > 1) {
            const T* wk = w + k * 8;
            V c, sn, x;
            c = V{} + wk[2], sn = V{} + wk[3], x = r1, r1 = x * c - i1 * sn, i1 = x * sn + i1 * c;
            c = V{} + wk[4], sn = V{} + wk[5], x = r2, r2 = x * c - i2 * sn, i2 = x * sn + i2 * c;
            c = V{} + wk[6], sn = V{} + wk[7], x = r3, r3 = x * c - i3 * sn, i3 = x * sn + i3 * c;
          }
          const V ar = r0 + r2, ai = i0 + i2, br = r0 - r2, bi = i0 - i2;
          const V cr = r1 + r3, ci = i1 + i3, dr = r1 - r3, di = i1 - i3;
          orr[o] = ar + cr, oi[o] = ai + ci;
          orr[o + 2 * Ns] = ar - cr, oi[o + 2 * Ns] = ai - ci;
          orr[o + Ns] = br + di, oi[o + Ns] = bi - dr;       // b - i d
          orr[o + 3 * Ns] = br - di, oi[o + 3 * Ns] = bi + dr;  // b + i d
        }
    } else if (R == 2) {
      for (i64 jb = 0; jb < nb; ++jb)
        for (i64 k = 0; k < Ns; ++k) {
          const i64 j = jb * Ns + k, o = jb * Ns * 2 + k;
          V r0 = ir[j], i0 = ii[j], r1 = ir[j + step], i1 = ii[j + step];
          if (Ns > 1) {
            const V c = V{} + w[k * 4 + 2], sn = V{} + w[k * 4 + 3], x = r1;
            r1 = x * c - i1 * sn;
            i1 = x * sn + i1 * c;
          }
          orr[o] = r0 + r1, oi[o] = i0 + i1;
          orr[o + Ns] = r0 - r1, oi[o + Ns] = i0 - i1;
        }
    } else {  // odd prime: twiddles, then a direct DFT of R points
      const T* d = t.dft[s].data();
      for (i64 jb = 0; jb < nb; ++jb)
        for (i64 k = 0; k < Ns; ++k) {
          const i64 j = jb * Ns + k, o = jb * Ns * R + k;
          V xr[kMaxOddRadix], xi[kMaxOddRadix];
          for (int r = 0; r < R; ++r) {
            const V a = ir[j + r * step], b = ii[j + r * step];
            const V c = V{} + w[(k * R + r) * 2], sn = V{} + w[(k * R + r) * 2 + 1];
            xr[r] = a * c - b * sn;
            xi[r] = a * sn + b * c;
          }
          for (int m = 0; m < R; ++m) {
            V yr = xr[0], yi = xi[0];
            for (int q = 1; q < R; ++q) {
              const V c = V{} + d[(q * R + m) * 2], sn = V{} + d[(q * R + m) * 2 + 1];
              yr += xr[q] * c - xi[q] * sn;
              yi += xr[q] * sn + xi[q] * c;
            }
            orr[o + m * Ns] = yr, oi[o + m * Ns] = yi;
          }
        }
    }
    std::swap(ir, orr);
    std::swap(ii, oi);
    cur ^= 1;
  }
  return cur;
}

// Real forward transform of NL pixels: zr[n] = x[2n], zi[n] = x[2n+1] (n < N, overwritten), spectrum
// slot vectors into S (2Hp vectors, padding slots zero). tr, ti: N vectors of scratch.
template <typename T, int VB>
MEDCONV_INLINE void rfft(const Tables<T>& t, i64 Hp, typename simd::VecOf<T, VB>::type* zr,
                         typename simd::VecOf<T, VB>::type* zi, typename simd::VecOf<T, VB>::type* tr,
                         typename simd::VecOf<T, VB>::type* ti, typename simd::VecOf<T, VB>::type* S) {
  typedef typename simd::VecOf<T, VB>::type V;
  const i64 N = t.N;
  const int cur = cfft<T, VB>(t, zr, zi, tr, ti);
  const V* Zr = cur ? tr : zr;
  const V* Zi = cur ? ti : zi;
  const V half = V{} + T(0.5);
  S[0] = Zr[0] + Zi[0];
  S[Hp] = Zr[0] - Zi[0];  // Nyquist
  for (i64 k = 1; k <= N / 2; ++k) {
    const i64 m = N - k;
    const V a = Zr[k], b = Zi[k], c = Zr[m], d = Zi[m];
    const V er = (a + c) * half, ei = (b - d) * half, orr = (a - c) * half, oi = (b + d) * half;
    const V cs = V{} + t.cs[k], sn = V{} + t.sn[k];
    S[k] = er - sn * orr + cs * oi;
    S[Hp + k] = ei - sn * oi - cs * orr;
    if (m != k) {
      S[m] = er + sn * orr - cs * oi;
      S[Hp + m] = -ei - cs * orr - sn * oi;
    }
  }
  for (i64 j = N; j < Hp; ++j) S[j] = S[Hp + j] = V{};
}

// Real inverse transform of NL pixels from spectrum slot vectors S (2Hp), scaled by 1/C: on return *xe
// points to x[2n] and *xo to -x[2n+1] (n < N; the sign is left to the caller's epilogue). a, b, c, d:
// N vectors of scratch each.
template <typename T, int VB>
MEDCONV_INLINE void irfft(const Tables<T>& t, i64 Hp, const typename simd::VecOf<T, VB>::type* S,
                          typename simd::VecOf<T, VB>::type* a, typename simd::VecOf<T, VB>::type* b,
                          typename simd::VecOf<T, VB>::type* c, typename simd::VecOf<T, VB>::type* d,
                          const typename simd::VecOf<T, VB>::type** xe, const typename simd::VecOf<T, VB>::type** xo) {
  typedef typename simd::VecOf<T, VB>::type V;
  const i64 N = t.N;
  const V inv = V{} + (T)(1.0 / (double)t.C);
  // Z[k] = (X[k] + conj X[N-k]) + i e^{2 pi i k/C} (X[k] - conj X[N-k]), times 1/C; stored conjugated
  // (the inverse FFT as the conjugate of the forward FFT of the conjugate)
  a[0] = (S[0] + S[Hp]) * inv;
  b[0] = (S[Hp] - S[0]) * inv;
  for (i64 k = 1; k <= N / 2; ++k) {
    const i64 m = N - k;
    const V xr = S[k], xi = S[Hp + k], yr = S[m], yi = S[Hp + m];
    const V er = xr + yr, ei = xi - yi, dr = xr - yr, di = xi + yi;
    const V cs = V{} + t.cs[k], sn = V{} + t.sn[k];
    const V p = cs * di + sn * dr, q = cs * dr - sn * di;
    a[k] = (er - p) * inv;
    b[k] = -(ei + q) * inv;
    if (m != k) {
      a[m] = (er + p) * inv;
      b[m] = (ei - q) * inv;
    }
  }
  const int cur = cfft<T, VB>(t, a, b, c, d);
  *xe = cur ? c : a;
  *xo = cur ? d : b;
}

}  // namespace channel_fft
}  // namespace medconv
