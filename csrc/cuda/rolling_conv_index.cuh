// Index formulas of the rolling-convolution CUDA kernels (csrc/cuda/rolling_conv.cu), in a header that
// also compiles as plain C++: tests/test_rolling_conv_cuda_index.py builds it with the host compiler
// and checks these exact functions, driven by the same op-to-kernel table, against the float64
// reference on the CPU (the kernels themselves need a GPU).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MEDCONV_HD __host__ __device__ __forceinline__
#else
#define MEDCONV_HD inline
#endif

namespace medconv {

// Geometry in conv terms, always 3D: `lo` is the conv-output side (y of conv, x of the transposed
// conv), `hi` the conv-input side; hi position = lo position * s + t * d - pad.
struct Geom {
  int64_t lo[3], hi[3], k[3], s[3], p[3], d[3];
};

// Where the logical weight G[o, c, t] lives in the base.
struct RollW {
  int64_t C;       // channels that roll (C_in of the op)
  int64_t nb;      // n_base
  int64_t n_rolls;
  int64_t sb, sc;  // base strides of b and of the rolled channel
  int64_t T;       // taps = kD * kH * kW
};

MEDCONV_HD int64_t rolled_channel(int64_t c, int64_t r, int64_t C) {
  // (c - r) mod C for 0 <= c < C, 0 <= r < C
  const int64_t cc = c - r;
  return cc < 0 ? cc + C : cc;
}

MEDCONV_HD int64_t weight_offset(int64_t o, int64_t c, int64_t t, const RollW& w) {
  const int64_t r = o / w.nb, b = o - r * w.nb;
  return b * w.sb + rolled_channel(c, r, w.C) * w.sc + t;
}

// Position in the hi (conv-input) grid read by lo position (d0, d1, d2) at tap (t0, t1, t2);
// -1 when it falls into the padding.
MEDCONV_HD int64_t hi_position(const Geom& g, int64_t d0, int64_t d1, int64_t d2, int64_t t0, int64_t t1,
                               int64_t t2) {
  const int64_t i0 = d0 * g.s[0] + t0 * g.d[0] - g.p[0];
  const int64_t i1 = d1 * g.s[1] + t1 * g.d[1] - g.p[1];
  const int64_t i2 = d2 * g.s[2] + t2 * g.d[2] - g.p[2];
  if (i0 < 0 || i0 >= g.hi[0] || i1 < 0 || i1 >= g.hi[1] || i2 < 0 || i2 >= g.hi[2]) return -1;
  return (i0 * g.hi[1] + i1) * g.hi[2] + i2;
}

// Position in the lo grid that reads hi position (h0, h1, h2) at tap (t0, t1, t2) (the inverse of
// hi_position: p = (i + pad - t*d) / s when divisible); -1 when there is none.
MEDCONV_HD int64_t lo_position(const Geom& g, int64_t h0, int64_t h1, int64_t h2, int64_t t0, int64_t t1,
                               int64_t t2) {
  const int64_t q0 = h0 + g.p[0] - t0 * g.d[0];
  const int64_t q1 = h1 + g.p[1] - t1 * g.d[1];
  const int64_t q2 = h2 + g.p[2] - t2 * g.d[2];
  if (q0 < 0 || q1 < 0 || q2 < 0) return -1;
  if (q0 % g.s[0] != 0 || q1 % g.s[1] != 0 || q2 % g.s[2] != 0) return -1;
  const int64_t l0 = q0 / g.s[0], l1 = q1 / g.s[1], l2 = q2 / g.s[2];
  if (l0 >= g.lo[0] || l1 >= g.lo[1] || l2 >= g.lo[2]) return -1;
  return (l0 * g.lo[1] + l1) * g.lo[2] + l2;
}

// Strides of the base: conv base (n_base, C, *k): (sb, sc) = (C*T, T); transposed base (C, n_base, *k):
// (sb, sc) = (T, n_base*T). `s0, s1` are the base's first two sizes.
inline RollW make_roll_w(bool transposed, int64_t s0, int64_t s1, int64_t n_rolls, int64_t T) {
  RollW rw;
  rw.T = T;
  rw.C = transposed ? s0 : s1;
  rw.nb = transposed ? s1 : s0;
  rw.n_rolls = n_rolls;
  rw.sb = transposed ? T : rw.C * T;
  rw.sc = transposed ? rw.nb * T : T;
  return rw;
}

// The op-to-kernel table (see the top of rolling_conv.cu). op: 0 conv, 1 conv grad_input,
// 2 transposed, 3 transposed grad_input -> the GEMM kernel's flags.
struct GemmMode {
  bool a_is_roll;  // output channel is the roll side o = r * n_base + b
  bool inverse;    // output on the hi grid, window inverted
};
inline GemmMode gemm_mode(int op) {
  switch (op) {
    case 0: return {true, false};
    case 1: return {false, true};
    case 2: return {true, true};
    default: return {false, false};
  }
}
// grad_weight: the roll-side tensor (grad_out) is on the lo grid for the conv, on the hi grid for the
// transposed conv.
inline bool grad_weight_roll_is_lo(bool transposed) { return !transposed; }

}  // namespace medconv
