"""A tiny run of bench/bench_involution.py: the benchmark runs, and writes a CSV and a plot."""
import csv
import os


from medconv_ext import available_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_involution_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import bench_involution

    out = tmp_path / "involution.csv"
    assert bench_involution.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    impls = {"unfold"} | ({"cpu"} if available_backends()["cpu"][0] else set())
    assert {r["impl"] for r in rows} == impls
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert {r["shape"] for r in rows} == {"2d N=2 C=16 S=9 K=3 G=1", "3d N=1 C=16 S=5 K=3 G=1"}
    assert len(rows) == 2 * 2 * len(impls)
    for r in rows:
        assert float(r["median_ms"]) > 0 and r["op"] == "involution" and r["dtype"] == "float32"
        assert float(r["speedup_vs_unfold"]) > 0
    assert (tmp_path / "involution.png").stat().st_size > 0
