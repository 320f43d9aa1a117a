// Stand-in for <mma.h> (CUDA-on-CPU tests): nvcuda::wmma emulated per warp. Each op is warp-collective (every lane
// must reach the same call site, checked by the scheduler); every lane then holds the whole 16x16
// tile and computes it redundantly, which gives the API's semantics (the kernel never touches
// fragment elements). Alignment rules of load/store (256-bit pointer, ldm multiple of 16 bytes)
// are checked. Products are accumulated in float in k order (tensor cores may differ in rounding).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <type_traits>
#include "cudaemu.h"

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int R = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int C = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = R * C;
  T x[R * C];
};

inline void collective(const char* what, const char* file, int line) {
  cudaemu::warp_op<int>(cudaemu::W_SYNC, 0xffffffffu, 0, 0, 32, file, line);
  (void)what;
}
inline void check_ptr(const void* p, unsigned ldm, size_t elem, const char* what, const char* file, int line) {
  if ((reinterpret_cast<uintptr_t>(p) % 32) != 0)
    cudaemu::report(std::string(what) + ": pointer not 256-bit aligned at " + file + ":" + std::to_string(line));
  if ((ldm * elem) % 16 != 0)
    cudaemu::report(std::string(what) + ": ldm not a multiple of 16 bytes at " + file + ":" + std::to_string(line));
}

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  collective("fill_fragment", file, line);
  for (auto& e : f.x) e = static_cast<T>(v);
}

template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads need a layout");
  collective("load_matrix_sync", file, line);
  check_ptr(p, ldm, sizeof(T), "load_matrix_sync", file, line);
  using Fr = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < Fr::R; ++r)
    for (int c = 0; c < Fr::C; ++c)
      f.x[r * Fr::C + c] = std::is_same<L, col_major>::value ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const T* p, unsigned ldm, layout_t lay,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  collective("load_matrix_sync", file, line);
  check_ptr(p, ldm, sizeof(T), "load_matrix_sync", file, line);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = lay == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t lay,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  collective("store_matrix_sync", file, line);
  check_ptr(p, ldm, sizeof(T), "store_matrix_sync", file, line);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (lay == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * N + c];
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC, void>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC, void>& c,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  collective("mma_sync", file, line);
  TC tmp[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = static_cast<float>(c.x[i * N + j]);
      for (int k = 0; k < K; ++k) s += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * N + j]);
      tmp[i * N + j] = static_cast<TC>(s);
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = tmp[i];
}
}  // namespace wmma
}  // namespace nvcuda
