"""The CUDA kernels' index math, checked on the CPU.

csrc/cuda/rolling_conv_index.cuh holds the functions the CUDA kernels use to address memory
(weight_offset: the roll by index shift; hi_position: the direct window; lo_position: the inverted
window) and the op-to-kernel table. This test compiles that header with the host C++ compiler into a
small shim (tests/rolling_conv_index_shim.cpp: each kernel's per-element sum, sequential, float64),
drives it with the same geometry as the host code of csrc/cuda/rolling_conv.cu, and compares all six
ops with the float64 reference. The CUDA tiling, shared memory and launches still need a GPU
(tests/test_rolling_conv_cuda.py).
"""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from _rolling_gpu_util import make_case, reference_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    so = str(tmp_path_factory.mktemp("shim") / "rolling_conv_index_shim.so")
    subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, "tests", "rolling_conv_index_shim.cpp"), "-o", so], check=True,
                   capture_output=True, text=True)
    lib = ctypes.CDLL(so)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gemm_ref.argtypes = [p, p, p, p, i64, i64, i64, p, i32, i64, i64, i64, i32]
    lib.grad_weight_ref.argtypes = [p, p, p, i64, p, i32, i64, i64, i64]
    return lib


def _geom(lo, hi, k, s, p, d):
    pad = lambda v, fill: [fill] * (3 - len(v)) + list(v)  # noqa: E731  (2D = 3D with depth 1)
    return torch.tensor(pad(lo, 1) + pad(hi, 1) + pad(k, 1) + pad(s, 1) + pad(p, 0) + pad(d, 1), dtype=torch.int64)


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _gemm(lib, out_shape, inp, w, bias, geom, transposed, n_rolls, op):
    out = torch.full(out_shape, float("nan"), dtype=torch.float64)  # poisoned: every element must be written
    inp, w = inp.contiguous(), w.contiguous()
    lib.gemm_ref(_ptr(out), _ptr(inp), _ptr(w), _ptr(bias), out.shape[0], out.shape[1], inp.shape[1], _ptr(geom),
                 int(transposed), w.shape[0], w.shape[1], n_rolls, op)
    return out


def _grad_weight(lib, w_shape, go, x, geom, transposed, n_rolls):
    gw = torch.full(w_shape, float("nan"), dtype=torch.float64)
    go, x = go.contiguous(), x.contiguous()
    lib.grad_weight_ref(_ptr(gw), _ptr(go), _ptr(x), go.shape[0], _ptr(geom), int(transposed), w_shape[0], w_shape[1],
                        n_rolls)
    return gw


CASES = [  # transposed, dims, N, C, nb, n_rolls, k, spatial, stride, padding, output_padding, dilation
    (False, 2, 2, 5, 2, 3, 3, (9, 8), [2, 2], [1, 1], [0, 0], [2, 2]),
    (False, 2, 1, 1, 1, 1, (3, 2), (5, 6), [1, 1], [0, 0], [0, 0], [1, 1]),
    (False, 3, 2, 4, 1, 4, 3, (5, 6, 7), [1, 2, 1], [1, 1, 0], [0, 0, 0], [1, 1, 2]),
    (True, 2, 2, 5, 2, 3, 3, (4, 5), [2, 2], [1, 1], [1, 1], [1, 1]),
    (True, 2, 1, 4, 1, 4, 3, (4, 3), [1, 1], [2, 2], [1, 1], [2, 2]),
    (True, 3, 1, 3, 2, 2, 2, (3, 2, 3), [2, 1, 2], [0, 0, 1], [1, 0, 1], [1, 1, 1]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "%s%dd-s%s-d%s-r%d-nb%d" % (
    "convT" if c[0] else "conv", c[1], "".join(map(str, c[8])), "".join(map(str, c[11])), c[5], c[4]))
def test_cuda_index_math_matches_reference(shim, case):
    transposed, dims, N, C, nb, n_rolls, k, spatial, stride, padding, output_padding, dilation = case
    x, w, b = make_case(transposed, dims, N, C, nb, n_rolls, k, spatial, torch.float64)
    y, gx, gw, gb, go = reference_all(transposed, x, w, b, stride, padding, output_padding, dilation, n_rolls)
    kk = list(w.shape[2:])
    CR = n_rolls * nb
    if transposed:  # x on the lo grid, y on the hi grid (as in rolling_conv_transpose_cuda)
        lo, hi = list(x.shape[2:]), list(y.shape[2:])
        geom = _geom(lo, hi, kk, stride, padding, dilation)
        ky = _gemm(shim, (N, CR, *hi), x, w, b, geom, True, n_rolls, op=2)
        kgx = _gemm(shim, tuple(x.shape), go, w, None, geom, True, n_rolls, op=3)
        kgw = _grad_weight(shim, tuple(w.shape), go, x, geom, True, n_rolls)
    else:  # x on the hi grid, y on the lo grid (as in rolling_conv_cuda)
        lo, hi = list(y.shape[2:]), list(x.shape[2:])
        geom = _geom(lo, hi, kk, stride, padding, dilation)
        ky = _gemm(shim, (N, CR, *lo), x, w, b, geom, False, n_rolls, op=0)
        kgx = _gemm(shim, tuple(x.shape), go, w, None, geom, False, n_rolls, op=1)
        kgw = _grad_weight(shim, tuple(w.shape), go, x, geom, False, n_rolls)
    for name, got, ref in (("forward", ky, y), ("grad_input", kgx, gx), ("grad_weight", kgw, gw)):
        assert not torch.isnan(got).any(), "%s: elements left unwritten" % name
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=lambda m: "%s: %s" % (name, m))
