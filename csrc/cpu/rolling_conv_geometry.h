// Geometry and argument checks shared by the CPU rolling-conv kernels (the direct kernels in
// rolling_conv.cpp and the fused spectral kernel in rolling_conv_spectral.cpp). The compiled ops
// check their arguments themselves (the Python layer checks too), so direct torch.ops calls are safe.
// Spatial sizes are held as 3 internal dims; `pos` says where spatial dim i of a `dims`-dim
// tensor goes (default: trailing, the leading dims have size 1).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>

namespace medconv {
namespace cpu_geom {

using i64 = int64_t;
using A3 = std::array<i64, 3>;
using PosFn = int (*)(int dims, int i);

inline int pos_trailing(int dims, int i) { return 3 - dims + i; }

inline std::string shape_str(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// Expands an int[] of length 1 or `dims` to the 3 internal dims (the others get `fill`).
inline A3 expand3(at::IntArrayRef v, int dims, i64 fill, const char* name, const char* op,
                  PosFn pos = pos_trailing) {
  TORCH_CHECK(v.size() == 1 || (int)v.size() == dims, op, ": ", name, " must have 1 or ", dims,
              " values, got ", v.size());
  A3 r{fill, fill, fill};
  for (int i = 0; i < dims; ++i) r[pos(dims, i)] = v.size() == 1 ? v[0] : v[i];
  return r;
}

// Spatial sizes of an (N, C, *spatial) tensor as the 3 internal dims (the others 1).
inline A3 spatial3(at::IntArrayRef sizes, int dims, PosFn pos = pos_trailing) {
  A3 r{1, 1, 1};
  for (int i = 0; i < dims; ++i) r[pos(dims, i)] = sizes[2 + i];
  return r;
}

struct Geom {
  int dims = 0;
  i64 N = 0, C = 0, nb = 0, n_rolls = 0;
  A3 k{1, 1, 1}, s{1, 1, 1}, p{0, 0, 0}, d{1, 1, 1};
  i64 taps() const { return k[0] * k[1] * k[2]; }
};

// allow_bf16: the fused spectral kernel also reads and writes bfloat16 (computing in float32).
inline void check_float_cpu(const at::Tensor& t, const char* name, const char* op, bool allow_bf16 = false) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || (allow_bf16 && st == at::kBFloat16), op, ": ", name,
              allow_bf16 ? " must be float32, float64 or bfloat16 on the CPU, got " : " must be float32 or float64 on the CPU, got ",
              st);
}

// Common checks: rank, weight sizes, n_rolls, stride/padding/dilation.
// weight_sizes is (n_base, C_in, *k) for a conv, (C_in, n_base, *k) for a transposed conv.
inline Geom make_geom(const char* op, int rank, at::IntArrayRef weight_sizes, bool transposed, i64 C,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, i64 n_rolls,
                      PosFn pos = pos_trailing) {
  TORCH_CHECK(rank >= 3 && rank <= 5, op, ": expected 3, 4 or 5 dims (N, C, *spatial), got ", rank);
  TORCH_CHECK((int)weight_sizes.size() == rank, op, ": weight must have ", rank, " dims, got shape ",
              shape_str(weight_sizes));
  Geom g;
  g.dims = rank - 2;
  g.C = C;
  g.nb = transposed ? weight_sizes[1] : weight_sizes[0];
  const i64 wc = transposed ? weight_sizes[0] : weight_sizes[1];
  TORCH_CHECK(wc == C, op, ": input has C_in=", C, " channels but weight has C_in=", wc, " (weight shape ",
              shape_str(weight_sizes), ")");
  TORCH_CHECK(C >= 1 && g.nb >= 1, op, ": C_in and n_base must be >= 1, got weight shape ", shape_str(weight_sizes));
  for (int i = 0; i < g.dims; ++i) {
    TORCH_CHECK(weight_sizes[2 + i] >= 1, op, ": kernel sizes must be >= 1, got weight shape ", shape_str(weight_sizes));
    g.k[pos(g.dims, i)] = weight_sizes[2 + i];
  }
  g.s = expand3(stride, g.dims, 1, "stride", op, pos);
  g.p = expand3(padding, g.dims, 0, "padding", op, pos);
  g.d = expand3(dilation, g.dims, 1, "dilation", op, pos);
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(g.s[i] >= 1, op, ": stride must be >= 1, got ", stride);
    TORCH_CHECK(g.d[i] >= 1, op, ": dilation must be >= 1, got ", dilation);
    TORCH_CHECK(g.p[i] >= 0, op, ": padding must be >= 0, got ", padding);
  }
  TORCH_CHECK(n_rolls >= 1 && n_rolls <= C, op, ": n_rolls must satisfy 1 <= n_rolls <= C_in=", C, ", got ", n_rolls);
  g.n_rolls = n_rolls;
  return g;
}

inline A3 conv_out(const Geom& g, const A3& in, const char* op) {
  A3 o;
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(in[i] + 2 * g.p[i] >= g.d[i] * (g.k[i] - 1) + 1, op, ": the kernel (extent ",
                g.d[i] * (g.k[i] - 1) + 1, ") is larger than the padded input (size ", in[i], " + 2*padding ", g.p[i],
                ")");
    o[i] = (in[i] + 2 * g.p[i] - g.d[i] * (g.k[i] - 1) - 1) / g.s[i] + 1;
  }
  return o;
}

// Transposed output size without output_padding.
inline A3 convt_out_base(const Geom& g, const A3& in) {
  A3 o;
  for (int i = 0; i < 3; ++i) o[i] = (in[i] - 1) * g.s[i] - 2 * g.p[i] + g.d[i] * (g.k[i] - 1) + 1;
  return o;
}

inline void check_convt_out(const Geom& g, const A3& in, const A3& out, const char* op) {
  const A3 base = convt_out_base(g, in);
  for (int i = 0; i < 3; ++i) {
    const i64 op_ = out[i] - base[i];
    TORCH_CHECK(out[i] >= 1 && op_ >= 0 && op_ < std::max(g.s[i], g.d[i]), op, ": the transposed-conv output size ",
                out[i], " along a spatial dim does not match input size ", in[i], " (expected ", base[i],
                " + output_padding, 0 <= output_padding < max(stride, dilation))");
  }
}

}  // namespace cpu_geom
}  // namespace medconv
