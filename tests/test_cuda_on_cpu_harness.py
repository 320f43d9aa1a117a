"""The CUDA-on-CPU harness itself (tests/cuda_on_cpu, docs/cuda_on_cpu.md), without compiling
anything (the emulated kernels run in `make test-cuda-emu`): the source rewrite keeps every line in
place and covers the CUDA syntax in use, and every CUDA source that registers ops has a driver whose
cases are the GPU tests' cases."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EMU = os.path.join(HERE, "cuda_on_cpu")
ROOT = os.path.dirname(HERE)
sys.path.insert(0, EMU)

import builder  # noqa: E402
import run  # noqa: E402
import transform  # noqa: E402

SNIPPET = """// a comment with k<<<1, 2>>>(x) and __shared__ float z[3]; in it
template <typename T>
__global__ void __launch_bounds__(256) kern(T* out) {
  extern __shared__ __align__(16) unsigned char raw[];
  __shared__ float tile[4][8];
  __shared__ T total;
  out[threadIdx.x] = tile[0][0] + raw[0] + total;
}
void host(float* p) {
  kern<float><<<dim3(2, 1),
                64, 128, stream>>>(p);
}
TORCH_LIBRARY_IMPL(medconv, CUDA, m) {
  m.impl("op_a", &a_cuda);
  m.impl("op_b", &b_cuda);
}
TORCH_LIBRARY_IMPL(medconv, AutocastCUDA, m) {
  m.impl("op_a", &a_autocast);
}
"""


def test_transform_rewrites_cuda_syntax_and_keeps_lines():
    out = transform.transform(SNIPPET, "snippet.cu", "/src/snippet.cu")
    head, body = out.split("\n", 2)[:2], out.split("\n", 2)[2]
    assert head == ['#include "cudaemu.h"', '#line 1 "/src/snippet.cu"']
    assert body.count("\n") == SNIPPET.count("\n")
    lines = body.split("\n")
    assert lines[0] == SNIPPET.split("\n")[0]  # comments are left alone
    assert "unsigned char* raw = reinterpret_cast<unsigned char*>(::cudaemu::dyn_smem());" in lines[3]
    assert "static float tile[4][8]; ::cudaemu::shared_decl(&tile, sizeof(tile));" in lines[4]
    assert "static T total; ::cudaemu::shared_decl(&total, sizeof(total));" in lines[5]
    assert '::cudaemu::launcher("kern<float>", "snippet.cu:10", kern<float>, dim3(2, 1),' in lines[9]
    assert lines[12] == "TORCH_LIBRARY_FRAGMENT(cudaemu, m) {"
    assert lines[13].strip() == 'm.def("op_a", &a_cuda);'
    assert lines[16].startswith("TORCH_LIBRARY_IMPL(medconv, AutocastCUDA, m)")  # left to the stand-in
    assert transform.describe(SNIPPET, "snippet.cu") == {
        "kernels": ["kern"], "launches": [{"kernel": "kern", "site": "snippet.cu:10"}], "ops": ["op_a", "op_b"]}


def test_transform_refuses_syntax_it_does_not_cover():
    with pytest.raises(ValueError, match="not cover"):
        transform.transform("__global__ void k() { __shared__ float x = 0; }\n", "s.cu", "s.cu")


def test_every_cuda_source_is_emulated():
    """Every csrc/cuda/*.cu with kernels or CUDA registrations is built, every op it registers has a
    driver (or a reason in NOT_EMULATED), and every kernel it defines has a launch site."""
    sources, skipped = builder.scan(ROOT)
    assert {name for name, _, _ in sources} >= {"rolling_conv.cu", "involution.cu"}
    for name in skipped:
        with open(os.path.join(ROOT, "csrc", "cuda", name)) as f:
            assert "__global__" not in f.read()
    drivers = run.load_drivers()
    manifest = {"files": {name: desc for name, _, desc in sources}}
    assert run.coverage(manifest, drivers, "", complete=False) == []
    assert {d.SOURCE for d in drivers} <= {name for name, _, _ in sources}


def test_drivers_use_the_gpu_tests_case_lists():
    import _involution_gpu_util
    import _rolling_gpu_util

    by_source = {d.SOURCE: d for d in run.load_drivers()}
    assert by_source["rolling_conv.cu"].fixed_cases() == _rolling_gpu_util.CUDA_CASES
    assert by_source["involution.cu"].fixed_cases() == _involution_gpu_util.CUDA_CASES
    for d in by_source.values():
        import random

        ids = [c[0] for c in d.fixed_cases() + d.fuzz_cases(random.Random(0), 10)]
        assert len(ids) == len(set(ids))


def test_a_new_source_without_driver_fails_the_coverage_check():
    manifest = {"files": {"new_op.cu": {"kernels": ["new_kernel", "orphan_kernel"],
                                        "launches": [{"kernel": "new_kernel", "site": "new_op.cu:40"}],
                                        "ops": ["new_op"]}}}
    problems = run.coverage(manifest, run.load_drivers(), "", complete=True)
    assert any("op new_op has no emulated test" in p for p in problems)
    assert any("orphan_kernel has no launch site" in p for p in problems)
    assert any("new_op.cu:40 was never reached" in p for p in problems)
    assert run.coverage(manifest, run.load_drivers(), "new_op.cu:40 3\n", complete=True) == [
        p for p in problems if "never reached" not in p]
