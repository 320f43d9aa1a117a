"""bench/gpu_check.sh, the one-shot GPU check, run as a dry run on the CPU (every section at tiny sizes: Triton
interpreter, no sanitizer, no rebuild), so that the script cannot rot between GPU runs. ~2-3 minutes on 2 cores."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
SECTIONS = ["env", "build", "tests", "sanitizer", "bench-rolling", "bench-involution", "profile", "table"]


def _run(args, out, timeout=300, python=sys.executable):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEDCONV_TRITON_CONFIG", "GPU")}
    env.update(PYTHON=python, OUT=str(out))
    return subprocess.run(["bash", SCRIPT] + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_passes_every_section(tmp_path):
    out = tmp_path / "gco"
    r = _run(["--dry-run"], out, timeout=300)  # the goal: within 5 minutes on 2 cores
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    for s in SECTIONS:
        assert any(line.split()[:2] == [s, "ok"] for line in summary.splitlines()), (s, summary)
    # CSVs in the benchmark's format under bench/results/dry-run/
    res = out / "bench" / "results" / "dry-run"
    with open(res / "rolling_conv.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0])[:8] == ["op", "impl", "device", "dtype", "mode", "shape", "median_ms", "peak_mem_mb"]
    assert {r["impl"] for r in rows} >= {"spectral", "reference", "dense", "roll_loop"}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"} and {r["mode"] for r in rows} == {"fwd", "fwdbwd"}
    with open(res / "involution.csv") as f:
        assert list(csv.DictReader(f))
    assert (out / "cuda_auto_table.json").is_file()
    assert "would run: TORCH_CUDA_ARCH_LIST=" in (out / "logs" / "build.log").read_text()
    assert "passed" in (out / "logs" / "tests.log").read_text()
    prof = (out / "profile" / "spectral_profile.txt").read_text()
    assert "rolling_conv_spectral_triton" in prof


def test_only_and_failures(tmp_path):
    out = tmp_path / "gco"
    r = _run(["--dry-run", "--only", "nosuch"], out, timeout=60)
    assert r.returncode == 2 and "unknown section 'nosuch'" in r.stderr
    # a failing section makes the run fail and names it, with the command that reruns it
    r = _run(["--dry-run", "--only", "build,table"], out, timeout=120, python="false")
    assert r.returncode == 1, r.stdout
    assert "FAILED sections: table" in r.stdout and "--only table" in r.stdout
    summary = (out / "summary.txt").read_text()
    assert "build" in summary and "env" not in summary.split("sections:")[1].splitlines()[0].split()
    r = subprocess.run(["bash", SCRIPT, "--list"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.split()[:len(SECTIONS)] == SECTIONS and "large" in r.stdout
