"""A handful of small cases per GPU kernel family, forward and backward, each checked against the float64
reference: the workload of the compute-sanitizer runs of bench/gpu_check.sh (memcheck, racecheck), small
enough that the sanitizers finish in seconds.

Families: cuda (the compiled rolling-conv kernels: plain, transposed, 3D), cuda-wmma (the tensor-core GEMM,
MEDCONV_CUDA_MMA=1, float16/bfloat16), triton (the direct Triton rolling-conv kernels), spectral (the fused
spectral Triton kernels), involution-cuda, involution-triton.

    python bench/gpu_sanitize_cases.py [--device cuda|cpu] [--families cuda,cuda-wmma,...]

On the CPU (--device cpu, TRITON_INTERPRET=1) the Triton families run in the interpreter and the CUDA
families are skipped: the dry run of bench/gpu_check.sh. Exit status 1 if a case is wrong.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

FAMILIES = ("cuda", "cuda-wmma", "triton", "spectral", "involution-cuda", "involution-triton")
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}

# (transposed, dims, N, C, n_base, n_rolls, k, spatial, stride, padding, output_padding, dtype)
ROLLING = [
    (False, 2, 2, 5, 2, 3, 3, 7, 2, 1, 0, torch.float32),
    (True, 2, 1, 4, 1, 4, 3, 5, 2, 1, 1, torch.float32),
    (False, 3, 1, 6, 1, 6, 3, 4, 1, 1, 0, torch.float32),
    (False, 2, 2, 33, 1, 33, 3, 9, 1, 1, 0, torch.bfloat16),
]
WMMA = [
    (False, 2, 2, 40, 2, 35, 3, 9, 1, 1, 0, torch.float16),
    (True, 2, 1, 33, 1, 33, 2, 6, 2, 0, 0, torch.bfloat16),
]


def _close(a, b, dtype, what):
    rtol, atol = TOL[dtype]
    if a.shape != b.shape or not torch.isfinite(a).all() or not torch.allclose(a.double().cpu(), b.double().cpu(),
                                                                                rtol=rtol, atol=atol):
        err = (a.double().cpu() - b.double().cpu()).abs().max().item() if a.shape == b.shape else float("nan")
        print("  WRONG %s (max abs err %.3g)" % (what, err))
        return False
    return True


def rolling_case(backend, case, device):
    import medconv_ext

    tr, dims, N, C, nb, nr, k, s, st, pad, op_, dtype = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn((N, C) + (s,) * dims, generator=g).to(dtype)
    w = (torch.randn(((C, nb) if tr else (nb, C)) + (k,) * dims, generator=g) / (C * k ** dims) ** 0.5).to(dtype)
    b = torch.randn(nr * nb, generator=g).to(dtype)
    args = dict(stride=st, padding=pad, n_rolls=nr)
    if tr:
        args["output_padding"] = op_
    f = getattr(medconv_ext, "rolling_conv%s%dd" % ("_transpose" if tr else "", dims))
    ok = True
    outs = []
    for be, dev, dt in ((backend, device, dtype), ("reference", "cpu", torch.float64)):
        xs, ws, bs = (t.detach().clone().to(dev, dt).requires_grad_() for t in (x, w, b))
        y = f(xs, ws, bs, backend=be, **args)
        # grad_out rounded to the case's dtype first, so that the reference sees the same values
        go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(dev, dt)
        y.backward(go)
        outs.append((y.detach(), xs.grad, ws.grad))
    for name, a, r in zip(("forward", "grad_input", "grad_weight"), outs[0], outs[1]):
        ok &= _close(a, r, dtype, "%s %s %s" % (backend, case[:2], name))
    return ok


def involution_case(backend, device):
    from medconv_ext import involution2d

    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 8, 9, 7, generator=g).to(dtype)
        w = (torch.randn(2, 2, 3, 3, 5, 4, generator=g) / 3).to(dtype)
        outs = []
        for be, dev, dt in ((backend, device, dtype), ("reference", "cpu", torch.float64)):
            xs, ws = (t.detach().clone().to(dev, dt).requires_grad_() for t in (x, w))
            y = involution2d(xs, ws, 3, 2, 1, 1, backend=be)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(dev, dt))
            outs.append((y.detach(), xs.grad, ws.grad))
        for name, a, r in zip(("forward", "grad_input", "grad_weight"), outs[0], outs[1]):
            ok &= _close(a, r, dtype, "%s %s %s" % (backend, dtype, name))
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--families", default=",".join(FAMILIES))
    a = p.parse_args(argv)
    import medconv_ext

    avail = medconv_ext.available_backends()
    ok = True
    for fam in a.families.split(","):
        if fam not in FAMILIES:
            p.error("unknown family %r (choose from %s)" % (fam, ", ".join(FAMILIES)))
        backend = {"cuda-wmma": "cuda", "involution-cuda": "cuda", "involution-triton": "triton"}.get(fam, fam)
        if backend != "spectral" and not avail[backend][0]:
            print("%-18s skipped: %s" % (fam, avail[backend][1]))
            continue
        if fam == "spectral" and a.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            print("%-18s skipped: the fused kernel runs on the CPU only under TRITON_INTERPRET=1" % fam)
            continue
        if backend == "cuda" and a.device != "cuda":
            print("%-18s skipped: needs a GPU" % fam)
            continue
        if fam == "cuda-wmma":
            os.environ["MEDCONV_CUDA_MMA"] = "1"
        try:
            if fam.startswith("involution"):
                good = involution_case(backend, a.device)
            else:
                good = all([rolling_case(backend, c, a.device) for c in (WMMA if fam == "cuda-wmma" else ROLLING)])
        finally:
            os.environ.pop("MEDCONV_CUDA_MMA", None)
        print("%-18s %s" % (fam, "ok" if good else "WRONG"), flush=True)
        ok &= good
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
