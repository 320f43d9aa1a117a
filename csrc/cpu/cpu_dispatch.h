// Helpers shared by the CPU kernels: forced inlining and the run-time choice of the instruction
// set of the hot loops on x86-64 (no -march=native: the wheel stays portable). Each kernel compiles
// its hot loops once per ISA (function target attributes) and picks a copy per call:
//   avx512: AVX-512 F/BW/DQ/VL + FMA (64-byte vectors; the fused spectral kernel, the others use avx2)
//   avx2:   AVX2 + FMA (32-byte vectors)
//   generic: the portable baseline (16-byte vectors, SSE2 on x86-64; also every non-x86 build)
// By default ("auto") the widest copy the CPU runs is used, except where a kernel knows a narrower one
// is faster for the call (the spectral kernel: a channel spectrum that 16 float lanes would pad by
// more than a quarter over 8 lanes, e.g. C_in <= 16, runs the AVX2 copy). The environment variable
// MEDCONV_CPU_ISA (avx512 | avx2 | generic, "scalar" is an alias of generic; auto) read at the first
// call, or torch.ops.medconv.set_cpu_isa at run time, forces exactly that copy (one wider than the
// CPU runs is clipped to what it runs).
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

inline constexpr int kIsaAuto = 3;  // a name only: auto selection, widest copy

// -1 for an unknown name.
inline int cpu_isa_parse(const char* s) {
  if (!s) return -1;
  if (!std::strcmp(s, "auto")) return kIsaAuto;
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

// The selection, one process-wide value (inline: one instance across translation units): the copy
// in the low byte, bit 8 set when it was forced (not auto).
inline int cpu_isa_encode(int want) {
  const int mx = cpu_isa_max();
  if (want < 0 || want == kIsaAuto) return mx;  // unknown names are reported by the Python layer
  return (want < mx ? want : mx) | 0x100;
}

inline std::atomic<int>& cpu_isa_state() {
  static std::atomic<int> state{cpu_isa_encode(cpu_isa_parse(std::getenv("MEDCONV_CPU_ISA")))};
  return state;
}

// The widest copy allowed (auto: the CPU's widest; forced: that copy).
inline int cpu_isa() { return cpu_isa_state().load(std::memory_order_relaxed) & 0xff; }
inline bool cpu_isa_forced() { return (cpu_isa_state().load(std::memory_order_relaxed) & 0x100) != 0; }

// Sets the selection (a copy, clipped to the CPU's widest, or kIsaAuto); returns the copy allowed.
inline int cpu_isa_set(int isa) {
  cpu_isa_state().store(cpu_isa_encode(isa), std::memory_order_relaxed);
  return cpu_isa();
}

#ifdef MEDCONV_X86_DISPATCH
inline bool cpu_has_avx2() { return cpu_isa() >= kIsaAvx2; }
#endif
}  // namespace medconv
