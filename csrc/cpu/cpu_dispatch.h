// Helpers shared by the CPU kernels: forced inlining and the run-time choice of the instruction
// set of the hot loops on x86-64 (no -march=native: the wheel stays portable). Each kernel compiles
// its hot loops once per ISA (function target attributes) and picks a copy per call:
//   avx512: AVX-512 F/BW/DQ/VL + FMA (64-byte vectors; the fused spectral kernel, the others use avx2)
//   avx2:   AVX2 + FMA (32-byte vectors)
//   generic: the portable baseline (16-byte vectors, SSE2 on x86-64; also every non-x86 build)
// The widest copy the CPU runs is the default; the environment variable MEDCONV_CPU_ISA
// (avx512 | avx2 | generic, "scalar" is an alias of generic) read at the first call, or
// torch.ops.medconv.set_cpu_isa at run time, forces a narrower one (a wider one than the CPU has
// is clipped to what it has).
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__)
#define MEDCONV_INLINE inline __attribute__((always_inline))
#else
#define MEDCONV_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MEDCONV_X86_DISPATCH 1
#define MEDCONV_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MEDCONV_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#endif

namespace medconv {

enum CpuIsa : int { kIsaGeneric = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

inline const char* cpu_isa_name(int isa) {
  return isa == kIsaAvx512 ? "avx512" : isa == kIsaAvx2 ? "avx2" : "generic";
}

// -1 for an unknown name.
inline int cpu_isa_parse(const char* s) {
  if (!s) return -1;
  if (!std::strcmp(s, "avx512")) return kIsaAvx512;
  if (!std::strcmp(s, "avx2")) return kIsaAvx2;
  if (!std::strcmp(s, "generic") || !std::strcmp(s, "scalar")) return kIsaGeneric;
  return -1;
}

// The widest copy this CPU can execute.
inline int cpu_isa_max() {
#ifdef MEDCONV_X86_DISPATCH
  static const int isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
      return (int)kIsaAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return (int)kIsaAvx2;
    return (int)kIsaGeneric;
  }();
  return isa;
#else
  return kIsaGeneric;
#endif
}

// The copy in use (one process-wide value; inline: one instance across translation units).
inline std::atomic<int>& cpu_isa_state() {
  static std::atomic<int> state{[] {
    const int mx = cpu_isa_max();
    const int want = cpu_isa_parse(std::getenv("MEDCONV_CPU_ISA"));
    return want < 0 ? mx : (want < mx ? want : mx);  // unknown names are reported by the Python layer
  }()};
  return state;
}

inline int cpu_isa() { return cpu_isa_state().load(std::memory_order_relaxed); }

// Sets the copy in use (clipped to the CPU's widest); returns the one set.
inline int cpu_isa_set(int isa) {
  const int mx = cpu_isa_max();
  const int v = isa < mx ? isa : mx;
  cpu_isa_state().store(v, std::memory_order_relaxed);
  return v;
}

#ifdef MEDCONV_X86_DISPATCH
inline bool cpu_has_avx2() { return cpu_isa() >= kIsaAvx2; }
#endif
}  // namespace medconv
