// Control functions of the CUDA-on-CPU runtime, plain C (run.py calls them through ctypes, so this
// file needs no torch headers and compiles in a second):
//   cudaemu_configure(sched, seed, max_grid, cc_major)  schedule (0 forward, 1 reverse, 2 random),
//       its seed, grid clamp (0: none), compute capability the device properties report
//   cudaemu_stats(out[5])   launches, blocks, fiber switches, barriers, warp ops
//   cudaemu_launch_sites()  "file.cu:LINE count" lines, one per launch site reached so far
#include <sstream>
#include <string>

#include "cudaemu.h"

extern "C" {
int cudaemu_configure(int64_t sched, int64_t seed, int64_t max_grid, int64_t cc_major) {
  if (sched < 0 || sched > 2) return -1;
  cudaemu::cfg.sched = static_cast<int>(sched);
  cudaemu::cfg.seed = static_cast<uint64_t>(seed);
  cudaemu::rt.rng.seed(static_cast<uint64_t>(seed));
  cudaemu::cfg.max_grid = max_grid;
  cudaemu::cfg.cc_major = static_cast<int>(cc_major);
  return 0;
}

void cudaemu_stats(int64_t* out) {
  const auto& r = cudaemu::rt;
  out[0] = r.launches;
  out[1] = r.blocks;
  out[2] = r.switches;
  out[3] = r.barriers;
  out[4] = r.warp_ops;
}

const char* cudaemu_launch_sites() {
  static std::string text;
  std::ostringstream s;
  for (const auto& kv : cudaemu::rt.site_launches) s << kv.first << " " << kv.second << "\n";
  text = s.str();
  return text.c_str();
}
}
