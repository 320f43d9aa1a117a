"""Launch configurations of the Triton kernels: per-architecture pruning and pinning one config.

Every autotuned kernel has a named list of configurations (tuples of block sizes, num_warps[, num_stages]).
- Pruning: tests/test_triton_aot.py compiles every configuration of every kernel ahead of time for sm_80
  (A100: 163 KB shared memory per block) and sm_90 (H100/H200: 227 KB) on the CPU and checks shared memory
  and register spills (cuobjdump's STACK/LOCAL of the cubin). A configuration that exceeds the limit or
  spills on an architecture is listed in PRUNED and never launched there; the test fails when this table
  and the compiler disagree, so it cannot go stale. GPUs of compute capability 8.x use the sm_80 list, 9.0
  and newer the sm_90 list (triton's autotuner also skips a config that runs out of resources).
- Pinning: MEDCONV_TRITON_CONFIG fixes one configuration per kernel (no autotuning), for tests, sanitizer
  runs and reproducible timings. Values (read when a kernel module is first imported):
      unset, "" or "auto"   autotune over the (pruned) list
      "N"                   configuration N (0-based, of the full list) of every kernel
      "first"               the first configuration each kernel keeps on this GPU's architecture (what
                            bench/gpu_check.sh uses: valid on every architecture)
      "KERNEL=N,..."        configuration N (or "first") of the named kernels (names in KERNELS), the others
                            autotuned; "N,KERNEL=M" pins every kernel to N except KERNEL to M
  A pinned configuration that is pruned on this GPU's architecture, or an index past the list, is an
  error naming the kernel. Under TRITON_INTERPRET=1 a pin replaces the small interpreter config too.
Determinism holds per configuration: each output element is summed in a fixed order for a given
configuration, but the order (and so the last bits) of the sums over a reduction split into blocks
depends on the block sizes: BLOCK_E / BLOCK_K of the channel GEMMs, BLOCK_F of the spectral mix, BLOCK_J of
the grad_weight reductions, BLOCK_C of involution's grad_weight. Pin a configuration to compare bits
across runs that might autotune differently.
"""
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

PIN_ENV = "MEDCONV_TRITON_CONFIG"

# Kernel names (the keys of PRUNED and of MEDCONV_TRITON_CONFIG=KERNEL=N).
KERNELS = ("rolling_gemm", "rolling_grad_weight", "spec_gemm", "spec_mix", "spec_grad_weight",
           "involution_fwd", "involution_grad_input", "involution_grad_weight")

# Per-block shared-memory limits (bytes) of the checked architectures.
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}

# Configurations that do not fit an architecture (shared memory over the limit, or register spills in
# one of the compiled variants), as measured by tests/test_triton_aot.py. Never launched there.
# Measured with triton 3.8.0 (its bundled ptxas); another triton may spill differently: the full test then
# checks only that every kept configuration fits.
PRUNED_TRITON_VERSION = "3.8.0"
PRUNED: Dict[str, Dict[str, List[Tuple]]] = {
    "sm_80": {
        "spec_gemm": [(64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (32, 32, 16, 2, 2)],
        "spec_mix": [(64, 16, 64, 4, 2)],
        "rolling_gemm": [(64, 32, 16, 4, 2), (32, 64, 16, 4, 2), (64, 64, 16, 4, 2), (64, 64, 16, 8, 2),
                         (32, 32, 32, 4, 2), (32, 32, 16, 2, 2)],
        "involution_fwd": [(512, 1, 4), (256, 1, 2)],
    },
    "sm_90": {
        "spec_gemm": [(128, 128, 32, 8, 3)],
        "involution_fwd": [(512, 2, 4)],
        "involution_grad_input": [(512, 1, 4), (256, 1, 2)],
    },
}


def current_arch() -> Optional[str]:
    """"sm_80" or "sm_90" for the current CUDA device (None without one or under the interpreter)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, _ = torch.cuda.get_device_capability()
    except Exception:  # pragma: no cover - a broken CUDA setup: no pruning, triton reports it at launch
        return None
    return "sm_90" if major >= 9 else "sm_80"


def _index(val: str, text: str):
    if val == "first":
        return "first"
    try:
        return int(val)
    except ValueError:
        raise ValueError("%s: %r is not a configuration index (expected N, first or KERNEL=N[,...], got %r)"
                         % (PIN_ENV, val, text)) from None


def parse_pin(text: Optional[str]) -> Tuple[Optional[object], Dict[str, object]]:
    """(index or "first" for every kernel or None, {kernel: index or "first"}) from a MEDCONV_TRITON_CONFIG
    value."""
    text = (text or "").strip()
    if text in ("", "auto"):
        return None, {}
    default, per = None, {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, val = item.partition("=")
        if not sep:
            name, val = None, item
        name = name.strip() if name else None
        if name is not None and name not in KERNELS:
            raise ValueError("%s: unknown kernel %r in %r (kernels: %s)" % (PIN_ENV, name, text, ", ".join(KERNELS)))
        idx = _index(val.strip(), text)
        if idx != "first" and idx < 0:
            raise ValueError("%s: configuration indices start at 0, got %d in %r" % (PIN_ENV, idx, text))
        if name is None:
            default = idx
        else:
            per[name] = idx
    return default, per


def select(kernel: str, configs: Sequence[Tuple], interpret_config: Optional[Tuple] = None,
           arch: Optional[str] = "current", pin: Optional[str] = None) -> List[Tuple]:
    """The configuration tuples `kernel` may launch with: the pinned one, else under the interpreter
    [interpret_config], else `configs` minus the ones PRUNED for the architecture."""
    assert kernel in KERNELS, kernel
    if arch == "current":
        arch = current_arch()
    default, per = parse_pin(os.environ.get(PIN_ENV) if pin is None else pin)
    idx = per.get(kernel, default)
    pruned = set(PRUNED.get(arch, {}).get(kernel, ())) if arch else set()
    if idx == "first":
        kept = [tuple(c) for c in configs if tuple(c) not in pruned]
        if not kept:  # pragma: no cover - the AOT test guarantees one survivor per kernel and architecture
            raise RuntimeError("kernel %s has no configuration that fits %s" % (kernel, arch))
        return kept[:1]
    if idx is not None:
        if idx >= len(configs):
            raise ValueError("%s: kernel %s has %d configurations (0..%d), got index %d"
                             % (PIN_ENV, kernel, len(configs), len(configs) - 1, idx))
        cfg = tuple(configs[idx])
        if cfg in pruned:
            raise ValueError("%s: configuration %d %s of kernel %s does not fit %s (pruned: shared memory or "
                             "register spills, see tests/test_triton_aot.py)" % (PIN_ENV, idx, cfg, kernel, arch))
        return [cfg]
    if interpret_config is not None and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [tuple(interpret_config)]
    kept = [tuple(c) for c in configs if tuple(c) not in pruned]
    if not kept:  # pragma: no cover - the AOT test guarantees one survivor per kernel and architecture
        raise RuntimeError("kernel %s has no configuration that fits %s" % (kernel, arch))
    return kept


def pinned_index(kernel: str) -> Optional[int]:
    default, per = parse_pin(os.environ.get(PIN_ENV))
    return per.get(kernel, default)
