// CPU kernels of rolling convolution (docs/design.md §1): forward, grad_input and grad_weight of
// the rolling conv and of the transposed rolling conv, 1D/2D/3D, float32 and float64.
//
// The C_out x C_in x k filter bank is never built. Every weight is read from the base by an
// index shift: output channel o = r * n_base + b at input channel c uses base channel
// (c - r) mod C_in. The base is copied once into E[b][tap][e] = base[b][e mod C_in][tap]
// (length 2*C_in along e, so the wrap-around needs no modulo in the inner loop): the weights
// of a tile of consecutive rolls (or consecutive input channels) are then consecutive in E.
//
// All six ops reduce to two kernels:
//  * corr: out[n, q, o] = bias[q] + sum_{red, tap} Wshift * buf[n, red, o*s + tap*d], where buf
//    is a zero-padded copy of the input (conv) or a zero-inserted, padded copy of grad_out /
//    x (transposed conv: the stride becomes 1 and the taps are flipped). Register-blocked: a
//    tile of RT output channels x VW output pixels accumulates over (red, tap); no scatter.
//  * grad_weight: dw[b, m, tap] = sum_{n, r, p} A[n, ., p] * buf[n, ., p*s + tap*d] (paper
//    eq. 7), one output element per work item, summed in a fixed order.
// Threads (at::parallel_for) own disjoint output elements and every sum has a fixed order:
// results are bit-identical run to run (no atomics) for a given thread count and CPU.
// On x86-64 an AVX2+FMA copy of the hot loops is compiled beside the portable one and picked
// at run time (no -march=native: the wheel stays portable).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/cpu_dispatch.h"
#include "cpu/rolling_conv_geometry.h"

namespace medconv {
namespace {

using i64 = int64_t;

constexpr int RT = 4;  // output channels per register tile

// ------------------------------------------------------------------------------------------
// argument checks (the Python layer checks too; these make direct torch.ops calls safe)
// ------------------------------------------------------------------------------------------
using cpu_geom::A3;
using cpu_geom::check_convt_out;
using cpu_geom::check_float_cpu;
using cpu_geom::conv_out;
using cpu_geom::convt_out_base;
using cpu_geom::expand3;
using cpu_geom::Geom;
using cpu_geom::make_geom;
using cpu_geom::shape_str;
using cpu_geom::spatial3;

void check_grad_shape(const at::Tensor& grad_out, i64 N, i64 Cq, const A3& out, int dims, const char* op) {
  std::vector<i64> want{N, Cq};
  for (int i = 0; i < dims; ++i) want.push_back(out[3 - dims + i]);
  TORCH_CHECK(grad_out.sizes().vec() == want, op, ": grad_out has shape ", shape_str(grad_out.sizes()),
              " but the sizes given imply ", shape_str(want));
}

// (N, C, *spatial) contiguous -> (N, C, S0, S1, S2) view
at::Tensor as5(const at::Tensor& t) {
  auto c = t.contiguous();
  auto s = c.sizes().vec();
  while (s.size() < 5) s.insert(s.begin() + 2, 1);
  return c.view(s);
}

// ------------------------------------------------------------------------------------------
// buffers
// ------------------------------------------------------------------------------------------
// E[b][tap][e] = base(b, e mod C, tap) for e in [0, 2C); taps optionally flipped.
// `transposed` base layout is (C, nb, *k), else (nb, C, *k).
template <typename T>
std::vector<T> make_E(const at::Tensor& w, const Geom& g, bool transposed, bool flip) {
  auto wc = w.contiguous();
  const T* wp = wc.data_ptr<T>();
  const i64 T_ = g.taps(), C = g.C, nb = g.nb;
  std::vector<T> E((size_t)(nb * T_ * 2 * C));
  for (i64 b = 0; b < nb; ++b)
    for (i64 t = 0; t < T_; ++t)
      for (i64 e = 0; e < 2 * C; ++e) {
        i64 m = e % C, ts = flip ? T_ - 1 - t : t;
        i64 src = transposed ? (m * nb + b) * T_ + ts : (b * C + m) * T_ + ts;
        E[(size_t)((b * T_ + t) * 2 * C + e)] = wp[src];
      }
  return E;
}

// buf[n, c, j] = src[n, c, (j + off) / su] where (j + off) is a multiple of su inside src, else 0;
// `slack` zero elements at the end let vector tails read past the last row.
template <typename T>
at::Tensor make_buffer(const at::Tensor& src5, const A3& L, const A3& off, const A3& su, i64 slack) {
  const i64 N = src5.size(0), Cs = src5.size(1);
  const A3 S{src5.size(2), src5.size(3), src5.size(4)};
  const i64 total = N * Cs * L[0] * L[1] * L[2];
  at::Tensor buf = at::zeros({total + slack}, src5.options());
  T* bp = buf.data_ptr<T>();
  const T* sp = src5.data_ptr<T>();
  auto idx = [](i64 j, i64 off_, i64 su_, i64 size) -> i64 {
    i64 m = j + off_;
    if (m < 0 || m % su_ != 0) return -1;
    m /= su_;
    return m < size ? m : -1;
  };
  const i64 rows = N * Cs * L[0] * L[1];
  at::parallel_for(0, rows, 64, [&](i64 begin, i64 end) {
    for (i64 row = begin; row < end; ++row) {
      i64 j1 = row % L[1], rest = row / L[1];
      i64 j0 = rest % L[0], nc = rest / L[0];
      i64 m0 = idx(j0, off[0], su[0], S[0]), m1 = idx(j1, off[1], su[1], S[1]);
      if (m0 < 0 || m1 < 0) continue;
      const T* srow = sp + ((nc * S[0] + m0) * S[1] + m1) * S[2];
      T* drow = bp + row * L[2];
      for (i64 j2 = 0; j2 < L[2]; ++j2) {
        i64 m2 = idx(j2, off[2], su[2], S[2]);
        if (m2 >= 0) drow[j2] = srow[m2];
      }
    }
  });
  return buf;
}

// ------------------------------------------------------------------------------------------
// kernel 1: register-blocked correlation with index-shifted weights
// ------------------------------------------------------------------------------------------
template <typename T>
struct CorrArgs {
  const T* buf;   // (N, Cred, L0, L1, L2) + slack
  i64 Cred;
  A3 L;
  const T* E;     // (nb, taps, 2C)
  i64 C, nb, n_rolls;
  A3 k, s, d;
  T* out;         // (N, Cq, O0, O1, O2)
  i64 Cq;
  A3 O;
  const T* bias;  // (Cq,) or nullptr
  bool out_rolls;  // true: out channel q = r*nb+b, reduce over c ("pattern R"); false: out c, reduce over q
};

// One tile of R output channels over one output row (n, o0, o1), VW pixels at a time.
// red_ch[k]: buffer channel of reduction step k; red_w[k]: offset in E of its weights, the
// weight of tile element i being E[red_w[k] + tap * 2C + i].
// GCC/Clang vector extensions keep the accumulator tile in registers (plain arrays indexed
// in loops were spilled to the stack); NV vectors of VB bytes = VW pixels per row.
template <typename T, int R, int NV, int VB, bool UNIT>
MEDCONV_INLINE void corr_tile(const CorrArgs<T>& a, i64 n, i64 o0, i64 o1, i64 nred, const i64* red_ch,
                              const i64* red_w, const i64* out_ch) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int NL = VB / sizeof(T), VW = NV * NL;
  const i64 L2 = a.L[2], plane = a.L[1] * L2, chs = a.L[0] * plane, tstride = 2 * a.C;
  const i64 k0 = a.k[0], k1 = a.k[1], k2 = a.k[2];
  const i64 s2 = a.s[2], d0 = a.d[0], d1 = a.d[1], d2 = a.d[2];
  const T* xn = a.buf + n * a.Cred * chs + (o0 * a.s[0]) * plane + (o1 * a.s[1]) * L2;
  T* outp[R];
  T bias[R];
  for (int i = 0; i < R; ++i) {
    outp[i] = a.out + ((n * a.Cq + out_ch[i]) * a.O[0] + o0) * a.O[1] * a.O[2] + o1 * a.O[2];
    bias[i] = a.bias ? a.bias[out_ch[i]] : T(0);
  }
  for (i64 w0 = 0; w0 < a.O[2]; w0 += VW) {
    V acc[R][NV];
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[i][v] = V{};
    const T* xw = xn + w0 * s2;
    for (i64 kr = 0; kr < nred; ++kr) {
      const T* xc = xw + red_ch[kr] * chs;
      const T* wk = a.E + red_w[kr];
      for (i64 kd = 0; kd < k0; ++kd) {
        for (i64 kh = 0; kh < k1; ++kh) {
          const T* xr = xc + kd * d0 * plane + kh * d1 * L2;
          const T* wr = wk + (kd * k1 + kh) * k2 * tstride;
          for (i64 kw = 0; kw < k2; ++kw) {
            const T* xp = xr + kw * d2;
            const T* wt = wr + kw * tstride;
            V xv[NV];
#pragma GCC unroll 16
            for (int v = 0; v < NV; ++v) {
              if (UNIT) {
                std::memcpy(&xv[v], xp + v * NL, VB);
              } else {
                // Gather the lanes into a plain array, then one copy into the vector: writing
                // single lanes of an unset vector reads it first (-Wmaybe-uninitialized).
                T lanes[NL];
#pragma GCC unroll 16
                for (int l = 0; l < NL; ++l) lanes[l] = xp[(v * NL + l) * s2];
                std::memcpy(&xv[v], lanes, VB);
              }
            }
#pragma GCC unroll 16
            for (int i = 0; i < R; ++i) {
              const T wv = wt[i];
#pragma GCC unroll 16
              for (int v = 0; v < NV; ++v) acc[i][v] += wv * xv[v];
            }
          }
        }
      }
    }
    const i64 nv = std::min<i64>(VW, a.O[2] - w0);
    for (int i = 0; i < R; ++i) {
      T tmp[VW];
      std::memcpy(tmp, acc[i], sizeof(tmp));
      for (i64 j = 0; j < nv; ++j) outp[i][w0 + j] = tmp[j] + bias[i];
    }
  }
}

template <typename T, int NV, int VB, bool UNIT>
MEDCONV_INLINE void corr_row_impl(const CorrArgs<T>& a, i64 row, std::vector<i64>& scratch) {
  const i64 o1 = row % a.O[1], o0 = (row / a.O[1]) % a.O[0], n = row / (a.O[0] * a.O[1]);
  const i64 T_ = a.k[0] * a.k[1] * a.k[2], C = a.C, nb = a.nb;
  const i64 nred = a.Cred;
  scratch.resize((size_t)(2 * nred));
  i64* red_ch = scratch.data();
  i64* red_w = red_ch + nred;
  i64 out_ch[RT];
  if (a.out_rolls) {
    // tile = rolls r0 .. r0+R-1 of base b; listed as i = R-1 .. 0 so that the weights
    // E[b][tap][c - r + C] of the tile are increasing in i.
    for (i64 b = 0; b < nb; ++b) {
      for (i64 r0 = 0; r0 < a.n_rolls; r0 += RT) {
        const int R = (int)std::min<i64>(RT, a.n_rolls - r0);
        for (int i = 0; i < R; ++i) out_ch[i] = (r0 + R - 1 - i) * nb + b;
        for (i64 c = 0; c < C; ++c) {
          red_ch[c] = c;
          red_w[c] = b * T_ * 2 * C + (c - r0 - R + 1 + C);
        }
        switch (R) {
          case 4: corr_tile<T, 4, NV, VB, UNIT>(a, n, o0, o1, nred, red_ch, red_w, out_ch); break;
          case 3: corr_tile<T, 3, NV, VB, UNIT>(a, n, o0, o1, nred, red_ch, red_w, out_ch); break;
          case 2: corr_tile<T, 2, NV, VB, UNIT>(a, n, o0, o1, nred, red_ch, red_w, out_ch); break;
          default: corr_tile<T, 1, NV, VB, UNIT>(a, n, o0, o1, nred, red_ch, red_w, out_ch); break;
        }
      }
    }
  } else {
    // tile = input channels c0 .. c0+R-1; reduce over q = r*nb + b with weights
    // E[b][tap][c - r + C], increasing in c.
    for (i64 c0 = 0; c0 < C; c0 += RT) {
      const int R = (int)std::min<i64>(RT, C - c0);
      for (int i = 0; i < R; ++i) out_ch[i] = c0 + i;
      for (i64 r = 0; r < a.n_rolls; ++r)
        for (i64 b = 0; b < nb; ++b) {
          red_ch[r * nb + b] = r * nb + b;
          red_w[r * nb + b] = b * T_ * 2 * C + (c0 - r + C);
        }
      switch (R) {
        case 4: corr_tile<T, 4, NV, VB, UNIT>(a, n, o0, o1, nred, red_ch, red_w, out_ch); break;
        case 3: corr_tile<T, 3, NV, VB, UNIT>(a, n, o0, o1, nred, red_ch, red_w, out_ch); break;
        case 2: corr_tile<T, 2, NV, VB, UNIT>(a, n, o0, o1, nred, red_ch, red_w, out_ch); break;
        default: corr_tile<T, 1, NV, VB, UNIT>(a, n, o0, o1, nred, red_ch, red_w, out_ch); break;
      }
    }
  }
}

// Rows [begin, end): portable build, and an AVX2+FMA build of the same code.
template <typename T>
void corr_rows_default(const CorrArgs<T>& a, i64 begin, i64 end) {
  std::vector<i64> scratch;
  for (i64 row = begin; row < end; ++row) {
    if (a.s[2] == 1) corr_row_impl<T, 2, 16, true>(a, row, scratch);
    else corr_row_impl<T, 2, 16, false>(a, row, scratch);
  }
}

#ifdef MEDCONV_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void corr_rows_avx2(const CorrArgs<T>& a, i64 begin, i64 end) {
  std::vector<i64> scratch;
  for (i64 row = begin; row < end; ++row) {
    if (a.s[2] == 1) corr_row_impl<T, 2, 32, true>(a, row, scratch);
    else corr_row_impl<T, 2, 32, false>(a, row, scratch);
  }
}
#endif

template <typename T>
void run_corr(const CorrArgs<T>& a, i64 N) {
  const i64 rows = N * a.O[0] * a.O[1];
  if (rows == 0 || a.O[2] == 0) return;
  // grain: a few rows per task; each row already holds Cq * O2 * Cred * taps multiply-adds
  at::parallel_for(0, rows, 1, [&](i64 begin, i64 end) {
#ifdef MEDCONV_X86_DISPATCH
    if (cpu_has_avx2()) {
      corr_rows_avx2<T>(a, begin, end);
      return;
    }
#endif
    corr_rows_default<T>(a, begin, end);
  });
}

// ------------------------------------------------------------------------------------------
// kernel 2: weight gradient (paper eq. 7), gather form
// ------------------------------------------------------------------------------------------
// dw[b, m, t] = sum_{r, n, p} A[n, ia, p] * B[n, ib, p*s + t*d]   with q = r*nb + b, c = (m + r) mod C,
// conv: (ia, ib) = (q, c); transposed: (ia, ib) = (c, q). One work item = (b, tile of R consecutive m,
// tap t): a register tile accumulates over (r, n, p) (see gw_block), then a fixed-order lane sum.
template <typename T>
struct GwArgs {
  const T* A;  // (N, CA, P0, P1, P2): grad_out (conv) or x (transposed)
  i64 CA;
  A3 P;
  const T* B;  // buffer (N, CB, L0, L1, L2): padded x (conv) or padded grad_out (transposed)
  i64 CB;
  A3 L;
  i64 N, C, nb, n_rolls;
  bool transposed;
  // flat: stride 1 in the last two dims and A stored with rows of length L2 (zero beyond P2):
  // then A[p1, pw] and B[p1 + kh*d, pw + kw*d] are both contiguous over (p1, pw) together, one
  // long vector loop per plane instead of one short loop per row (the zero columns of A cancel
  // the products that wrap into the next row of B).
  bool flat;
  A3 k, s, d;
  T* out;  // (nb, C, taps)
};

// NV vectors of NL lanes from src[j * stride] (contiguous when UNIT or stride == 1).
template <typename T, typename V, int NV, int NL, bool UNIT>
MEDCONV_INLINE void vload(V* dst, const T* src, i64 stride) {
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    if (UNIT || stride == 1) {
      std::memcpy(&dst[v], src + v * NL, sizeof(V));
    } else {
      // Lanes gathered into a plain array, then one copy (no lane writes into an unset vector).
      T lanes[NL];
#pragma GCC unroll 16
      for (int l = 0; l < NL; ++l) lanes[l] = src[(v * NL + l) * stride];
      std::memcpy(&dst[v], lanes, sizeof(V));
    }
  }
}

// Rolls r0 .. r0+RR-1 of output elements m0 .. m0+R-1 (base b, tap t), added to accd[R].
// Pair (i, jr) multiplies the "roll side" channel q = (r0 + jr)*nb + b with the "rolled side"
// channel (m0 + i + r0 + jr) mod C = rolled[i + jr]: per vector step RR + R + RR - 1 loads
// feed R * RR multiply-adds (a 2D register tile; grad_out is the roll side for the conv,
// the B side for the transposed conv).
template <typename T, int R, int RR, int VB, bool UNIT, bool TRANS>
MEDCONV_INLINE void gw_block(const GwArgs<T>& a, i64 b, i64 m0, i64 r0, i64 tap_off, double* accd) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int NL = VB / sizeof(T), NY = R + RR - 1;
  const i64 Pl = a.P[1] * a.P[2], Pc = a.P[0] * Pl;
  const i64 L2 = a.L[2], Ll = a.L[1] * L2, Lc = a.L[0] * Ll;
  const i64 P2 = a.P[2], s2 = a.s[2];
  const bool flat = a.flat;
  const i64 nrow = flat ? a.P[0] : a.P[0] * a.P[1];
  const i64 span = flat ? a.P[1] * P2 : P2;
  const i64 nfull = span / NL * NL;
  for (i64 n = 0; n < a.N; ++n) {
    // X: roll side (RR rows), Y: rolled side (NY rows); A rows are contiguous, B rows strided by s2
    const T* X[RR];
    const T* Y[NY];
    for (int jr = 0; jr < RR; ++jr) {
      const i64 q = (r0 + jr) * a.nb + b;
      X[jr] = TRANS ? a.B + (n * a.CB + q) * Lc + tap_off : a.A + (n * a.CA + q) * Pc;
    }
    for (int j = 0; j < NY; ++j) {
      const i64 c = (m0 + r0 + j) % a.C;
      Y[j] = TRANS ? a.A + (n * a.CA + c) * Pc : a.B + (n * a.CB + c) * Lc + tap_off;
    }
    const i64 xs = TRANS ? s2 : 1, ys = TRANS ? 1 : s2;
    // lanes in T per n, then flushed into double so long sums keep their precision
    V acc[R];
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) acc[i] = V{};
    T tail[R];
    for (int i = 0; i < R; ++i) tail[i] = T(0);
    for (i64 row = 0; row < nrow; ++row) {
      const i64 p0 = flat ? row : row / a.P[1], p1 = flat ? 0 : row % a.P[1];
      const i64 ao = p0 * Pl + p1 * P2, bo = p0 * a.s[0] * Ll + p1 * a.s[1] * L2;
      const i64 xo = TRANS ? bo : ao, yo = TRANS ? ao : bo;
      i64 pw = 0;
      for (; pw < nfull; pw += NL) {
        V xv[RR], yv[NY];
#pragma GCC unroll 16
        for (int jr = 0; jr < RR; ++jr) vload<T, V, 1, NL, UNIT || !TRANS>(&xv[jr], X[jr] + xo + pw * xs, xs);
#pragma GCC unroll 16
        for (int j = 0; j < NY; ++j) vload<T, V, 1, NL, UNIT || TRANS>(&yv[j], Y[j] + yo + pw * ys, ys);
#pragma GCC unroll 16
        for (int jr = 0; jr < RR; ++jr)
#pragma GCC unroll 16
          for (int i = 0; i < R; ++i) acc[i] += xv[jr] * yv[i + jr];
      }
      for (; pw < span; ++pw)  // tail pixels
        for (int jr = 0; jr < RR; ++jr)
          for (int i = 0; i < R; ++i) tail[i] += X[jr][xo + pw * xs] * Y[i + jr][yo + pw * ys];
    }
    for (int i = 0; i < R; ++i) {
      T lanes[NL];
      std::memcpy(lanes, &acc[i], sizeof(lanes));
      T sum = tail[i];
      for (int j = 0; j < NL; ++j) sum += lanes[j];
      accd[i] += (double)sum;
    }
  }
}

template <typename T, int R, int NV, int VB, bool UNIT, bool TRANS>
MEDCONV_INLINE void gw_tile(const GwArgs<T>& a, i64 b, i64 m0, i64 t) {
  const i64 k1 = a.k[1], k2 = a.k[2];
  const i64 kw = t % k2, kh = (t / k2) % k1, kd = t / (k2 * k1);
  const i64 Ll = a.L[1] * a.L[2];
  const i64 tap_off = kd * a.d[0] * Ll + kh * a.d[1] * a.L[2] + kw * a.d[2];
  constexpr int RR = 4;
  double accd[R];
  for (int i = 0; i < R; ++i) accd[i] = 0.0;
  i64 r0 = 0;
  for (; r0 + RR <= a.n_rolls; r0 += RR) gw_block<T, R, RR, VB, UNIT, TRANS>(a, b, m0, r0, tap_off, accd);
  for (; r0 < a.n_rolls; ++r0) gw_block<T, R, 1, VB, UNIT, TRANS>(a, b, m0, r0, tap_off, accd);
  const i64 T_ = a.k[0] * k1 * k2;
  for (int i = 0; i < R; ++i) a.out[(b * a.C + m0 + i) * T_ + t] = (T)accd[i];
}

template <typename T, int NV, int VB, bool UNIT, bool TRANS>
MEDCONV_INLINE void gw_item_impl(const GwArgs<T>& a, i64 item) {
  const i64 T_ = a.k[0] * a.k[1] * a.k[2], ntiles = (a.C + RT - 1) / RT;
  const i64 t = item % T_, tile = (item / T_) % ntiles, b = item / (T_ * ntiles);
  const i64 m0 = tile * RT;
  switch ((int)std::min<i64>(RT, a.C - m0)) {
    case 4: gw_tile<T, 4, NV, VB, UNIT, TRANS>(a, b, m0, t); break;
    case 3: gw_tile<T, 3, NV, VB, UNIT, TRANS>(a, b, m0, t); break;
    case 2: gw_tile<T, 2, NV, VB, UNIT, TRANS>(a, b, m0, t); break;
    default: gw_tile<T, 1, NV, VB, UNIT, TRANS>(a, b, m0, t); break;
  }
}

template <typename T, int NV, int VB>
MEDCONV_INLINE void gw_items(const GwArgs<T>& a, i64 begin, i64 end) {
  for (i64 it = begin; it < end; ++it) {
    if (a.s[2] == 1) {
      if (a.transposed) gw_item_impl<T, NV, VB, true, true>(a, it);
      else gw_item_impl<T, NV, VB, true, false>(a, it);
    } else {
      if (a.transposed) gw_item_impl<T, NV, VB, false, true>(a, it);
      else gw_item_impl<T, NV, VB, false, false>(a, it);
    }
  }
}

template <typename T>
void gw_items_default(const GwArgs<T>& a, i64 begin, i64 end) {
  gw_items<T, 2, 16>(a, begin, end);
}

#ifdef MEDCONV_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void gw_items_avx2(const GwArgs<T>& a, i64 begin, i64 end) {
  gw_items<T, 2, 32>(a, begin, end);
}
#endif

template <typename T>
void run_gw(const GwArgs<T>& a) {
  const i64 items = a.nb * ((a.C + RT - 1) / RT) * a.k[0] * a.k[1] * a.k[2];
  at::parallel_for(0, items, 1, [&](i64 begin, i64 end) {
#ifdef MEDCONV_X86_DISPATCH
    if (cpu_has_avx2()) {
      gw_items_avx2<T>(a, begin, end);
      return;
    }
#endif
    gw_items_default<T>(a, begin, end);
  });
}

// ------------------------------------------------------------------------------------------
// the ops
// ------------------------------------------------------------------------------------------
// Vector tails read up to VW * stride elements past the last row: zero slack covers that.
constexpr i64 kSlack = 64;

i64 slack_for(const A3& s) { return kSlack * s[2] + 64; }

std::vector<i64> out_sizes(i64 N, i64 C, const A3& S, int dims) {
  std::vector<i64> r{N, C};
  for (int i = 0; i < dims; ++i) r.push_back(S[3 - dims + i]);
  return r;
}

// Shared driver of kernel 1.
//   src: (N, Cred, *S) input of the correlation; direct=true: conv (off=-pad, stride s);
//   direct=false: transposed (zero-insertion by s, stride 1, flipped taps).
at::Tensor corr_op(const at::Tensor& src, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const Geom& g, bool weight_transposed, bool direct, bool out_rolls, i64 Cq, const A3& O) {
  auto src5 = as5(src);
  const i64 N = src5.size(0);
  at::Tensor out5 = at::empty({N, Cq, O[0], O[1], O[2]}, src5.options());
  A3 L, off, su, ks;
  for (int i = 0; i < 3; ++i) {
    if (direct) {
      L[i] = (O[i] - 1) * g.s[i] + g.d[i] * (g.k[i] - 1) + 1;
      off[i] = -g.p[i];
      su[i] = 1;
      ks[i] = g.s[i];
    } else {
      L[i] = O[i] + g.d[i] * (g.k[i] - 1);
      off[i] = g.p[i] - g.d[i] * (g.k[i] - 1);
      su[i] = g.s[i];
      ks[i] = 1;
    }
  }
  AT_DISPATCH_FLOATING_TYPES(src5.scalar_type(), "rolling_conv_cpu", [&] {
    std::vector<scalar_t> E = make_E<scalar_t>(weight, g, weight_transposed, /*flip=*/!direct);
    at::Tensor buf = make_buffer<scalar_t>(src5, L, off, su, slack_for(ks));
    at::Tensor bias_c;
    if (bias.has_value()) bias_c = bias->contiguous();
    CorrArgs<scalar_t> a;
    a.buf = buf.data_ptr<scalar_t>();
    a.Cred = src5.size(1);
    a.L = L;
    a.E = E.data();
    a.C = g.C;
    a.nb = g.nb;
    a.n_rolls = g.n_rolls;
    a.k = g.k;
    a.s = ks;
    a.d = g.d;
    a.out = out5.data_ptr<scalar_t>();
    a.Cq = Cq;
    a.O = O;
    a.bias = bias.has_value() ? bias_c.data_ptr<scalar_t>() : nullptr;
    a.out_rolls = out_rolls;
    run_corr<scalar_t>(a, N);
  });
  return out5.view(out_sizes(N, Cq, O, g.dims));
}

// ------------------------------------------------------------------------------------------
// a non-finite base in the transposed correlation
// ------------------------------------------------------------------------------------------
// The transposed correlation (the transposed conv's forward, the conv's grad_input) gathers over a
// zero-padded (and, for stride > 1, zero-inserted) buffer: every output meets zeros with the taps
// that reach it from no input voxel, so a NaN or Inf weight (x * 0 = NaN) would make outputs of its
// base non-finite that torch's transposed conv, which multiplies only the voxels a tap reaches,
// keeps finite (near the border; with stride > 1 everywhere). Such a base (a check over the small
// base only) runs torch's transposed conv of the expanded bank instead.
bool transposed_corr_nonfinite(const at::Tensor& weight) { return !at::isfinite(weight).all().item<bool>(); }

std::vector<i64> last_dims(const A3& v, int dims) { return std::vector<i64>(v.begin() + (3 - dims), v.end()); }

// The dense bank of the base: conv (n_rolls * nb, C, *k) from (nb, C, *k), transposed (C, n_rolls * nb, *k)
// from (C, nb, *k); channel o = r * nb + b reads base channel (c - r) mod C.
at::Tensor expanded_bank(const at::Tensor& weight, const Geom& g, bool transposed) {
  std::vector<at::Tensor> parts;
  for (i64 r = 0; r < g.n_rolls; ++r) parts.push_back(at::roll(weight, {r}, {transposed ? 0 : 1}));
  return at::cat(parts, transposed ? 1 : 0);
}

at::Tensor dense_transposed(const at::Tensor& src, const at::Tensor& bank, const std::optional<at::Tensor>& bias,
                            const Geom& g, const A3& O) {
  const A3 S = spatial3(src.sizes(), g.dims);
  A3 opad;
  for (int i = 0; i < 3; ++i) opad[i] = O[i] - ((S[i] - 1) * g.s[i] - 2 * g.p[i] + g.d[i] * (g.k[i] - 1) + 1);
  return at::convolution(src, bank, bias, last_dims(g.s, g.dims), last_dims(g.p, g.dims), last_dims(g.d, g.dims),
                         true, last_dims(opad, g.dims), 1).contiguous();
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, i64 Cq, const char* op) {
  if (!bias.has_value()) return;
  check_float_cpu(*bias, "bias", op);
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias has dtype ", bias->scalar_type(), " but x has ",
              x.scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Cq, op, ": bias must have shape [n_rolls * n_base] = [", Cq,
              "], got ", shape_str(bias->sizes()));
}

void check_pair(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb_, const char* op) {
  check_float_cpu(a, na, op);
  check_float_cpu(b, nb_, op);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", na, " has dtype ", a.scalar_type(), " but ", nb_,
              " has dtype ", b.scalar_type());
}

at::Tensor rolling_conv_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t n_rolls) {
  const char* op = "medconv::rolling_conv";
  check_pair(x, "x", weight, "weight", op);
  Geom g = make_geom(op, (int)x.dim(), weight.sizes(), false, x.size(1), stride, padding, dilation, n_rolls);
  const i64 Cq = g.n_rolls * g.nb;
  check_bias(bias, x, Cq, op);
  A3 O = conv_out(g, spatial3(x.sizes(), g.dims), op);
  return corr_op(x, weight, bias, g, false, true, true, Cq, O);
}

at::Tensor rolling_conv_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& weight, at::IntArrayRef input_size,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_grad_input";
  check_pair(grad_out, "grad_out", weight, "weight", op);
  TORCH_CHECK(input_size.size() == (size_t)grad_out.dim(), op, ": input_size ", input_size, " must have ",
              grad_out.dim(), " values like grad_out");
  Geom g = make_geom(op, (int)grad_out.dim(), weight.sizes(), false, input_size[1], stride, padding, dilation, n_rolls);
  TORCH_CHECK(input_size[0] >= 0, op, ": bad input_size ", input_size);
  A3 S = spatial3(input_size, g.dims);
  A3 O = conv_out(g, S, op);
  check_grad_shape(grad_out, input_size[0], g.n_rolls * g.nb, O, g.dims, op);
  if (transposed_corr_nonfinite(weight)) return dense_transposed(grad_out, expanded_bank(weight, g, false), std::nullopt, g, S);
  return corr_op(grad_out, weight, std::nullopt, g, false, false, false, g.C, S);
}

// Whether the first and last `e` values of every row (length L2) of buf are finite.
template <typename T>
bool edge_columns_finite(const T* buf, i64 rows, i64 L2, i64 e) {
  if (e <= 0) return true;
  e = std::min(e, L2);
  for (i64 row = 0; row < rows; ++row) {
    const T* r = buf + row * L2;
    T acc = T(0);  // x * 0 is NaN exactly for NaN and +-Inf
    for (i64 j = 0; j < e; ++j) acc += r[j] * T(0) + r[L2 - 1 - j] * T(0);
    if (acc != acc) return false;
  }
  return true;
}

// shared by both grad_weight ops: A (small spatial, indexed by p), Bsrc (indexed by p*s + t*d - pad)
at::Tensor gw_op(const at::Tensor& A, const at::Tensor& Bsrc, const Geom& g, bool transposed) {
  auto A5 = as5(A), B5 = as5(Bsrc);
  const i64 N = A5.size(0);
  A3 P{A5.size(2), A5.size(3), A5.size(4)}, L, off, su{1, 1, 1};
  for (int i = 0; i < 3; ++i) {
    L[i] = (P[i] - 1) * g.s[i] + g.d[i] * (g.k[i] - 1) + 1;
    off[i] = -g.p[i];
  }
  bool flat = g.s[1] == 1 && g.s[2] == 1 && P[1] > 1;
  const i64 T_ = g.taps();
  at::Tensor out = at::empty({g.nb, g.C, T_}, A5.options());
  AT_DISPATCH_FLOATING_TYPES(A5.scalar_type(), "rolling_conv_grad_weight_cpu", [&] {
    if (N == 0) {
      out.zero_();
      return;
    }
    // flat runs read up to (k2 - 1) * d2 past the last row of B
    at::Tensor buf = make_buffer<scalar_t>(B5, L, off, su, slack_for(g.s) + (g.k[2] - 1) * g.d[2]);
    // The flat runs multiply the zero columns of A by the B columns that no tap reads in torch's
    // gradient (the first and last (k2 - 1) * d2 columns of each B row): a NaN or Inf there would
    // give NaN * 0 = NaN in entries that torch keeps finite. Such a B runs row by row instead
    // (a scan of 2 (k2 - 1) d2 values per row, negligible beside the gradient itself).
    if (flat && !edge_columns_finite<scalar_t>(buf.data_ptr<scalar_t>(), B5.size(0) * B5.size(1) * L[0] * L[1], L[2],
                                               (g.k[2] - 1) * g.d[2]))
      flat = false;
    at::Tensor abuf = A5;
    A3 PA = P;
    if (flat) {  // A with rows of length L2, zero beyond P2 (see GwArgs::flat)
      PA[2] = L[2];
      abuf = make_buffer<scalar_t>(A5, PA, A3{0, 0, 0}, su, 0);
    }
    GwArgs<scalar_t> a;
    a.A = abuf.data_ptr<scalar_t>();
    a.CA = A5.size(1);
    a.P = PA;
    a.B = buf.data_ptr<scalar_t>();
    a.CB = B5.size(1);
    a.L = L;
    a.N = N;
    a.C = g.C;
    a.nb = g.nb;
    a.n_rolls = g.n_rolls;
    a.transposed = transposed;
    a.flat = flat;
    a.k = g.k;
    a.s = g.s;
    a.d = g.d;
    a.out = out.data_ptr<scalar_t>();
    run_gw<scalar_t>(a);
  });
  std::vector<i64> ksz;
  for (int i = 0; i < g.dims; ++i) ksz.push_back(g.k[3 - g.dims + i]);
  std::vector<i64> shape{g.nb, g.C};
  shape.insert(shape.end(), ksz.begin(), ksz.end());
  at::Tensor w = out.view(shape);
  if (transposed) w = w.transpose(0, 1).contiguous();  // (C, nb, *k)
  return w;
}

at::Tensor rolling_conv_grad_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef weight_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_grad_weight";
  check_pair(grad_out, "grad_out", x, "x", op);
  TORCH_CHECK(grad_out.dim() == x.dim(), op, ": grad_out has ", grad_out.dim(), " dims but x has ", x.dim());
  Geom g = make_geom(op, (int)x.dim(), weight_size, false, x.size(1), stride, padding, dilation, n_rolls);
  A3 O = conv_out(g, spatial3(x.sizes(), g.dims), op);
  check_grad_shape(grad_out, x.size(0), g.n_rolls * g.nb, O, g.dims, op);
  return gw_op(grad_out, x, g, false);
}

at::Tensor rolling_conv_transpose_cpu(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef output_padding,
                                      at::IntArrayRef dilation, int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_transpose";
  check_pair(x, "x", weight, "weight", op);
  Geom g = make_geom(op, (int)x.dim(), weight.sizes(), true, x.size(1), stride, padding, dilation, n_rolls);
  const i64 Cq = g.n_rolls * g.nb;
  check_bias(bias, x, Cq, op);
  A3 opad = expand3(output_padding, g.dims, 0, "output_padding", op);
  A3 S = spatial3(x.sizes(), g.dims), O = convt_out_base(g, S);
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(opad[i] >= 0 && opad[i] < std::max(g.s[i], g.d[i]), op,
                ": output_padding must satisfy 0 <= output_padding < max(stride, dilation), got ", output_padding);
    O[i] += opad[i];
    TORCH_CHECK(O[i] >= 1, op, ": the output would be empty (spatial size ", O[i], "); reduce padding");
  }
  if (transposed_corr_nonfinite(weight)) return dense_transposed(x, expanded_bank(weight, g, true), bias, g, O);
  return corr_op(x, weight, bias, g, true, false, true, Cq, O);
}

at::Tensor rolling_conv_transpose_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& weight,
                                                 at::IntArrayRef input_size, at::IntArrayRef stride,
                                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_transpose_grad_input";
  check_pair(grad_out, "grad_out", weight, "weight", op);
  TORCH_CHECK(input_size.size() == (size_t)grad_out.dim(), op, ": input_size ", input_size, " must have ",
              grad_out.dim(), " values like grad_out");
  Geom g = make_geom(op, (int)grad_out.dim(), weight.sizes(), true, input_size[1], stride, padding, dilation, n_rolls);
  TORCH_CHECK(input_size[0] >= 0 && grad_out.size(0) == input_size[0], op, ": grad_out has batch ", grad_out.size(0),
              " but input_size is ", input_size);
  TORCH_CHECK(grad_out.size(1) == g.n_rolls * g.nb, op, ": grad_out has ", grad_out.size(1),
              " channels, expected n_rolls * n_base = ", g.n_rolls * g.nb);
  A3 S = spatial3(input_size, g.dims);
  check_convt_out(g, S, spatial3(grad_out.sizes(), g.dims), op);
  return corr_op(grad_out, weight, std::nullopt, g, true, true, false, g.C, S);
}

at::Tensor rolling_conv_transpose_grad_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                  at::IntArrayRef weight_size, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t n_rolls) {
  const char* op = "medconv::rolling_conv_transpose_grad_weight";
  check_pair(grad_out, "grad_out", x, "x", op);
  TORCH_CHECK(grad_out.dim() == x.dim(), op, ": grad_out has ", grad_out.dim(), " dims but x has ", x.dim());
  Geom g = make_geom(op, (int)x.dim(), weight_size, true, x.size(1), stride, padding, dilation, n_rolls);
  TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) == g.n_rolls * g.nb, op, ": grad_out has shape ",
              shape_str(grad_out.sizes()), ", expected batch ", x.size(0), " and n_rolls * n_base = ",
              g.n_rolls * g.nb, " channels");
  check_convt_out(g, spatial3(x.sizes(), g.dims), spatial3(grad_out.sizes(), g.dims), op);
  return gw_op(x, grad_out, g, true);
}

}  // namespace
}  // namespace medconv

TORCH_LIBRARY_IMPL(medconv, CPU, m) {
  m.impl("rolling_conv", &medconv::rolling_conv_cpu);
  m.impl("rolling_conv_grad_input", &medconv::rolling_conv_grad_input_cpu);
  m.impl("rolling_conv_grad_weight", &medconv::rolling_conv_grad_weight_cpu);
  m.impl("rolling_conv_transpose", &medconv::rolling_conv_transpose_cpu);
  m.impl("rolling_conv_transpose_grad_input", &medconv::rolling_conv_transpose_grad_input_cpu);
  m.impl("rolling_conv_transpose_grad_weight", &medconv::rolling_conv_transpose_grad_weight_cpu);
}
