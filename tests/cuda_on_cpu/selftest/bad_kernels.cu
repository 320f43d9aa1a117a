// Self-test of the CUDA-on-CPU emulator: one correct kernel and deliberately broken ones, each of
// which the emulator must flag (selftest.py states how). No torch: built standalone in seconds.
//
// Usage: bad_kernels CASE SCHED   (SCHED 0 forward, 1 reverse, 2 random fiber/block order)
// Prints "error: <emulator error>" and/or "result: <max abs error vs the exact answer> <nan count>".
// Sanitizer reports go to stderr.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

constexpr int kN = 64;     // elements reduced per block
constexpr int kBlocks = 4;

// Correct: shared-memory tree step + warp-shuffle reduction of 64 values per block.
__global__ void ok_reduce(float* out, const float* in) {
  __shared__ float buf[kN];
  const int t = threadIdx.x;
  buf[t] = in[blockIdx.x * kN + t];
  __syncthreads();
  if (t < 32) buf[t] += buf[t + 32];
  __syncthreads();
  float v = t < 32 ? buf[t] : 0.f;
  if (t < 32)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (t == 0) out[blockIdx.x] = v;
}

// Correct: warp votes and an atomic counter. out[w] = ballot of odd lanes + any/all flags; out[2] =
// number of threads of the grid (atomicAdd).
__global__ void ok_votes_atomics(float* out, unsigned* ballots, int* counter) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned b = __ballot_sync(0xffffffffu, lane % 2 == 1);
  const int any = __any_sync(0xffffffffu, lane == 31 && warp == 1);
  const int all = __all_sync(0xffffffffu, lane < 32);
  if (lane == 0) {
    ballots[warp] = b;
    out[warp] = static_cast<float>(any * 2 + all);
  }
  atomicAdd(counter, 1);
}

// The same with the first __syncthreads() removed: threads read buf[t + 32] before it is written.
__global__ void missing_syncthreads(float* out, const float* in) {
  __shared__ float buf[kN];
  const int t = threadIdx.x;
  buf[t] = in[blockIdx.x * kN + t];
  if (t < 32) buf[t] += buf[t + 32];
  __syncthreads();
  float v = t < 32 ? buf[t] : 0.f;
  if (t < 32)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (t == 0) out[blockIdx.x] = v;
}

// Off-by-one store bound: `i <= n` instead of `i < n` writes one element past the output.
__global__ void store_off_by_one(float* out, const float* in, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 2.f * (i < n ? in[i] : 0.f);
}

// Dynamic shared memory one element too small (the launch passes (n - 1) * sizeof(float)).
__global__ void dyn_smem_short(float* out, const float* in) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = dyn[blockDim.x - 1 - threadIdx.x];
}

// Static shared array overrun by one element.
__global__ void static_smem_overrun(float* out) {
  __shared__ float buf[32];
  buf[threadIdx.x + 1] = 1.f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

// __syncthreads() inside a branch only half of the block takes (a hang on a GPU).
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.f;
}

// A full-mask shuffle reached by half of the warp (undefined on a GPU).
__global__ void partial_shuffle(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Reads a shared-memory element nobody wrote.
__global__ void uninit_shared(float* out) {
  __shared__ float buf[32];
  if (threadIdx.x < 31) buf[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = buf[(threadIdx.x + 1) % 32];
}

// No grid-stride loop: correct only while the grid covers every element. The host code of the real
// kernels clamps grids to the hardware limits, which the tests reach by clamping small grids.
__global__ void missing_grid_stride_loop(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = 1.f;
}

namespace {
std::vector<float> input(int n) {
  std::vector<float> v(n);
  for (int i = 0; i < n; ++i) v[i] = static_cast<float>((i * 37) % 11) - 5.f;
  return v;
}

// Exact-size heap buffer, NaN-filled: ASan sees one element past the end, unwritten stays NaN.
float* nan_buffer(int n) {
  float* p = static_cast<float*>(std::malloc(n * sizeof(float)));
  for (int i = 0; i < n; ++i) p[i] = NAN;
  return p;
}

void result(const float* got, const float* want, int n) {
  double err = 0;
  int nans = 0;
  for (int i = 0; i < n; ++i) {
    if (std::isnan(got[i])) ++nans;
    else err = std::fmax(err, std::fabs(got[i] - want[i]));
  }
  std::printf("result: %g %d\n", err, nans);
}

void reduce_case(bool racy) {
  const std::vector<float> in = input(kBlocks * kN);
  float* out = nan_buffer(kBlocks);
  float want[kBlocks] = {};
  for (int b = 0; b < kBlocks; ++b)
    for (int i = 0; i < kN; ++i) want[b] += in[b * kN + i];
  if (racy) missing_syncthreads<<<kBlocks, kN>>>(out, in.data());
  else ok_reduce<<<kBlocks, kN>>>(out, in.data());
  result(out, want, kBlocks);
  std::free(out);
}

void votes_case() {
  float* out = nan_buffer(2);
  unsigned ballots[2] = {0, 0};
  int counter = 0;
  ok_votes_atomics<<<3, 64>>>(out, ballots, &counter);
  const float want[2] = {1.f, 3.f};  // warp 0: any = 0, all = 1; warp 1: any = 1, all = 1
  double err = std::fabs(counter - 3 * 64);
  for (int w = 0; w < 2; ++w) err += std::fabs(static_cast<double>(ballots[w]) - 0xAAAAAAAAu);
  if (err != 0) std::printf("ballots %x %x counter %d\n", ballots[0], ballots[1], counter);
  const float got[2] = {out[0] + static_cast<float>(err), out[1]};
  result(got, want, 2);
  std::free(out);
}

void run_case(const std::string& c) {
  const int n = 100;
  if (c == "ok_reduce") return reduce_case(false);
  if (c == "ok_votes_atomics") return votes_case();
  if (c == "missing_syncthreads") return reduce_case(true);
  float* out = nan_buffer(n);
  std::vector<float> want(n, 1.f);
  const std::vector<float> in = input(n);
  if (c == "store_off_by_one") {
    store_off_by_one<<<(n + 31) / 32, 32>>>(out, in.data(), n);
    for (int i = 0; i < n; ++i) want[i] = 2.f * in[i];
    result(out, want.data(), n);
  } else if (c == "dyn_smem_short") {
    dyn_smem_short<<<1, 32, 31 * sizeof(float)>>>(out, in.data());
    for (int i = 0; i < 32; ++i) want[i] = in[31 - i];
    result(out, want.data(), 32);
  } else if (c == "static_smem_overrun") {
    static_smem_overrun<<<1, 32>>>(out);
  } else if (c == "divergent_barrier") {
    divergent_barrier<<<1, 32>>>(out);
  } else if (c == "partial_shuffle") {
    partial_shuffle<<<1, 32>>>(out);
  } else if (c == "uninit_shared") {
    uninit_shared<<<1, 32>>>(out);
    result(out, want.data(), 32);
  } else if (c == "missing_grid_stride_loop") {
    missing_grid_stride_loop<<<(n + 31) / 32, 32>>>(out, n);
    result(out, want.data(), n);
  } else if (c == "grid_y_too_large") {
    divergent_barrier<<<dim3(1, 70000), 32>>>(out);
  } else if (c == "block_too_large") {
    uninit_shared<<<1, 1056>>>(out);
  } else if (c == "dyn_smem_too_large") {
    dyn_smem_short<<<1, 32, 49 * 1024>>>(out, in.data());
  } else {
    std::fprintf(stderr, "unknown case %s\n", c.c_str());
    std::exit(2);
  }
  std::free(out);
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s CASE [SCHED [MAX_GRID]]\n", argv[0]);
    return 2;
  }
  cudaemu::cfg.sched = argc > 2 ? std::atoi(argv[2]) : 0;
  cudaemu::cfg.max_grid = argc > 3 ? std::atoi(argv[3]) : 0;
  try {
    run_case(argv[1]);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    for (char& ch : msg)
      if (ch == '\n') ch = ' ';
    std::printf("error: %s\n", msg.c_str());
  }
  return 0;
}
