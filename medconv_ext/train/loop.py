"""Training loop of the synthetic-QSM example: model resolution, Adam, progress bar,
checkpoints with exact resume, and the held-out evaluation against TKD."""
import contextlib
import csv
import dataclasses
import importlib
import inspect
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .losses import QSMLoss
from .metrics import qsm_metrics
from .qsm_data import SyntheticQSM

CKPT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.csv"
METRICS_NAME = "metrics.json"


@dataclasses.dataclass
class QSMTrainConfig:
    model: str = "rolling_qsmnet"
    features: Optional[int] = None     # None: 8 on the CPU (small and quick), the builder's default on CUDA
    patch: int = 32
    batch_size: int = 2
    steps: int = 100
    lr: float = 1e-3
    device: str = "auto"
    out: str = "runs/qsm"
    seed: int = 0
    val_size: int = 4
    backend: Optional[str] = None      # forwarded to the model's rolling layers
    amp: str = "none"                  # "none" or "bf16"
    ckpt_every: int = 50
    noise: float = 0.002               # field noise std, ppm
    data_scale: float = 0.1            # model sees field / data_scale and predicts chi / data_scale
    tkd_threshold: float = 0.19
    log_every: int = 0                 # 0: about 20 progress lines when stderr is not a terminal
    quiet: bool = False


# settings that define the optimisation trajectory: a resumed run must keep them
LOCKED = ("model", "features", "patch", "batch_size", "lr", "seed", "amp", "noise", "data_scale")


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


def _cast_input_to_weight(module, args):
    # The rolling ops require x and weight of one dtype and have no autocast rule: under bf16
    # autocast a dense layer before them hands over bf16 activations. Run the rolling layer in
    # its weight dtype (float32) instead of failing; the dense layers still use bf16.
    x = args[0]
    if torch.is_tensor(x) and x.dtype != module.weight.dtype:
        return (x.to(module.weight.dtype),) + tuple(args[1:])
    return None


def build_model(cfg: QSMTrainConfig, device: torch.device, builder=None, log=print) -> nn.Module:
    fn = builder if builder is not None else resolve_builder(cfg.model)
    kwargs = {}
    features = cfg.features
    if features is not None:
        if not _accepts(fn, "features"):
            raise ValueError("--features: the builder %r takes no 'features' argument" % (cfg.model,))
        kwargs["features"] = int(features)
    backend_passed = False
    if cfg.backend is not None and _accepts(fn, "backend"):
        kwargs["backend"] = cfg.backend
        backend_passed = True
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError("model builder %r returned %s, not a torch.nn.Module" % (cfg.model, type(model).__name__))
    rolling = _rolling_layers(model)
    if cfg.backend is not None and not backend_passed:
        for m in rolling:
            m.backend = cfg.backend
        if not rolling:
            log("note: --backend %s has no effect: the model has no rolling layers" % cfg.backend)
    if cfg.amp == "bf16":
        for m in rolling:
            m.register_forward_pre_hook(_cast_input_to_weight)
    return model.to(device)


# --------------------------------------------------------------------------------------
# progress bar (no dependency)
# --------------------------------------------------------------------------------------
class Progress:
    def __init__(self, total: int, start: int = 0, stream=None, every: int = 0, quiet: bool = False):
        self.total, self.start = total, start
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every or max(1, (total - start) // 20)
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def update(self, step: int, info: str):
        """step: number of steps done so far."""
        if self.quiet:
            return
        done = step - self.start
        last = step == self.total
        if not self.tty and not (done % self.every == 0 or last):
            return
        el = time.perf_counter() - self.t0
        rate = done / el if el > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        width = 24
        fill = int(width * step / max(self.total, 1))
        bar = "#" * fill + "-" * (width - fill)
        line = "[%s] %d/%d %s %.2f it/s eta %s" % (bar, step, self.total, info, rate, _fmt_time(eta))
        if self.tty:
            self.stream.write("\r" + line + ("\n" if last else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _fmt_time(s):
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return "%d:%02d:%02d" % (s // 3600, s // 60 % 60, s % 60) if s >= 3600 else "%d:%02d" % (s // 60, s % 60)


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
def save_checkpoint(path, model, opt, step, cfg, history):
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "config": dataclasses.asdict(cfg),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": history,
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a broken checkpoint


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise FileNotFoundError("--resume: no checkpoint at %s" % path)
    return torch.load(path, map_location=map_location, weights_only=True)


def merge_resumed_config(cfg: QSMTrainConfig, saved: Dict, given: Optional[set] = None) -> QSMTrainConfig:
    """The run continues with the checkpoint's trajectory settings (LOCKED); explicitly given
    values that differ are an error. Other settings (steps, device, ...) come from cfg."""
    given = given if given is not None else set()
    merged = dataclasses.replace(cfg)
    for k in LOCKED:
        if k not in saved:
            continue
        if k in given and getattr(cfg, k) != saved[k]:
            raise ValueError("--resume: %s=%r differs from the checkpoint's %s=%r; a resumed run keeps the "
                             "settings that define the training trajectory (%s)"
                             % (k, getattr(cfg, k), k, saved[k], ", ".join(LOCKED)))
        setattr(merged, k, saved[k])
    return merged


# --------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError("--device: %s" % e) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device %s: CUDA is not available on this machine" % name)
    return dev


def _autocast(device, amp):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def validate_config(cfg: QSMTrainConfig):
    def pos_int(name, minimum=1):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError("--%s must be an int >= %d, got %r" % (name.replace("_", "-"), minimum, v))
    pos_int("patch", 4)
    pos_int("batch_size")
    pos_int("steps", 0)
    pos_int("val_size", 0)
    pos_int("ckpt_every")
    pos_int("log_every", 0)
    if cfg.features is not None:
        pos_int("features")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError("--lr must be a positive number, got %r" % (cfg.lr,))
    if cfg.amp not in ("none", "bf16"):
        raise ValueError("--amp must be 'none' or 'bf16', got %r" % (cfg.amp,))
    if not (math.isfinite(cfg.data_scale) and cfg.data_scale > 0):
        raise ValueError("data_scale must be positive, got %r" % (cfg.data_scale,))
    if cfg.val_size > 0 and cfg.patch < 15:
        raise ValueError("--patch must be >= 15 to evaluate (SSIM uses an 11^3 window, HFEN a 15^3 LoG); "
                         "got %d (or pass --val-size 0)" % cfg.patch)


def train_step(model, opt, loss_fn, field, chi, scale, device, amp):
    model.train()
    opt.zero_grad(set_to_none=True)
    with _autocast(device, amp):
        pred = model(field / scale)
    loss, parts = loss_fn(pred.float(), chi / scale)
    if not torch.isfinite(loss):
        raise FloatingPointError("the loss is %s; lower --lr or use --amp none" % loss.item())
    loss.backward()
    opt.step()
    return float(loss), {k: float(v) for k, v in parts.items()}


@torch.no_grad()
def evaluate(model, data: SyntheticQSM, n: int, scale: float, device, tkd_threshold=0.19, amp="none"):
    """Mean metrics over held-out samples 0..n-1 for the model and for TKD."""
    model.eval()
    rows = {"model": [], "tkd": []}
    for i in range(n):
        field, chi = data.sample(i)
        field, chi = field.unsqueeze(0), chi.unsqueeze(0)
        with _autocast(device, amp):
            pred = model(field / scale)
        pred = pred.float() * scale
        rows["model"].append(qsm_metrics(pred, chi))
        rows["tkd"].append(qsm_metrics(data.tkd(field, tkd_threshold), chi))
    out = {}
    for k, lst in rows.items():
        out[k] = {m: sum(r[m] for r in lst) / len(lst) for m in lst[0]} if lst else {}
    return out


def format_table(results: Dict[str, Dict[str, float]], names: Dict[str, str]) -> str:
    lines = ["%-28s %10s %8s %9s %8s" % ("method", "PSNR (dB)", "SSIM", "NMSE", "HFEN")]
    for key, vals in results.items():
        lines.append("%-28s %10.2f %8.4f %9.4f %8.4f" % (names.get(key, key), vals["psnr"], vals["ssim"],
                                                          vals["nmse"], vals["hfen"]))
    return "\n".join(lines)


def run_qsm(cfg: QSMTrainConfig, *, resume: Optional[str] = None, given: Optional[set] = None, builder=None,
            log: Callable[[str], None] = print, stream=None) -> Dict:
    """Train (or continue training) and evaluate. resume: a checkpoint path, or "auto" for
    OUT/checkpoint.pt. Returns {'step', 'history', 'metrics', 'model', 'config'}."""
    saved = None
    if resume is not None:
        path = os.path.join(cfg.out, CKPT_NAME) if resume == "auto" else resume
        saved = load_checkpoint(path)
        cfg = merge_resumed_config(cfg, saved["config"], given)
    validate_config(cfg)
    device = resolve_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, CKPT_NAME)

    if cfg.features is None and device.type == "cpu" and _accepts(builder or resolve_builder(cfg.model), "features"):
        # small by default on the CPU; recorded in the config so that the checkpoint says so
        cfg = dataclasses.replace(cfg, features=8)
        log("features=8 (the CPU default; pass --features to change it)")
    torch.manual_seed(cfg.seed)  # the model's initial weights
    model = build_model(cfg, device, builder, log)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = QSMLoss()
    data = SyntheticQSM(cfg.patch, seed=cfg.seed, stream="train", noise_std=cfg.noise, device=device)
    start, history = 0, []
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        start, history = int(saved["step"]), list(saved["history"])
        torch.set_rng_state(saved["rng_cpu"])
        if saved["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng_cuda"])
        log("resumed from %s at step %d" % (resume if resume != "auto" else ckpt_path, start))
    log("model %s: %d parameters, device %s, patch %d^3, batch %d, amp %s"
        % (cfg.model, n_params, device, cfg.patch, cfg.batch_size, cfg.amp))

    log_path = os.path.join(cfg.out, LOG_NAME)
    _write_log(log_path, history)  # rows beyond the checkpoint step (an interrupted run) are dropped
    prog = Progress(cfg.steps, start, stream, cfg.log_every, cfg.quiet)
    t0 = time.perf_counter()
    with open(log_path, "a", newline="") as logf:
        writer = csv.writer(logf)
        for step in range(start, cfg.steps):
            field, chi = data.batch(step, cfg.batch_size)
            loss, parts = train_step(model, opt, loss_fn, field, chi, cfg.data_scale, device, cfg.amp)
            row = {"step": step + 1, "loss": loss, **parts}
            history.append(row)
            writer.writerow([row[k] for k in ("step", "loss", "l1", "model", "grad")])
            logf.flush()
            prog.update(step + 1, "loss %.4f" % loss)
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(ckpt_path, model, opt, step + 1, cfg, history)
    train_s = time.perf_counter() - t0

    metrics = {}
    if cfg.val_size > 0:
        val = SyntheticQSM(cfg.patch, seed=cfg.seed, stream="val", noise_std=cfg.noise, device=device)
        t1 = time.perf_counter()
        metrics = evaluate(model, val, cfg.val_size, cfg.data_scale, device, cfg.tkd_threshold)
        names = {"model": cfg.model, "tkd": "TKD (threshold %.2f)" % cfg.tkd_threshold}
        log("held-out set: %d synthetic volumes of %d^3 (seed %d, stream 'val'), noise %.4g ppm"
            % (cfg.val_size, cfg.patch, cfg.seed, cfg.noise))
        log(format_table(metrics, names))
        report = {"config": dataclasses.asdict(cfg), "step": max(start, cfg.steps),
                  "parameters": n_params, "device": str(device), "train_seconds_this_run": train_s,
                  "eval_seconds": time.perf_counter() - t1,
                  "final_loss": history[-1]["loss"] if history else None,
                  "metrics": {names[k]: v for k, v in metrics.items()}}
        with open(os.path.join(cfg.out, METRICS_NAME), "w") as f:
            json.dump(report, f, indent=2)
    return {"step": max(start, cfg.steps), "history": history, "metrics": metrics, "model": model, "config": cfg,
            "train_seconds": train_s}


def _write_log(path, history: List[Dict]):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "l1", "model", "grad"])
        for r in history:
            w.writerow([r[k] for k in ("step", "loss", "l1", "model", "grad")])
