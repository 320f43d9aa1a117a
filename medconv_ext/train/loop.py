"""The training loop shared by the examples (qsm, seg): configuration, model building, Adam with a
learning-rate schedule, bf16 autocast, DistributedDataParallel under torchrun, a progress bar,
checkpoints with exact resume, the CSV log and metrics.json.

A task (qsm.QSMTask, seg.SegTask) supplies what differs: its config fields, the data, the loss,
the model wrapper and the held-out evaluation. See docs/training.md.
"""
import contextlib
import csv
import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._errors import FileError, check_readable, problem_of
from .._progress import Progress

CKPT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.csv"
METRICS_NAME = "metrics.json"

LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass
class TrainConfig:
    """Settings every example has (a task's config adds its own)."""
    model: str = ""
    features: Optional[int] = None     # None: the task's CPU default on the CPU, the builder's default on CUDA
    batch_size: int = 2                # per process (a torchrun run of N processes uses N * batch_size per step)
    steps: int = 100
    lr: float = 1e-3
    lr_schedule: str = "constant"      # "constant" or "cosine" (from lr down to 0 at `steps`)
    device: str = "auto"
    out: str = "runs/train"
    seed: int = 0
    val_size: int = 4
    backend: Optional[str] = None      # forwarded to the model's rolling layers
    amp: str = "none"                  # "none" or "bf16"
    ckpt_every: int = 50
    log_every: int = 0                 # 0: about 20 progress lines when stderr is not a terminal
    quiet: bool = False


# settings that define the optimisation trajectory: a resumed run must keep them (plus the task's)
LOCKED = ("model", "features", "batch_size", "lr", "lr_schedule", "seed", "amp")


class Task:
    """What an example supplies to run_training. Subclasses override the methods below."""
    name = "task"
    locked: Tuple[str, ...] = ()          # task settings that define the trajectory
    cpu_features: Optional[int] = None    # default width on the CPU (None: the builder's)

    def validate(self, cfg):
        pass

    def builder_kwargs(self, fn) -> Dict:
        """Extra keyword arguments for the model builder `fn` (e.g. the number of classes)."""
        return {}

    def wrap_model(self, net: nn.Module, cfg) -> nn.Module:
        """The trained module around the built network (e.g. a residual around a baseline)."""
        return net

    def make_data(self, cfg, device):
        """An object with sample(i) -> tuple of tensors (a pure function of (seed, i))."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Tuple[torch.Tensor, ...], cfg, amp_ctx) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, cfg, device) -> Tuple[Dict[str, Dict[str, float]], str]:
        """({method name: {metric: value}}, printable table)."""
        raise NotImplementedError

    def describe(self, cfg) -> str:
        return ""


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------
def resolve_builder(name: str) -> Callable[..., nn.Module]:
    """NAME -> medconv_ext.models.NAME; 'package.module:attr' -> that callable."""
    if not isinstance(name, str) or not name:
        raise ValueError("model must be a non-empty name, got %r" % (name,))
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError("--model %s: cannot import module %r (%s)" % (name, mod_name, e)) from None
        fn = getattr(mod, attr, None)
        if not callable(fn):
            raise ValueError("--model %s: module %r has no callable %r" % (name, mod_name, attr))
        return fn
    try:
        models = importlib.import_module("medconv_ext.models")
    except ImportError as e:
        raise ValueError("--model %s: medconv_ext.models is not available (%s); give a builder as "
                         "'package.module:function' instead" % (name, e)) from None
    fn = getattr(models, name, None)
    if not callable(fn):
        known = sorted(n for n in dir(models) if not n.startswith("_") and callable(getattr(models, n))
                       and n[0].islower())
        raise ValueError("--model %s: medconv_ext.models has no builder %r (available: %s)"
                         % (name, name, ", ".join(known)))
    return fn


def _accepts(fn, kw):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return kw in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _rolling_layers(model):
    from ..nn import rolling_conv as rc
    return [m for m in model.modules() if isinstance(m, rc._RollingConvNd)]


def _runs_dtype(layer, device, dtype) -> bool:
    """Whether the layer's (explicit) backend runs `dtype` on `device` (auto always finds one)."""
    from .. import backends
    from ..nn import rolling_conv as rc
    if layer.backend == "auto":
        return True
    transposed = isinstance(layer, (rc.RollingConvTranspose2d, rc.RollingConvTranspose3d))
    try:
        backends.resolve("rolling_conv_transpose" if transposed else "rolling_conv", layer.backend, device, dtype, [])
    except (RuntimeError, ValueError):
        return False
    return True


def _float32_forward(forward, x, *args, **kwargs):
    # A rolling layer whose backend has no bfloat16 kernels (the compiled `cpu` one): run it in float32
    # with autocast off, as autocast does for ops on its float32 list; the neighbours stay in bf16.
    with torch.autocast(x.device.type, enabled=False):
        return forward(x.float(), *args, **kwargs)


def build_model(cfg, device: torch.device, builder=None, log=print, task: Optional[Task] = None) -> nn.Module:
    fn = builder if builder is not None else resolve_builder(cfg.model)
    kwargs = dict(task.builder_kwargs(fn)) if task is not None else {}
    if cfg.features is not None:
        if not _accepts(fn, "features"):
            raise ValueError("--features: the builder %r takes no 'features' argument" % (cfg.model,))
        kwargs["features"] = int(cfg.features)
    backend_passed = False
    if cfg.backend is not None and _accepts(fn, "backend"):
        kwargs["backend"] = cfg.backend
        backend_passed = True
    net = fn(**kwargs)
    if not isinstance(net, nn.Module):
        raise TypeError("model builder %r returned %s, not a torch.nn.Module" % (cfg.model, type(net).__name__))
    rolling = _rolling_layers(net)
    if cfg.backend is not None and not backend_passed:
        for m in rolling:
            m.backend = cfg.backend
        if not rolling:
            log("note: --backend %s has no effect: the model has no rolling layers" % cfg.backend)
    if cfg.amp == "bf16":
        slow = [m for m in rolling if not _runs_dtype(m, device, torch.bfloat16)]
        for m in slow:
            m.forward = functools.partial(_float32_forward, m.forward)
        if slow:
            log("note: backend %r has no bfloat16 kernels: its %d rolling layers run in float32 under --amp bf16"
                % (slow[0].backend, len(slow)))
    model = task.wrap_model(net, cfg) if task is not None else net
    return model.to(device)


# --------------------------------------------------------------------------------------
# progress (medconv_ext._progress: redraws on a terminal, one line at a bounded rate in a log)
# --------------------------------------------------------------------------------------
def make_progress(cfg, start: int, stream=None, enabled: bool = True) -> Progress:
    """The training progress: every cfg.log_every steps in a log when given, else at most one line
    every LOG_INTERVAL seconds (and the last step); a redrawn line on a terminal."""
    return Progress(cfg.steps, label="", unit="steps", start=start, stream=stream, every=cfg.log_every,
                    enabled=enabled and not cfg.quiet)


# --------------------------------------------------------------------------------------
# distributed (torchrun)
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL when the
    run uses CUDA, gloo on the CPU. A single process (no torchrun) gets Dist() and no group."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local, False)
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, True)


def _all_mean(values: List[float], d: Dist, device) -> List[float]:
    if not d.active:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / d.world_size).tolist()


def _barrier(d: Dist):
    if d.active:
        import torch.distributed as dist
        dist.barrier()


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
def _unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(path, model, opt, step, cfg, history, world_size=1):
    state = {
        "step": step,
        "model": _unwrap(model).state_dict(),
        "optimizer": opt.state_dict(),
        "config": dataclasses.asdict(cfg),
        "world_size": world_size,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": history,
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a broken checkpoint


def load_checkpoint(path, map_location="cpu"):
    """The training checkpoint at `path`; a file that is missing, unreadable, truncated or not a
    checkpoint of this loop is a FileError naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError("--resume: no checkpoint at %s" % path)
    check_readable(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, a text file, ...
        raise FileError(path, problem_of(e)) from e
    missing = [k for k in ("step", "model", "optimizer", "config", "history", "rng_cpu") if
               not isinstance(state, dict) or k not in state]
    if missing:
        raise FileError(path, "is not a checkpoint of python -m medconv_ext.train (it has no %s)"
                        % ", ".join(repr(k) for k in missing))
    return state


# Options that a resumed run may change (the others are the run's: restored when not given, refused
# when given with another value): --steps (to train further), --device (another machine or GPU),
# --backend (the kernels of the rolling layers, which a device may not have), --out (where a run
# given by its checkpoint path writes), --ckpt-every, --log-every and --quiet (bookkeeping only).
RESUME_MAY_CHANGE = ("steps", "device", "backend", "out", "ckpt_every", "log_every", "quiet")


def merge_resumed_config(cfg, saved: Dict, given: Optional[set] = None, locked: Sequence[str] = LOCKED):
    """The configuration of a resumed run: every option of the saved run, except those in `given`
    (given on the command line). A given option in RESUME_MAY_CHANGE replaces the run's; any other
    given option must equal the run's, else a ValueError names it. given=None (a call from Python
    with a whole config): every option of cfg that is not None counts as given. (`locked` names
    options that may never change; every option outside RESUME_MAY_CHANGE is locked anyway.)"""
    if given is None:
        given = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is not None}
    merged = dataclasses.replace(cfg)
    changed = []
    for f in dataclasses.fields(cfg):
        k = f.name
        if k not in saved or k == "quiet":
            continue
        if k in given:
            if getattr(cfg, k) != saved[k] and (k not in RESUME_MAY_CHANGE or k in locked):
                opt = "--" + k.replace("_", "-")
                changed.append("%s %s differs from the checkpoint's run (%s %s)" % (opt, getattr(cfg, k), opt, saved[k]))
            continue
        setattr(merged, k, saved[k])
    if changed:
        raise ValueError("--resume: %s; a resumed run keeps every option of the run except %s: start a new run "
                         "(another --out) to change it"
                         % ("; ".join(changed), ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)))
    return merged


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
def resolve_device(name: str, d: Optional[Dist] = None) -> torch.device:
    d = d or Dist()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError("--device: %s" % e) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device %s: CUDA is not available on this machine" % name)
        if d.active and dev.index is None:
            dev = torch.device("cuda", d.local_rank)  # one GPU per process
    return dev


def autocast(device, amp):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lr_at(cfg, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(cfg.steps, 1)))
    return cfg.lr


def validate_common(cfg):
    def pos_int(name, minimum=1):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError("--%s must be an int >= %d, got %r" % (name.replace("_", "-"), minimum, v))
    pos_int("batch_size")
    pos_int("steps", 0)
    pos_int("val_size", 0)
    pos_int("ckpt_every")
    pos_int("log_every", 0)
    if cfg.features is not None:
        pos_int("features")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError("--lr must be a positive number, got %r" % (cfg.lr,))
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError("--lr-schedule must be one of %s, got %r" % (", ".join(LR_SCHEDULES), cfg.lr_schedule))
    if cfg.amp not in ("none", "bf16"):
        raise ValueError("--amp must be 'none' or 'bf16', got %r" % (cfg.amp,))
    return pos_int


def sample_indices(step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> List[int]:
    """Samples of process `rank` at step `step`: the step's global batch is samples
    step*B*W .. step*B*W + B*W - 1 (B per process, W processes), rank r takes the r-th block of B.
    With one process this is step*B .. step*B + B - 1."""
    first = (step * world_size + rank) * batch_size
    return list(range(first, first + batch_size))


def collate(data, indices) -> Tuple[torch.Tensor, ...]:
    samples = [data.sample(i) for i in indices]
    return tuple(torch.stack([s[j] for s in samples]) for j in range(len(samples[0])))


def train_step(model, opt, task: Task, batch, cfg, device, dist_info: Optional[Dist] = None):
    """One optimizer step. Returns (loss, parts) as floats (the mean over the processes)."""
    d = dist_info or Dist()
    model.train()
    opt.zero_grad(set_to_none=True)
    loss, parts = task.loss(model, batch, cfg, autocast(device, cfg.amp))
    loss.backward()
    names = list(parts)
    vals = _all_mean([loss.detach().item()] + [parts[k].detach().item() for k in names], d, device)
    if not all(math.isfinite(v) for v in vals):
        # every process sees the same mean, so all of them stop here
        raise FloatingPointError("the loss is %s; lower --lr or use --amp none" % vals[0])
    opt.step()
    return vals[0], dict(zip(names, vals[1:]))


def format_table(results: Dict[str, Dict[str, float]], columns: Sequence[Tuple[str, str, str]]) -> str:
    """columns: (metric key, header, number format)."""
    w = max([len("method")] + [len(n) for n in results])
    head = "%-*s " % (w, "method") + " ".join("%10s" % h for _, h, _ in columns)
    lines = [head]
    for name, vals in results.items():
        lines.append("%-*s " % (w, name) + " ".join("%10s" % (fmt % vals[k]) for k, _, fmt in columns))
    return "\n".join(lines)


def run_training(cfg, task: Task, *, resume: Optional[str] = None, given: Optional[set] = None, builder=None,
                 log: Callable[[str], None] = print, stream=None) -> Dict:
    """Train (or continue training) cfg.model on the task, then evaluate it. resume: a checkpoint path,
    or "auto" for OUT/checkpoint.pt. Under torchrun (WORLD_SIZE > 1) every process runs this; rank 0
    writes the checkpoint, the log and metrics.json and prints. Returns {'step', 'history', 'metrics',
    'model', 'config', 'train_seconds', 'world_size'} (metrics only on rank 0)."""
    d = init_distributed(cfg.device)
    try:
        return _run(cfg, task, d, resume, given, builder, log if d.main else (lambda s: None), stream)
    finally:
        if d.initialized_here:
            import torch.distributed as dist
            dist.destroy_process_group()


def _run(cfg, task, d, resume, given, builder, log, stream):
    locked = LOCKED + tuple(task.locked)
    saved = None
    if resume is not None:
        path = os.path.join(cfg.out, CKPT_NAME) if resume == "auto" else resume
        saved = load_checkpoint(path)
        cfg = merge_resumed_config(cfg, saved["config"], given, locked)
    validate_common(cfg)
    task.validate(cfg)
    device = resolve_device(cfg.device, d)
    if d.main:
        os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, CKPT_NAME)

    if (cfg.features is None and device.type == "cpu" and task.cpu_features is not None
            and _accepts(builder or resolve_builder(cfg.model), "features")):
        # small by default on the CPU; recorded in the config so that the checkpoint says so
        cfg = dataclasses.replace(cfg, features=task.cpu_features)
        log("features=%d (the CPU default; pass --features to change it)" % task.cpu_features)
    torch.manual_seed(cfg.seed)  # the model's initial weights (the same in every process)
    model = build_model(cfg, device, builder, log, task)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data = task.make_data(cfg, device)
    start, history = 0, []
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        start, history = int(saved["step"]), list(saved["history"])
        torch.set_rng_state(saved["rng_cpu"])
        if saved["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng_cuda"])
        log("resumed from %s at step %d" % (resume if resume != "auto" else ckpt_path, start))
        was = int(saved.get("world_size", 1))
        if was != d.world_size:
            log("note: the checkpoint was written by %d process(es), this run has %d: the data of the next "
                "steps is split differently than in an uninterrupted run" % (was, d.world_size))
    train_model = model
    if d.active:
        # DDP broadcasts rank 0's parameters and buffers (BatchNorm statistics too, at every forward)
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    log("%s: model %s, %d parameters, device %s, %s%d process(es) x batch %d, amp %s"
        % (task.name, cfg.model, n_params, device, task.describe(cfg) + ", " if task.describe(cfg) else "",
           d.world_size, cfg.batch_size, cfg.amp))

    log_path = os.path.join(cfg.out, LOG_NAME)
    prog = make_progress(cfg, start, stream, enabled=d.main)
    t0 = time.perf_counter()
    logf = writer = None
    columns = list(history[0]) if history else None
    try:
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            batch = collate(data, sample_indices(step, cfg.batch_size, d.rank, d.world_size))
            batch = tuple(t.to(device) for t in batch)
            loss, parts = train_step(train_model, opt, task, batch, cfg, device, d)
            row = {"step": step + 1, "loss": loss, **parts}
            history.append(row)
            if d.main:
                if writer is None:
                    columns = columns or list(row)
                    _write_log(log_path, history[:-1], columns)  # rows beyond the checkpoint step are dropped
                    logf = open(log_path, "a", newline="")
                    writer = csv.writer(logf)
                writer.writerow([row.get(k, "") for k in columns])
                logf.flush()
            prog.update(step + 1, "loss %.4f" % loss)
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
                if d.main:
                    save_checkpoint(ckpt_path, model, opt, step + 1, cfg, history, d.world_size)
                _barrier(d)
    finally:
        prog.close()
        if logf is not None:
            logf.close()
    train_s = time.perf_counter() - t0

    metrics = {}
    if cfg.val_size > 0 and d.main:
        t1 = time.perf_counter()
        metrics, table = task.evaluate(model, cfg, device)
        log(table)
        report = {"task": task.name, "config": dataclasses.asdict(cfg), "step": max(start, cfg.steps),
                  "world_size": d.world_size, "parameters": n_params, "device": str(device),
                  "train_seconds_this_run": train_s, "eval_seconds": time.perf_counter() - t1,
                  "threads": torch.get_num_threads(),
                  "final_loss": history[-1]["loss"] if history else None,
                  "metrics": metrics}
        with open(os.path.join(cfg.out, METRICS_NAME), "w") as f:
            json.dump(report, f, indent=2)
    _barrier(d)
    return {"step": max(start, cfg.steps), "history": history, "metrics": metrics, "model": model, "config": cfg,
            "train_seconds": train_s, "world_size": d.world_size}


def _write_log(path, history: List[Dict], columns: List[str]):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in history:
            w.writerow([r.get(k, "") for k in columns])
