// Stand-in for <ATen/cuda/CUDAContext.h> (CUDA-on-CPU tests): the emulator runtime plus the few
// CUDA-side ATen names the host wrappers use (stream, device properties). Included after the real
// ATen headers. Add a name here when a new .cu file uses one (docs/cuda_on_cpu.md).
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>  // before the macros below

#include "cudaemu.h"

namespace at {
namespace cuda {
using CUDAStream = ::cudaemu::Stream;
inline CUDAStream getCurrentCUDAStream(int64_t = -1) { return {}; }
struct DeviceProp {
  int major = 9, minor = 0, multiProcessorCount = 132, warpSize = 32, maxThreadsPerBlock = 1024;
  size_t sharedMemPerBlock = 48 * 1024;
};
inline DeviceProp* getCurrentDeviceProperties() {
  static DeviceProp p;
  p.major = ::cudaemu::cfg.cc_major;
  return &p;
}
}  // namespace cuda
}  // namespace at

// The tensors are CPU tensors: the wrappers' "must be a CUDA tensor" checks become "CPU tensor".
#define is_cuda is_cpu
// transform.py turns TORCH_LIBRARY_IMPL(medconv, CUDA, m) blocks into torch.ops.cudaemu.* definitions;
// any other implementation block (AutocastCUDA) is compiled but registers nothing.
#undef TORCH_LIBRARY_IMPL
#define CUDAEMU_CAT2(a, b) a##b
#define CUDAEMU_CAT(a, b) CUDAEMU_CAT2(a, b)
#define TORCH_LIBRARY_IMPL(ns, k, m) [[maybe_unused]] static void CUDAEMU_CAT(cudaemu_unused_impl_, __LINE__)(torch::Library & m)
