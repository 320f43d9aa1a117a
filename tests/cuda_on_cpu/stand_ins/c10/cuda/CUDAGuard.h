// Stand-in for <c10/cuda/CUDAGuard.h> (CUDA-on-CPU tests): there is one device, guards do nothing.
#pragma once
#include <c10/core/Device.h>
#include <optional>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};
}  // namespace cuda
}  // namespace c10
