"""Backends and how one is chosen.

Every operator has implementations registered per backend name:
  "reference"  pure PyTorch, written for clarity (materializes what the math defines); any device
  "spectral"   rolling conv only: the exact channel-FFT algorithm (docs/design.md §1); any device. A fused
               kernel runs where one is registered for the input's device type and supports the input
               (register_fused: ops/rolling_conv_spectral_cpu.py on CPU tensors, the Triton kernel of
               ops/rolling_conv_spectral_triton.py on CUDA tensors), the composition of torch ops elsewhere
  "spectral_unfused"  rolling conv only: always the composition of torch ops (rfft, depthwise conv,
               irfft): the readable form of the algorithm, and a check of the fused kernels
  "cpu"        the compiled C++ kernels (torch.ops.medconv.*) on CPU tensors
  "cuda"       the compiled CUDA kernels on CUDA tensors
  "triton"     Triton kernels on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)

`backend="auto"` asks the operator for its ordered candidates (a rule derived from the
benchmark, written down in the operator's module) and takes the first one that is available
and supports the input. The environment variable MEDCONV_BACKEND (read at every call) overrides the
automatic choice wherever that backend supports the input (elsewhere auto proceeds as usual).
Operators may memoise a choice per input signature in DISPATCH_CACHE (ops/rolling_conv.py does, for eager
calls on CPU tensors); every registration empties it.
An explicitly requested backend that cannot run the input raises an error saying why.
`forced_backend(name)` (a context manager) overrides every choice, explicit ones included, within a block.

One registry holds the whole dispatch: per operator and backend an `Impl` (its function, what inputs it
supports, whether that function applies the epilogue y = relu?((conv + bias) * scale + shift) itself), and
per device type the backend's fused kernels (`Fused`: function, supports(x, weight), epilogue flag).
`resolve` picks the backend; calling the `Impl` it returns picks the function (`Impl.kernel`: the fused
kernel for the input's device type where it supports the input, else the backend's own function) and runs
the epilogue in that function where its flag says so, else with torch ops after it.
`capabilities(op)` lists what is registered.
"""
import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from . import _ext

BACKENDS = ("reference", "spectral", "spectral_unfused", "cpu", "cuda", "triton")


def _triton_status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return False, "triton is not importable (%s)" % e
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, "triton %s in interpreter mode (TRITON_INTERPRET=1): runs on CPU tensors" % triton.__version__
    if torch.cuda.is_available():
        return True, "triton %s on %s" % (triton.__version__, torch.cuda.get_device_name())
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)"


_STATUS_CACHE: Dict[str, Dict[str, Tuple[bool, str]]] = {}


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """{name: (available, reason)} for every backend on this machine."""
    return dict(_backend_status())


def _backend_status() -> Dict[str, Tuple[bool, str]]:
    """The cached status (not copied: resolve() reads it on every operator call)."""
    key = os.environ.get("TRITON_INTERPRET", "0")  # the only input that changes at run time
    if key not in _STATUS_CACHE:
        _STATUS_CACHE[key] = _probe_backends()
    return _STATUS_CACHE[key]


def _probe_backends() -> Dict[str, Tuple[bool, str]]:
    out = {
        "reference": (True, "pure PyTorch, always available"),
        "spectral": (True, "channel-FFT algorithm: a fused kernel where one runs the input, else torch ops"),
        "spectral_unfused": (True, "channel-FFT algorithm as a composition of torch ops, always available"),
    }
    if _ext.has_compiled_ops():
        out["cpu"] = (True, "compiled C++ kernels (medconv_ext._C)")
    else:
        out["cpu"] = (False, _ext.EXT_ERROR)
    if not _ext.has_compiled_ops():
        out["cuda"] = (False, _ext.EXT_ERROR)
    elif not _ext.has_cuda_kernels():
        out["cuda"] = (False, _ext.no_cuda_kernels_reason())
    elif not torch.cuda.is_available():
        out["cuda"] = (False, "CUDA kernels are compiled in, but no GPU is visible (torch.cuda.is_available() is False)")
    else:
        out["cuda"] = (True, "compiled CUDA kernels on %s" % torch.cuda.get_device_name())
    out["triton"] = _triton_status()
    return out


@dataclass
class Fused:
    """A fused kernel of one backend for one device type (same arguments as the backend's own function)."""
    fn: Callable
    # supports(x, weight) -> None when the fused kernel runs this input, else the reason (the backend's own
    # function runs it then)
    supports: Callable[..., Optional[str]]
    # True: fn(*args, scale=, shift=, relu=) applies the epilogue itself (in-kernel)
    epilogue: bool = False


@dataclass
class Impl:
    """One backend of one operator. Calling it runs the input: Impl.kernel picks the function, and the
    epilogue runs in it (its epilogue flag) or as torch ops after it."""
    fn: Callable
    # supports(device, dtype, **ctx) -> None when the input is supported, else the reason
    supports: Callable[..., Optional[str]]
    # True: fn(*args, scale=, shift=, relu=) applies the epilogue itself
    epilogue: bool = False
    # device type -> the fused kernel that runs there where it supports the input (register_fused)
    fused: Dict[str, Fused] = field(default_factory=dict)

    def fused_for(self, x: torch.Tensor, weight: torch.Tensor) -> Optional[Fused]:
        """The fused kernel registered for x's device type, where it supports (x, weight); else None."""
        f = self.fused.get(x.device.type)
        if f is None or f.supports(x, weight) is not None:
            return None
        return f

    def kernel(self, x: torch.Tensor, weight: torch.Tensor) -> Tuple[Callable, bool]:
        """(function, epilogue flag) that runs this input: the fused kernel where one runs it, else fn."""
        f = self.fused_for(x, weight)
        return (f.fn, f.epilogue) if f is not None else (self.fn, self.epilogue)

    def __call__(self, *args, scale=None, shift=None, relu: bool = False):
        """Run the op on args (x, weight, ... in the op's order) with the optional epilogue."""
        fn, epilogue = self.kernel(args[0], args[1])
        return run_kernel(fn, epilogue, args, scale, shift, relu)


def run_kernel(fn: Callable, epilogue: bool, args, scale=None, shift=None, relu: bool = False):
    """fn(*args) with the optional epilogue: in fn where its epilogue flag says so, else as torch ops after it."""
    if scale is None and shift is None and not relu:
        return fn(*args)
    if epilogue:
        return fn(*args, scale=scale, shift=shift, relu=relu)
    from .ops._common import apply_epilogue  # imported late: ops imports this module
    return apply_epilogue(fn(*args), scale, shift, relu)


_IMPLS: Dict[str, Dict[str, Impl]] = {}
# Choices memoised by the operators (ops/rolling_conv.py: the backend and kernel of backend="auto" per input
# signature on CPU tensors). Emptied whenever the registry changes; clear_dispatch_cache() empties it too.
DISPATCH_CACHE: Dict[tuple, tuple] = {}


def clear_dispatch_cache() -> None:
    """Forget the memoised backend choices (done on every registration; call it after changing an operator's
    auto thresholds at run time)."""
    DISPATCH_CACHE.clear()


def _env_reader(name: str) -> Callable[[], Optional[str]]:
    """A reader of os.environ[name] at every call (so os.environ assignments and monkeypatch.setenv apply at
    once) without os.environ.get's per-call key encoding: a look-up in the dict os.environ keeps in sync."""
    data = getattr(os.environ, "_data", None)
    try:
        key = os.environ.encodekey(name)
    except Exception:  # pragma: no cover - another os.environ implementation
        data = None
    if not isinstance(data, dict):  # pragma: no cover
        return lambda: os.environ.get(name)

    def read() -> Optional[str]:
        v = data.get(key)
        return None if v is None else os.environ.decodevalue(v)
    return read


_read_backend_env = _env_reader("MEDCONV_BACKEND")


def backend_override() -> Optional[str]:
    """The backend named by the environment variable MEDCONV_BACKEND (read at every call), or None where it is
    unset, empty or "auto"."""
    env = _read_backend_env()
    if not env:
        return None
    env = env.strip()
    return env if env and env != "auto" else None


def forced_backend_name() -> Optional[str]:
    """The backend forced by forced_backend() in this thread, or None."""
    if not _FORCED_ACTIVE[0]:  # no forced_backend() block open in any thread: skip the thread-local look-up
        return None
    return getattr(_FORCED, "name", None)


def supports_any(device, dtype, **ctx) -> Optional[str]:
    """`supports` of a backend that runs every input (the pure-PyTorch ones)."""
    return None


def supports_device_dtypes(device_type: str, dtypes):
    """`supports` of a backend that runs on one device type and a fixed set of dtypes."""
    def supports(device, dtype, **ctx) -> Optional[str]:
        if device.type != device_type:
            return "it runs on %s tensors, the input is on %s" % (device_type, device)
        if dtype not in dtypes:
            return "dtype %s is not supported (supported: %s)" % (dtype, ", ".join(str(d) for d in dtypes))
        return None
    return supports


def register_impl(op: str, backend: str, fn: Callable, supports: Callable[..., Optional[str]], *,
                  epilogue: bool = False) -> None:
    """Register `fn` as `op`'s implementation on `backend`. epilogue=True: fn takes the keyword-only
    scale=, shift=, relu= and applies the epilogue itself (the others get it as torch ops after them)."""
    if backend not in BACKENDS:
        raise ValueError("unknown backend %r (known: %s)" % (backend, ", ".join(BACKENDS)))
    _IMPLS.setdefault(op, {})[backend] = Impl(fn, supports, bool(epilogue))
    DISPATCH_CACHE.clear()


def register_fused(op: str, backend: str, device_type: str, fn: Callable, supports: Callable[..., Optional[str]],
                   *, epilogue: bool = False) -> None:
    """Register `fn` as the fused kernel of `op` on `backend` for tensors of `device_type`: it runs every input
    of that device type for which supports(x, weight) returns None, the backend's own function the others.
    epilogue as in register_impl. The backend must be registered first (register_impl)."""
    impl = _IMPLS.get(op, {}).get(backend)
    if impl is None:
        raise ValueError("register_fused: %s has no %r implementation to add a fused kernel to" % (op, backend))
    impl.fused[device_type] = Fused(fn, supports, bool(epilogue))
    DISPATCH_CACHE.clear()


def capabilities(op: str) -> Dict[str, Dict[str, object]]:
    """What is registered for `op`: {backend: {"epilogue": bool, "fused": {device_type: {"epilogue": bool}}}}.
    "epilogue": the backend's own function applies the epilogue in-kernel; "fused": the device types with a
    fused kernel (which runs the inputs its supports accepts) and whether that kernel applies the epilogue.
    Registered is not available: available_backends() says which backends run on this machine."""
    return {name: {"epilogue": impl.epilogue,
                   "fused": {dev: {"epilogue": f.epilogue} for dev, f in sorted(impl.fused.items())}}
            for name, impl in sorted(_IMPLS.get(op, {}).items())}


def _why_not(op: str, backend: str, device: torch.device, dtype: torch.dtype, ctx) -> Optional[str]:
    impl = _IMPLS.get(op, {}).get(backend)
    if impl is None:
        return "%s has no %r implementation" % (op, backend)
    ok, reason = _backend_status()[backend]
    if not ok:
        return "backend %r is not available: %s" % (backend, reason)
    return impl.supports(device, dtype, **ctx)


_FORCED = threading.local()
_FORCED_ACTIVE = [0]  # forced_backend() blocks open, all threads together
_FORCED_LOCK = threading.Lock()


@contextlib.contextmanager
def forced_backend(name: str):
    """Within the block (this thread only), every operator call runs on backend `name` wherever it supports
    the input, whatever the call's own backend= argument, the module's backend or MEDCONV_BACKEND say.
    receptive_radius probes networks this way on "reference" (torch's own ops), so that its answer does not
    depend on any kernel's NaN semantics."""
    if name not in BACKENDS:
        raise ValueError("forced_backend: unknown backend %r; choose one of %s" % (name, ", ".join(BACKENDS)))
    prev = getattr(_FORCED, "name", None)
    _FORCED.name = name
    with _FORCED_LOCK:
        _FORCED_ACTIVE[0] += 1
    try:
        yield
    finally:
        _FORCED.name = prev
        with _FORCED_LOCK:
            _FORCED_ACTIVE[0] -= 1


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype,
            auto_candidates: Sequence[str], ctx=None) -> Tuple[str, Impl]:
    """The backend name and implementation that runs `op` on this input. The implementation is called with
    the op's arguments (and the keyword-only epilogue): see Impl.__call__."""
    ctx = ctx or {}
    if not isinstance(backend, str):
        raise TypeError("backend must be a string, got %r" % (backend,))
    forced = getattr(_FORCED, "name", None)
    if forced is not None and _why_not(op, forced, device, dtype, ctx) is None:
        return forced, _IMPLS[op][forced]
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError("%s: unknown backend %r; choose one of %s or 'auto'" % (op, backend, ", ".join(BACKENDS)))
        why = _why_not(op, backend, device, dtype, ctx)
        if why is not None:
            raise RuntimeError("%s: backend %r cannot run this input: %s" % (op, backend, why))
        return backend, _IMPLS[op][backend]
    env = backend_override()
    if env:
        if env not in BACKENDS:
            raise ValueError("MEDCONV_BACKEND=%r is not a backend; choose one of %s" % (env, ", ".join(BACKENDS)))
        if _why_not(op, env, device, dtype, ctx) is None:
            return env, _IMPLS[op][env]
    reasons = []
    for name in list(auto_candidates) + ["reference"]:
        why = _why_not(op, name, device, dtype, ctx)
        if why is None:
            return name, _IMPLS[op][name]
        reasons.append("%s: %s" % (name, why))
    raise RuntimeError("%s: no backend can run this input (%s)" % (op, "; ".join(reasons)))
