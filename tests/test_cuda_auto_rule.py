"""The CUDA `auto` rule of rolling convolution (ops/_cuda_auto.py): measured, never predicted.
No GPU needed: CUDA inputs are stand-ins that carry only what the rule may read (device, shape, dtype,
requires_grad), and the GPU name lookup is replaced."""
import csv
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from medconv_ext import backends
from medconv_ext.ops import _cuda_auto as CA
from medconv_ext.ops import rolling_conv as RC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = "nvidia-h100-80gb-hbm3"


class _FakeCuda:
    """Only what the rule may read; any other attribute access fails the test."""
    __slots__ = ("device", "shape", "dtype", "requires_grad")

    def __init__(self, shape, dtype, requires_grad=False):
        self.device = torch.device("cuda", 0)
        self.shape = tuple(shape)
        self.dtype = dtype
        self.requires_grad = requires_grad

    def dim(self):
        return len(self.shape)

    def numel(self):
        return math.prod(self.shape)


@pytest.fixture
def gpu_name(monkeypatch):
    calls = []

    def name(index):
        calls.append(index)
        return GPU

    monkeypatch.setattr(CA, "_device_slug", name)
    return calls


@pytest.fixture
def fused_runs(monkeypatch):
    """The fused spectral kernel "runs" every CUDA input (as on a GPU with triton)."""
    _set_fused_cuda(monkeypatch, lambda x, w: None)


def _set_fused_cuda(monkeypatch, supports):
    """Register a stand-in fused "spectral" kernel for CUDA tensors (both ops) whose support is `supports`."""
    for op in (RC.OP, RC.OP_T):
        monkeypatch.setitem(backends._IMPLS[op]["spectral"].fused, "cuda", backends.Fused(print, supports, True))


def _layer(c, k, dims, dtype, n_base=1, transposed=False, grad=False):
    x = _FakeCuda((2, c) + (16,) * dims, dtype, requires_grad=grad)
    w = _FakeCuda(((c, n_base) if transposed else (n_base, c)) + (k,) * dims, dtype)
    return x, w


CASES = [(c, k, dims, dtype, nb, tr, grad)
         for c in (1, 8, 64, 128, 256, 512, 1024) for k, dims in ((1, 2), (3, 2), (5, 3), (3, 3))
         for dtype in (torch.float32, torch.bfloat16, torch.float16) for nb in (1, 2) for tr in (False, True)
         for grad in (False, True)]


@pytest.mark.parametrize("tf32", [False, True], ids=["tf32-off", "tf32-on"])
def test_shipped_table_means_reference_everywhere(monkeypatch, fused_runs, tf32):
    """With the shipped table (no GPU measurement committed yet) every CUDA layer gets "reference", without
    even looking up the GPU's name."""
    monkeypatch.delenv(CA.TABLE_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    monkeypatch.setattr(CA, "_device_slug", lambda i: pytest.fail("GPU name looked up with an empty table"))
    for c, k, dims, dtype, nb, tr, grad in CASES:
        x, w = _layer(c, k, dims, dtype, nb, tr, grad)
        with torch.set_grad_enabled(grad):
            assert RC._auto_candidates(x, w, tr, c) == ["reference"], (c, k, dims, dtype, nb, tr, grad)
            assert RC._auto_candidates(x, w, tr, max(1, c // 2)) == ["reference"]


def test_shipped_table_is_valid_and_packaged():
    table = CA.load_table(CA.SHIPPED_TABLE)
    assert isinstance(table, dict)
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert "cuda_auto_table.json" in f.read(), "the table must be listed in setup.py's package_data"


def _write(tmp_path, gpus):
    p = tmp_path / "table.json"
    p.write_text(json.dumps({"format": 1, "gpus": gpus}))
    return str(p)


ENTRY = {"dims": 2, "transposed": False, "c_min": 192, "c_max": 384, "taps": 9, "n_base": 1, "full_roll": True,
         "dtype": "bfloat16", "tf32": None, "training": False, "backend": "spectral"}


def test_fixture_table_is_followed(monkeypatch, tmp_path, gpu_name, fused_runs):
    f32 = dict(ENTRY, dtype="float32", tf32=False, training=True, dims=3, taps=125, c_min=128, c_max=128,
               backend="triton")
    monkeypatch.setenv(CA.TABLE_ENV, _write(tmp_path, {GPU: [ENTRY, f32], "nvidia-a100-sxm4-80gb": [
        dict(ENTRY, c_min=1, c_max=4096, backend="cuda")]}))
    rule = RC._auto_candidates
    with torch.no_grad():
        for c in (192, 256, 384):
            assert rule(*_layer(c, 3, 2, torch.bfloat16), False, c) == ["spectral", "reference"]
        for c in (128, 191, 385, 512):  # outside the measured range: no extrapolation
            assert rule(*_layer(c, 3, 2, torch.bfloat16), False, c) == ["reference"], c
        assert rule(*_layer(256, 3, 2, torch.float16), False, 256) == ["reference"]    # other dtype
        assert rule(*_layer(256, 3, 2, torch.float32), False, 256) == ["reference"]
        assert rule(*_layer(256, 5, 2, torch.bfloat16), False, 256) == ["reference"]   # other taps
        assert rule(*_layer(256, 3, 2, torch.bfloat16), False, 128) == ["reference"]   # half roll
        assert rule(*_layer(256, 3, 2, torch.bfloat16, n_base=2), False, 256) == ["reference"]
        assert rule(*_layer(256, 3, 2, torch.bfloat16, transposed=True), True, 256) == ["reference"]
    # training (a tensor that requires grad, grad mode on) is another case than inference
    with torch.enable_grad():
        assert rule(*_layer(256, 3, 2, torch.bfloat16, grad=True), False, 256) == ["reference"]
        assert rule(*_layer(256, 3, 2, torch.bfloat16, grad=False), False, 256) == ["spectral", "reference"]
    # float32: the TF32 flag of cuDNN is part of the case
    for tf32, want in ((False, ["triton", "reference"]), (True, ["reference"])):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
        with torch.enable_grad():
            assert rule(*_layer(128, 5, 3, torch.float32, grad=True), False, 128) == want
        with torch.no_grad():
            assert rule(*_layer(128, 5, 3, torch.float32, grad=True), False, 128) == ["reference"]
    # the GPU name was looked up through the cached helper only (device index 0)
    assert gpu_name and set(gpu_name) == {0}


def test_gpu_not_in_table_gets_reference(monkeypatch, tmp_path, fused_runs):
    monkeypatch.setenv(CA.TABLE_ENV, _write(tmp_path, {"nvidia-a100-sxm4-80gb": [ENTRY]}))
    monkeypatch.setattr(CA, "_device_slug", lambda i: "nvidia-h200")
    with torch.no_grad():
        assert RC._auto_candidates(*_layer(256, 3, 2, torch.bfloat16), False, 256) == ["reference"]


def test_spectral_entry_needs_the_fused_kernel(monkeypatch, tmp_path, gpu_name):
    """"spectral" was measured as the fused Triton kernel: where it cannot run the input, reference."""
    monkeypatch.setenv(CA.TABLE_ENV, _write(tmp_path, {GPU: [ENTRY]}))
    _set_fused_cuda(monkeypatch, lambda x, w: "not here")
    with torch.no_grad():
        assert RC._auto_candidates(*_layer(256, 3, 2, torch.bfloat16), False, 256) == ["reference"]


def test_bad_table_is_a_clear_error(monkeypatch, tmp_path, gpu_name):
    monkeypatch.setenv(CA.TABLE_ENV, _write(tmp_path, {GPU: [dict(ENTRY, backend="dense")]}))
    with pytest.raises(ValueError, match="backend 'dense'"):
        RC._auto_candidates(*_layer(256, 3, 2, torch.bfloat16), False, 256)
    p = tmp_path / "other.json"
    p.write_text(json.dumps({"gpus": []}))
    monkeypatch.setenv(CA.TABLE_ENV, str(p))
    with pytest.raises(ValueError, match="not a CUDA auto table"):
        RC._auto_candidates(*_layer(256, 3, 2, torch.bfloat16), False, 256)


def test_gpu_slug():
    assert CA.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert CA.gpu_slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
    assert CA.gpu_slug("NVIDIA H200") == "nvidia-h200"


def test_cpu_rule_untouched_by_the_cuda_table(monkeypatch, tmp_path):
    monkeypatch.setenv(CA.TABLE_ENV, _write(tmp_path, {GPU: [dict(ENTRY, dtype="float32", tf32=False)]}))
    x = torch.empty(1, 256, 8, 8)
    w = torch.empty(1, 256, 3, 3)
    assert RC._auto_candidates(x, w, False, 256) == RC._cpu_auto_candidates(x, w, False, 256)


def _csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cols = ["op", "impl", "device", "dtype", "mode", "shape", "median_ms", "peak_mem_mb", "vs_dense"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(dict(dict(op="rolling_conv", device="NVIDIA H100 80GB HBM3", peak_mem_mb=1, vs_dense=1), **r))


def test_table_script_from_benchmark_csvs(tmp_path):
    """bench/make_cuda_auto_table.py: a backend enters only where measured >= min_gain faster than reference;
    consecutive channel counts with the same winner merge, nothing is extrapolated; TF32 rows separate."""
    res = tmp_path / "results"
    rows = []
    for c, spec_ms in ((64, 1.2), (128, 0.8), (256, 0.5), (512, 0.95)):
        sh = "2d N=8 C=%d S=128 k=3" % c
        rows += [dict(impl="reference", dtype="bfloat16", mode="fwd", shape=sh, median_ms=1.0),
                 dict(impl="spectral", dtype="bfloat16", mode="fwd", shape=sh, median_ms=spec_ms),
                 dict(impl="dense", dtype="bfloat16", mode="fwd", shape=sh, median_ms=0.9),
                 dict(impl="cuda", dtype="bfloat16", mode="fwd", shape=sh, median_ms=3.0)]
    sh = "3d N=2 C=128 S=32 k=5"
    rows += [dict(impl="reference", dtype="float32", mode="fwdbwd", shape=sh, median_ms=10.0),
             dict(impl="spectral", dtype="float32", mode="fwdbwd", shape=sh, median_ms=2.0),
             dict(impl="reference", dtype="float32-tf32", mode="fwdbwd", shape=sh, median_ms=3.0),
             dict(impl="spectral", dtype="float32-tf32", mode="fwdbwd", shape=sh, median_ms=2.9)]
    _csv(str(res / GPU / "rolling_conv.csv"), rows)
    _csv(str(res / "cpu-2threads" / "rolling_conv.csv"), rows)  # CPU results are not GPU measurements
    out = tmp_path / "table.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "make_cuda_auto_table.py"), "--results",
                        str(res), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    table = CA.load_table(str(out))
    assert list(table) == [GPU]
    got = sorted((e["dims"], e["dtype"], e["tf32"], e["training"], e["c_min"], e["c_max"], e["backend"])
                 for e in table[GPU])
    assert got == [(2, "bfloat16", None, False, 128, 256, "spectral"),
                   (3, "float32", False, True, 128, 128, "spectral")], got
    # the rule follows the generated table
    layer = CA.Layer(GPU, 2, False, 200, 9, 1, True, "bfloat16", None, False)
    assert CA.choose(layer, table) == ["spectral", "reference"]
    assert CA.choose(layer._replace(c_in=512), table) == ["reference"]
    assert CA.choose(layer._replace(c_in=64), table) == ["reference"]
