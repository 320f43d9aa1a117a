"""Build the CUDA `auto` table of rolling convolution from committed GPU benchmark results.

Reads bench/results/<gpu>/rolling_conv*.csv (rows of bench/bench_rolling_conv.py run on that GPU; the
folder name is the GPU's name lower-cased, other characters than letters and digits as '-', e.g.
nvidia-h100-80gb-hbm3) and writes the table that ops/rolling_conv._auto_candidates consults on CUDA
(medconv_ext/data/cuda_auto_table.json, shipped in the package; format in medconv_ext/ops/_cuda_auto.py).

A backend (spectral, cuda, triton) enters the table for a measured case (dims, C_in, taps, dtype, TF32
setting, training or inference) only where it was at least --min-gain times faster than "reference" (bank +
cuDNN) in that row's measurement; consecutive measured channel counts with the same winner merge into one
range, and nothing is extrapolated beyond the measured channel counts. Every other case stays "reference".
CSV dtype column: "float32" rows on CUDA were measured with TF32 off, "float32-tf32" rows with cuDNN's TF32
on (PyTorch's default); 16-bit rows have no TF32 setting.

    python bench/make_cuda_auto_table.py                       # bench/results -> the package's table
    python bench/make_cuda_auto_table.py --results DIR --out FILE [--min-gain 1.1]
"""
import argparse
import csv
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "medconv_ext", "data", "cuda_auto_table.json")
CANDIDATES = ("spectral", "cuda", "triton")
SHAPE_RE = re.compile(r"\s*([23])d\s+N=(\d+)\s+C=(\d+)\s+S=(\d+)\s+k=(\d+)\s*")


def _is_gpu_folder(name: str) -> bool:
    return not (name.startswith("cpu-") or name in ("dry-run",))


def read_rows(folder: str):
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "rolling_conv*.csv"))):
        with open(path, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def _dtype_tf32(dtype: str):
    if dtype == "float32-tf32":
        return "float32", True
    if dtype == "float32":
        return "float32", False
    return dtype, None


def entries_for(rows, min_gain: float):
    """Table entries of one GPU from its benchmark rows."""
    cases = {}  # (dims, taps, dtype, tf32, training) -> {c_in: (winner or None, speedup)}
    by_case = {}
    for r in rows:
        m = SHAPE_RE.fullmatch(r.get("shape", ""))
        if not m or r.get("op") != "rolling_conv":
            continue
        try:
            ms = float(r["median_ms"])
        except (KeyError, ValueError):
            continue
        if not ms > 0:
            continue
        dims, n, c, s, k = (int(v) for v in m.groups())
        dtype, tf32 = _dtype_tf32(r["dtype"])
        key = (dims, k ** dims, dtype, tf32, r["mode"] == "fwdbwd", c)
        by_case.setdefault(key, {})[r["impl"]] = min(ms, by_case.get(key, {}).get(r["impl"], float("inf")))
    for (dims, taps, dtype, tf32, training, c), impls in by_case.items():
        ref = impls.get("reference")
        if ref is None:
            continue
        best = None
        for name in CANDIDATES:
            if name in impls and ref / impls[name] >= min_gain and (best is None or impls[name] < impls[best]):
                best = name
        cases.setdefault((dims, taps, dtype, tf32, training), {})[c] = (best, ref / impls[best] if best else 1.0)
    out = []
    for (dims, taps, dtype, tf32, training), per_c in sorted(cases.items(), key=lambda kv: str(kv[0])):
        run = None
        for c in sorted(per_c):
            winner, gain = per_c[c]
            if run is not None and winner == run["backend"]:
                run["c_max"] = c
                run["speedup"] = round(min(run["speedup"], gain), 3)
                continue
            if run is not None:
                out.append(run)
            run = None
            if winner is not None:
                run = {"dims": dims, "transposed": False, "c_min": c, "c_max": c, "taps": taps, "n_base": 1,
                       "full_roll": True, "dtype": dtype, "tf32": tf32, "training": training, "backend": winner,
                       "speedup": round(gain, 3)}
        if run is not None:
            out.append(run)
    return out


def build(results_root: str, min_gain: float, include_all: bool = False) -> dict:
    gpus = {}
    for folder in sorted(glob.glob(os.path.join(results_root, "*"))):
        name = os.path.basename(folder)
        if not os.path.isdir(folder) or (not include_all and not _is_gpu_folder(name)):
            continue
        rows = read_rows(folder)
        if rows:
            gpus[name] = entries_for(rows, min_gain)
    return {"format": 1, "source": "bench/make_cuda_auto_table.py from bench/results/<gpu>/rolling_conv.csv",
            "min_gain": min_gain, "gpus": gpus}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"),
                   help="folder of <gpu>/ result folders (default bench/results)")
    p.add_argument("--out", default=DEFAULT_OUT, help="table file to write (default: the package's table)")
    p.add_argument("--min-gain", type=float, default=1.1,
                   help="a backend must be this many times faster than reference to be chosen (default 1.1)")
    p.add_argument("--include-all", action="store_true",
                   help="also read cpu-*/ and dry-run/ folders (tests of this script only)")
    a = p.parse_args(argv)
    if not a.min_gain >= 1.0:
        p.error("--min-gain must be >= 1, got %r" % a.min_gain)
    table = build(a.results, a.min_gain, a.include_all)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    n = sum(len(v) for v in table["gpus"].values())
    print("wrote %s: %d GPU(s), %d non-reference entr%s" % (a.out, len(table["gpus"]), n, "y" if n == 1 else "ies"))
    for gpu, entries in table["gpus"].items():
        for e in entries:
            print("  %-28s %dD taps=%d C %d-%d %s%s %s -> %s (%.2fx over reference)"
                  % (gpu, e["dims"], e["taps"], e["c_min"], e["c_max"], e["dtype"],
                     "" if e["tf32"] is None else (" tf32" if e["tf32"] else " no-tf32"),
                     "train" if e["training"] else "infer", e["backend"], e["speedup"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
