"""`make bench`: run the benchmarks, then print one summary table.

    python bench/run_all.py                    # representative set: at most ~10 minutes on 2 CPU cores
    python bench/run_all.py --full             # every case of every benchmark (much longer)
    python bench/run_all.py --update-results   # write into bench/results/ (the committed results)
    python bench/run_all.py --only rolling_conv,involution

Each benchmark (bench/bench_<name>.py) runs in its own process, prints its own tables and writes
its CSV and plot under <results root>/<device>/. The results root is bench/out/ (not tracked by
git); only --update-results writes bench/results/, so an ordinary run never changes committed
results. The summary at the end reads the CSVs this run wrote and shows, per case, how much
faster (>1) or slower (<1) the medconv implementation is than the dense layer it replaces and
than the published implementation (the roll-and-concatenate loop for rolling convolution, the
unfold implementation for involution, MONAI sliding-window inference for tiling).

The project's goals, checked in the summary:
  - rolling conv, backend "auto": never slower than the published roll loop;
  - rolling conv, forward, CPU float32: >= 3x faster than the dense conv at 2D 3x3 C=512 32^2
    and >= 5x at 3D 5x5x5 C=128 16^3 (meaningful on an otherwise idle machine).
"""
import argparse
import csv
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_ENV = "MEDCONV_BENCH_RESULTS"  # read by bench/harness.py
UNTRACKED = os.path.join(ROOT, "bench", "out")
COMMITTED = os.path.join(ROOT, "bench", "results")

# name -> (script, arguments of the representative set, of --full, of --smoke)
BENCHMARKS = {
    "rolling_conv": ("bench_rolling_conv.py", ["--quick"], [],
                     ["--shape", "2d N=1 C=8 S=8 k=3", "--shape", "3d N=1 C=4 S=5 k=3", "--budget", "0",
                      "--no-peak-mem"]),
    "involution": ("bench_involution.py", ["--quick"], [], ["--smoke", "--device", "cpu", "--no-plot"]),
    "models": ("bench_models.py", ["--quick"], [], ["--quick", "--size", "64", "--tiny"]),
    "tiling": ("bench_tiling.py", ["--quick"], [], ["--quick", "--features", "2", "--blocks", "1"]),
}
GOALS_VS_DENSE = {"2d N=1 C=512 S=32 k=3": 6.0, "3d N=1 C=128 S=16 k=5": 10.0}  # the forward goals, CPU float32, 2 threads


def _read_csvs(root, name, since):
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "*", name + ".csv")) + glob.glob(os.path.join(root, "*", name + "_cuda.csv"))):
        if os.path.getmtime(path) + 1 < since:
            continue  # from an earlier run
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _x(ratio):
    """Speed-up as text: 2.50x faster, 0.80x (slower)."""
    if ratio != ratio:  # NaN
        return "-"
    return "%.2fx" % ratio


def summarize(root, since, names):
    """Rows (benchmark, case, mode, impl, ms, vs dense, vs published, note) from this run's CSVs."""
    out, goals = [], []
    if "rolling_conv" in names:
        best = {}  # per case, the faster of auto on NC(D)HW input and on channels-last input ("auto_cl")
        for r in _read_csvs(root, "rolling_conv", since):
            if r["impl"] in ("auto", "auto_cl"):
                key = (r["device"], r["dtype"], r["mode"], r["shape"])
                if key not in best or _f(r["median_ms"]) < _f(best[key]["median_ms"]):
                    best[key] = r
        for r in best.values():
            vs_dense, vs_pub = 1 / _f(r.get("vs_dense")), 1 / _f(r.get("vs_roll_loop"))
            dev = "cuda" if "cuda" in r["device"].lower() or "nvidia" in r["device"].lower() else "cpu"
            out.append(("rolling_conv", "%s %s" % (r["shape"], r["dtype"]), r["mode"], r["impl"], _f(r["median_ms"]),
                        vs_dense, vs_pub, "published: roll loop"))
            goals.append(("auto never slower than the roll loop, %s %s" % (r["mode"], r["shape"]), vs_pub, 1.0))
            if dev == "cpu" and r["mode"] == "fwd" and r["dtype"] == "float32" and r["shape"] in GOALS_VS_DENSE:
                goals.append(("auto vs dense, fwd %s" % r["shape"], vs_dense, GOALS_VS_DENSE[r["shape"]]))
    if "involution" in names:
        for r in _read_csvs(root, "involution", since):
            if r["impl"] in ("unfold", "reference", "naive_per_output") or not r.get("speedup_vs_unfold"):
                continue
            mem = _f(r.get("mem_ratio_vs_unfold"))
            note = "published: unfold" + ("; unfold's peak memory / this: %.1fx" % mem if mem == mem else "")
            out.append(("involution", "%s %s" % (r["shape"], r["dtype"]), r["mode"], r["impl"], _f(r["median_ms"]),
                        float("nan"), _f(r["speedup_vs_unfold"]), note))
    if "models" in names:
        rows = _read_csvs(root, "models", since)
        by = {(r["impl"], r["mode"], r["shape"]): r for r in rows}
        for (impl, mode, shape), r in by.items():
            if not impl.startswith("rolling_unet[auto]"):
                continue
            dense = by.get(("unet", mode, shape))
            pub = by.get(("rolling_unet[roll_loop]", mode, shape))
            ms = _f(r["median_ms"])
            out.append(("models", "Rolling UNet %s %s" % (shape, r["dtype"]), mode, "auto", ms,
                        _f(dense["median_ms"]) / ms if dense else float("nan"),
                        _f(pub["median_ms"]) / ms if pub else float("nan"),
                        "dense: UNet; published: roll-loop Rolling UNet"))
    if "tiling" in names:
        rows = _read_csvs(root, "tiling", since)
        by = {(r["impl"], r["net"], r["mode"]): r for r in rows}
        for (impl, net, mode), r in by.items():
            if impl != "predict_tiled":
                continue
            monai = by.get(("monai_sliding_window", net, mode))
            rate = _f(r["voxels_per_s"])
            note = "max |diff| to full image %s" % r["max_abs_diff"]
            if monai:
                note += " (MONAI %s)" % monai["max_abs_diff"]
            out.append(("tiling", "%s %s" % (net, r["shape"]), mode, impl, _f(r["median_ms"]), float("nan"),
                        rate / _f(monai["voxels_per_s"]) if monai else float("nan"), note))
    return out, goals


def print_summary(rows, goals, root):
    print("\n" + "=" * 100)
    print("Summary: speed-up of medconv over the dense layer and over the published implementation")
    print("(baseline time / medconv time: above 1 = medconv faster; '-' = no such baseline)")
    print("=" * 100)
    if not rows:
        print("(no results were written by this run)")
        return
    head = "%-13s %-46s %-9s %-13s %10s %9s %9s  %s" % ("benchmark", "case", "mode", "impl", "ms", "vs dense",
                                                      "vs publ.", "note")
    print(head)
    print("-" * len(head))
    for bench, case, mode, impl, ms, vd, vp, note in rows:
        print("%-13s %-46s %-9s %-13s %10.4g %9s %9s  %s" % (bench, case[:46], mode[:9], impl[:13], ms, _x(vd), _x(vp),
                                                            note))
    if goals:
        print("\nGoals:")
        for text, value, need in goals:
            status = "met   " if value >= need else "missed"
            print("  %s %-60s %s (goal >= %.0fx)" % (status, text, _x(value), need))
    print("\nCSV files and plots: %s" % os.path.relpath(root, ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="every case of every benchmark (much longer than the default)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (checks that the scripts run)")
    p.add_argument("--update-results", action="store_true",
                   help="write into bench/results/ (the committed results) instead of bench/out/")
    p.add_argument("--results-dir", default=None, help="write into this folder instead (overrides the two above)")
    p.add_argument("--only", default="", help="comma list of benchmarks (%s)" % ", ".join(BENCHMARKS))
    a = p.parse_args(argv)
    if a.full and a.smoke:
        p.error("--full and --smoke exclude each other")
    names = [n for n in a.only.split(",") if n] or list(BENCHMARKS)
    for n in names:
        if n not in BENCHMARKS:
            p.error("--only: unknown benchmark %r (choose from %s)" % (n, ", ".join(BENCHMARKS)))
    root = os.path.abspath(a.results_dir or (COMMITTED if a.update_results else UNTRACKED))
    os.makedirs(root, exist_ok=True)
    env = dict(os.environ, **{RESULTS_ENV: root})
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    which = "smoke" if a.smoke else ("full" if a.full else "representative")
    print("medconv benchmarks: %s set, results in %s" % (which, os.path.relpath(root, ROOT)), flush=True)

    start = time.time()
    failed, took = [], {}
    for name in names:
        script, rep, full, smoke = BENCHMARKS[name]
        args = smoke if a.smoke else (full if a.full else rep)
        print("\n" + "=" * 100 + "\n== %s %s\n" % (script, " ".join(args)) + "=" * 100, flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, os.path.join(HERE, script)] + args, env=env, cwd=ROOT)
        took[name] = time.time() - t0
        if rc != 0:
            failed.append(name)
    rows, goals = summarize(root, start, names)
    print_summary(rows, goals, root)
    print("Time: %s; total %.0f s" % (", ".join("%s %.0f s" % kv for kv in took.items()), time.time() - start))
    if failed:
        print("FAILED: %s" % ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
