"""Smoke tests of the benchmarks on tiny shapes (seconds), so the scripts cannot rot:
bench/bench_rolling_conv.py must time every impl in both modes, check the medconv outputs against
the reference, and write the CSV (harness columns + ratios) and the plot; bench/run_all.py must
write into the untracked folder (or the one given) and end with a correct summary table."""
import csv
import glob
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    path = os.path.join(ROOT, "bench", "bench_rolling_conv.py")
    spec = importlib.util.spec_from_file_location("bench_rolling_conv", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_rolling_conv_tiny(tmp_path, capsys):
    bench = _load_bench()
    threads = torch.get_num_threads()
    try:  # the thread-CPU-time mode (for a shared machine) needs 1 thread; restore afterwards
        rc = bench.main(["--device", "cpu", "--shape", "2d N=1 C=4 S=6 k=3", "--shape", "3d N=2 C=3 S=5 k=3",
                         "--budget", "0", "--no-peak-mem", "--threads", "1", "--timer", "thread",
                         "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    assert "Time ratio: impl / roll_loop" in out and "Time ratio: impl / dense" in out
    with open(tmp_path / "rolling_conv.csv") as f:
        rows = list(csv.DictReader(f))
    for col in ("op", "impl", "device", "dtype", "mode", "shape", "median_ms", "peak_mem_mb", "vs_roll_loop",
                "vs_dense", "max_rel_err"):
        assert col in rows[0], col
    impls = {r["impl"] for r in rows}
    assert {"reference", "spectral", "auto", "roll_loop", "dense", "dense_cl", "depthwise_separable"} <= impls
    assert {r["shape"] for r in rows} == {"2d N=1 C=4 S=6 k=3", "3d N=2 C=3 S=5 k=3"}
    assert {r["mode"] for r in rows} == {"fwd", "fwdbwd"}
    assert len(rows) == 2 * 2 * len(impls)
    for r in rows:
        assert float(r["median_ms"]) > 0
        if r["mode"] == "fwd" and r["impl"] not in ("dense", "dense_cl", "depthwise_separable"):
            assert float(r["max_rel_err"]) < 1e-5, r  # the benchmark's own correctness guard
        if r["impl"] == "roll_loop":
            assert float(r["vs_roll_loop"]) == pytest.approx(1.0)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "rolling_conv.png").stat().st_size > 0


def test_parse_shape_rejects_garbage():
    bench = _load_bench()
    assert bench.parse_shape("3d N=1 C=128 S=16 k=5") == (3, 1, 128, 16, 5)
    with pytest.raises(Exception):
        bench.parse_shape("4d N=1 C=1 S=1 k=1")


def _load(name):
    path = os.path.join(ROOT, "bench", name + ".py")
    spec = importlib.util.spec_from_file_location("bench_" + name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_go_to_the_untracked_folder_by_default(monkeypatch, tmp_path):
    import sys
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    sys.modules.pop("harness", None)
    harness = _load("harness")
    monkeypatch.delenv("MEDCONV_BENCH_RESULTS", raising=False)
    assert harness.results_root() == os.path.join(ROOT, "bench", "out")
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "bench/out/" in f.read().split()
    monkeypatch.setenv("MEDCONV_BENCH_RESULTS", str(tmp_path))
    assert harness.results_dir(torch.device("cpu")).startswith(str(tmp_path))


def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_run_all_summary_ratios(tmp_path, capsys):
    run_all = _load("run_all")
    d = tmp_path / "cpu-2threads"
    base = dict(op="", device="cpu (2 threads)", dtype="float32", peak_mem_mb="1")
    _write(str(d / "rolling_conv.csv"), [
        dict(base, impl="auto", mode="fwd", shape="2d N=1 C=512 S=32 k=3", median_ms="10", vs_roll_loop="0.25",
             vs_dense="0.5"),
        dict(base, impl="dense", mode="fwd", shape="2d N=1 C=512 S=32 k=3", median_ms="20", vs_roll_loop="0.5",
             vs_dense="1"),
        dict(base, impl="auto", mode="fwdbwd", shape="3d N=1 C=16 S=32 k=5", median_ms="10", vs_roll_loop="1.25",
             vs_dense="1")])
    _write(str(d / "involution.csv"), [
        dict(base, impl="cpu", mode="fwd", shape="2d C=64", median_ms="2", speedup_vs_unfold="10",
             mem_ratio_vs_unfold="20"),
        dict(base, impl="unfold", mode="fwd", shape="2d C=64", median_ms="20", speedup_vs_unfold="1",
             mem_ratio_vs_unfold="1")])
    _write(str(d / "models.csv"), [
        dict(base, impl="rolling_unet[auto]", mode="infer", shape="1x1x64x64", median_ms="2"),
        dict(base, impl="unet", mode="infer", shape="1x1x64x64", median_ms="3"),
        dict(base, impl="rolling_unet[roll_loop]", mode="infer", shape="1x1x64x64", median_ms="4")])
    _write(str(d / "tiling.csv"), [
        dict(base, impl="predict_tiled", mode="3d", shape="s", median_ms="1", voxels_per_s="300", max_abs_diff="0",
             net="valid_srnet"),
        dict(base, impl="monai_sliding_window", mode="3d", shape="s", median_ms="1", voxels_per_s="100",
             max_abs_diff="0.25", net="valid_srnet")])
    rows, goals = run_all.summarize(str(tmp_path), 0, list(run_all.BENCHMARKS))
    by = {(r[0], r[2]): r for r in rows}
    assert by[("rolling_conv", "fwd")][5:7] == (2.0, 4.0)          # 2x faster than dense, 4x than the roll loop
    assert by[("rolling_conv", "fwdbwd")][6] == pytest.approx(0.8)  # slower than the roll loop
    assert by[("involution", "fwd")][6] == 10.0 and len([r for r in rows if r[0] == "involution"]) == 1
    assert by[("models", "infer")][5:7] == (1.5, 2.0)
    assert by[("tiling", "3d")][6] == 3.0
    status = {text: value >= need for text, value, need in goals}
    assert status["auto vs dense, fwd 2d N=1 C=512 S=32 k=3"] is False   # 2x < the 6x goal
    assert status["auto never slower than the roll loop, fwdbwd 3d N=1 C=16 S=32 k=5"] is False
    run_all.print_summary(rows, goals, str(tmp_path))
    out = capsys.readouterr().out
    assert "vs dense" in out and "missed" in out and "met" in out
    # CSVs older than the run are not summarised
    assert run_all.summarize(str(tmp_path), 4e9, list(run_all.BENCHMARKS)) == ([], [])


def test_run_all_smoke_end_to_end(tmp_path):
    """`run_all.py --smoke` runs a benchmark in its own process, writes into the given folder only,
    and ends with the summary table."""
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run_all.py"), "--smoke", "--only", "rolling_conv",
                        "--results-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Summary: speed-up of medconv" in p.stdout
    assert "rolling_conv" in p.stdout.split("Summary:")[1]
    assert glob.glob(str(tmp_path / "*" / "rolling_conv.csv"))


def test_bench_models_layouts_tiny():
    """bench/bench_models_layouts.py runs end to end at a tiny slice and reports every model in both
    layouts with its ratio to the dense model."""
    import re
    import subprocess
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_models_layouts.py"), "--size", "32",
                        "--reps", "1", "--threads", "1", "--no-qsm"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    for name in ("unet", "rolling_unet", "depthwise_unet"):
        line = next(l for l in p.stdout.splitlines() if l.split()[:1] == [name])
        assert re.search(r"nchw +[0-9.]+ s +channels-last +[0-9.]+ s +faster: (nchw|cl) ", line), line
        assert re.search(r"[0-9.]+x$", line), line


def test_bench_rolling_conv_cat_quick():
    """bench/bench_rolling_conv_cat.py runs end to end on tiny shapes and reports both layouts per shape."""
    import subprocess
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_rolling_conv_cat.py"), "--quick",
                        "--reps", "1", "--threads", "1"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    rows = [l.split() for l in p.stdout.splitlines() if l[:2] in ("2d", "3d")]
    if "not built" not in p.stdout:
        assert len(rows) == 4 and {r[-4] for r in rows} == {"cl", "nchw"}
        assert all(float(r[-3]) > 0 and float(r[-2]) > 0 for r in rows)


def test_profile_models_quick():
    """bench/profile_models.py --quick profiles both rolling models and prints a table whose rows name
    the layer kinds (fused kernel, transposed up-sampling, torch.cat, optimizer...) with their shares."""
    import re
    import subprocess
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "profile_models.py"), "--quick", "--size", "32",
                        "--threads", "1"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "rolling_unet inference" in out and "rolling_qsmnet training step" in out
    rows = [l for l in out.splitlines() if re.search(r" [0-9.]+ +[0-9.]+% +[0-9]+$", l)]
    names = " | ".join(rows)
    for kind in ("rolling conv, ", "rolling transposed up-sampling", "max-pool", "dense first conv",
                 "dense 1x1 output conv", "optimizer (Adam step", "backward: rolling conv", "BatchNorm",
                 "backward: BatchNorm"):
        assert kind in names, (kind, out)
    # eval folds BatchNorm + ReLU into the rolling layers; the decoders read the skip connection in place
    assert "[BN+ReLU fused]" in names and "[BN+ReLU fused, cat in place]" in names and "] [cat in place]" not in names
    assert "fused kernel, C_in=16 [cat in place]" in names  # training: the QSMnet decoder's first conv  # eval folds BatchNorm + ReLU into the rolling layers
    for share in re.findall(r"profiled ops, sum of self times +[0-9.]+ +([0-9.]+)%", out):
        assert 50.0 < float(share) <= 101.0  # the rows account for the profiled wall time


def test_bench_rolling_conv_threads_quick():
    """bench/bench_rolling_conv_threads.py runs end to end on tiny shapes."""
    import subprocess
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_rolling_conv_threads.py"), "--quick",
                        "--reps", "1"], capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    rows = [l.split() for l in p.stdout.splitlines() if l[:2] in ("2d", "3d")]
    if "not built" not in p.stdout:
        import math
        assert len(rows) == 2  # times > 0, a finite speed-up (its value depends on the machine's load), user and
        # sys time and page faults per call for 1 / N threads
        assert all(float(r[5]) > 0 and float(r[6]) > 0 and math.isfinite(float(r[7])) for r in rows)
        assert all(len(r) == 11 and all(float(v) >= 0 for v in r[8].split("/") + r[9].split("/") + r[10].split("/"))
                   for r in rows)


def test_bench_rolling_conv_transforms_quick():
    """bench/bench_rolling_conv_transforms.py runs end to end on tiny shapes: both transforms timed where the
    channel count has an FFT, the composition above 256 channels, the setting restored."""
    import math
    import subprocess
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_rolling_conv_transforms.py"), "--quick",
                        "--reps", "1"], capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    if "not built" in p.stdout:
        return
    rows = [l.split() for l in p.stdout.splitlines() if l[:2] in ("2d", "3d")]
    assert len(rows) == 6  # 3 shapes x 2 layouts
    for r in rows:
        gemm, fft, comp = float(r[-4]), float(r[-3]), float(r[-1])
        assert gemm > 0 and fft > 0
        assert math.isfinite(comp) == (r[1] == "C=300")


def test_bench_rolling_conv_cpu_overhead():
    """bench/bench_rolling_conv_cpu.py --overhead runs end to end: every per-call and training-step row has a
    positive time."""
    import subprocess
    from medconv_ext.ops import rolling_conv_spectral_cpu as fused
    if not fused.available():
        pytest.skip("compiled extension not built: the overhead rows time the fused op")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_rolling_conv_cpu.py"), "--overhead",
                        "--threads", "1", "--budget", "0"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    rows = [l for l in p.stdout.splitlines() if " us" in l]
    assert len(rows) == 11, p.stdout
    assert all(float(l.split(" us")[0].split()[-1]) > 0 for l in rows)
    assert "training step" in p.stdout and "step" in rows[-1]
