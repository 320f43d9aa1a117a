// CUDA-on-CPU runtime: runs CUDA __global__ kernels on the CPU, one block at a time, every CUDA
// thread of the block a cooperative fiber (own stack, hand-written x86-64 context switch in
// context_switch.S) on one OS thread. Used by tests/cuda_on_cpu (docs/cuda_on_cpu.md).
//
//  * __syncthreads() is a real block barrier: a fiber runs until it reaches a barrier (or exits),
//    then the next fiber runs; the barrier opens when every thread of the block has arrived.
//    Reaching different __syncthreads() call sites, or a barrier while other threads of the block
//    have exited, is reported as an error (undefined behaviour / hang on a GPU).
//  * warp intrinsics (__shfl_*_sync, __ballot/__any/__all_sync, __syncwarp and the WMMA ops of stand_ins/mma.h) are
//    warp-collective: every lane named in the mask must reach the same call site; the values are
//    exchanged by the scheduler.
//  * shared memory: static __shared__ arrays become function-local statics (one copy per block, since
//    blocks run one at a time), dynamic (extern) shared memory is a malloc'd buffer of exactly the
//    launch's byte count (so AddressSanitizer sees overruns); both are filled with 0xFF bytes (NaN
//    for floating point) at the start of every block, so reads of unwritten shared memory show up.
//  * race detection: the order in which fibers run between barriers, and the block order, is
//    configurable (forward, reverse, random); a missing barrier changes the result with the order.
//  * launch configuration is validated like the driver would (block <= 1024 threads, grid y/z <=
//    65535, dynamic shared memory <= 48 KiB without opt-in, no empty grid); max_grid clamps the
//    grid so that grid-stride loops are exercised with small inputs.
//  * every launch is counted per source site ("file.cu:LINE"), so a test run can prove that each
//    kernel launch of the sources was exercised.
#pragma once
#include <sys/mman.h>


#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

// Minimal x86-64 context switch (context_switch.S): saves callee-saved registers, MXCSR and the x87
// control word on the current stack, stores the stack pointer in *save and continues on new_sp.
// glibc's swapcontext makes a sigprocmask system call per switch, which dominated the run time.
extern "C" void cudaemu_switch(void** save, void* new_sp);

#if defined(__SANITIZE_ADDRESS__)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
}
#define CUDAEMU_ASAN 1
#else
#define CUDAEMU_ASAN 0
#endif

// ---- CUDA keywords -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace cudaemu {

struct Stream {};

struct Config {
  int sched = 0;           // 0 forward, 1 reverse, 2 random (fiber order between barriers and block order)
  uint64_t seed = 1;
  int64_t max_grid = 0;    // > 0: clamp every grid dimension to this (exercises grid-stride loops)
  int cc_major = 9;        // reported by the fake getCurrentDeviceProperties()
  size_t stack_size = 512 * 1024;
  int64_t smem_limit = 48 * 1024;
};
inline Config cfg;

enum State { READY, AT_BAR, AT_WARP, DONE };
enum WarpOp { W_IDX, W_UP, W_DOWN, W_XOR, W_SYNC, W_BALLOT, W_ANY, W_ALL };

struct Fiber {
  void* sp = nullptr;
  char* map = nullptr;   // mmap'd region incl. guard page
  char* stack = nullptr; // usable stack bottom
  size_t stack_size = 0;
  State state = DONE;
  uint3 idx{0, 0, 0};
  const char* file = "";
  int line = 0;
  int wop = 0;
  unsigned mask = 0;
  int warg = 0, width = 32;
  uint64_t val = 0, out = 0;
  void* fake_stack = nullptr;
};

struct Runtime {
  std::vector<Fiber> fibers;
  void* sched_sp = nullptr;
  int cur = -1;
  std::function<void()> body;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  void* sched_fake = nullptr;
  bool fatal = false;
  std::vector<std::string> errors;
  unsigned char* dyn = nullptr;
  size_t dyn_size = 0;
  uint64_t block_gen = 0;
  std::unordered_map<const void*, std::pair<uint64_t, size_t>> shared;  // address -> (block gen, bytes)
  std::mt19937_64 rng{1};
  const char* kernel = "";
  // statistics
  int64_t launches = 0, blocks = 0, switches = 0, barriers = 0, warp_ops = 0;
  std::map<std::string, int64_t> site_launches;  // "file.cu:LINE" of the <<<...>>> -> launches
};
inline Runtime rt;

inline std::string where() {
  std::ostringstream s;
  s << rt.kernel << " block (" << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z << ")";
  return s.str();
}

inline void report(const std::string& msg, bool fatal = false) {
  if (rt.errors.size() < 20) rt.errors.push_back(where() + ": " + msg);
  if (fatal) rt.fatal = true;
}

inline void start_switch(void** save, const void* bottom, size_t size) {
#if CUDAEMU_ASAN
  __sanitizer_start_switch_fiber(save, bottom, size);
#else
  (void)save; (void)bottom; (void)size;
#endif
}
inline void finish_switch(void* save, const void** bottom_old, size_t* size_old) {
#if CUDAEMU_ASAN
  __sanitizer_finish_switch_fiber(save, bottom_old, size_old);
#else
  (void)save; (void)bottom_old; (void)size_old;
#endif
}

inline void yield_to_sched() {
  Fiber& f = rt.fibers[rt.cur];
  start_switch(&f.fake_stack, rt.main_bottom, rt.main_size);
  cudaemu_switch(&f.sp, rt.sched_sp);
  finish_switch(f.fake_stack, nullptr, nullptr);
}

inline void fiber_entry() {
  finish_switch(nullptr, &rt.main_bottom, &rt.main_size);
  rt.body();
  Fiber& f = rt.fibers[rt.cur];
  f.state = DONE;
  start_switch(nullptr, rt.main_bottom, rt.main_size);  // this fiber's stack is done
  cudaemu_switch(&f.sp, rt.sched_sp);
  std::abort();  // never resumed
}

inline void ensure_fibers(unsigned n) {
  while (rt.fibers.size() < n) {
    rt.fibers.emplace_back();
    Fiber& f = rt.fibers.back();
    const size_t page = 4096;
    f.map = static_cast<char*>(mmap(nullptr, cfg.stack_size + page, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (f.map == MAP_FAILED) throw std::runtime_error("cudaemu: mmap of a fiber stack failed");
    mprotect(f.map, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    f.stack = f.map + page;
    f.stack_size = cfg.stack_size;
  }
}

inline void resume(int i) {
  Fiber& f = rt.fibers[i];
  rt.cur = i;
  threadIdx = f.idx;
  ++rt.switches;
  start_switch(&rt.sched_fake, f.stack, f.stack_size);
  cudaemu_switch(&rt.sched_sp, f.sp);
  finish_switch(rt.sched_fake, nullptr, nullptr);
  rt.cur = -1;
}

// ---- synchronisation primitives called by kernel code --------------------------------------
inline void syncthreads_impl(const char* file, int line) {
  Fiber& f = rt.fibers[rt.cur];
  f.state = AT_BAR;
  f.file = file;
  f.line = line;
  yield_to_sched();
}

template <typename T>
inline T warp_op(int op, unsigned mask, T v, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 8, "cudaemu: warp shuffle of a type wider than 8 bytes");
  Fiber& f = rt.fibers[rt.cur];
  f.wop = op;
  f.mask = mask;
  f.warg = arg;
  f.width = width;
  f.val = 0;
  std::memcpy(&f.val, &v, sizeof(T));
  f.file = file;
  f.line = line;
  f.state = AT_WARP;
  yield_to_sched();
  T r;
  std::memcpy(&r, &rt.fibers[rt.cur].out, sizeof(T));
  return r;
}

inline std::string site(const Fiber& f) {
  std::ostringstream s;
  s << f.file << ":" << f.line;
  return s.str();
}

// Opens warp-collective ops whose lanes have all arrived; returns whether any was released.
inline bool release_warps(unsigned n) {
  bool released = false;
  for (unsigned w0 = 0; w0 < n; w0 += 32) {
    const unsigned w1 = std::min(n, w0 + 32);
    int at_warp = -1;
    bool all = true;
    for (unsigned i = w0; i < w1; ++i) {
      if (rt.fibers[i].state == AT_WARP) {
        if (at_warp < 0) at_warp = (int)i;
      } else {
        all = false;
      }
    }
    if (at_warp < 0) continue;
    const Fiber& f0 = rt.fibers[at_warp];
    // which lanes the op names
    const unsigned lanes = w1 - w0;
    const unsigned present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    if ((f0.mask & ~present) != 0) {
      std::ostringstream s;
      s << "warp op at " << site(f0) << " with mask 0x" << std::hex << f0.mask << " names lanes that do not exist (warp of "
        << std::dec << lanes << " threads)";
      report(s.str(), true);
      return false;
    }
    bool ready = true;
    for (unsigned i = w0; i < w1; ++i) {
      const Fiber& f = rt.fibers[i];
      const bool named = (f0.mask >> (i - w0)) & 1u;
      if (!named) continue;
      if (f.state != AT_WARP) {
        ready = false;
        continue;
      }
      if (f.line != f0.line || f.file != f0.file || f.wop != f0.wop || f.mask != f0.mask) {
        report("lanes of one warp reached different warp-collective ops: " + site(f0) + " and " + site(f), true);
        return false;
      }
    }
    (void)all;
    if (!ready) continue;  // decided by the deadlock check below if nobody can move
    // votes: bit l set when lane l (named in the mask) passed a non-zero predicate
    uint64_t ballot = 0;
    for (unsigned i = w0; i < w1; ++i)
      if (((f0.mask >> (i - w0)) & 1u) && rt.fibers[i].val != 0) ballot |= 1ull << (i - w0);
    for (unsigned i = w0; i < w1; ++i) {
      Fiber& f = rt.fibers[i];
      if (!((f0.mask >> (i - w0)) & 1u)) continue;
      const int lane = (int)(i - w0);
      if (f.wop == W_BALLOT || f.wop == W_ANY || f.wop == W_ALL) {
        f.out = f.wop == W_BALLOT ? ballot : f.wop == W_ANY ? (ballot != 0) : (ballot == (f0.mask & present));
        f.state = READY;
        continue;
      }
      const int width = f.width;
      int src = lane;
      switch (f.wop) {
        case W_DOWN: src = ((lane & (width - 1)) + f.warg < width) ? lane + f.warg : lane; break;
        case W_UP: src = ((lane & (width - 1)) >= f.warg) ? lane - f.warg : lane; break;
        case W_XOR: {
          const int s = lane ^ f.warg;
          src = (s / width > lane / width) ? lane : s;
          break;
        }
        case W_IDX: src = (lane / width) * width + (f.warg % width); break;
        default: src = lane; break;
      }
      if (src < 0 || src >= (int)lanes || !((f0.mask >> src) & 1u)) {
        std::ostringstream s;
        s << "lane " << lane << " reads lane " << src << " which is not in the mask (value undefined) at " << site(f);
        report(s.str());
        f.out = 0xffffffffffffffffull;
      } else {
        f.out = rt.fibers[w0 + src].val;
      }
      f.state = READY;
    }
    ++rt.warp_ops;
    released = true;
  }
  return released;
}

inline void run_block(unsigned n) {
  ++rt.block_gen;
  ++rt.blocks;
  if (rt.dyn != nullptr && rt.dyn_size > 0) std::memset(rt.dyn, 0xff, rt.dyn_size);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = rt.fibers[i];
    // initial frame popped by cudaemu_switch: [mxcsr|fpucw][r15 r14 r13 r12 rbx rbp][ret -> fiber_entry][0]
    uint64_t* top = reinterpret_cast<uint64_t*>(f.stack + f.stack_size);  // 16-byte aligned
    top[-1] = 0;
    top[-2] = reinterpret_cast<uint64_t>(&fiber_entry);
    for (int r = 3; r <= 8; ++r) top[-r] = 0;
    top[-9] = 0x037F00001F80ull;  // MXCSR 0x1F80 (low 4 bytes), x87 control word 0x037F
    f.sp = &top[-9];
    f.state = READY;
    f.idx = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
    f.line = 0;
    f.file = "";
    f.fake_stack = nullptr;
  }
  std::vector<unsigned> order(n);
  for (;;) {
    for (unsigned i = 0; i < n; ++i) order[i] = i;
    if (cfg.sched == 1) std::reverse(order.begin(), order.end());
    if (cfg.sched == 2) std::shuffle(order.begin(), order.end(), rt.rng);
    for (unsigned i : order)
      if (rt.fibers[i].state == READY) resume((int)i);
    if (rt.fatal) return;
    unsigned done = 0, bar = 0;
    for (unsigned i = 0; i < n; ++i) {
      done += rt.fibers[i].state == DONE;
      bar += rt.fibers[i].state == AT_BAR;
    }
    if (done == n) break;
    if (release_warps(n)) continue;
    if (rt.fatal) return;
    if (bar > 0 && bar + done == n) {
      const Fiber* first = nullptr;
      for (unsigned i = 0; i < n; ++i) {
        const Fiber& f = rt.fibers[i];
        if (f.state != AT_BAR) continue;
        if (first == nullptr) first = &f;
        if (f.line != first->line || f.file != first->file) {
          report("threads of one block wait at different __syncthreads(): " + site(*first) + " and " + site(f), true);
          return;
        }
      }
      if (done > 0) {
        std::ostringstream s;
        s << "__syncthreads() at " << site(*first) << " reached by " << bar << " threads while " << done
          << " threads of the block have exited";
        report(s.str(), true);
        return;
      }
      for (unsigned i = 0; i < n; ++i) rt.fibers[i].state = READY;
      ++rt.barriers;
      continue;
    }
    std::ostringstream s;
    s << "deadlock: " << done << " exited, " << bar << " at __syncthreads, the rest at warp ops;";
    for (unsigned i = 0; i < n; ++i)
      if (rt.fibers[i].state == AT_WARP) {
        s << " e.g. thread " << i << " at " << site(rt.fibers[i]);
        break;
      }
    for (unsigned i = 0; i < n; ++i)
      if (rt.fibers[i].state == AT_BAR) {
        s << " thread " << i << " at __syncthreads " << site(rt.fibers[i]);
        break;
      }
    report(s.str(), true);
    return;
  }
  // shared memory budget of this block: static arrays touched + dynamic
  size_t stat = 0;
  for (auto& kv : rt.shared)
    if (kv.second.first == rt.block_gen) stat += kv.second.second;
  if ((int64_t)(stat + rt.dyn_size) > cfg.smem_limit) {
    std::ostringstream s;
    s << "shared memory " << stat << " static + " << rt.dyn_size << " dynamic bytes exceeds " << cfg.smem_limit;
    report(s.str(), true);
  }
}

// Called (by the transformed declaration) wherever a static __shared__ array is declared.
inline void shared_decl(void* p, size_t bytes) {
  auto& e = rt.shared[p];
  if (e.first != rt.block_gen) {
    e.first = rt.block_gen;
    e.second = bytes;
    std::memset(p, 0xff, bytes);
  }
}
inline unsigned char* dyn_smem() { return rt.dyn; }

inline std::string dim_str(dim3 d) {
  std::ostringstream s;
  s << "(" << d.x << "," << d.y << "," << d.z << ")";
  return s.str();
}

template <typename... P>
struct Launch {
  const char* name;
  const char* site;
  void (*k)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... a) {
    static_assert(sizeof...(A) == sizeof...(P), "cudaemu: wrong number of kernel arguments");
    std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    ++rt.launches;
    ++rt.site_launches[site];
    rt.kernel = name;
    rt.errors.clear();
    rt.fatal = false;
    const unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
    std::string bad;
    if (block.x == 0 || block.y == 0 || block.z == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 ||
        block.z > 64)
      bad = "invalid block " + dim_str(block);
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
      bad = "invalid grid " + dim_str(grid);
    if ((int64_t)smem > cfg.smem_limit) bad = "dynamic shared memory of " + std::to_string(smem) + " bytes";
    if (!bad.empty())
      throw std::runtime_error(std::string("cudaemu: launch of ") + name + " fails (cudaErrorInvalidConfiguration / "
                               "too many resources): " + bad);
    dim3 g = grid;
    if (cfg.max_grid > 0) {
      g.x = (unsigned)std::min<int64_t>(g.x, cfg.max_grid);
      g.y = (unsigned)std::min<int64_t>(g.y, cfg.max_grid);
      g.z = (unsigned)std::min<int64_t>(g.z, cfg.max_grid);
    }
    gridDim = g;
    blockDim = block;
    ensure_fibers((unsigned)nthreads);
    rt.dyn_size = smem;
    rt.dyn = static_cast<unsigned char*>(std::malloc(smem > 0 ? smem : 1));
    if (smem == 0) rt.dyn_size = 0;
    rt.body = [&]() { std::apply(k, args); };
    std::vector<uint3> blocks;
    for (unsigned z = 0; z < g.z; ++z)
      for (unsigned y = 0; y < g.y; ++y)
        for (unsigned x = 0; x < g.x; ++x) blocks.push_back(uint3{x, y, z});
    if (cfg.sched == 1) std::reverse(blocks.begin(), blocks.end());
    if (cfg.sched == 2) std::shuffle(blocks.begin(), blocks.end(), rt.rng);
    for (const uint3& b : blocks) {
      blockIdx = b;
      run_block((unsigned)nthreads);
      if (rt.fatal) break;
    }
    std::free(rt.dyn);
    rt.dyn = nullptr;
    rt.dyn_size = 0;
    rt.body = nullptr;
    if (!rt.errors.empty()) {
      std::string msg = std::string("cudaemu: ") + std::to_string(rt.errors.size()) + " error(s) in kernel " + name +
                        " grid " + dim_str(grid) + " block " + dim_str(block) + ":";
      for (auto& e : rt.errors) msg += "\n  " + e;
      rt.errors.clear();
      throw std::runtime_error(msg);
    }
  }
};

template <typename... P>
Launch<P...> launcher(const char* name, const char* site, void (*k)(P...), dim3 grid, dim3 block, size_t smem = 0,
                      Stream = {}) {
  return Launch<P...>{name, site, k, grid, block, smem};
}

inline void trap(const char* file, int line) {
  report(std::string("__trap() at ") + file + ":" + std::to_string(line), true);
  yield_to_sched();
}

}  // namespace cudaemu

// ---- device builtins -----------------------------------------------------------------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cudaemu::syncthreads_impl(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cudaemu::warp_op<int>(cudaemu::W_SYNC, mask, 0, 0, 32, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  return cudaemu::warp_op<T>(cudaemu::W_DOWN, mask, v, (int)delta, width, file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  return cudaemu::warp_op<T>(cudaemu::W_UP, mask, v, (int)delta, width, file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  return cudaemu::warp_op<T>(cudaemu::W_XOR, mask, v, lane_mask, width, file, line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return cudaemu::warp_op<T>(cudaemu::W_IDX, mask, v, src, width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<unsigned>(cudaemu::warp_op<uint64_t>(cudaemu::W_BALLOT, mask, pred != 0, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(cudaemu::warp_op<uint64_t>(cudaemu::W_ANY, mask, pred != 0, 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(cudaemu::warp_op<uint64_t>(cudaemu::W_ALL, mask, pred != 0, 0, 32, file, line));
}
#define __trap() ::cudaemu::trap(__FILE__, __LINE__)

// Atomics are plain read-modify-writes: fibers switch only at barriers and warp collectives, so no
// other thread can run in between. (A kernel whose result depends on the order of its atomics is
// caught by the schedule variants like any other order dependence.)
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicSub(T* p, T v) {
  const T old = *p;
  *p = old - v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
// One sequentially consistent memory: fences and read-only-cache loads are plain.
inline void __threadfence() {}
inline void __threadfence_block() {}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
