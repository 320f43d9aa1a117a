// CUDA kernels of involution (docs/design.md §2), 2D and 3D, registered as
// TORCH_LIBRARY_IMPL(medconv, CUDA): involution, involution_grad_input, involution_grad_weight.
//
//   out[n, c, p] = sum_t weight[n, g(c), t, p] * x[n, c, p*s + t*d - pad],   g(c) = c / (C / G)
//
// Design (docs/involution_gpu.md has the long form):
// - 2D is run as 3D with D = 1, kd = 1: one instantiation per dtype and kernel (compile time).
// - A block owns a tile of positions (outputs for forward / grad_weight, inputs for grad_input)
//   of one (n, group) and a chunk of up to kChan channels of that group. The x window of the tile
//   (or the grad_out window, for grad_input) is staged in shared memory for the chunk's channels,
//   so the K^d taps of neighbouring positions read it from shared memory; one weight value is
//   loaded once per thread and tap and reused for all channels of the chunk (register
//   accumulators). Shared memory is bounded (kSmemBudget, below the 48 KiB every GPU gives
//   without opt-in); a window too large even for one channel (huge dilation) falls back to
//   direct global reads in the same kernel (uniform branch).
// - Both gradients are gather forms: every output element is written by exactly one thread, no
//   atomics, deterministic. grad_weight reduces over the C/G channels of a group inside one
//   block; when the group does not fit one chunk the partial sums go through a float32/float64
//   workspace owned by the same thread (so half/bfloat16 results are rounded once).
// - Accumulation in at::opmath_type (float for half/bfloat16/float, double for double).
// - int64 for every global offset; tile-local indices are int (bounded by the shared-memory
//   size). Blocks of at most 256 threads with __launch_bounds__(256), a 1D grid-stride loop over
//   blocks (no grid-dimension limit), the current stream, a device guard, and every launch checked.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace medconv {
namespace {

constexpr int kMaxThreads = 256;            // block size upper bound (launch_bounds)
constexpr int kChan = 16;                   // channels per chunk = register accumulators per thread
constexpr int64_t kSmemBudget = 40 * 1024;  // bytes of dynamic shared memory per block
constexpr int64_t kMaxGrid = int64_t(1) << 16;  // blocks launched (>> resident blocks); the kernels grid-stride over the rest

// Geometry, always 3D (2D: D = Do = 1, kd = sd = dd = 1, pd = 0).
struct Geom {
  int64_t N, C, G, Cg;
  int64_t D, H, W;
  int64_t Do, Ho, Wo;
  int64_t kd, kh, kw;
  int64_t sd, sh, sw;
  int64_t pd, ph, pw;
  int64_t dd, dh, dw;
};

// How the positions are cut into blocks and which window each block stages.
struct Tile {
  int td, th, tw;        // tile extent in positions (threads = td * th * tw)
  int ed, eh, ew;        // staged window extent (shared-memory box per channel)
  int64_t ntd, nth, ntw; // tiles per dim
  int64_t ntiles;
  int cps;               // channels per chunk (<= kChan)
  int64_t nchunks;       // ceil(Cg / cps)
  bool use_smem;
  int64_t smem_bytes;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

inline int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < cap && p < v) p *= 2;
  return p;
}

// kind 0: the window of x read by a tile of outputs (forward, grad_weight).
// kind 1: the window of grad_out read by a tile of inputs (grad_input); its origin is
//         floor((i0 + pad - (k-1)*d) / s), its extent at most floor((t-1 + (k-1)*d) / s) + 2.
inline int64_t window_extent(int kind, int64_t t, int64_t k, int64_t s, int64_t d) {
  if (kind == 0) return (t - 1) * s + (k - 1) * d + 1;
  return (t - 1 + (k - 1) * d) / s + 2;
}

Tile choose_tile(int kind, const Geom& g, int64_t PD, int64_t PH, int64_t PW, int64_t elem_size) {
  Tile t{};
  t.tw = pow2_at_least(PW, 32);
  t.th = pow2_at_least(PH, kMaxThreads / t.tw);
  t.td = pow2_at_least(PD, kMaxThreads / (t.tw * t.th));
  const int64_t want = std::min<int64_t>(kChan, g.Cg);
  for (;;) {
    const int64_t ed = window_extent(kind, t.td, g.kd, g.sd, g.dd);
    const int64_t eh = window_extent(kind, t.th, g.kh, g.sh, g.dh);
    const int64_t ew = window_extent(kind, t.tw, g.kw, g.sw, g.dw);
    // Guard the product against overflow before multiplying (huge dilations).
    const bool small = ed <= kSmemBudget && eh <= kSmemBudget && ew <= kSmemBudget;
    const int64_t per_chan = small ? ed * eh * ew * elem_size : kSmemBudget + 1;
    const int64_t fit = small ? kSmemBudget / per_chan : 0;
    const int threads = t.td * t.th * t.tw;
    if (fit >= want || (fit >= 1 && threads <= 64)) {
      t.use_smem = true;
      t.cps = (int)std::min(want, fit);
      t.ed = (int)ed; t.eh = (int)eh; t.ew = (int)ew;
      t.smem_bytes = (int64_t)t.cps * per_chan;
      break;
    }
    if (threads == 1) {  // not even one channel of a 1-position window fits: global reads
      t.use_smem = false;
      t.cps = (int)want;
      t.ed = t.eh = t.ew = 1;
      t.smem_bytes = 0;
      break;
    }
    if (t.td > 1 && t.td >= t.th && t.td >= t.tw) t.td /= 2;
    else if (t.th > 1 && t.th >= t.tw) t.th /= 2;
    else t.tw /= 2;
  }
  t.cps = std::max(t.cps, 1);
  t.ntd = ceil_div(PD, t.td);
  t.nth = ceil_div(PH, t.th);
  t.ntw = ceil_div(PW, t.tw);
  t.ntiles = t.ntd * t.nth * t.ntw;
  t.nchunks = ceil_div(g.Cg, t.cps);
  return t;
}

// Channels in chunk `chunk` of a group of Cg channels cut into chunks of cps.
__device__ __forceinline__ int chunk_len(int cps, int64_t Cg, int64_t chunk) {
  const int64_t left = Cg - chunk * cps;
  return left < cps ? (int)left : cps;
}

struct TilePos {
  int ld, lh, lw;             // this thread's place in the tile
  int64_t b0d, b0h, b0w;      // first position of the tile
};

__device__ __forceinline__ TilePos tile_pos(const Tile& t, int64_t tile) {
  TilePos r;
  const int tid = threadIdx.x;
  r.lw = tid % t.tw;
  r.lh = (tid / t.tw) % t.th;
  r.ld = tid / (t.tw * t.th);
  const int64_t iw = tile % t.ntw;
  const int64_t ih = (tile / t.ntw) % t.nth;
  const int64_t id = tile / (t.ntw * t.nth);
  r.b0d = id * t.td;
  r.b0h = ih * t.th;
  r.b0w = iw * t.tw;
  return r;
}

// Stage nc channels (starting at plane pointer `src`, channel stride `cstride`) of the box
// [o_d, o_d+ed) x [o_h, o_h+eh) x [o_w, o_w+ew) of a (SD, SH, SW) volume; zero outside it.
template <typename scalar_t>
__device__ __forceinline__ void stage_box(scalar_t* dst, const scalar_t* __restrict__ src, int64_t cstride,
                                          int nc, const Tile& t, int64_t o_d, int64_t o_h, int64_t o_w,
                                          int64_t SD, int64_t SH, int64_t SW) {
  const int ext = t.ed * t.eh * t.ew;
  const int total = nc * ext;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int cc = e / ext;
    const int rem = e - cc * ext;
    const int ew = rem % t.ew;
    const int eh = (rem / t.ew) % t.eh;
    const int ed = rem / (t.ew * t.eh);
    const int64_t a = o_d + ed, b = o_h + eh, c = o_w + ew;
    scalar_t v = static_cast<scalar_t>(0.0f);
    if (a >= 0 && a < SD && b >= 0 && b < SH && c >= 0 && c < SW) {
      v = src[cc * cstride + (a * SH + b) * SW + c];
    }
    dst[e] = v;
  }
}

// ------------------------------------------------------------------------------------------
// forward: one thread per output position, kChan register accumulators (one per channel)
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
involution_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                      scalar_t* __restrict__ out, const Geom g, const Tile t, const int64_t total_blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* xs = reinterpret_cast<scalar_t*>(smem_raw);
  const int64_t So = g.Do * g.Ho * g.Wo;
  const int64_t Si = g.D * g.H * g.W;
  const int64_t KT = g.kd * g.kh * g.kw;
  const int ext = t.ed * t.eh * t.ew;

  for (int64_t blk = blockIdx.x; blk < total_blocks; blk += gridDim.x) {
    int64_t r = blk;
    const int64_t chunk = r % t.nchunks; r /= t.nchunks;
    const int64_t tile = r % t.ntiles; r /= t.ntiles;
    const int64_t grp = r % g.G;
    const int64_t n = r / g.G;
    const TilePos tp = tile_pos(t, tile);
    const int64_t od = tp.b0d + tp.ld, oh = tp.b0h + tp.lh, ow = tp.b0w + tp.lw;
    const bool active = od < g.Do && oh < g.Ho && ow < g.Wo;
    const int64_t c0 = grp * g.Cg + chunk * t.cps;
    const int nc = chunk_len(t.cps, g.Cg, chunk);
    const scalar_t* xc = x + (n * g.C + c0) * Si;

    if (t.use_smem) {
      stage_box(xs, xc, Si, nc, t, tp.b0d * g.sd - g.pd, tp.b0h * g.sh - g.ph, tp.b0w * g.sw - g.pw,
                g.D, g.H, g.W);
      __syncthreads();
    }
    if (active) {
      acc_t acc[kChan];
#pragma unroll
      for (int cc = 0; cc < kChan; ++cc) acc[cc] = acc_t(0);
      const int64_t p = (od * g.Ho + oh) * g.Wo + ow;
      const scalar_t* wp = w + (n * g.G + grp) * KT * So + p;
      int64_t tap = 0;
      for (int64_t a = 0; a < g.kd; ++a) {
        for (int64_t b = 0; b < g.kh; ++b) {
          for (int64_t c = 0; c < g.kw; ++c, ++tap) {
            const acc_t wv = static_cast<acc_t>(wp[tap * So]);
            if (t.use_smem) {
              const int off = (int)(((tp.ld * g.sd + a * g.dd) * t.eh + tp.lh * g.sh + b * g.dh) * t.ew +
                                    tp.lw * g.sw + c * g.dw);
#pragma unroll
              for (int cc = 0; cc < kChan; ++cc)
                if (cc < nc) acc[cc] += wv * static_cast<acc_t>(xs[cc * ext + off]);
            } else {
              const int64_t id = od * g.sd - g.pd + a * g.dd;
              const int64_t ih = oh * g.sh - g.ph + b * g.dh;
              const int64_t iw = ow * g.sw - g.pw + c * g.dw;
              if (id < 0 || id >= g.D || ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
              const scalar_t* xp = xc + (id * g.H + ih) * g.W + iw;
#pragma unroll
              for (int cc = 0; cc < kChan; ++cc)
                if (cc < nc) acc[cc] += wv * static_cast<acc_t>(xp[cc * Si]);
            }
          }
        }
      }
      scalar_t* op = out + (n * g.C + c0) * So + p;
#pragma unroll
      for (int cc = 0; cc < kChan; ++cc)
        if (cc < nc) op[cc * So] = static_cast<scalar_t>(acc[cc]);
    }
    if (t.use_smem) __syncthreads();  // the next block iteration overwrites xs
  }
}

// ------------------------------------------------------------------------------------------
// grad_input (gather): one thread per input position; output p feeds input i through tap t
// iff p*s = i + pad - t*d. The grad_out window of the input tile is staged per channel.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
involution_grad_input_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ w,
                             scalar_t* __restrict__ gx, const Geom g, const Tile t, const int64_t total_blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* gs = reinterpret_cast<scalar_t*>(smem_raw);
  const int64_t So = g.Do * g.Ho * g.Wo;
  const int64_t Si = g.D * g.H * g.W;
  const int64_t KT = g.kd * g.kh * g.kw;
  const int ext = t.ed * t.eh * t.ew;

  for (int64_t blk = blockIdx.x; blk < total_blocks; blk += gridDim.x) {
    int64_t r = blk;
    const int64_t chunk = r % t.nchunks; r /= t.nchunks;
    const int64_t tile = r % t.ntiles; r /= t.ntiles;
    const int64_t grp = r % g.G;
    const int64_t n = r / g.G;
    const TilePos tp = tile_pos(t, tile);
    const int64_t id = tp.b0d + tp.ld, ih = tp.b0h + tp.lh, iw = tp.b0w + tp.lw;
    const bool active = id < g.D && ih < g.H && iw < g.W;
    const int64_t c0 = grp * g.Cg + chunk * t.cps;
    const int nc = chunk_len(t.cps, g.Cg, chunk);
    const scalar_t* gyc = gy + (n * g.C + c0) * So;
    // Origin of the staged grad_out box: the first output any input of the tile can reach.
    const int64_t P0d = floor_div(tp.b0d + g.pd - (g.kd - 1) * g.dd, g.sd);
    const int64_t P0h = floor_div(tp.b0h + g.ph - (g.kh - 1) * g.dh, g.sh);
    const int64_t P0w = floor_div(tp.b0w + g.pw - (g.kw - 1) * g.dw, g.sw);

    if (t.use_smem) {
      stage_box(gs, gyc, So, nc, t, P0d, P0h, P0w, g.Do, g.Ho, g.Wo);
      __syncthreads();
    }
    if (active) {
      acc_t acc[kChan];
#pragma unroll
      for (int cc = 0; cc < kChan; ++cc) acc[cc] = acc_t(0);
      const scalar_t* wg = w + (n * g.G + grp) * KT * So;
      // Per-axis tap arithmetic in 32 bits (64-bit division is a slow software routine on the
      // GPU); make_geom guarantees every per-axis extent is below 2^30. Offsets stay 64-bit.
      const int sd = (int)g.sd, sh = (int)g.sh, sw = (int)g.sw;
      for (int64_t a = 0; a < g.kd; ++a) {
        const int qd = (int)(id + g.pd) - (int)(a * g.dd);
        if (qd < 0 || (sd != 1 && qd % sd != 0)) continue;
        const int64_t pd_ = qd / sd;
        if (pd_ >= g.Do) continue;
        for (int64_t b = 0; b < g.kh; ++b) {
          const int qh = (int)(ih + g.ph) - (int)(b * g.dh);
          if (qh < 0 || (sh != 1 && qh % sh != 0)) continue;
          const int64_t ph_ = qh / sh;
          if (ph_ >= g.Ho) continue;
          for (int64_t c = 0; c < g.kw; ++c) {
            const int qw = (int)(iw + g.pw) - (int)(c * g.dw);
            if (qw < 0 || (sw != 1 && qw % sw != 0)) continue;
            const int64_t pw_ = qw / sw;
            if (pw_ >= g.Wo) continue;
            const int64_t p = (pd_ * g.Ho + ph_) * g.Wo + pw_;
            const int64_t tap = (a * g.kh + b) * g.kw + c;
            const acc_t wv = static_cast<acc_t>(wg[tap * So + p]);
            if (t.use_smem) {
              const int off = (int)(((pd_ - P0d) * t.eh + (ph_ - P0h)) * t.ew + (pw_ - P0w));
#pragma unroll
              for (int cc = 0; cc < kChan; ++cc)
                if (cc < nc) acc[cc] += wv * static_cast<acc_t>(gs[cc * ext + off]);
            } else {
#pragma unroll
              for (int cc = 0; cc < kChan; ++cc)
                if (cc < nc) acc[cc] += wv * static_cast<acc_t>(gyc[cc * So + p]);
            }
          }
        }
      }
      scalar_t* xp = gx + (n * g.C + c0) * Si + (id * g.H + ih) * g.W + iw;
#pragma unroll
      for (int cc = 0; cc < kChan; ++cc)
        if (cc < nc) xp[cc * Si] = static_cast<scalar_t>(acc[cc]);
    }
    if (t.use_smem) __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------
// grad_weight (gather): gw[n, g, t, p] = sum_{c in group} gy[n, c, p] * x[n, c, p*s + t*d - pad].
// One thread per output position p; the block walks over all channel chunks of the group, its
// grad_out values in registers, the x window in shared memory. With more than one chunk the
// partial sums live in the opmath workspace `ws`, touched only by the owning thread.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
involution_grad_weight_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                              scalar_t* __restrict__ gw, at::opmath_type<scalar_t>* __restrict__ ws,
                              const Geom g, const Tile t, const int64_t total_blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* xs = reinterpret_cast<scalar_t*>(smem_raw);
  const int64_t So = g.Do * g.Ho * g.Wo;
  const int64_t Si = g.D * g.H * g.W;
  const int64_t KT = g.kd * g.kh * g.kw;
  const int ext = t.ed * t.eh * t.ew;

  for (int64_t blk = blockIdx.x; blk < total_blocks; blk += gridDim.x) {
    int64_t r = blk;
    const int64_t tile = r % t.ntiles; r /= t.ntiles;
    const int64_t grp = r % g.G;
    const int64_t n = r / g.G;
    const TilePos tp = tile_pos(t, tile);
    const int64_t od = tp.b0d + tp.ld, oh = tp.b0h + tp.lh, ow = tp.b0w + tp.lw;
    const bool active = od < g.Do && oh < g.Ho && ow < g.Wo;
    const int64_t p = active ? (od * g.Ho + oh) * g.Wo + ow : 0;
    const int64_t wbase = (n * g.G + grp) * KT * So + p;

    for (int64_t chunk = 0; chunk < t.nchunks; ++chunk) {
      const int64_t c0 = grp * g.Cg + chunk * t.cps;
      const int nc = chunk_len(t.cps, g.Cg, chunk);
      const scalar_t* xc = x + (n * g.C + c0) * Si;
      if (t.use_smem) {
        stage_box(xs, xc, Si, nc, t, tp.b0d * g.sd - g.pd, tp.b0h * g.sh - g.ph, tp.b0w * g.sw - g.pw,
                  g.D, g.H, g.W);
        __syncthreads();
      }
      if (active) {
        acc_t gyr[kChan];
        const scalar_t* gyp = gy + (n * g.C + c0) * So + p;
#pragma unroll
        for (int cc = 0; cc < kChan; ++cc) gyr[cc] = cc < nc ? static_cast<acc_t>(gyp[cc * So]) : acc_t(0);
        const bool first = chunk == 0, last = chunk == t.nchunks - 1;
        int64_t tap = 0;
        for (int64_t a = 0; a < g.kd; ++a) {
          for (int64_t b = 0; b < g.kh; ++b) {
            for (int64_t c = 0; c < g.kw; ++c, ++tap) {
              acc_t s = acc_t(0);
              if (t.use_smem) {
                const int off = (int)(((tp.ld * g.sd + a * g.dd) * t.eh + tp.lh * g.sh + b * g.dh) * t.ew +
                                      tp.lw * g.sw + c * g.dw);
#pragma unroll
                for (int cc = 0; cc < kChan; ++cc)
                  if (cc < nc) s += gyr[cc] * static_cast<acc_t>(xs[cc * ext + off]);
              } else {
                const int64_t id = od * g.sd - g.pd + a * g.dd;
                const int64_t ih = oh * g.sh - g.ph + b * g.dh;
                const int64_t iw = ow * g.sw - g.pw + c * g.dw;
                if (id >= 0 && id < g.D && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
                  const scalar_t* xp = xc + (id * g.H + ih) * g.W + iw;
#pragma unroll
                  for (int cc = 0; cc < kChan; ++cc)
                    if (cc < nc) s += gyr[cc] * static_cast<acc_t>(xp[cc * Si]);
                }
              }
              const int64_t o = wbase + tap * So;
              if (first && last) {
                gw[o] = static_cast<scalar_t>(s);
              } else if (first) {
                ws[o] = s;
              } else if (!last) {
                ws[o] += s;
              } else {
                gw[o] = static_cast<scalar_t>(ws[o] + s);
              }
            }
          }
        }
      }
      if (t.use_smem) __syncthreads();
    }
  }
}

// ------------------------------------------------------------------------------------------
// host side: checks, geometry, launches
// ------------------------------------------------------------------------------------------
int64_t out_size(int64_t n, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (n + 2 * p - d * (k - 1) - 1) / s + 1;
}

std::vector<int64_t> expect_list(c10::IntArrayRef v, int64_t dims, const char* name, const char* op, int64_t minimum) {
  TORCH_CHECK((int64_t)v.size() == dims, op, ": ", name, " must have ", dims, " values, got ", v);
  for (auto e : v) TORCH_CHECK(e >= minimum, op, ": ", name, " must be >= ", minimum, ", got ", v);
  return std::vector<int64_t>(v.begin(), v.end());
}

void check_float_cuda(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", dt);
}

void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " has dtype ", a.scalar_type(), " but ", bn,
              " has dtype ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": ", an, " is on ", a.device(), " but ", bn, " is on ", b.device());
}

// Fills the geometry from the input sizes (N, C, *S), kernel arguments and G; checks everything
// a direct op call could get wrong, so that no kernel can read or write out of bounds.
Geom make_geom(const char* op, c10::IntArrayRef in_sizes, int64_t G, c10::IntArrayRef kernel_size,
               c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const int64_t dims = (int64_t)in_sizes.size() - 2;
  TORCH_CHECK(dims == 2 || dims == 3, op, ": the input must be (N, C, H, W) or (N, C, D, H, W), got sizes ", in_sizes);
  auto k = expect_list(kernel_size, dims, "kernel_size", op, 1);
  auto s = expect_list(stride, dims, "stride", op, 1);
  auto p = expect_list(padding, dims, "padding", op, 0);
  auto d = expect_list(dilation, dims, "dilation", op, 1);
  for (auto v : in_sizes) TORCH_CHECK(v >= 0, op, ": negative size in ", in_sizes);
  TORCH_CHECK(G >= 1, op, ": the number of groups G must be >= 1, got ", G);
  const int64_t C = in_sizes[1];
  TORCH_CHECK(C % G == 0, op, ": C=", C, " channels are not divisible by G=", G, " groups");
  Geom g{};
  g.N = in_sizes[0];
  g.C = C;
  g.G = G;
  g.Cg = C / G;
  const int64_t off = 3 - dims;  // 2D: the depth axis is a dummy of size 1
  int64_t S[3] = {1, 1, 1}, K[3] = {1, 1, 1}, ST[3] = {1, 1, 1}, PA[3] = {0, 0, 0}, DI[3] = {1, 1, 1}, O[3];
  for (int64_t i = 0; i < dims; ++i) {
    S[off + i] = in_sizes[2 + i];
    K[off + i] = k[i];
    ST[off + i] = s[i];
    PA[off + i] = p[i];
    DI[off + i] = d[i];
    // Per-axis coordinates are 32-bit inside the kernels (flattened offsets are 64-bit).
    constexpr int64_t lim = int64_t(1) << 30;
    TORCH_CHECK(in_sizes[2 + i] < lim && p[i] < lim && k[i] < lim && d[i] < lim && s[i] < lim &&
                    in_sizes[2 + i] + 2 * p[i] < lim && d[i] * (k[i] - 1) < lim,
                op, ": spatial dim ", i, " is too large (size + 2*padding, dilation*(kernel_size-1) and stride must "
                "each be below 2^30), got size ", in_sizes[2 + i], ", padding ", p[i], ", dilation ", d[i],
                ", kernel_size ", k[i], ", stride ", s[i]);
    TORCH_CHECK(in_sizes[2 + i] + 2 * p[i] >= d[i] * (k[i] - 1) + 1, op, ": the kernel (size ", k[i], ", dilation ",
                d[i], ") is larger than the padded input along spatial dim ", i, " (size ", in_sizes[2 + i],
                " + 2*padding ", p[i], ")");
  }
  for (int i = 0; i < 3; ++i) O[i] = out_size(S[i], K[i], ST[i], PA[i], DI[i]);
  g.D = S[0]; g.H = S[1]; g.W = S[2];
  g.Do = O[0]; g.Ho = O[1]; g.Wo = O[2];
  g.kd = K[0]; g.kh = K[1]; g.kw = K[2];
  g.sd = ST[0]; g.sh = ST[1]; g.sw = ST[2];
  g.pd = PA[0]; g.ph = PA[1]; g.pw = PA[2];
  g.dd = DI[0]; g.dh = DI[1]; g.dw = DI[2];
  return g;
}

std::vector<int64_t> weight_sizes(const Geom& g, int64_t dims) {
  std::vector<int64_t> v{g.N, g.G};
  const int64_t K[3] = {g.kd, g.kh, g.kw}, O[3] = {g.Do, g.Ho, g.Wo};
  for (int64_t i = 3 - dims; i < 3; ++i) v.push_back(K[i]);
  for (int64_t i = 3 - dims; i < 3; ++i) v.push_back(O[i]);
  return v;
}

std::vector<int64_t> out_sizes(const Geom& g, int64_t dims) {
  std::vector<int64_t> v{g.N, g.C};
  const int64_t O[3] = {g.Do, g.Ho, g.Wo};
  for (int64_t i = 3 - dims; i < 3; ++i) v.push_back(O[i]);
  return v;
}

void check_weight(const char* op, const at::Tensor& weight, const Geom& g, int64_t dims) {
  const auto expected = weight_sizes(g, dims);
  TORCH_CHECK(weight.sizes().vec() == expected, op, ": weight must have shape (N, G, *kernel_size, *output_size) = ",
              c10::IntArrayRef(expected), " for these arguments, got ", weight.sizes());
}

inline int64_t grid_for(int64_t total_blocks) { return std::min(total_blocks, kMaxGrid); }

at::Tensor involution_cuda(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef kernel_size,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const char* op = "medconv::involution";
  check_float_cuda(x, "x", op);
  check_float_cuda(weight, "weight", op);
  check_same(x, "x", weight, "weight", op);
  const int64_t dims = x.dim() - 2;
  TORCH_CHECK(dims == 2 || dims == 3, op, ": x must be (N, C, H, W) or (N, C, D, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 + 2 * dims, op, ": weight must have ", 2 + 2 * dims,
              " dims (N, G, *kernel_size, *output_size), got shape ", weight.sizes());
  const Geom g = make_geom(op, x.sizes(), weight.size(1), kernel_size, stride, padding, dilation);
  check_weight(op, weight, g, dims);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(out_sizes(g, dims), x.options());
  if (out.numel() == 0) return out;
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "involution_cuda", [&] {
    const Tile t = choose_tile(0, g, g.Do, g.Ho, g.Wo, sizeof(scalar_t));
    const int64_t total = g.N * g.G * t.ntiles * t.nchunks;
    involution_fwd_kernel<scalar_t><<<(unsigned)grid_for(total), t.td * t.th * t.tw, (size_t)t.smem_bytes,
                                      at::cuda::getCurrentCUDAStream()>>>(
        xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, t, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor involution_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& weight, c10::IntArrayRef input_size,
                                      c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                      c10::IntArrayRef dilation) {
  const char* op = "medconv::involution_grad_input";
  check_float_cuda(grad_out, "grad_out", op);
  check_float_cuda(weight, "weight", op);
  check_same(grad_out, "grad_out", weight, "weight", op);
  const int64_t dims = (int64_t)input_size.size() - 2;
  TORCH_CHECK(dims == 2 || dims == 3, op, ": input_size must be (N, C, H, W) or (N, C, D, H, W), got ", input_size);
  TORCH_CHECK(weight.dim() == 2 + 2 * dims, op, ": weight must have ", 2 + 2 * dims,
              " dims (N, G, *kernel_size, *output_size), got shape ", weight.sizes());
  const Geom g = make_geom(op, input_size, weight.size(1), kernel_size, stride, padding, dilation);
  check_weight(op, weight, g, dims);
  const auto osz = out_sizes(g, dims);
  TORCH_CHECK(grad_out.sizes().vec() == osz, op, ": grad_out must have shape ", c10::IntArrayRef(osz), ", got ",
              grad_out.sizes());
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto gx = at::empty(input_size, grad_out.options());
  if (gx.numel() == 0) return gx;
  const auto gyc = grad_out.contiguous();
  const auto wc = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "involution_grad_input_cuda", [&] {
    const Tile t = choose_tile(1, g, g.D, g.H, g.W, sizeof(scalar_t));
    const int64_t total = g.N * g.G * t.ntiles * t.nchunks;
    involution_grad_input_kernel<scalar_t><<<(unsigned)grid_for(total), t.td * t.th * t.tw, (size_t)t.smem_bytes,
                                             at::cuda::getCurrentCUDAStream()>>>(
        gyc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), g, t, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

at::Tensor involution_grad_weight_cuda(const at::Tensor& grad_out, const at::Tensor& x, c10::IntArrayRef kernel_size,
                                       c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                       int64_t groups) {
  const char* op = "medconv::involution_grad_weight";
  check_float_cuda(grad_out, "grad_out", op);
  check_float_cuda(x, "x", op);
  check_same(grad_out, "grad_out", x, "x", op);
  const int64_t dims = x.dim() - 2;
  TORCH_CHECK(dims == 2 || dims == 3, op, ": x must be (N, C, H, W) or (N, C, D, H, W), got shape ", x.sizes());
  const Geom g = make_geom(op, x.sizes(), groups, kernel_size, stride, padding, dilation);
  const auto osz = out_sizes(g, dims);
  TORCH_CHECK(grad_out.sizes().vec() == osz, op, ": grad_out must have shape ", c10::IntArrayRef(osz), ", got ",
              grad_out.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  auto gw = at::empty(weight_sizes(g, dims), x.options());
  if (gw.numel() == 0) return gw;
  if (g.Cg == 0) return gw.zero_();  // C == 0: an empty sum
  const auto gyc = grad_out.contiguous();
  const auto xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "involution_grad_weight_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tile t = choose_tile(0, g, g.Do, g.Ho, g.Wo, sizeof(scalar_t));
    at::Tensor ws;  // partial sums over channel chunks, only when a group spans several chunks
    if (t.nchunks > 1) {
      ws = at::empty(gw.sizes(), x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    }
    const int64_t total = g.N * g.G * t.ntiles;
    involution_grad_weight_kernel<scalar_t><<<(unsigned)grid_for(total), t.td * t.th * t.tw, (size_t)t.smem_bytes,
                                              at::cuda::getCurrentCUDAStream()>>>(
        gyc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), gw.mutable_data_ptr<scalar_t>(),
        ws.defined() ? ws.mutable_data_ptr<acc_t>() : nullptr, g, t, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gw;
}

}  // namespace

TORCH_LIBRARY_IMPL(medconv, CUDA, m) {
  m.impl("involution", &involution_cuda);
  m.impl("involution_grad_input", &involution_grad_input_cuda);
  m.impl("involution_grad_weight", &involution_grad_weight_cuda);
}

}  // namespace medconv
