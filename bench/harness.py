"""Shared benchmark harness: timing (median), peak memory, device naming, CSV, table, plots.

Every bench/bench_<op>.py uses it so that all results share one CSV layout:
    op, impl, device, dtype, mode, shape, median_ms, peak_mem_mb, [extra columns...]
written to <results root>/<device-slug>/<name>.csv, with plots beside it. The results root is
bench/out/ (not tracked by git) unless MEDCONV_BENCH_RESULTS names another folder;
`bench/run_all.py --update-results` sets it to bench/results/, the committed results.
"""
import argparse
import csv
import gc
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BASE_COLUMNS = ["op", "impl", "device", "dtype", "mode", "shape", "median_ms", "peak_mem_mb"]


def device_name(device: torch.device) -> str:
    """Human-readable device name for the `device` column."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%s (%d threads)" % (model, torch.get_num_threads())


def device_slug(device: torch.device) -> str:
    """Folder name under the results root for this device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu-%dthreads" % torch.get_num_threads()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


RESULTS_ENV = "MEDCONV_BENCH_RESULTS"
UNTRACKED_ROOT = os.path.join(ROOT, "bench", "out")        # .gitignore'd: every ordinary run
COMMITTED_ROOT = os.path.join(ROOT, "bench", "results")    # only with run_all.py --update-results


def results_root() -> str:
    """Folder that holds <device-slug>/ result folders (see the module docstring)."""
    return os.path.abspath(os.environ.get(RESULTS_ENV) or UNTRACKED_ROOT)


def results_dir(device: torch.device) -> str:
    d = os.path.join(results_root(), device_slug(device))
    os.makedirs(d, exist_ok=True)
    return d


# ---------------------------------------------------------------- peak memory
def _read_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_cpu_peak() -> bool:
    """Reset the process's peak resident set size (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _libc():
    """glibc through ctypes, or None (another C library)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _set_mmap_threshold(nbytes: int, trim_bytes: Optional[int] = None) -> bool:
    """glibc: serve allocations of at least `nbytes` with their own mmap (unmapped on free); keep up to
    `trim_bytes` (default nbytes) of free memory at the top of the heap."""
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return (libc.mallopt(m_mmap_threshold, nbytes) == 1
            and libc.mallopt(m_trim_threshold, nbytes if trim_bytes is None else trim_bytes) == 1)


def exact_cpu_peaks() -> bool:
    """Make glibc give every allocation of 64 KiB or more its own mapping. Otherwise a buffer can
    reuse heap pages that an earlier call freed but that are still resident, and the resident-set
    peak misses it (0 MB for a 6 MB output). measure_peak_mb does this around each measurement;
    a benchmark may call it once for the whole run (costs fresh page faults, for every impl alike)."""
    return _set_mmap_threshold(64 * 1024)


def measure_peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory (MB) that one call of fn adds above what was in use before it.
    CUDA: torch's allocator peak. CPU: growth of the peak resident set size (VmHWM) over the
    resident size before the call; NaN where the OS does not allow resetting the peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak / 2**20
    exact = exact_cpu_peaks()
    if exact:
        _malloc_trim()  # free heap pages back to the OS, so that reusing them shows in the peak
    try:
        if not _reset_cpu_peak():
            fn()
            return float("nan")
        base = _read_status_kb("VmRSS")
        out = fn()
        peak = _read_status_kb("VmHWM") - base
        del out
    finally:
        if exact:
            restore_allocator()
    return max(peak, 0) / 1024.0


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def restore_allocator() -> None:
    """After exact_cpu_peaks: glibc's thresholds as a running loop leaves them. glibc's default threshold is
    dynamic (it rises to the size of the largest mapped block freed, up to 32 MiB on 64-bit, the trim
    threshold to twice that); a fixed value, even the initial 128 KiB, disables that, after which every
    buffer above it is mapped anew and page-faulted on every call: the timings of everything measured after
    a peak-memory measurement were off (the C=512 spectral composition, with many such buffers, 4x slower)."""
    _set_mmap_threshold(32 * 1024 * 1024, 64 * 1024 * 1024)


# ---------------------------------------------------------------- timing
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, min_reps: int = 5,
            max_reps: int = 50, budget_s: float = 2.0) -> float:
    """Median wall time of fn in milliseconds. Repeats until `budget_s` is spent (at least
    min_reps, at most max_reps). CUDA uses events around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start_all < budget_s):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------- output
class Results:
    """Collects rows, prints them as they come, writes CSV."""

    def __init__(self, name: str, device: torch.device, extra_columns: Optional[List[str]] = None):
        self.name = name
        self.device = device
        self.columns = BASE_COLUMNS + list(extra_columns or [])
        self.rows: List[Dict] = []

    def add(self, **row) -> Dict:
        row.setdefault("device", device_name(self.device))
        for c in self.columns:
            row.setdefault(c, "")
        self.rows.append(row)
        print("  %-22s %-10s %-5s %-44s %10s ms %10s MB" % (
            row["impl"], row["dtype"], row["mode"], row["shape"], _fmt(row["median_ms"]), _fmt(row["peak_mem_mb"])),
            flush=True)
        return row

    def write_csv(self, path: Optional[str] = None) -> str:
        path = path or os.path.join(results_dir(self.device), self.name + ".csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow({k: (_fmt(v) if isinstance(v, float) else v) for k, v in r.items()})
        print("wrote %s" % os.path.relpath(path, ROOT))
        return path


def ab_parser(doc: str, threads: int, reps: int, threads_help: Optional[str] = None) -> argparse.ArgumentParser:
    """The A/B benchmarks' command line: --threads, --reps (calls per median_ms) and --quick (tiny shapes),
    described by the first paragraph of the script's docstring."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=threads, help=threads_help)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    return ap


def median_ms(fn: Callable[[], object], reps: int, device: torch.device = torch.device("cpu")) -> float:
    """Median wall time (ms) of exactly reps calls after 2 warm-up calls (the A/B benchmarks' timer)."""
    return time_ms(fn, device, warmup=2, min_reps=reps, max_reps=reps, budget_s=0.0)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return "%.4g" % v
    return str(v)


def ratio_table(rows: List[Dict], baseline_impl: str, impls: List[str], key=("dtype", "mode", "shape")) -> List[Dict]:
    """For each (dtype, mode, shape): median_ms of each impl divided by that of `baseline_impl`."""
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key), {})[r["impl"]] = r
    out = []
    for k, by_impl in groups.items():
        base = by_impl.get(baseline_impl)
        if base is None or not base["median_ms"]:
            continue
        rec = dict(zip(key, k))
        for impl in impls:
            if impl in by_impl:
                rec[impl] = by_impl[impl]["median_ms"] / base["median_ms"]
        out.append(rec)
    return out
