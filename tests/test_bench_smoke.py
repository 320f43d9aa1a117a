"""Smoke test of bench/bench_rolling_conv.py on tiny shapes (seconds), so the script cannot rot:
it must time every impl in both modes, check the medconv outputs against the reference, and
write the CSV (harness columns + ratios) and the plot."""
import csv
import importlib.util
import os

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
