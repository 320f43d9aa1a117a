"""Launch configurations of the Triton kernels, checked without a GPU.

- Ahead-of-time compile for sm_80 (A100, 163 KB shared memory per block) and sm_90 (H100/H200, 227 KB) on the
  CPU (tests/_triton_aot.py): shared memory within the limit and no register spills. By default the first
  configuration each kernel keeps on each architecture (a minute on 2 cores); with MEDCONV_AOT_FULL=1
  (`make test-triton-aot`) every configuration of every kernel, which must agree exactly with the pruning
  table triton_kernels/_configs.PRUNED (the configurations that do not fit are named in the failure).
- MEDCONV_TRITON_CONFIG: one pinned configuration per kernel (parsing, errors, the pruned ones refused).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import medconv_ext  # noqa: E402,F401  (maps triton_kernels/ to medconv_ext.triton_kernels)
from medconv_ext.triton_kernels import _configs as C  # noqa: E402

FULL = os.environ.get("MEDCONV_AOT_FULL", "0") == "1"

RUNNER = r"""
import json, sys
sys.path.insert(0, sys.argv[1] + "/tests")
import _triton_aot as A
jobs = json.loads(sys.argv[2])
v = A.variants()
todo = [(k, i, a) for k, i, a in jobs]
import os
from concurrent.futures import ProcessPoolExecutor
with ProcessPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:
    rows = [r for rs in ex.map(A.compile_one, todo) for r in rs]
print("ROWS" + json.dumps(rows))
"""


def _config_lists():
    """{kernel: config list} without importing triton in this (interpreter-mode) process."""
    import importlib

    out = {}
    sp = importlib.import_module("medconv_ext.triton_kernels.rolling_conv_spectral")
    rc = importlib.import_module("medconv_ext.triton_kernels.rolling_conv")
    out.update(spec_gemm=sp.GEMM_CONFIG_LIST, spec_mix=sp.MIX_CONFIG_LIST, spec_grad_weight=sp.GW_CONFIG_LIST,
               rolling_gemm=rc.GEMM_CONFIG_LIST, rolling_grad_weight=rc.GW_CONFIG_LIST)
    try:
        inv = importlib.import_module("medconv_ext.triton_kernels.involution")
        for k in ("involution_fwd", "involution_grad_input", "involution_grad_weight"):
            out[k] = inv.CONFIG_LIST
    except ImportError:  # pragma: no cover - triton missing: the AOT tests skip anyway
        pass
    return out


def _compile(jobs, tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", C.PIN_ENV)}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, "-c", RUNNER, ROOT, json.dumps(jobs)], env=env, capture_output=True,
                       text=True, timeout=1800)
    if r.returncode != 0 and "ImportError" in r.stderr and ("GPUTarget" in r.stderr or "ASTSource" in r.stderr):
        pytest.skip("triton has no ahead-of-time compile API here")  # pragma: no cover
    assert r.returncode == 0, r.stderr[-4000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("ROWS")][-1]
    rows = json.loads(line[4:])
    for row in rows:
        row["config"] = tuple(row["config"])
    return rows


def _verdict(row):
    why = []
    if row["shared"] > C.SMEM_LIMIT[row["arch"]]:
        why.append("shared memory %d KB > %d KB" % (-(-row["shared"] // 1024), C.SMEM_LIMIT[row["arch"]] // 1024))
    if row["stack"] > 0 or row["local"] > 0:
        why.append("register spills (stack %d B, local %d B, %d registers)" % (row["stack"], row["local"], row["regs"]))
    return why


def _check_tensor_cores(rows):
    for row in rows:
        if row["kernel"] in ("spec_gemm", "spec_mix") or (row["kernel"] == "rolling_gemm" and row["variant"] == "bfloat16"):
            assert row["mma"], "%s %s %s should use the tensor cores (mma)" % (row["kernel"], row["config"], row["variant"])


def test_every_kernel_keeps_a_config_per_arch():
    lists = _config_lists()
    assert set(lists) == set(C.KERNELS)
    for arch in C.SMEM_LIMIT:
        for k, cfgs in lists.items():
            pruned = set(C.PRUNED.get(arch, {}).get(k, ()))
            assert pruned <= set(map(tuple, cfgs)), "PRUNED[%s][%s] names a configuration not in the list" % (arch, k)
            assert len(pruned) < len(cfgs), "kernel %s keeps no configuration on %s" % (k, arch)
    assert set(C.PRUNED) <= set(C.SMEM_LIMIT)


@pytest.mark.skipif(FULL, reason="MEDCONV_AOT_FULL=1: test_every_config_compiles covers these")
def test_first_kept_configs_compile_and_fit(tmp_path):
    """The configuration each kernel launches first on sm_80 and sm_90 compiles ahead of time, uses the tensor
    cores where it should, and neither spills registers nor exceeds the shared memory per block."""
    lists = _config_lists()
    jobs = []
    for arch in ("sm_80", "sm_90"):
        for k, cfgs in lists.items():
            pruned = set(C.PRUNED.get(arch, {}).get(k, ()))
            idx = next(i for i, c in enumerate(cfgs) if tuple(c) not in pruned)
            jobs.append((k, idx, arch))
    rows = _compile(jobs, tmp_path)
    bad = ["%s %s %s %s: %s" % (r["kernel"], r["arch"], r["config"], r["variant"], "; ".join(_verdict(r)))
           for r in rows if _verdict(r)]
    assert not bad, "\n".join(bad)
    _check_tensor_cores(rows)


@pytest.mark.skipif(not FULL, reason="every configuration for sm_80 and sm_90 takes minutes: MEDCONV_AOT_FULL=1 "
                                     "(make test-triton-aot)")
def test_every_config_compiles(tmp_path):
    """Every configuration of every kernel for sm_80 and sm_90: the ones that do not fit are exactly those in
    triton_kernels/_configs.PRUNED (measured with PRUNED_TRITON_VERSION; with another triton, every kept
    configuration must still fit)."""
    import triton

    lists = _config_lists()
    jobs = [(k, i, a) for a in ("sm_80", "sm_90") for k, cfgs in lists.items() for i in range(len(cfgs))]
    rows = _compile(jobs, tmp_path)
    _check_tensor_cores(rows)
    measured = {}
    reasons = {}
    for r in rows:
        why = _verdict(r)
        if why:
            lst = measured.setdefault(r["arch"], {}).setdefault(r["kernel"], [])
            if r["config"] not in lst:
                lst.append(r["config"])
            reasons.setdefault((r["arch"], r["kernel"], r["config"]), []).append("%s: %s" % (r["variant"], "; ".join(why)))
    report = "\n".join("%s %-22s %-22s %s" % (a, k, c, " | ".join(w)) for (a, k, c), w in sorted(reasons.items()))
    print("pruned configurations:\n" + report)
    table = {a: {k: sorted(v) for k, v in ks.items() if v} for a, ks in C.PRUNED.items()}
    got = {a: {k: sorted(v) for k, v in ks.items()} for a, ks in measured.items()}
    for a in C.SMEM_LIMIT:
        table.setdefault(a, {})
        got.setdefault(a, {})
    kept_bad = [(a, k, c) for a, ks in got.items() for k, cs in ks.items() for c in cs
                if c not in table.get(a, {}).get(k, [])]
    assert not kept_bad, "configurations launched although they do not fit:\n%s\n%s" % (kept_bad, report)
    if triton.__version__ == C.PRUNED_TRITON_VERSION:
        assert got == table, "PRUNED is stale; measured:\n%r\n%s" % (got, report)


# --------------------------------------------------------------------------------------
# MEDCONV_TRITON_CONFIG: one configuration per kernel
# --------------------------------------------------------------------------------------
LIST = [(64, 16, 64, 4, 2), (64, 16, 32, 4, 2), (32, 16, 32, 2, 2)]


def test_pin_parsing():
    assert C.parse_pin(None) == (None, {})
    assert C.parse_pin(" auto ") == (None, {})
    assert C.parse_pin("0") == (0, {})
    assert C.parse_pin("1,spec_mix=2") == (1, {"spec_mix": 2})
    assert C.parse_pin("spec_gemm=0, involution_fwd=3") == (None, {"spec_gemm": 0, "involution_fwd": 3})
    assert C.parse_pin("first,spec_mix=1") == ("first", {"spec_mix": 1})
    with pytest.raises(ValueError, match="unknown kernel 'mix'"):
        C.parse_pin("mix=1")
    with pytest.raises(ValueError, match="not a configuration index"):
        C.parse_pin("spec_mix=last")
    with pytest.raises(ValueError, match="start at 0"):
        C.parse_pin("-1")


def test_select_pins_prunes_and_refuses(monkeypatch):
    monkeypatch.setitem(C.PRUNED, "sm_80", {"spec_mix": [LIST[0]]})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # autotuning: the list minus the pruned ones of the architecture
    assert C.select("spec_mix", LIST, None, arch="sm_80", pin="") == LIST[1:]
    assert C.select("spec_mix", LIST, None, arch="sm_90", pin="") == LIST
    # pinned: exactly one, by index of the full list; other kernels follow the default index
    assert C.select("spec_mix", LIST, None, arch="sm_90", pin="2") == [LIST[2]]
    assert C.select("spec_mix", LIST, None, arch="sm_80", pin="0,spec_mix=1") == [LIST[1]]
    assert C.select("spec_gemm", LIST, None, arch="sm_80", pin="spec_mix=1") == LIST  # not pinned
    # "first": the first configuration kept on this architecture
    assert C.select("spec_mix", LIST, None, arch="sm_80", pin="first") == [LIST[1]]
    assert C.select("spec_mix", LIST, None, arch="sm_90", pin="first") == [LIST[0]]
    with pytest.raises(ValueError, match="does not fit sm_80"):
        C.select("spec_mix", LIST, None, arch="sm_80", pin="0")
    with pytest.raises(ValueError, match="has 3 configurations"):
        C.select("spec_mix", LIST, None, arch="sm_90", pin="3")
    # the interpreter runs its own small config unless one is pinned
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert C.select("spec_mix", LIST, (8, 8, 8, 1, 1), arch=None, pin="") == [(8, 8, 8, 1, 1)]
    assert C.select("spec_mix", LIST, (8, 8, 8, 1, 1), arch=None, pin="1") == [LIST[1]]


def test_pin_reaches_the_kernels(tmp_path):
    """A fresh process with MEDCONV_TRITON_CONFIG=spec_mix=1,1 defines every autotuned kernel with exactly one
    configuration (interpreter mode: no GPU needed)."""
    pytest.importorskip("triton")
    code = ("import medconv_ext\n"
            "from medconv_ext.triton_kernels import rolling_conv_spectral as S, rolling_conv as R, involution as I\n"
            "ks = [S._spec_gemm_kernel, S._spec_mix_kernel, S._spec_grad_weight_kernel, R._rolling_gemm_kernel,\n"
            "      R._rolling_grad_weight_kernel, I._involution_fwd_kernel, I._involution_grad_input_kernel,\n"
            "      I._involution_grad_weight_kernel]\n"
            "assert all(len(k.configs) == 1 for k in ks), [len(k.configs) for k in ks]\n"
            "c = S._spec_mix_kernel.configs[0]\n"
            "assert (c.kwargs['BLOCK_P'], c.kwargs['BLOCK_F'], c.kwargs['BLOCK_A'], c.num_warps) == S.MIX_CONFIG_LIST[2][:4]\n"
            "c = R._rolling_gemm_kernel.configs[0]\n"
            "assert (c.kwargs['BLOCK_P'], c.kwargs['BLOCK_A'], c.kwargs['BLOCK_E']) == R.GEMM_CONFIG_LIST[1][:3]\n"
            "print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, TRITON_CACHE_DIR=str(tmp_path))
    env[C.PIN_ENV] = "spec_mix=2,1"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr[-3000:]
    env[C.PIN_ENV] = "spec_mix=99"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "spec_mix has 5 configurations" in r.stderr
