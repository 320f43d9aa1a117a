// Placeholder translation unit so that the CUDA part of the build always exists and is
// proven to compile and link (CI builds it with FORCE_CUDA=1 on a machine without a GPU).
// The kernels live in csrc/cuda/<op>.cu, each with its own TORCH_LIBRARY_IMPL(medconv, CUDA).
#include <torch/library.h>
#include <cuda_runtime.h>

namespace medconv {
// Compiled by nvcc: returns the CUDA runtime version the extension was built against.
int cuda_runtime_version_built() { return CUDART_VERSION; }
}  // namespace medconv
