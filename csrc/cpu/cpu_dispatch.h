// Helpers shared by the CPU kernels: forced inlining, run-time choice of the AVX2+FMA copy of
// the hot loops on x86-64 (no -march=native: the wheel stays portable).
#pragma once

#if defined(__GNUC__)
#define MEDCONV_INLINE inline __attribute__((always_inline))
#else
#define MEDCONV_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MEDCONV_X86_DISPATCH 1
#endif

namespace medconv {
#ifdef MEDCONV_X86_DISPATCH
inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif
}  // namespace medconv
