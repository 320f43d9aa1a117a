// Control ops of the CUDA-on-CPU runtime, registered as torch.ops.cudaemu.*:
//   configure(sched, seed, max_grid, cc_major)  schedule (0 forward, 1 reverse, 2 random), its seed,
//                                               grid clamp (0: none), compute capability reported
//   stats() -> [launches, blocks, fiber switches, barriers, warp ops]
//   launch_sites() -> "file.cu:LINE count" lines, one per launch site reached so far
#include <torch/library.h>

#include <sstream>

#include "cudaemu.h"

namespace {
void configure(int64_t sched, int64_t seed, int64_t max_grid, int64_t cc_major) {
  TORCH_CHECK(sched >= 0 && sched <= 2, "cudaemu.configure: sched must be 0, 1 or 2, got ", sched);
  cudaemu::cfg.sched = static_cast<int>(sched);
  cudaemu::cfg.seed = static_cast<uint64_t>(seed);
  cudaemu::rt.rng.seed(static_cast<uint64_t>(seed));
  cudaemu::cfg.max_grid = max_grid;
  cudaemu::cfg.cc_major = static_cast<int>(cc_major);
}

std::vector<int64_t> stats() {
  const auto& r = cudaemu::rt;
  return {r.launches, r.blocks, r.switches, r.barriers, r.warp_ops};
}

std::string launch_sites() {
  std::ostringstream s;
  for (const auto& kv : cudaemu::rt.site_launches) s << kv.first << " " << kv.second << "\n";
  return s.str();
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(cudaemu, m) {
  m.def("configure", &configure);
  m.def("stats", &stats);
  m.def("launch_sites", &launch_sites);
}
