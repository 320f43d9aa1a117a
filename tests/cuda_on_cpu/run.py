"""Run the real CUDA kernels of csrc/cuda on the CPU and check them (docs/cuda_on_cpu.md).

Builds build/cuda_on_cpu/libcudaemu.so (builder.py), runs the emulator's self-test (selftest.py), then
for every case x dtype x op of every driver (drivers/<source>.py) compares the emulated kernel with
the float64 reference of the GPU tests and reports:
  * values outside the GPU tests' tolerances, and non-finite values: outputs and workspaces are
    allocated NaN-filled (torch.use_deterministic_algorithms), so an element never written stays NaN;
  * emulator errors: barrier divergence, deadlock, warp-op misuse, invalid launch configuration;
  * AddressSanitizer / UBSan reports raised during that op call;
  * schedule dependence: the same call with the threads of a block in reverse / random order between
    barriers, blocks in reverse / random order, and every grid dimension clamped to 1 or 2 blocks
    (grid-stride loops) must give the same bits.
Finally it proves coverage: every op a .cu file registers for CUDA is tested by a driver (or listed
in NOT_EMULATED with the reason), and every kernel launch site in the sources was reached.

Modes:
  (default) quick: float64 + float32 fixed cases, 4 / 2 schedule variants, 24 random configurations
            per driver, and one float16 case per driver with the WMMA path (every launch site runs)
  --full    all four dtypes, the WMMA path for every 16-bit case, all five schedule variants for
            every dtype, 150 random configurations per driver in float64/float32 and 50 in
            float16/bfloat16 (forward + random order with clamped grid), and the mutation test
            (mutants.py: bugs injected into copies of the real sources must be flagged)
Options: --only SUBSTR (case ids containing it), --fuzz N --seed S (random configurations only),
         --no-variants, --lib PATH (a prebuilt library, e.g. of mutated sources), -j N (build jobs).
Usage:   make test-cuda-emu [EMU_ARGS="--full"]   or   python tests/cuda_on_cpu/run.py [options]
"""
import argparse
import importlib
import json
import os
import pkgutil
import random
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "tests")]

# Ops a .cu file registers that the emulator cannot run, with the reason (docs/cuda_on_cpu.md lists
# them too). Every other registered op must be tested by a driver, or the run fails.
NOT_EMULATED = {}

# (name, sched, seed, max_grid): sched 0 forward, 1 reverse, 2 random order of the threads between
# barriers and of the blocks; max_grid > 0 clamps every grid dimension. The first is compared with the
# reference, the others with the first, bit for bit.
VARIANTS = [("fwd", 0, 1, 0), ("rev", 1, 1, 0), ("rand", 2, 7, 0), ("grid1", 0, 1, 1), ("grid2-rand", 2, 3, 2)]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--full", action="store_true", help="all dtypes, WMMA path, all schedule variants, longer fuzz")
    ap.add_argument("--only", default="", help="only the cases whose id contains this")
    ap.add_argument("--fuzz", type=int, default=None, help="only random configurations: this many per driver")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random configurations")
    ap.add_argument("--fuzz-16bit", action="store_true", help="with --fuzz: float16/bfloat16 (incl. WMMA)")
    ap.add_argument("--no-variants", action="store_true", help="forward schedule only")
    ap.add_argument("--lib", default=None, help="use this prebuilt library (no build, no self-test)")
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "cuda_on_cpu"), help="build folder")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel compilers")
    ap.add_argument("--no-selftest", action="store_true")
    ap.add_argument("--mutants", action="store_true", help="only the mutation test (mutants.py; part of --full)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # internal: sanitizers preloaded
    return ap.parse_args(argv)


def sanitizer_env(logdir):
    """Environment of the python process that loads the sanitized library."""
    cc = os.environ.get("CC", "gcc")
    libs = [subprocess.run([cc, "-print-file-name=%s" % n], capture_output=True, text=True, check=True).stdout.strip()
            for n in ("libasan.so", "libubsan.so")]
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(libs + [p for p in env.get("LD_PRELOAD", "").split(":") if p])
    log = os.path.join(logdir, "asan")
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=0:log_path=%s:symbolize=1" % log
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=0:log_path=%s" % log
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class SanitizerLog:
    """New text in this process's sanitizer log (ASAN_OPTIONS log_path=... -> log_path.<pid>)."""

    def __init__(self):
        self.path, self.pos = None, 0
        for part in os.environ.get("ASAN_OPTIONS", "").split(":"):
            if part.startswith("log_path="):
                self.path = part[len("log_path="):] + ".%d" % os.getpid()

    def new(self):
        if self.path is None or not os.path.exists(self.path):
            return ""
        with open(self.path, errors="replace") as f:
            f.seek(self.pos)
            s = f.read()
            self.pos = f.tell()
        return "\n".join(ln for ln in s.splitlines() if "makecontext/swapcontext" not in ln).strip()


def summarize_sanitizer(s):
    lines = s.splitlines()
    keep = [ln for ln in lines if "ERROR: AddressSanitizer" in ln or "runtime error" in ln or "READ of" in ln
            or "WRITE of" in ln]
    frames = [ln.strip() for ln in lines if ".cu:" in ln][:3]
    return "; ".join(keep[:2] + frames)


class Checker:
    """Runs one op under the schedule variants and records the outcome (handed to the drivers)."""

    def __init__(self, torch, ops, variants, wmma, logdir, variants_all_dtypes=False):
        self.torch, self.ops, self.variants, self.wmma = torch, ops, variants, wmma
        self.variants_all_dtypes = variants_all_dtypes
        self.logdir = logdir
        self.san = SanitizerLog()
        self.san.new()
        self.lines, self.failures = [], 0

    def record(self, case, dtype, op, ok, detail):
        self.failures += not ok
        line = "%s %-28s %-9s %-24s %s" % ("ok  " if ok else "FAIL", case, str(dtype).replace("torch.", ""), op, detail)
        print(line, flush=True)
        self.lines.append(line)

    def _call(self, fn, args):
        torch = self.torch
        torch.use_deterministic_algorithms(True)  # with fill_uninitialized_memory: at::empty -> NaN
        try:
            out, err = fn(*args), ""
        except Exception as e:  # emulator and launch errors come back as RuntimeError
            out, err = None, str(e).split("\nException raised from")[0]
        finally:
            torch.use_deterministic_algorithms(False)
        return out, err, self.san.new()

    def _variants_for(self, dtype, opname):
        """All variants in float64 and for the WMMA kernel; the other dtypes run the same templated
        code, so they get the forward schedule plus the last (random order, clamped grid) variant."""
        if self.variants_all_dtypes or dtype == self.torch.float64 or "wmma" in opname or len(self.variants) <= 1:
            return self.variants
        return [self.variants[0], self.variants[-1]]

    def check(self, case, dtype, opname, fn, args, expected, tol):
        torch = self.torch
        rtol, atol = tol
        base = None
        for vi, (vname, sched, seed, max_grid) in enumerate(self._variants_for(dtype, opname)):
            self.ops.configure(sched, seed, max_grid, 9)
            out, err, san = self._call(fn, args)
            what = opname if vi == 0 else "%s[%s]" % (opname, vname)
            if err:
                self.record(case, dtype, what, False, "emulator/launch error: " + err.replace("\n", " | ")[:600])
                break
            if san:
                self.record(case, dtype, what, False, "SANITIZER: " + summarize_sanitizer(san)[:800])
                with open(os.path.join(self.logdir, "sanitizer_reports.txt"), "a") as f:
                    f.write("=== %s %s %s\n%s\n" % (case, dtype, what, san))
            if vi == 0:
                base = out
                if out.shape != expected.shape:
                    self.record(case, dtype, what, False, "shape %s != %s" % (tuple(out.shape), tuple(expected.shape)))
                    break
                nonfinite = int((~torch.isfinite(out)).sum())
                diff = (out.double() - expected.double()).abs()
                bad = diff > atol + rtol * expected.double().abs()
                nbad = int(bad.sum())
                maxerr = float(diff.max()) if diff.numel() else 0.0
                if nonfinite or nbad:
                    idx = (bad if nbad else ~torch.isfinite(out)).nonzero()[:3].tolist()
                    self.record(case, dtype, what, False, "%d/%d mismatches, %d non-finite, max err %.3g, first at %s" %
                                (nbad, out.numel(), nonfinite, maxerr, idx))
                elif not san:
                    self.record(case, dtype, what, True, "max err %.2e (%d elems)" % (maxerr, out.numel()))
            elif out.shape != base.shape or not torch.equal(out.reshape(-1).view(torch.uint8),
                                                            base.reshape(-1).view(torch.uint8)):
                d = (out.double() - base.double()).abs() if out.shape == base.shape else None
                self.record(case, dtype, what, False, "result differs from the forward schedule (race or grid-stride "
                            "bug): %s elems differ" % ("all" if d is None else int((d > 0).sum())))
        self.ops.configure(0, 1, 0, 9)


def load_drivers():
    """drivers/<name>.py modules: SOURCE (the .cu file), OPS, fixed_cases(), fuzz_cases(rnd, n), run()."""
    import drivers
    return [importlib.import_module("drivers." + m.name) for m in pkgutil.iter_modules(drivers.__path__)]


def coverage(manifest, drivers, sites_text, complete):
    """Failure messages: ops without a driver, kernels never launched (when the run was complete)."""
    problems = []
    tested = {op for d in drivers for op in d.OPS}
    reached = {ln.split()[0] for ln in sites_text.splitlines() if ln.strip()}
    for name, desc in sorted(manifest["files"].items()):
        for op in desc["ops"]:
            if op not in tested and op not in NOT_EMULATED:
                problems.append("%s: op %s has no emulated test (add it to a driver in tests/cuda_on_cpu/drivers/ "
                                "or to NOT_EMULATED in run.py with the reason)" % (name, op))
        launched = {ln["kernel"] for ln in desc["launches"]}
        for k in desc["kernels"]:
            if k not in launched:
                problems.append("%s: kernel %s has no launch site in its file (the emulator cannot reach it)" % (name, k))
        if complete:
            for ln in desc["launches"]:
                if ln["site"] not in reached:
                    problems.append("%s: the launch of %s at %s was never reached by any case" %
                                    (name, ln["kernel"], ln["site"]))
    return problems


class Ops:
    """torch.ops.cudaemu (the emulated CUDA ops) plus the runtime's C control functions."""

    def __init__(self, torch, lib):
        import ctypes

        torch.ops.load_library(lib)
        self._ops = torch.ops.cudaemu
        self._c = ctypes.CDLL(lib)
        self._c.cudaemu_configure.argtypes = [ctypes.c_int64] * 4
        self._c.cudaemu_launch_sites.restype = ctypes.c_char_p
        self._i64 = ctypes.c_int64

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def configure(self, sched, seed, max_grid, cc_major):
        assert self._c.cudaemu_configure(sched, seed, max_grid, cc_major) == 0

    def stats(self):
        out = (self._i64 * 5)()
        self._c.cudaemu_stats(out)
        return list(out)

    def launch_sites(self):
        return self._c.cudaemu_launch_sites().decode()


def child(args):
    import torch

    ops = Ops(torch, args.lib)
    with open(os.path.join(os.path.dirname(args.lib), "manifest.json")) as f:
        manifest = json.load(f)
    logdir = os.path.join(args.out, "logs")
    f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
    variants = VARIANTS if args.full else [VARIANTS[0], VARIANTS[1], VARIANTS[3], VARIANTS[4]]
    if args.no_variants:
        variants = variants[:1]
    drivers = load_drivers()
    t = Checker(torch, ops, variants, wmma=True, logdir=logdir, variants_all_dtypes=args.full)
    t0 = time.time()
    # plan: (label, driver, cases, dtypes)
    plan = []
    if args.fuzz is not None:
        dts = [f16, bf16] if args.fuzz_16bit else [f64, f32]
        for d in drivers:
            plan.append(("fuzz seed %d" % args.seed, d, d.fuzz_cases(random.Random(args.seed), args.fuzz), dts))
    elif args.full:
        for d in drivers:
            plan.append(("fixed", d, d.fixed_cases(), [f64, f32, f16, bf16]))
            plan.append(("fuzz seed %d" % args.seed, d, d.fuzz_cases(random.Random(args.seed), 150), [f64, f32]))
            plan.append(("fuzz16 seed %d" % args.seed, d, d.fuzz_cases(random.Random(args.seed + 1), 50), [f16, bf16]))
    else:
        for d in drivers:
            cases = d.fixed_cases()
            plan.append(("fixed", d, cases, [f64, f32]))
            plan.append(("16-bit smoke", d, cases[:1], [f16]))
            plan.append(("fuzz seed %d" % args.seed, d, d.fuzz_cases(random.Random(args.seed), 24), [f64, f32]))
    n_cases = 0
    for label, d, cases, dts in plan:
        if label.startswith("fuzz") or label.startswith("16-bit"):
            t.variants = [v for v in variants if v[0] in ("fwd", "grid2-rand")] or variants[:1]
        else:
            t.variants = variants
        print("## %s: %s, %d cases, %s (at %.0f s)" % (d.SOURCE, label, len(cases), ", ".join(str(x)[6:] for x in dts),
                                                      time.time() - t0), flush=True)
        for c in cases:
            if args.only in c[0]:
                if label.startswith("fuzz"):
                    print("#", c, flush=True)
                d.run(c, dts, t)
                n_cases += 1
    left = t.san.new()  # a report raised outside any op call (reference code, interpreter exit is later)
    if left:
        t.record("sanitizer", "-", "-", False, "report outside the op calls: " + summarize_sanitizer(left)[:800])
    if n_cases == 0:
        t.record("selection", "-", "-", False, "no case id contains %r" % args.only)
    complete = not args.only and args.fuzz is None
    problems = coverage(manifest, drivers, ops.launch_sites(), complete)
    for p in problems:
        t.record("coverage", "-", "-", False, p)
    for name, why in sorted(manifest["skipped"].items()):
        print("## not built: %s (%s)" % (name, why))
    for op, why in sorted(NOT_EMULATED.items()):
        print("## not emulated: %s (%s)" % (op, why))
    stats = list(ops.stats())
    print("## launch sites reached:\n" + "".join("##   " + ln + "\n" for ln in ops.launch_sites().splitlines()), end="")
    summary = ("cuda_on_cpu: %d checks on %d cases, %d failures, %.0f s wall, %.0f s CPU; emulator: %d launches, "
               "%d blocks, %d fiber switches, %d barriers, %d warp ops" %
               ((len(t.lines), n_cases, t.failures, time.time() - t0, time.process_time()) + tuple(stats)))
    print(summary)
    with open(os.path.join(logdir, "results.txt"), "w") as f:
        f.write("\n".join(t.lines + [summary]) + "\n")
    return 1 if t.failures else 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return child(args)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    t0 = time.time()
    failures = 0
    args.lib_built_here = args.lib is None
    if args.lib is None:
        import builder
        args.lib, _ = builder.build(ROOT, args.out, args.jobs)
        if not args.no_selftest:
            import selftest
            failures += selftest.main(os.path.join(args.out, "selftest"), verbose=False)
            print("cuda_on_cpu: self-test %s (%d of %d broken-kernel expectations failed)" %
                  ("ok" if not failures else "FAILED", failures, len(selftest.EXPECT)), flush=True)
    if args.mutants:
        import mutants
        bad = mutants.run_mutants(ROOT, args.out, args.jobs, os.path.abspath(__file__))
        print("cuda_on_cpu: mutation test %s" % ("ok" if not bad else "FAILED (%d mutants not flagged)" % bad))
        return 1 if bad or failures else 0
    for f in os.listdir(os.path.join(args.out, "logs")):
        if f.startswith("asan.") or f == "sanitizer_reports.txt":
            os.remove(os.path.join(args.out, "logs", f))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--lib", os.path.abspath(args.lib)] + \
        [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--child",)]
    if "--out" not in cmd:
        cmd += ["--out", args.out]
    rc = subprocess.run(cmd, env=sanitizer_env(os.path.join(args.out, "logs"))).returncode
    if args.full and args.lib_built_here and not args.only and args.fuzz is None:
        import mutants
        bad = mutants.run_mutants(ROOT, args.out, args.jobs, os.path.abspath(__file__))
        print("cuda_on_cpu: mutation test %s" % ("ok" if not bad else "FAILED (%d mutants not flagged)" % bad))
        failures += bad
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru.ru_utime + ru.ru_stime + time.process_time()
    print("cuda_on_cpu: %s in %.0f s wall, %.0f s CPU (build, self-test and checks); log %s" %
          ("PASSED" if rc == 0 and not failures else "FAILED", time.time() - t0, cpu,
           os.path.join(args.out, "logs", "results.txt")))
    return 1 if (rc or failures) else 0


if __name__ == "__main__":
    sys.exit(main())
