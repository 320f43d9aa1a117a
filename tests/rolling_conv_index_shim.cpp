// CPU shim for tests/test_rolling_conv_cuda_index.py: the CUDA kernels' per-element math, run
// sequentially with the exact index functions and op-to-kernel table of csrc/cuda/rolling_conv_index.cuh.
// Built by the test with the host C++ compiler; never part of the extension.
#include <cstdint>

#include "cuda/rolling_conv_index.cuh"

using medconv::Geom;
using medconv::RollW;

static Geom geom_from(const int64_t* v) {  // lo[3], hi[3], k[3], s[3], p[3], d[3]
  Geom g;
  for (int i = 0; i < 3; ++i) {
    g.lo[i] = v[i]; g.hi[i] = v[3 + i]; g.k[i] = v[6 + i]; g.s[i] = v[9 + i]; g.p[i] = v[12 + i]; g.d[i] = v[15 + i];
  }
  return g;
}

extern "C" {

// out (N, A, out grid) = the GEMM kernel for op 0..3 (see gemm_mode), in float64.
void gemm_ref(double* out, const double* in, const double* w, const double* bias, int64_t N, int64_t A, int64_t E,
              const int64_t* geom, int transposed, int64_t base0, int64_t base1, int64_t n_rolls, int op) {
  const Geom g = geom_from(geom);
  const RollW rw = medconv::make_roll_w(transposed != 0, base0, base1, n_rolls, g.k[0] * g.k[1] * g.k[2]);
  const medconv::GemmMode mode = medconv::gemm_mode(op);
  const int64_t* og = mode.inverse ? g.hi : g.lo;
  const int64_t P_out = og[0] * og[1] * og[2];
  const int64_t P_in = mode.inverse ? g.lo[0] * g.lo[1] * g.lo[2] : g.hi[0] * g.hi[1] * g.hi[2];
  const int64_t k12 = g.k[1] * g.k[2];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t a = 0; a < A; ++a)
      for (int64_t p = 0; p < P_out; ++p) {
        const int64_t q2 = p % og[2], rest = p / og[2], q1 = rest % og[1], q0 = rest / og[1];
        double acc = bias ? bias[a] : 0.0;
        for (int64_t t = 0; t < rw.T; ++t) {
          const int64_t t0 = t / k12, t1 = (t / g.k[2]) % g.k[1], t2 = t % g.k[2];
          const int64_t src = mode.inverse ? medconv::lo_position(g, q0, q1, q2, t0, t1, t2)
                                           : medconv::hi_position(g, q0, q1, q2, t0, t1, t2);
          if (src < 0) continue;
          for (int64_t e = 0; e < E; ++e) {
            const int64_t wo = mode.a_is_roll ? medconv::weight_offset(a, e, t, rw) : medconv::weight_offset(e, a, t, rw);
            acc += w[wo] * in[(n * E + e) * P_in + src];
          }
        }
        out[(n * A + a) * P_out + p] = acc;
      }
}

// gw (base layout): the grad_weight kernel's sum, in float64.
void grad_weight_ref(double* gw, const double* roll_t, const double* chan_t, int64_t N, const int64_t* geom,
                     int transposed, int64_t base0, int64_t base1, int64_t n_rolls) {
  const Geom g = geom_from(geom);
  const RollW rw = medconv::make_roll_w(transposed != 0, base0, base1, n_rolls, g.k[0] * g.k[1] * g.k[2]);
  const bool roll_is_lo = medconv::grad_weight_roll_is_lo(transposed != 0);
  const int64_t P_lo = g.lo[0] * g.lo[1] * g.lo[2], P_hi = g.hi[0] * g.hi[1] * g.hi[2];
  const int64_t P_R = roll_is_lo ? P_lo : P_hi, P_C = roll_is_lo ? P_hi : P_lo;
  const int64_t CR = rw.n_rolls * rw.nb, k12 = g.k[1] * g.k[2];
  for (int64_t b = 0; b < rw.nb; ++b)
    for (int64_t m = 0; m < rw.C; ++m)
      for (int64_t t = 0; t < rw.T; ++t) {
        const int64_t t0 = t / k12, t1 = (t / g.k[2]) % g.k[1], t2 = t % g.k[2];
        double acc = 0.0;
        for (int64_t j = 0; j < N * P_lo; ++j) {
          const int64_t n = j / P_lo, p = j - n * P_lo;
          const int64_t l2 = p % g.lo[2], rest = p / g.lo[2], l1 = rest % g.lo[1], l0 = rest / g.lo[1];
          const int64_t h = medconv::hi_position(g, l0, l1, l2, t0, t1, t2);
          if (h < 0) continue;
          const int64_t pos_R = roll_is_lo ? p : h, pos_C = roll_is_lo ? h : p;
          int64_t cm = m;
          for (int64_t r = 0; r < rw.n_rolls; ++r) {
            acc += roll_t[(n * CR + r * rw.nb + b) * P_R + pos_R] * chan_t[(n * rw.C + cm) * P_C + pos_C];
            cm = cm + 1 == rw.C ? 0 : cm + 1;
          }
        }
        gw[b * rw.sb + m * rw.sc + t] = acc;
      }
}

}  // extern "C"
