// Involution on the CPU (docs/design.md §2): forward, grad_input and grad_weight, 2D and 3D,
// float32 and float64.
//
//   out[n, c, p] = sum_t weight[n, g(c), t, p] * x[n, c, p*s + t*d - pad],  g(c) = c / (C / G)
//
// 2D runs as 3D with depth 1 (D = KD = 1, stride/dilation 1, padding 0), so there is one code
// path. Work is split into "rows": one (n, g, depth, height) index of the tensor being written,
// covering all C/G channels of the group. Every output element is written by exactly one task
// in a fixed order: no atomics, results do not depend on the thread count. Within a task the
// loop order is tap -> channel -> width, so one weight row (W_out values) stays in L1 while it
// is reused by the C/G channels of its group, and x / grad_out rows are read contiguously
// (unit stride when the width stride is 1, which the compiler vectorizes). No unfold buffer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace medconv {
namespace {

struct InvGeom {
  int64_t dims = 2;
  int64_t N = 0, C = 0, G = 1, cpg = 0;  // cpg: channels per group
  int64_t D = 1, H = 1, W = 1;           // input spatial size
  int64_t Do = 1, Ho = 1, Wo = 1;        // output spatial size
  int64_t KD = 1, KH = 1, KW = 1;
  int64_t sd = 1, sh = 1, sw = 1;
  int64_t pd = 0, ph = 0, pw = 0;
  int64_t dd = 1, dh = 1, dw = 1;
};

int64_t out_size(int64_t n, int64_t k, int64_t s, int64_t p, int64_t d) {
  // floor division: the numerator is >= 0 whenever the kernel fits (checked by the caller)
  return (n + 2 * p - d * (k - 1) - 1) / s + 1;
}

// Parses and checks the geometry. `spatial` is the input spatial size (2 or 3 values).
InvGeom make_geom(const char* op, int64_t N, int64_t C, int64_t G, at::IntArrayRef spatial,
                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation) {
  const int64_t dims = static_cast<int64_t>(spatial.size());
  TORCH_CHECK(dims == 2 || dims == 3, op, ": expected 2 or 3 spatial dims, got ", dims);
  TORCH_CHECK(static_cast<int64_t>(kernel_size.size()) == dims && static_cast<int64_t>(stride.size()) == dims &&
                  static_cast<int64_t>(padding.size()) == dims && static_cast<int64_t>(dilation.size()) == dims,
              op, ": kernel_size, stride, padding and dilation must have ", dims, " values each, got ",
              kernel_size, ", ", stride, ", ", padding, ", ", dilation);
  TORCH_CHECK(G >= 1, op, ": the number of groups G must be >= 1, got ", G);
  TORCH_CHECK(C >= 1 && C % G == 0, op, ": C=", C, " must be a positive multiple of G=", G);
  TORCH_CHECK(N >= 0, op, ": negative batch size");
  InvGeom g;
  g.dims = dims;
  g.N = N;
  g.C = C;
  g.G = G;
  g.cpg = C / G;
  int64_t in[3] = {1, 1, 1}, k[3] = {1, 1, 1}, s[3] = {1, 1, 1}, p[3] = {0, 0, 0}, d[3] = {1, 1, 1}, o[3] = {1, 1, 1};
  const int64_t off = 3 - dims;
  for (int64_t i = 0; i < dims; ++i) {
    in[off + i] = spatial[i];
    k[off + i] = kernel_size[i];
    s[off + i] = stride[i];
    p[off + i] = padding[i];
    d[off + i] = dilation[i];
    TORCH_CHECK(spatial[i] >= 1, op, ": input spatial sizes must be >= 1, got ", spatial);
    TORCH_CHECK(kernel_size[i] >= 1 && stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0, op,
                ": need kernel_size >= 1, stride >= 1, dilation >= 1, padding >= 0; got kernel_size=",
                kernel_size, " stride=", stride, " padding=", padding, " dilation=", dilation);
    TORCH_CHECK(spatial[i] + 2 * padding[i] >= dilation[i] * (kernel_size[i] - 1) + 1, op,
                ": the kernel (extent ", dilation[i] * (kernel_size[i] - 1) + 1,
                ") is larger than the padded input (", spatial[i] + 2 * padding[i], ") along spatial dim ", i);
    o[off + i] = out_size(spatial[i], kernel_size[i], stride[i], padding[i], dilation[i]);
  }
  g.D = in[0]; g.H = in[1]; g.W = in[2];
  g.KD = k[0]; g.KH = k[1]; g.KW = k[2];
  g.sd = s[0]; g.sh = s[1]; g.sw = s[2];
  g.pd = p[0]; g.ph = p[1]; g.pw = p[2];
  g.dd = d[0]; g.dh = d[1]; g.dw = d[2];
  g.Do = o[0]; g.Ho = o[1]; g.Wo = o[2];
  return g;
}

std::vector<int64_t> out_spatial(const InvGeom& g) {
  if (g.dims == 2) return {g.Ho, g.Wo};
  return {g.Do, g.Ho, g.Wo};
}

std::vector<int64_t> weight_shape(const InvGeom& g) {
  std::vector<int64_t> s = {g.N, g.G};
  if (g.dims == 3) s.push_back(g.KD);
  s.push_back(g.KH);
  s.push_back(g.KW);
  for (int64_t v : out_spatial(g)) s.push_back(v);
  return s;
}

void check_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64 on the CPU, got ", t.scalar_type());
}

void check_shape(const char* op, const char* name, const at::Tensor& t, const std::vector<int64_t>& expected) {
  TORCH_CHECK(t.sizes().vec() == expected, op, ": ", name, " must have shape ", at::IntArrayRef(expected),
              ", got ", t.sizes());
}

// The output positions wo in [lo, hi) whose input position wo*s + off lies in [0, n).
inline void valid_range(int64_t off, int64_t s, int64_t n, int64_t n_out, int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + s - 1) / s;
  hi = (n - 1 - off) >= 0 ? (n - 1 - off) / s + 1 : 0;
  hi = std::min(hi, n_out);
  if (lo > hi) lo = hi;
}

// o[wo] += v[wo] * 0 for the output positions outside [lo, hi), whose tap reads the zero
// padding: torch's unfold multiplies the padding, so a NaN or Inf v gives NaN there (a finite v
// adds 0). Border positions only: no cost inside the image.
template <typename scalar_t>
__attribute__((noinline, cold)) void add_times_padding(scalar_t* __restrict__ o, const scalar_t* __restrict__ v, int64_t lo, int64_t hi,
                              int64_t n_out) {
  if (lo >= hi) lo = hi = n_out;
  for (int64_t wo = 0; wo < lo; ++wo) o[wo] += v[wo] * scalar_t(0);
  for (int64_t wo = hi; wo < n_out; ++wo) o[wo] += v[wo] * scalar_t(0);
}

// Whether v[wo] * 0 is NaN (v non-finite) for some wo outside [lo, hi): then the padding terms are added.
template <typename scalar_t>
inline bool padding_nonfinite(const scalar_t* __restrict__ v, int64_t lo, int64_t hi, int64_t n_out) {
  if (lo >= hi) lo = hi = n_out;
  scalar_t acc = scalar_t(0);
  for (int64_t wo = 0; wo < lo; ++wo) acc += v[wo] * scalar_t(0);
  for (int64_t wo = hi; wo < n_out; ++wo) acc += v[wo] * scalar_t(0);
  return acc != acc;
}

// Grain: aim for tasks of at least ~32k multiply-adds so scheduling overhead stays small.
int64_t grain_for(int64_t per_task) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_task)); }

// ---------------------------------------------------------------------------- forward
template <typename scalar_t>
void forward_kernel(const InvGeom& g, const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                    scalar_t* __restrict__ out) {
  const int64_t taps = g.KD * g.KH * g.KW;
  const int64_t out_plane = g.Do * g.Ho * g.Wo;
  const int64_t in_plane = g.D * g.H * g.W;
  const int64_t rows = g.N * g.G * g.Do * g.Ho;
  at::parallel_for(0, rows, grain_for(g.cpg * taps * g.Wo), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t oh = r % g.Ho;
      const int64_t od = (r / g.Ho) % g.Do;
      const int64_t ng = r / (g.Ho * g.Do);  // n * G + grp
      const int64_t n = ng / g.G, grp = ng % g.G;
      const int64_t row_off = (od * g.Ho + oh) * g.Wo;
      const int64_t c0 = n * g.C + grp * g.cpg;  // first (n, c) plane of the group
      for (int64_t c = 0; c < g.cpg; ++c) {
        scalar_t* o = out + (c0 + c) * out_plane + row_off;
        std::fill(o, o + g.Wo, scalar_t(0));
      }
      for (int64_t kd = 0; kd < g.KD; ++kd) {
        const int64_t id = od * g.sd + kd * g.dd - g.pd;
        const bool d_ok = id >= 0 && id < g.D;
        for (int64_t kh = 0; kh < g.KH; ++kh) {
          const int64_t ih = oh * g.sh + kh * g.dh - g.ph;
          const bool ok = d_ok && ih >= 0 && ih < g.H;
          for (int64_t kw = 0; kw < g.KW; ++kw) {
            const int64_t off = kw * g.dw - g.pw;
            int64_t lo = 0, hi = 0;
            if (ok) valid_range(off, g.sw, g.W, g.Wo, lo, hi);
            const int64_t t = (kd * g.KH + kh) * g.KW + kw;
            const scalar_t* __restrict__ wr = w + (ng * taps + t) * out_plane + row_off;
            // the padding terms w * 0 are the same for every channel of the group: added only when nonzero
            if (padding_nonfinite(wr, lo, hi, g.Wo))
              for (int64_t c = 0; c < g.cpg; ++c) add_times_padding(out + (c0 + c) * out_plane + row_off, wr, lo, hi, g.Wo);
            if (lo >= hi) continue;
            for (int64_t c = 0; c < g.cpg; ++c) {
              const scalar_t* __restrict__ xr = x + (c0 + c) * in_plane + (id * g.H + ih) * g.W + off;
              scalar_t* __restrict__ o = out + (c0 + c) * out_plane + row_off;
              if (g.sw == 1) {
                for (int64_t wo = lo; wo < hi; ++wo) o[wo] += wr[wo] * xr[wo];
              } else {
                const int64_t sw = g.sw;
                for (int64_t wo = lo; wo < hi; ++wo) o[wo] += wr[wo] * xr[wo * sw];
              }
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------- grad_input
// Gather form: task = one input row (n, g, id, ih) of all C/G channels; it visits the
// (tap, output row) pairs that read this input row. Along the width, distinct wo map to
// distinct input positions for a fixed tap, so the row is written by this task alone.
template <typename scalar_t>
void grad_input_kernel(const InvGeom& g, const scalar_t* __restrict__ gy, const scalar_t* __restrict__ w,
                       scalar_t* __restrict__ gx) {
  const int64_t taps = g.KD * g.KH * g.KW;
  const int64_t out_plane = g.Do * g.Ho * g.Wo;
  const int64_t in_plane = g.D * g.H * g.W;
  const int64_t rows = g.N * g.G * g.D * g.H;
  at::parallel_for(0, rows, grain_for(g.cpg * taps * g.W), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ih = r % g.H;
      const int64_t id = (r / g.H) % g.D;
      const int64_t ng = r / (g.H * g.D);
      const int64_t n = ng / g.G, grp = ng % g.G;
      const int64_t in_row = (id * g.H + ih) * g.W;
      const int64_t c0 = n * g.C + grp * g.cpg;
      for (int64_t c = 0; c < g.cpg; ++c) {
        scalar_t* o = gx + (c0 + c) * in_plane + in_row;
        std::fill(o, o + g.W, scalar_t(0));
      }
      for (int64_t kd = 0; kd < g.KD; ++kd) {
        const int64_t nd = id + g.pd - kd * g.dd;  // = od * sd
        if (nd < 0 || nd % g.sd != 0) continue;
        const int64_t od = nd / g.sd;
        if (od >= g.Do) continue;
        for (int64_t kh = 0; kh < g.KH; ++kh) {
          const int64_t nh = ih + g.ph - kh * g.dh;
          if (nh < 0 || nh % g.sh != 0) continue;
          const int64_t oh = nh / g.sh;
          if (oh >= g.Ho) continue;
          const int64_t row_off = (od * g.Ho + oh) * g.Wo;
          for (int64_t kw = 0; kw < g.KW; ++kw) {
            const int64_t off = kw * g.dw - g.pw;
            int64_t lo, hi;
            valid_range(off, g.sw, g.W, g.Wo, lo, hi);
            if (lo >= hi) continue;
            const int64_t t = (kd * g.KH + kh) * g.KW + kw;
            const scalar_t* __restrict__ wr = w + (ng * taps + t) * out_plane + row_off;
            for (int64_t c = 0; c < g.cpg; ++c) {
              const scalar_t* __restrict__ gr = gy + (c0 + c) * out_plane + row_off;
              scalar_t* __restrict__ o = gx + (c0 + c) * in_plane + in_row + off;
              if (g.sw == 1) {
                for (int64_t wo = lo; wo < hi; ++wo) o[wo] += wr[wo] * gr[wo];
              } else {
                const int64_t sw = g.sw;
                for (int64_t wo = lo; wo < hi; ++wo) o[wo * sw] += wr[wo] * gr[wo];
              }
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------- grad_weight
// Gather form: task = one output row (n, g, od, oh); for each tap it reduces over the C/G
// channels of the group into the weight row, which stays in L1.
template <typename scalar_t>
void grad_weight_kernel(const InvGeom& g, const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                        scalar_t* __restrict__ gw) {
  const int64_t taps = g.KD * g.KH * g.KW;
  const int64_t out_plane = g.Do * g.Ho * g.Wo;
  const int64_t in_plane = g.D * g.H * g.W;
  const int64_t rows = g.N * g.G * g.Do * g.Ho;
  // the output columns where some tap reads the padding: [0, lo_max) and [hi_min, Wo)
  int64_t lo_max = 0, hi_min = g.Wo;
  for (int64_t kw = 0; kw < g.KW; ++kw) {
    int64_t lo, hi;
    valid_range(kw * g.dw - g.pw, g.sw, g.W, g.Wo, lo, hi);
    if (lo >= hi) lo = hi = g.Wo;
    lo_max = std::max(lo_max, lo);
    hi_min = std::min(hi_min, hi);
  }
  if (lo_max > hi_min) hi_min = lo_max;
  at::parallel_for(0, rows, grain_for(g.cpg * taps * g.Wo), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t oh = r % g.Ho;
      const int64_t od = (r / g.Ho) % g.Do;
      const int64_t ng = r / (g.Ho * g.Do);
      const int64_t n = ng / g.G, grp = ng % g.G;
      const int64_t row_off = (od * g.Ho + oh) * g.Wo;
      const int64_t c0 = n * g.C + grp * g.cpg;
      // Is grad_out non-finite at a position of this row where some tap reads the padding? (Only then
      // are the padding terms gy * 0 added.) Inside the image only the border columns are checked; a
      // row with a tap row in the padding (a border row) is checked whole.
      const bool row_oob = od * g.sd - g.pd < 0 || od * g.sd + (g.KD - 1) * g.dd - g.pd >= g.D ||
                           oh * g.sh - g.ph < 0 || oh * g.sh + (g.KH - 1) * g.dh - g.ph >= g.H;
      bool gy_pad_nf = false;
      for (int64_t c = 0; c < g.cpg && !gy_pad_nf; ++c)
        gy_pad_nf = padding_nonfinite(gy + (c0 + c) * out_plane + row_off, row_oob ? 0 : lo_max, row_oob ? 0 : hi_min,
                                      g.Wo);
      for (int64_t kd = 0; kd < g.KD; ++kd) {
        const int64_t id = od * g.sd + kd * g.dd - g.pd;
        const bool d_ok = id >= 0 && id < g.D;
        for (int64_t kh = 0; kh < g.KH; ++kh) {
          const int64_t ih = oh * g.sh + kh * g.dh - g.ph;
          const bool ok = d_ok && ih >= 0 && ih < g.H;
          for (int64_t kw = 0; kw < g.KW; ++kw) {
            const int64_t t = (kd * g.KH + kh) * g.KW + kw;
            scalar_t* __restrict__ o = gw + (ng * taps + t) * out_plane + row_off;
            std::fill(o, o + g.Wo, scalar_t(0));
            const int64_t off = kw * g.dw - g.pw;
            int64_t lo = 0, hi = 0;
            if (ok) valid_range(off, g.sw, g.W, g.Wo, lo, hi);
            if (gy_pad_nf)  // taps that read the padding: gy * 0
              for (int64_t c = 0; c < g.cpg; ++c) add_times_padding(o, gy + (c0 + c) * out_plane + row_off, lo, hi, g.Wo);
            if (lo >= hi) continue;
            for (int64_t c = 0; c < g.cpg; ++c) {
              const scalar_t* __restrict__ gr = gy + (c0 + c) * out_plane + row_off;
              const scalar_t* __restrict__ xr = x + (c0 + c) * in_plane + (id * g.H + ih) * g.W + off;
              if (g.sw == 1) {
                for (int64_t wo = lo; wo < hi; ++wo) o[wo] += gr[wo] * xr[wo];
              } else {
                const int64_t sw = g.sw;
                for (int64_t wo = lo; wo < hi; ++wo) o[wo] += gr[wo] * xr[wo * sw];
              }
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------- op entry points
at::Tensor involution_cpu(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "medconv::involution";
  check_tensor(op, "x", x);
  check_tensor(op, "weight", weight);
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x and weight must have the same dtype, got ",
              x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, op, ": x must be (N, C, H, W) or (N, C, D, H, W), got shape ", x.sizes());
  const int64_t dims = x.dim() - 2;
  TORCH_CHECK(weight.dim() == 2 + 2 * dims, op, ": weight must have ", 2 + 2 * dims, " dims (N, G, *K, *S_out), got shape ",
              weight.sizes());
  const InvGeom g = make_geom(op, x.size(0), x.size(1), weight.size(1), x.sizes().slice(2), kernel_size, stride,
                              padding, dilation);
  check_shape(op, "weight", weight, weight_shape(g));
  std::vector<int64_t> oshape = {g.N, g.C};
  for (int64_t v : out_spatial(g)) oshape.push_back(v);
  at::Tensor out = at::empty(oshape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_cpu", [&] {
    forward_kernel<scalar_t>(g, xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor involution_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& weight, at::IntArrayRef input_size,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation) {
  const char* op = "medconv::involution_grad_input";
  check_tensor(op, "grad_out", grad_out);
  check_tensor(op, "weight", weight);
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type(), op, ": grad_out and weight must have the same dtype, got ",
              grad_out.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(input_size.size() == 4 || input_size.size() == 5, op, ": input_size must have 4 or 5 values, got ",
              input_size);
  const int64_t dims = static_cast<int64_t>(input_size.size()) - 2;
  TORCH_CHECK(weight.dim() == 2 + 2 * dims, op, ": weight must have ", 2 + 2 * dims, " dims, got shape ", weight.sizes());
  const InvGeom g = make_geom(op, input_size[0], input_size[1], weight.size(1), input_size.slice(2), kernel_size,
                              stride, padding, dilation);
  check_shape(op, "weight", weight, weight_shape(g));
  std::vector<int64_t> gshape = {g.N, g.C};
  for (int64_t v : out_spatial(g)) gshape.push_back(v);
  check_shape(op, "grad_out", grad_out, gshape);
  at::Tensor gx = at::empty(input_size, grad_out.options().memory_format(at::MemoryFormat::Contiguous));
  if (gx.numel() == 0) return gx;
  const at::Tensor gyc = grad_out.contiguous();
  const at::Tensor wc = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "involution_grad_input_cpu", [&] {
    grad_input_kernel<scalar_t>(g, gyc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>());
  });
  return gx;
}

at::Tensor involution_grad_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef kernel_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups) {
  const char* op = "medconv::involution_grad_weight";
  check_tensor(op, "grad_out", grad_out);
  check_tensor(op, "x", x);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out and x must have the same dtype, got ",
              grad_out.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, op, ": x must be (N, C, H, W) or (N, C, D, H, W), got shape ", x.sizes());
  const InvGeom g = make_geom(op, x.size(0), x.size(1), groups, x.sizes().slice(2), kernel_size, stride, padding,
                              dilation);
  std::vector<int64_t> gshape = {g.N, g.C};
  for (int64_t v : out_spatial(g)) gshape.push_back(v);
  check_shape(op, "grad_out", grad_out, gshape);
  at::Tensor gw = at::empty(weight_shape(g), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (gw.numel() == 0) return gw;
  const at::Tensor gyc = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "involution_grad_weight_cpu", [&] {
    grad_weight_kernel<scalar_t>(g, gyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>());
  });
  return gw;
}

}  // namespace

TORCH_LIBRARY_IMPL(medconv, CPU, m) {
  m.impl("involution", &involution_cpu);
  m.impl("involution_grad_input", &involution_grad_input_cpu);
  m.impl("involution_grad_weight", &involution_grad_weight_cpu);
}

}  // namespace medconv
