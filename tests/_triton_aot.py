"""Ahead-of-time compile of every launch configuration of every Triton kernel for sm_80 and sm_90, on the
CPU (no GPU needed), with the resource use of each: shared memory (triton's metadata) and registers, stack
and local memory (cuobjdump -res-usage of the cubin; a STACK or LOCAL above 0 means register spills: the
kernels keep no arrays in local memory). Used by tests/test_triton_aot.py; as a script it prints the table:

    python tests/_triton_aot.py [--arch sm_80,sm_90] [--kernel spec_mix,...] [--jobs N]

Each configuration is compiled in its heaviest variants (float32 operands with the most precise dots take
the most shared memory and registers), so a configuration that passes here fits every dtype:
    spec_gemm         float32 (tf32x3) and the 16-bit hi/lo split (bfloat16 dots)
    spec_mix          float32 out, tf32x3, transposed geometry; bfloat16 out, TF32, conv geometry; full epilogue
    spec_grad_weight  transposed geometry (grad spectrum on the hi grid)
    rolling_gemm      float32 (IEEE dots) and bfloat16 (tensor cores), transposed geometry, bias
    rolling_grad_weight  float32, transposed geometry
    involution_*      float64 (float64 accumulators: the most registers)
Must run without TRITON_INTERPRET (the kernels are defined for a GPU target then).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH_CC = {"sm_80": 80, "sm_90": 90}


def _mods():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    import medconv_ext  # noqa: F401  (maps triton_kernels/ to medconv_ext.triton_kernels)
    from medconv_ext.triton_kernels import _configs, involution, rolling_conv, rolling_conv_spectral

    return _configs, rolling_conv, rolling_conv_spectral, involution


def variants():
    """{kernel: (jit fn, config list, [(variant name, pointer dtypes, i64 args, constexprs), ...], meta names)}"""
    _, rc, sp, inv = _mods()
    f32 = lambda *names: {n: "*fp32" for n in names}  # noqa: E731
    epi = dict(HAS_BIAS=True, HAS_SCALE=True, HAS_SHIFT=True, RELU=True)
    mix_ptrs = ("out_ptr", "s_ptr", "coef_ptr", "m_ptr", "bias_ptr", "scale_ptr", "shift_ptr")
    return {
        "spec_gemm": (sp._spec_gemm_kernel.fn, sp.GEMM_CONFIG_LIST, [
            ("float32", f32("out_ptr", "in_ptr", "m_ptr"), (), dict(PREC="tf32x3", A_F32=True, SPLIT=False)),
            ("bfloat16-split", dict(out_ptr="*fp32", in_ptr="*bf16", m_ptr="*bf16"), (),
             dict(PREC="tf32", A_F32=False, SPLIT=True)),
        ], ("BLOCK_P", "BLOCK_K", "BLOCK_E")),
        "spec_mix": (sp._spec_mix_kernel.fn, sp.MIX_CONFIG_LIST, [
            ("float32-tf32x3-inverse", f32(*mix_ptrs), (), dict(INVERSE=True, PREC="tf32x3", **epi)),
            ("bfloat16-tf32", dict(f32(*mix_ptrs), out_ptr="*bf16", bias_ptr="*bf16"), (),
             dict(INVERSE=False, PREC="tf32", **epi)),
        ], ("BLOCK_P", "BLOCK_F", "BLOCK_A")),
        "spec_grad_weight": (sp._spec_grad_weight_kernel.fn, sp.GW_CONFIG_LIST, [
            ("float32-transposed", f32("part_ptr", "g_ptr", "s_ptr"), ("ITEMS", "CHUNK"), dict(G_IS_LO=False)),
        ], ("BLOCK_J", "BLOCK_F")),
        "rolling_gemm": (rc._rolling_gemm_kernel.fn, rc.GEMM_CONFIG_LIST, [
            ("float32-ieee", f32("out_ptr", "in_ptr", "w_ptr", "bias_ptr"), ("P_OUT", "P_IN"),
             dict(A_IS_ROLL=False, INVERSE=True, HAS_BIAS=True, IEEE=True, DOT_F32=False)),
            ("bfloat16", {n: "*bf16" for n in ("out_ptr", "in_ptr", "w_ptr", "bias_ptr")}, ("P_OUT", "P_IN"),
             dict(A_IS_ROLL=False, INVERSE=True, HAS_BIAS=True, IEEE=False, DOT_F32=False)),
        ], ("BLOCK_P", "BLOCK_A", "BLOCK_E")),
        "rolling_grad_weight": (rc._rolling_grad_weight_kernel.fn, rc.GW_CONFIG_LIST, [
            ("float32-transposed", f32("part_ptr", "roll_ptr", "chan_ptr"), ("ITEMS", "CHUNK"),
             dict(ROLL_IS_LO=False)),
        ], ("BLOCK_M", "BLOCK_J")),
        "involution_fwd": (inv._involution_fwd_kernel.fn, inv.CONFIG_LIST, [
            ("float64", {n: "*fp64" for n in ("x_ptr", "w_ptr", "out_ptr")}, (), dict(ACC="fp64")),
        ], ("BLOCK_P", "BLOCK_C")),
        "involution_grad_input": (inv._involution_grad_input_kernel.fn, inv.CONFIG_LIST, [
            ("float64", {n: "*fp64" for n in ("gy_ptr", "w_ptr", "gx_ptr")}, (), dict(ACC="fp64")),
        ], ("BLOCK_P", "BLOCK_C")),
        "involution_grad_weight": (inv._involution_grad_weight_kernel.fn, inv.CONFIG_LIST, [
            ("float64", {n: "*fp64" for n in ("gy_ptr", "x_ptr", "gw_ptr")}, (), dict(ACC="fp64")),
        ], ("BLOCK_P", "BLOCK_C")),
    }


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def compile_one(job):
    """job = (kernel, config index, arch) -> dict of resource use for every variant."""
    kernel, idx, arch = job
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, configs, vlist, meta = variants()[kernel]
    cfg = configs[idx]
    nmeta = len(meta)
    opts = {"num_warps": cfg[nmeta]}
    if len(cfg) > nmeta + 1:
        opts["num_stages"] = cfg[nmeta + 1]
    rows = []
    for vname, ptrs, i64, const in vlist:
        const = dict(const, **dict(zip(meta, cfg[:nmeta])))
        if const.get("ACC") == "fp64":
            const["ACC"] = tl.float64
        sig = {a: ("constexpr" if a in const else ptrs.get(a, "i64" if a in i64 else "i32")) for a in fn.arg_names}
        t0 = time.time()
        k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", ARCH_CC[arch], 32), options=opts)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        try:
            out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                                 timeout=120).stdout
        finally:
            os.unlink(f.name)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
        if not m:
            raise RuntimeError("cuobjdump -res-usage gave no resource line for %s %s: %r" % (kernel, cfg, out[-500:]))
        reg, stack, shared_static, local = (int(v) for v in m.groups())
        shared = int(k.metadata.shared)
        rows.append(dict(kernel=kernel, index=idx, config=tuple(cfg), arch=arch, variant=vname, regs=reg,
                         stack=stack, local=local, shared=shared + shared_static, seconds=time.time() - t0,
                         mma="mma" in k.asm["ptx"]))
    return rows


def verdict(row, smem_limit):
    why = []
    if row["shared"] > smem_limit:
        why.append("shared memory %d KB > %d KB" % (-(-row["shared"] // 1024), smem_limit // 1024))
    if row["stack"] > 0 or row["local"] > 0:
        why.append("register spills (stack %d B, local %d B, %d registers)" % (row["stack"], row["local"], row["regs"]))
    return why


def run(archs=("sm_80", "sm_90"), kernels=None, jobs=None):
    v = variants()
    todo = [(k, i, a) for a in archs for k in (kernels or list(v)) for i in range(len(v[k][1]))]
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    if jobs == 1:
        results = [compile_one(j) for j in todo]
    else:
        with ProcessPoolExecutor(jobs) as ex:
            results = list(ex.map(compile_one, todo))
    return [r for rows in results for r in rows]


def pruned_from(rows):
    """{arch: {kernel: [config, ...]}} of the configurations that do not fit (any variant)."""
    cfgs, _, _, _ = _mods()
    out = {}
    for r in rows:
        if verdict(r, cfgs.SMEM_LIMIT[r["arch"]]):
            lst = out.setdefault(r["arch"], {}).setdefault(r["kernel"], [])
            if r["config"] not in lst:
                lst.append(r["config"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_80,sm_90")
    p.add_argument("--kernel", default=None)
    p.add_argument("--jobs", type=int, default=None)
    a = p.parse_args(argv)
    cfgs = _mods()[0]
    t0 = time.time()
    rows = run(a.arch.split(","), a.kernel.split(",") if a.kernel else None, a.jobs)
    print("%-22s %-6s %-24s %-24s %5s %6s %6s %8s  %s" % ("kernel", "arch", "config", "variant", "regs", "stack",
                                                          "local", "smem KB", "verdict"))
    for r in rows:
        why = verdict(r, cfgs.SMEM_LIMIT[r["arch"]])
        print("%-22s %-6s %-24s %-24s %5d %6d %6d %8.1f  %s" % (
            r["kernel"], r["arch"], r["config"], r["variant"], r["regs"], r["stack"], r["local"], r["shared"] / 1024,
            "; ".join(why) if why else "fits"))
    print("PRUNED =", pruned_from(rows))
    print("%d compiles in %.0f s" % (len(rows), time.time() - t0))


if __name__ == "__main__":
    main()
