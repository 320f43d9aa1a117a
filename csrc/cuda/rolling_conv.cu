// CUDA kernels of the six rolling-convolution ops (schemas in csrc/ops.cpp, docs/design.md §1).
//
// All six ops reduce to three generic kernels over one "logical" dense weight
//     G[o, c, t] = base[b, (c - r) mod C, t]      o = r * n_base + b   (conv, base (n_base, C, *k))
//     G[o, c, t] = base[(c - r) mod C, b, t]      o = r * n_base + b   (transposed, base (C, n_base, *k))
// which is never stored: it is read from the base by index shift, `b * sb + cc * sc + t` with
// (sb, sc) = (C*T, T) for conv and (T, n_base*T) for transposed. The mapping (mirrored line by line
// in medconv_ext/ops/rolling_conv_triton.py, whose tests run on the CPU) is:
//     op                         kernel            out chan a   reduced chan e   gather
//     conv forward               rolling_gemm      o (roll)     c                direct  (i = p*s + t*d - pad)
//     conv grad_input            rolling_gemm      c            o (roll)         inverse (p = (i + pad - t*d) / s)
//     transposed forward         rolling_gemm      o (roll)     c                inverse
//     transposed grad_input      rolling_gemm      c            o (roll)         direct
//     conv grad_weight           grad_weight       roll side = grad_out at p, channel side = x at p*s + t*d - pad
//     transposed grad_weight     grad_weight       roll side = grad_out at p*s + t*d - pad, channel side = x at p
// 2D is 3D with depth 1 (kernel depth 1, stride 1, padding 0, dilation 1): one instantiation per dtype.
//
// Kernels: a tiled SIMT implicit GEMM (64 pixels x 32 output channels per block, K = channels x taps
// in steps of 16 channels, operands staged in shared memory in the accumulation type; the weight
// tile is gathered from the base by the roll index). 16-bit inputs are converted to float32 on load
// and accumulated in float32; float64 accumulates in float64. A WMMA (tensor-core) variant of the
// same tile for float16/bfloat16 exists but is opt-in (MEDCONV_CUDA_MMA=1): it has not yet run on a
// GPU (see docs/rolling_conv_gpu.md).
// grad_weight is gather-form and deterministic: each block reduces a fixed slice of (n, p) for 8
// base channels with a fixed warp-shuffle tree, writes a float32/64 partial per slice, and a second
// kernel sums the slices in a fixed order. No atomics anywhere: the same bits on every run.
// Indexing is int64 throughout; every grid dimension is clamped to its hardware limit and the
// kernels loop over the remainder (grid-stride), so any size launches.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mma.h>

#include "rolling_conv_index.cuh"  // Geom, RollW and the index formulas (also compiled on the CPU by the tests)

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace medconv {
namespace {

using at::IntArrayRef;
using at::Tensor;

constexpr int kTileP = 64;    // output pixels per block
constexpr int kTileA = 32;    // output channels per block
constexpr int kTileE = 16;    // reduced channels per shared-memory stage
constexpr int kThreads = 256; // 8 warps: each thread owns 2 pixels x 4 channels
static_assert(kThreads % kTileP == 0 && (kTileE * kTileP) % kThreads == 0, "x tile loader layout");
static_assert((kTileE * kTileA) % kThreads == 0, "w tile loader layout");
static_assert(kTileP == 64 && kTileA == 4 * (kThreads / 32), "compute layout: 32 lanes x 2 pixels, 8 warps x 4 channels");

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

// out[n, a, P_out] = (bias[a]) + sum_e sum_t G(a|e) * in[n, e, src(P_out, t)]
//   inverse == false: out grid = lo, in grid = hi, src = hi_position (direct gather)
//   inverse == true:  out grid = hi, in grid = lo, src = lo_position (window inverted, gather form)
// a_is_roll: the output channel is the roll side o (forward ops) or the channel side c (grad_input).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
rolling_gemm_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ in, const scalar_t* __restrict__ w,
                    const scalar_t* __restrict__ bias, int64_t N, int64_t A, int64_t E, Geom g, RollW rw,
                    bool a_is_roll, bool inverse) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t xs[kTileE][kTileP];
  __shared__ acc_t ws[kTileE][kTileA];

  const int tid = threadIdx.x;
  const int lane = tid & 31;       // compute: pixels lane, lane + 32
  const int warp = tid >> 5;       // compute: channels 4*warp .. 4*warp + 3
  const int ld_p = tid % kTileP;   // x loader: pixel ld_p, channels ld_e0 + k * (kThreads / kTileP)
  const int ld_e0 = tid / kTileP;

  const int64_t og0 = inverse ? g.hi[0] : g.lo[0];  // output grid
  const int64_t og1 = inverse ? g.hi[1] : g.lo[1];
  const int64_t og2 = inverse ? g.hi[2] : g.lo[2];
  const int64_t P_out = og0 * og1 * og2;
  const int64_t P_in = inverse ? g.lo[0] * g.lo[1] * g.lo[2] : g.hi[0] * g.hi[1] * g.hi[2];
  const int64_t n_ptiles = (P_out + kTileP - 1) / kTileP;
  const int64_t n_atiles = (A + kTileA - 1) / kTileA;
  const int64_t k12 = g.k[1] * g.k[2];

  for (int64_t n = blockIdx.z; n < N; n += gridDim.z) {
    for (int64_t at_ = blockIdx.y; at_ < n_atiles; at_ += gridDim.y) {
      for (int64_t pt = blockIdx.x; pt < n_ptiles; pt += gridDim.x) {
        const int64_t p0 = pt * kTileP, a0 = at_ * kTileA;
        // this thread's loader pixel, decomposed once
        const int64_t lp = p0 + ld_p;
        const bool lp_ok = lp < P_out;
        int64_t q2 = 0, q1 = 0, q0 = 0;
        if (lp_ok) {
          q2 = lp % og2;
          const int64_t rest = lp / og2;
          q1 = rest % og1;
          q0 = rest / og1;
        }
        const scalar_t* in_n = in + n * E * P_in;

        acc_t acc[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);

        for (int64_t t = 0; t < rw.T; ++t) {
          const int64_t t0 = t / k12, t1 = (t / g.k[2]) % g.k[1], t2 = t % g.k[2];
          int64_t src = -1;
          if (lp_ok) src = inverse ? lo_position(g, q0, q1, q2, t0, t1, t2) : hi_position(g, q0, q1, q2, t0, t1, t2);
          for (int64_t e0 = 0; e0 < E; e0 += kTileE) {
#pragma unroll
            for (int k = 0; k < (kTileE * kTileP) / kThreads; ++k) {
              const int el = ld_e0 + k * (kThreads / kTileP);
              const int64_t e = e0 + el;
              acc_t v = acc_t(0);
              if (src >= 0 && e < E) v = static_cast<acc_t>(in_n[e * P_in + src]);
              xs[el][ld_p] = v;
            }
#pragma unroll
            for (int k = 0; k < (kTileE * kTileA) / kThreads; ++k) {
              const int idx = tid + k * kThreads;
              const int el = idx / kTileA, al = idx % kTileA;
              const int64_t e = e0 + el, a = a0 + al;
              acc_t v = acc_t(0);
              if (e < E && a < A) v = static_cast<acc_t>(w[a_is_roll ? weight_offset(a, e, t, rw) : weight_offset(e, a, t, rw)]);
              ws[el][al] = v;
            }
            __syncthreads();
#pragma unroll
            for (int el = 0; el < kTileE; ++el) {
              const acc_t x0 = xs[el][lane], x1 = xs[el][lane + 32];
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const acc_t wv = ws[el][warp * 4 + j];
                acc[0][j] += x0 * wv;
                acc[1][j] += x1 * wv;
              }
            }
            __syncthreads();
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int64_t p = p0 + lane + 32 * i;
          if (p >= P_out) continue;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int64_t a = a0 + warp * 4 + j;
            if (a >= A) continue;
            acc_t v = acc[i][j];
            if (bias != nullptr) v += static_cast<acc_t>(bias[a]);
            out[(n * A + a) * P_out + p] = static_cast<scalar_t>(v);
          }
        }
      }
    }
  }
}

// ---- tensor-core variant for float16 / bfloat16 (opt-in: MEDCONV_CUDA_MMA=1) ---------------
// The same implicit GEMM with WMMA 16x16x16 fragments (fp16/bf16 operands, float32 accumulators):
// 8 warps as 4 (pixels) x 2 (channels) fragments of a 64 x 32 tile; the input tile and the weight
// tile gathered from the base by the roll index are staged in shared memory in the input dtype.
// NOT yet run on a GPU: off by default until tests/test_rolling_conv_cuda.py passes with it on.
template <typename scalar_t>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
rolling_gemm_mma_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ in, const scalar_t* __restrict__ w,
                        const scalar_t* __restrict__ bias, int64_t N, int64_t A, int64_t E, Geom g, RollW rw,
                        bool a_is_roll, bool inverse) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using mma_t = typename WmmaType<scalar_t>::type;
  static_assert(kTileP == 64 && kTileA == 32 && kTileE == 16 && kThreads == 256, "fragment layout: 4 x 2 warps of 16 x 16");
  __shared__ __align__(32) scalar_t xs[kTileP][kTileE];  // A: pixels x K, row-major, ldm 16
  __shared__ __align__(32) scalar_t ws[kTileE][kTileA];  // B: K x channels, row-major, ldm 32
  __shared__ __align__(32) float cs[kTileP][kTileA];     // accumulator staging for the epilogue

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int wm = warp & 3, wn = warp >> 2;  // this warp's fragment: pixels 16*wm.., channels 16*wn..
  const int ld_p = tid % kTileP;
  const int ld_e0 = tid / kTileP;

  const int64_t og0 = inverse ? g.hi[0] : g.lo[0];
  const int64_t og1 = inverse ? g.hi[1] : g.lo[1];
  const int64_t og2 = inverse ? g.hi[2] : g.lo[2];
  const int64_t P_out = og0 * og1 * og2;
  const int64_t P_in = inverse ? g.lo[0] * g.lo[1] * g.lo[2] : g.hi[0] * g.hi[1] * g.hi[2];
  const int64_t n_ptiles = (P_out + kTileP - 1) / kTileP;
  const int64_t n_atiles = (A + kTileA - 1) / kTileA;
  const int64_t k12 = g.k[1] * g.k[2];
  const scalar_t zero = scalar_t(0.0f);

  for (int64_t n = blockIdx.z; n < N; n += gridDim.z) {
    for (int64_t at_ = blockIdx.y; at_ < n_atiles; at_ += gridDim.y) {
      for (int64_t pt = blockIdx.x; pt < n_ptiles; pt += gridDim.x) {
        const int64_t p0 = pt * kTileP, a0 = at_ * kTileA;
        const int64_t lp = p0 + ld_p;
        const bool lp_ok = lp < P_out;
        int64_t q2 = 0, q1 = 0, q0 = 0;
        if (lp_ok) {
          q2 = lp % og2;
          const int64_t rest = lp / og2;
          q1 = rest % og1;
          q0 = rest / og1;
        }
        const scalar_t* in_n = in + n * E * P_in;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int64_t t = 0; t < rw.T; ++t) {
          const int64_t t0 = t / k12, t1 = (t / g.k[2]) % g.k[1], t2 = t % g.k[2];
          int64_t src = -1;
          if (lp_ok) src = inverse ? lo_position(g, q0, q1, q2, t0, t1, t2) : hi_position(g, q0, q1, q2, t0, t1, t2);
          for (int64_t e0 = 0; e0 < E; e0 += kTileE) {
#pragma unroll
            for (int k = 0; k < (kTileE * kTileP) / kThreads; ++k) {
              const int el = ld_e0 + k * (kThreads / kTileP);
              const int64_t e = e0 + el;
              xs[ld_p][el] = (src >= 0 && e < E) ? in_n[e * P_in + src] : zero;
            }
#pragma unroll
            for (int k = 0; k < (kTileE * kTileA) / kThreads; ++k) {
              const int idx = tid + k * kThreads;
              const int el = idx / kTileA, al = idx % kTileA;
              const int64_t e = e0 + el, a = a0 + al;
              ws[el][al] = (e < E && a < A) ? w[a_is_roll ? weight_offset(a, e, t, rw) : weight_offset(e, a, t, rw)] : zero;
            }
            __syncthreads();
            wmma::fragment<wmma::matrix_a, 16, 16, 16, mma_t, wmma::row_major> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, mma_t, wmma::row_major> fb;
            wmma::load_matrix_sync(fa, reinterpret_cast<const mma_t*>(&xs[wm * 16][0]), kTileE);
            wmma::load_matrix_sync(fb, reinterpret_cast<const mma_t*>(&ws[0][wn * 16]), kTileA);
            wmma::mma_sync(acc, fa, fb, acc);
            __syncthreads();
          }
        }
        wmma::store_matrix_sync(&cs[wm * 16][wn * 16], acc, kTileA, wmma::mem_row_major);
        __syncthreads();
        for (int idx = tid; idx < kTileP * kTileA; idx += kThreads) {
          const int pl = idx % kTileP, al = idx / kTileP;  // consecutive threads: consecutive pixels
          const int64_t p = p0 + pl, a = a0 + al;
          if (p < P_out && a < A) {
            float v = cs[pl][al];
            if (bias != nullptr) v += static_cast<float>(bias[a]);
            out[(n * A + a) * P_out + p] = static_cast<scalar_t>(v);
          }
        }
        __syncthreads();  // cs is rewritten by the next tile
      }
    }
  }
#else
  __trap();  // never launched: the host picks this kernel only on compute capability >= 8.0
#endif
}

constexpr int kGwLanes = 32;  // threadIdx.x: one warp strides over (n, p)
constexpr int kGwRows = 8;    // threadIdx.y: base channels m per block

// partial[split, b*sb + m*sc + t] = sum over this split's (n, p) and all rolls r of
//     roll_t[n, r*nb + b, pos_R] * chan_t[n, (m + r) mod C, pos_C]
// p runs over the lo grid; the other operand sits at hi_position(p, t) (skipped in the padding).
// roll_is_lo: conv (grad_out is on the lo grid); false for the transposed conv (x is on the lo grid).
template <typename scalar_t>
__global__ void __launch_bounds__(kGwLanes * kGwRows)
rolling_grad_weight_kernel(at::opmath_type<scalar_t>* __restrict__ partial, const scalar_t* __restrict__ roll_t,
                           const scalar_t* __restrict__ chan_t, int64_t N, Geom g, RollW rw, bool roll_is_lo,
                           int64_t chunk, int64_t n_splits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P_lo = g.lo[0] * g.lo[1] * g.lo[2];
  const int64_t P_hi = g.hi[0] * g.hi[1] * g.hi[2];
  const int64_t P_R = roll_is_lo ? P_lo : P_hi;
  const int64_t P_C = roll_is_lo ? P_hi : P_lo;
  const int64_t CR = rw.n_rolls * rw.nb;
  const int64_t items = N * P_lo;
  const int64_t n_mtiles = (rw.C + kGwRows - 1) / kGwRows;
  const int64_t n_entry_blocks = rw.nb * rw.T * n_mtiles;
  const int64_t entries = rw.nb * rw.C * rw.T;
  const int64_t k12 = g.k[1] * g.k[2];

  for (int64_t split = blockIdx.y; split < n_splits; split += gridDim.y) {
    const int64_t j_begin = split * chunk;
    const int64_t j_end = j_begin + chunk < items ? j_begin + chunk : items;
    for (int64_t eb = blockIdx.x; eb < n_entry_blocks; eb += gridDim.x) {
      const int64_t mt = eb % n_mtiles;
      const int64_t bt = eb / n_mtiles;
      const int64_t t = bt % rw.T, b = bt / rw.T;
      const int64_t m = mt * kGwRows + threadIdx.y;
      const int64_t t0 = t / k12, t1 = (t / g.k[2]) % g.k[1], t2 = t % g.k[2];
      acc_t acc = acc_t(0);
      if (m < rw.C) {
        for (int64_t j = j_begin + threadIdx.x; j < j_end; j += kGwLanes) {
          const int64_t n = j / P_lo, p = j - n * P_lo;
          const int64_t l2 = p % g.lo[2], rest = p / g.lo[2];
          const int64_t l1 = rest % g.lo[1], l0 = rest / g.lo[1];
          const int64_t h = hi_position(g, l0, l1, l2, t0, t1, t2);
          if (h < 0) continue;
          const int64_t pos_R = roll_is_lo ? p : h;
          const int64_t pos_C = roll_is_lo ? h : p;
          const scalar_t* rp = roll_t + (n * CR + b) * P_R + pos_R;
          const scalar_t* cp = chan_t + n * rw.C * P_C + pos_C;
          int64_t cm = m;  // (m + r) mod C
          for (int64_t r = 0; r < rw.n_rolls; ++r) {
            acc += static_cast<acc_t>(rp[r * rw.nb * P_R]) * static_cast<acc_t>(cp[cm * P_C]);
            cm = cm + 1 == rw.C ? 0 : cm + 1;
          }
        }
      }
      // fixed-order warp tree: deterministic
#pragma unroll
      for (int off = kGwLanes / 2; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
      if (threadIdx.x == 0 && m < rw.C) partial[split * entries + b * rw.sb + m * rw.sc + t] = acc;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
sum_splits_kernel(scalar_t* __restrict__ out, const at::opmath_type<scalar_t>* __restrict__ partial, int64_t entries,
                  int64_t n_splits) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < entries; e += (int64_t)gridDim.x * blockDim.x) {
    acc_t s = acc_t(0);
    for (int64_t k = 0; k < n_splits; ++k) s += partial[k * entries + e];
    out[e] = static_cast<scalar_t>(s);
  }
}

// ------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------
int64_t conv_out(int64_t n, int64_t k, int64_t s, int64_t p, int64_t d) { return (n + 2 * p - d * (k - 1) - 1) / s + 1; }

std::vector<int64_t> as3(IntArrayRef v, int64_t fill, const char* name, int64_t dims) {
  TORCH_CHECK(static_cast<int64_t>(v.size()) == dims, "medconv rolling_conv (CUDA): ", name, " must have ", dims,
              " values, got ", v.size());
  std::vector<int64_t> r(3, fill);
  for (int64_t i = 0; i < dims; ++i) r[3 - dims + i] = v[i];
  return r;
}

Geom make_geom(IntArrayRef lo, IntArrayRef hi, IntArrayRef k, IntArrayRef stride, IntArrayRef padding,
               IntArrayRef dilation) {
  const int64_t dims = static_cast<int64_t>(k.size());
  Geom g;
  auto L = as3(lo, 1, "lo", dims), H = as3(hi, 1, "hi", dims), K = as3(k, 1, "kernel", dims);
  auto S = as3(stride, 1, "stride", dims), P = as3(padding, 0, "padding", dims), D = as3(dilation, 1, "dilation", dims);
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(S[i] >= 1 && D[i] >= 1 && P[i] >= 0, "medconv rolling_conv (CUDA): stride and dilation must be >= 1 "
                "and padding >= 0, got stride ", stride, ", padding ", padding, ", dilation ", dilation);
    g.lo[i] = L[i]; g.hi[i] = H[i]; g.k[i] = K[i]; g.s[i] = S[i]; g.p[i] = P[i]; g.d[i] = D[i];
  }
  return g;
}

RollW make_rollw(const Tensor& w, bool transposed, int64_t n_rolls) {
  int64_t T = 1;
  for (int64_t i = 2; i < w.dim(); ++i) T *= w.size(i);
  RollW rw = make_roll_w(transposed, w.size(0), w.size(1), n_rolls, T);
  TORCH_CHECK(n_rolls >= 1 && n_rolls <= rw.C, "medconv rolling_conv (CUDA): n_rolls must satisfy 1 <= n_rolls <= C_in=",
              rw.C, ", got ", n_rolls);
  return rw;
}

void check_tensor(const Tensor& t, const char* name, int64_t dim, const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "medconv rolling_conv (CUDA): ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, "medconv rolling_conv (CUDA): ", name, " must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "medconv rolling_conv (CUDA): ", name, " has dtype ",
              t.scalar_type(), " but expected ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "medconv rolling_conv (CUDA): ", name, " is on ", t.device(), " but expected ",
              ref.device());
}

// stride / padding / dilation lists: checked before anything indexes them.
void check_params(int64_t dims, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation) {
  TORCH_CHECK(static_cast<int64_t>(stride.size()) == dims && static_cast<int64_t>(padding.size()) == dims &&
                  static_cast<int64_t>(dilation.size()) == dims,
              "medconv rolling_conv (CUDA): stride, padding and dilation must have ", dims, " values each, got ", stride,
              ", ", padding, ", ", dilation);
  for (int64_t i = 0; i < dims; ++i)
    TORCH_CHECK(stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0, "medconv rolling_conv (CUDA): stride and dilation "
                "must be >= 1 and padding >= 0, got stride ", stride, ", padding ", padding, ", dilation ", dilation);
}

void check_weight(const Tensor& w, int64_t dims) {
  TORCH_CHECK(dims == 2 || dims == 3, "medconv rolling_conv (CUDA): only 2D and 3D are supported, got a weight of shape ",
              w.sizes());
  for (int64_t i = 0; i < w.dim(); ++i)
    TORCH_CHECK(w.size(i) >= 1, "medconv rolling_conv (CUDA): weight sizes must be >= 1, got ", w.sizes());
}

// The WMMA kernel is opt-in (MEDCONV_CUDA_MMA=1) until it has been validated on a GPU; it needs
// compute capability 8.0 or newer (bfloat16 fragments).
bool use_mma(const Tensor& out) {
  if (out.scalar_type() != at::kHalf && out.scalar_type() != at::kBFloat16) return false;
  const char* env = std::getenv("MEDCONV_CUDA_MMA");
  if (env == nullptr || std::strcmp(env, "1") != 0) return false;
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
}

// out (N, A, out grid), in (N, E, in grid): both contiguous.
void launch_gemm(Tensor& out, const Tensor& in, const Tensor& w, const c10::optional<Tensor>& bias, const Geom& g,
                 const RollW& rw, GemmMode mode) {
  const bool a_is_roll = mode.a_is_roll, inverse = mode.inverse;
  const int64_t N = out.size(0), A = out.size(1), E = in.size(1);
  if (out.numel() == 0) return;
  const int64_t P_out = out.numel() / (N * A);
  const int64_t n_ptiles = (P_out + kTileP - 1) / kTileP, n_atiles = (A + kTileA - 1) / kTileA;
  const dim3 grid(static_cast<unsigned>(std::min(n_ptiles, kMaxGridX)), static_cast<unsigned>(std::min(n_atiles, kMaxGridYZ)),
                  static_cast<unsigned>(std::min(N, kMaxGridYZ)));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (use_mma(out)) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(out.scalar_type(), "rolling_gemm_mma_cuda", [&] {
      const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
      rolling_gemm_mma_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(out.data_ptr<scalar_t>(), in.data_ptr<scalar_t>(),
                                                                       w.data_ptr<scalar_t>(), bp, N, A, E, g, rw, a_is_roll,
                                                                       inverse);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "rolling_gemm_cuda", [&] {
    const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    rolling_gemm_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(out.data_ptr<scalar_t>(), in.data_ptr<scalar_t>(),
                                                                 w.data_ptr<scalar_t>(), bp, N, A, E, g, rw, a_is_roll, inverse);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// gw (weight shape, contiguous); roll_t (N, n_rolls*nb, ...), chan_t (N, C, ...): contiguous.
void launch_grad_weight(Tensor& gw, const Tensor& roll_t, const Tensor& chan_t, const Geom& g, const RollW& rw,
                        bool roll_is_lo) {
  const int64_t N = roll_t.size(0);
  const int64_t P_lo = g.lo[0] * g.lo[1] * g.lo[2];
  const int64_t items = N * P_lo;
  const int64_t entries = rw.nb * rw.C * rw.T;
  const int64_t n_entry_blocks = rw.nb * rw.T * ((rw.C + kGwRows - 1) / kGwRows);
  // Enough blocks to fill a large GPU (~8 per SM on 132 SMs), slices of at least 256 items. A fixed
  // constant, not the device's SM count, so that results are the same bits on every GPU.
  const int64_t want_blocks = 1056;
  int64_t n_splits = std::max<int64_t>(1, (want_blocks + n_entry_blocks - 1) / n_entry_blocks);
  n_splits = std::min<int64_t>(n_splits, std::max<int64_t>(1, (items + 255) / 256));
  n_splits = std::min<int64_t>(n_splits, kMaxGridYZ);
  const int64_t chunk = std::max<int64_t>(1, (items + n_splits - 1) / n_splits);
  const auto acc_type = gw.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor partial = at::empty({n_splits, entries}, gw.options().dtype(acc_type));
  const dim3 block(kGwLanes, kGwRows);
  const dim3 grid(static_cast<unsigned>(std::min(n_entry_blocks, kMaxGridX)), static_cast<unsigned>(n_splits));
  const int64_t sum_blocks = std::min<int64_t>((entries + 255) / 256, 65535);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gw.scalar_type(), "rolling_grad_weight_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rolling_grad_weight_kernel<scalar_t><<<grid, block, 0, stream>>>(partial.data_ptr<acc_t>(), roll_t.data_ptr<scalar_t>(),
                                                                     chan_t.data_ptr<scalar_t>(), N, g, rw, roll_is_lo,
                                                                     chunk, n_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_splits_kernel<scalar_t><<<static_cast<unsigned>(sum_blocks), 256, 0, stream>>>(gw.data_ptr<scalar_t>(),
                                                                                       partial.data_ptr<acc_t>(), entries, n_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::vector<int64_t> spatial(const Tensor& t) { return std::vector<int64_t>(t.sizes().begin() + 2, t.sizes().end()); }

// ---- conv --------------------------------------------------------------------------------
Tensor rolling_conv_cuda(const Tensor& x_, const Tensor& weight_, const c10::optional<Tensor>& bias_, IntArrayRef stride,
                         IntArrayRef padding, IntArrayRef dilation, int64_t n_rolls) {
  const int64_t dims = weight_.dim() - 2;
  check_weight(weight_, dims);
  check_params(dims, stride, padding, dilation);
  check_tensor(x_, "x", dims + 2, weight_);
  check_tensor(weight_, "weight", dims + 2, x_);
  c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), weight = weight_.contiguous();
  RollW rw = make_rollw(weight, false, n_rolls);
  TORCH_CHECK(x.size(1) == rw.C, "medconv rolling_conv (CUDA): x has ", x.size(1), " channels, weight expects ", rw.C);
  c10::optional<Tensor> bias;
  if (bias_.has_value()) {
    check_tensor(*bias_, "bias", 1, x);
    TORCH_CHECK(bias_->size(0) == n_rolls * rw.nb, "medconv rolling_conv (CUDA): bias must have ", n_rolls * rw.nb,
                " values, got ", bias_->size(0));
    bias = bias_->contiguous();
  }
  auto hi = spatial(x);
  std::vector<int64_t> lo(dims);
  for (int64_t i = 0; i < dims; ++i) {
    lo[i] = conv_out(hi[i], weight.size(2 + i), stride[i], padding[i], dilation[i]);
    TORCH_CHECK(lo[i] >= 1, "medconv rolling_conv (CUDA): the kernel does not fit the padded input (spatial dim ", i, ")");
  }
  Geom g = make_geom(lo, hi, weight.sizes().slice(2), stride, padding, dilation);
  std::vector<int64_t> osz = {x.size(0), n_rolls * rw.nb};
  osz.insert(osz.end(), lo.begin(), lo.end());
  Tensor out = at::empty(osz, x.options());
  launch_gemm(out, x, weight, bias, g, rw, gemm_mode(0));  // conv forward
  return out;
}

Tensor rolling_conv_grad_input_cuda(const Tensor& grad_out_, const Tensor& weight_, IntArrayRef input_size,
                                    IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t n_rolls) {
  const int64_t dims = weight_.dim() - 2;
  check_weight(weight_, dims);
  check_params(dims, stride, padding, dilation);
  check_tensor(grad_out_, "grad_out", dims + 2, weight_);
  TORCH_CHECK(static_cast<int64_t>(input_size.size()) == dims + 2, "medconv rolling_conv_grad_input (CUDA): input_size must have ",
              dims + 2, " values, got ", input_size);
  c10::cuda::CUDAGuard guard(grad_out_.device());
  const Tensor go = grad_out_.contiguous(), weight = weight_.contiguous();
  RollW rw = make_rollw(weight, false, n_rolls);
  std::vector<int64_t> hi(input_size.begin() + 2, input_size.end()), lo = spatial(go);
  for (int64_t i = 0; i < dims; ++i)
    TORCH_CHECK(lo[i] == conv_out(hi[i], weight.size(2 + i), stride[i], padding[i], dilation[i]),
                "medconv rolling_conv_grad_input (CUDA): grad_out shape ", go.sizes(), " does not match input_size ", input_size);
  TORCH_CHECK(go.size(0) == input_size[0] && go.size(1) == n_rolls * rw.nb && input_size[1] == rw.C,
              "medconv rolling_conv_grad_input (CUDA): grad_out shape ", go.sizes(), " does not match input_size ", input_size,
              " and weight ", weight.sizes());
  Geom g = make_geom(lo, hi, weight.sizes().slice(2), stride, padding, dilation);
  Tensor gx = at::empty(input_size, go.options());
  launch_gemm(gx, go, weight, c10::nullopt, g, rw, gemm_mode(1));  // conv grad_input
  return gx;
}

Tensor rolling_conv_grad_weight_cuda(const Tensor& grad_out_, const Tensor& x_, IntArrayRef weight_size, IntArrayRef stride,
                                     IntArrayRef padding, IntArrayRef dilation, int64_t n_rolls) {
  const int64_t dims = static_cast<int64_t>(weight_size.size()) - 2;
  TORCH_CHECK(dims == 2 || dims == 3, "medconv rolling_conv_grad_weight (CUDA): weight_size must have 4 or 5 values, got ",
              weight_size);
  check_params(dims, stride, padding, dilation);
  check_tensor(grad_out_, "grad_out", dims + 2, x_);
  check_tensor(x_, "x", dims + 2, grad_out_);
  c10::cuda::CUDAGuard guard(x_.device());
  const Tensor go = grad_out_.contiguous(), x = x_.contiguous();
  Tensor gw = at::empty(weight_size, x.options());
  check_weight(gw, dims);
  RollW rw = make_rollw(gw, false, n_rolls);
  auto hi = spatial(x), lo = spatial(go);
  for (int64_t i = 0; i < dims; ++i)
    TORCH_CHECK(lo[i] == conv_out(hi[i], weight_size[2 + i], stride[i], padding[i], dilation[i]),
                "medconv rolling_conv_grad_weight (CUDA): grad_out shape ", go.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK(go.size(0) == x.size(0) && go.size(1) == n_rolls * rw.nb && x.size(1) == rw.C,
              "medconv rolling_conv_grad_weight (CUDA): grad_out ", go.sizes(), ", x ", x.sizes(), " and weight_size ",
              weight_size, " do not match");
  Geom g = make_geom(lo, hi, weight_size.slice(2), stride, padding, dilation);
  launch_grad_weight(gw, go, x, g, rw, grad_weight_roll_is_lo(false));
  return gw;
}

// ---- transposed conv ---------------------------------------------------------------------
Tensor rolling_conv_transpose_cuda(const Tensor& x_, const Tensor& weight_, const c10::optional<Tensor>& bias_,
                                   IntArrayRef stride, IntArrayRef padding, IntArrayRef output_padding, IntArrayRef dilation,
                                   int64_t n_rolls) {
  const int64_t dims = weight_.dim() - 2;
  check_weight(weight_, dims);
  check_params(dims, stride, padding, dilation);
  check_tensor(x_, "x", dims + 2, weight_);
  check_tensor(weight_, "weight", dims + 2, x_);
  TORCH_CHECK(static_cast<int64_t>(output_padding.size()) == dims, "medconv rolling_conv_transpose (CUDA): output_padding must have ",
              dims, " values, got ", output_padding);
  c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), weight = weight_.contiguous();
  RollW rw = make_rollw(weight, true, n_rolls);
  TORCH_CHECK(x.size(1) == rw.C, "medconv rolling_conv_transpose (CUDA): x has ", x.size(1), " channels, weight expects ", rw.C);
  c10::optional<Tensor> bias;
  if (bias_.has_value()) {
    check_tensor(*bias_, "bias", 1, x);
    TORCH_CHECK(bias_->size(0) == n_rolls * rw.nb, "medconv rolling_conv_transpose (CUDA): bias must have ", n_rolls * rw.nb,
                " values, got ", bias_->size(0));
    bias = bias_->contiguous();
  }
  auto lo = spatial(x);
  std::vector<int64_t> hi(dims);
  for (int64_t i = 0; i < dims; ++i) {
    TORCH_CHECK(output_padding[i] >= 0 && output_padding[i] < std::max(stride[i], dilation[i]),
                "medconv rolling_conv_transpose (CUDA): output_padding must be >= 0 and smaller than stride or dilation, got ",
                output_padding);
    hi[i] = (lo[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.size(2 + i) - 1) + output_padding[i] + 1;
    TORCH_CHECK(hi[i] >= 1, "medconv rolling_conv_transpose (CUDA): the output would be empty along spatial dim ", i);
  }
  Geom g = make_geom(lo, hi, weight.sizes().slice(2), stride, padding, dilation);
  std::vector<int64_t> osz = {x.size(0), n_rolls * rw.nb};
  osz.insert(osz.end(), hi.begin(), hi.end());
  Tensor out = at::empty(osz, x.options());
  launch_gemm(out, x, weight, bias, g, rw, gemm_mode(2));  // transposed forward
  return out;
}

// The transposed conv's input x lives on the lo grid and its output on the hi grid; input_size = x's shape.
void check_transposed_grad_shapes(const char* op, const Tensor& go, IntArrayRef input_size, IntArrayRef wsz, IntArrayRef stride,
                                  IntArrayRef padding, IntArrayRef dilation, int64_t n_rolls, int64_t nb, int64_t C) {
  const int64_t dims = static_cast<int64_t>(wsz.size()) - 2;
  TORCH_CHECK(static_cast<int64_t>(input_size.size()) == dims + 2, "medconv ", op, " (CUDA): input size must have ", dims + 2,
              " values, got ", input_size);
  TORCH_CHECK(go.size(0) == input_size[0] && go.size(1) == n_rolls * nb && input_size[1] == C, "medconv ", op,
              " (CUDA): grad_out ", go.sizes(), ", input ", input_size, " and weight ", wsz, " do not match");
  for (int64_t i = 0; i < dims; ++i) {
    const int64_t base = (input_size[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (wsz[2 + i] - 1) + 1;
    const int64_t op_ = go.size(2 + i) - base;  // the output_padding this grad_out implies
    TORCH_CHECK(op_ >= 0 && op_ < std::max(stride[i], dilation[i]), "medconv ", op, " (CUDA): grad_out shape ", go.sizes(),
                " does not match input size ", input_size);
  }
}

Tensor rolling_conv_transpose_grad_input_cuda(const Tensor& grad_out_, const Tensor& weight_, IntArrayRef input_size,
                                              IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t n_rolls) {
  const int64_t dims = weight_.dim() - 2;
  check_weight(weight_, dims);
  check_params(dims, stride, padding, dilation);
  check_tensor(grad_out_, "grad_out", dims + 2, weight_);
  c10::cuda::CUDAGuard guard(grad_out_.device());
  const Tensor go = grad_out_.contiguous(), weight = weight_.contiguous();
  RollW rw = make_rollw(weight, true, n_rolls);
  check_transposed_grad_shapes("rolling_conv_transpose_grad_input", go, input_size, weight.sizes(), stride, padding, dilation,
                               n_rolls, rw.nb, rw.C);
  std::vector<int64_t> lo(input_size.begin() + 2, input_size.end()), hi = spatial(go);
  Geom g = make_geom(lo, hi, weight.sizes().slice(2), stride, padding, dilation);
  Tensor gx = at::empty(input_size, go.options());
  launch_gemm(gx, go, weight, c10::nullopt, g, rw, gemm_mode(3));  // transposed grad_input
  return gx;
}

Tensor rolling_conv_transpose_grad_weight_cuda(const Tensor& grad_out_, const Tensor& x_, IntArrayRef weight_size,
                                               IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t n_rolls) {
  const int64_t dims = static_cast<int64_t>(weight_size.size()) - 2;
  TORCH_CHECK(dims == 2 || dims == 3, "medconv rolling_conv_transpose_grad_weight (CUDA): weight_size must have 4 or 5 values, got ",
              weight_size);
  check_params(dims, stride, padding, dilation);
  check_tensor(grad_out_, "grad_out", dims + 2, x_);
  check_tensor(x_, "x", dims + 2, grad_out_);
  c10::cuda::CUDAGuard guard(x_.device());
  const Tensor go = grad_out_.contiguous(), x = x_.contiguous();
  Tensor gw = at::empty(weight_size, x.options());
  check_weight(gw, dims);
  RollW rw = make_rollw(gw, true, n_rolls);
  check_transposed_grad_shapes("rolling_conv_transpose_grad_weight", go, x.sizes(), weight_size, stride, padding, dilation,
                               n_rolls, rw.nb, rw.C);
  auto lo = spatial(x), hi = spatial(go);
  Geom g = make_geom(lo, hi, weight_size.slice(2), stride, padding, dilation);
  launch_grad_weight(gw, go, x, g, rw, grad_weight_roll_is_lo(true));
  return gw;
}

// ---- autocast: the forward ops run in the autocast dtype (float32 accumulation inside) ------
// Float32 inputs are cast to torch.get_autocast_dtype("cuda") (float64 is left alone, as for
// torch's own convolutions); the casts are recorded by autograd, so gradients flow back in float32.
Tensor rolling_conv_autocast(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias, IntArrayRef stride,
                             IntArrayRef padding, IntArrayRef dilation, int64_t n_rolls) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("medconv::rolling_conv", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const c10::optional<Tensor>&, IntArrayRef, IntArrayRef,
                                     IntArrayRef, int64_t)>();
  const auto dt = at::autocast::get_autocast_dtype(at::kCUDA);
  return op.call(at::autocast::cached_cast(dt, x, c10::DeviceType::CUDA), at::autocast::cached_cast(dt, weight, c10::DeviceType::CUDA),
                 at::autocast::cached_cast(dt, bias, c10::DeviceType::CUDA), stride, padding, dilation, n_rolls);
}

Tensor rolling_conv_transpose_autocast(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                       IntArrayRef stride, IntArrayRef padding, IntArrayRef output_padding, IntArrayRef dilation,
                                       int64_t n_rolls) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("medconv::rolling_conv_transpose", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const c10::optional<Tensor>&, IntArrayRef, IntArrayRef,
                                     IntArrayRef, IntArrayRef, int64_t)>();
  const auto dt = at::autocast::get_autocast_dtype(at::kCUDA);
  return op.call(at::autocast::cached_cast(dt, x, c10::DeviceType::CUDA), at::autocast::cached_cast(dt, weight, c10::DeviceType::CUDA),
                 at::autocast::cached_cast(dt, bias, c10::DeviceType::CUDA), stride, padding, output_padding, dilation, n_rolls);
}

}  // namespace
}  // namespace medconv

TORCH_LIBRARY_IMPL(medconv, AutocastCUDA, m) {
  m.impl("rolling_conv", &medconv::rolling_conv_autocast);
  m.impl("rolling_conv_transpose", &medconv::rolling_conv_transpose_autocast);
}

TORCH_LIBRARY_IMPL(medconv, CUDA, m) {
  m.impl("rolling_conv", &medconv::rolling_conv_cuda);
  m.impl("rolling_conv_grad_input", &medconv::rolling_conv_grad_input_cuda);
  m.impl("rolling_conv_grad_weight", &medconv::rolling_conv_grad_weight_cuda);
  m.impl("rolling_conv_transpose", &medconv::rolling_conv_transpose_cuda);
  m.impl("rolling_conv_transpose_grad_input", &medconv::rolling_conv_transpose_grad_input_cuda);
  m.impl("rolling_conv_transpose_grad_weight", &medconv::rolling_conv_transpose_grad_weight_cuda);
}
