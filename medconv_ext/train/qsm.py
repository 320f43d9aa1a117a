"""The synthetic-QSM example (`python -m medconv_ext.train qsm`): a dipole-inversion network
(local field -> susceptibility) trained on phantoms made from physics, compared on a held-out
set with thresholded k-space division (TKD).

Default (chosen because it beats TKD on a CPU in minutes; see docs/training.md for what every
choice measured): the network learns a correction of TKD (`--residual tkd`: chi = TKD(field) +
net(TKD(field)), the net's last layer initialised to zero so that training starts from TKD) with
the mean squared error on chi (`--loss mse`). `--residual none --loss paper` is the paper's setup
(field -> chi, L1 + 0.5 L1 of the dipole-convolved maps + 0.1 L1 of the gradients).
"""
import dataclasses
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from . import loop
from .losses import QSMLoss, QSMMSELoss
from .metrics import qsm_metrics
from .qsm_data import SyntheticQSM, tkd

RESIDUALS = ("tkd", "none")
LOSSES = ("mse", "paper")


@dataclasses.dataclass
class QSMTrainConfig(loop.TrainConfig):
    model: str = "rolling_qsmnet"
    residual: str = "tkd"              # "tkd": learn a correction of TKD; "none": field -> chi
    loss: str = "mse"                  # "mse" on chi, or "paper" (QSMnet's L1 + model + gradient loss)
    patch: int = 32
    steps: int = 300
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    out: str = "runs/qsm"
    noise: float = 0.002               # field noise std, ppm
    data_scale: float = 0.1            # model sees field / data_scale and predicts chi / data_scale
    tkd_threshold: float = 0.19


# --------------------------------------------------------------------------------------
# model: a learned correction of TKD
# --------------------------------------------------------------------------------------
def last_conv(net: nn.Module) -> nn.Module:
    """The last convolution registered in `net` (for the published U-Nets: the 1x1 output conv)."""
    from ..nn import rolling_conv as rc
    convs = [m for m in net.modules() if isinstance(m, (nn.modules.conv._ConvNd, rc._RollingConvNd))]
    if not convs:
        raise ValueError("--residual: the network has no convolution layer to initialise to zero")
    return convs[-1]


class TKDResidual(nn.Module):
    """chi = TKD(field) + net(TKD(field)) (all on the model's scale; TKD is linear).

    The last convolution of `net` starts at zero (weight and bias), so for a network whose output
    is that layer's output (the U-Nets of medconv_ext.models) the untrained model IS TKD, and
    training can only move away from it where the loss improves. TKD runs in float32 (k-space)
    also under autocast; it has no parameters."""

    def __init__(self, net: nn.Module, threshold: float = 0.19, voxel_size=(1.0, 1.0, 1.0),
                 b0_dir=(0.0, 0.0, 1.0), pad: bool = True, zero_init: bool = True):
        super().__init__()
        self.net = net
        self.threshold, self.voxel_size, self.b0_dir, self.pad = float(threshold), voxel_size, b0_dir, pad
        if zero_init:
            layer = last_conv(net)
            with torch.no_grad():
                layer.weight.zero_()
                if getattr(layer, "bias", None) is not None:
                    layer.bias.zero_()

    def baseline(self, field: torch.Tensor) -> torch.Tensor:
        return tkd(field.float(), self.threshold, self.voxel_size, self.b0_dir, self.pad)

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        t = self.baseline(field)
        return t + self.net(t).float()


# --------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------
METRIC_COLUMNS = (("psnr", "PSNR (dB)", "%.2f"), ("ssim", "SSIM", "%.4f"), ("nmse", "NMSE", "%.4f"),
                  ("hfen", "HFEN", "%.4f"))


def model_label(cfg) -> str:
    return cfg.model + (" (TKD + learned correction)" if cfg.residual == "tkd" else "")


def tkd_label(cfg) -> str:
    return "TKD (threshold %.2f)" % cfg.tkd_threshold


class QSMTask(loop.Task):
    name = "qsm"
    locked = ("patch", "noise", "data_scale", "residual", "loss", "tkd_threshold")
    cpu_features = 8

    def validate(self, cfg):
        pos_int = loop.validate_common(cfg)
        pos_int("patch", 4)
        if not (isinstance(cfg.data_scale, (int, float)) and cfg.data_scale > 0 and cfg.data_scale < float("inf")):
            raise ValueError("data_scale must be positive, got %r" % (cfg.data_scale,))
        if cfg.residual not in RESIDUALS:
            raise ValueError("--residual must be one of %s, got %r" % (", ".join(RESIDUALS), cfg.residual))
        if cfg.loss not in LOSSES:
            raise ValueError("--loss must be one of %s, got %r" % (", ".join(LOSSES), cfg.loss))
        if cfg.val_size > 0 and cfg.patch < 15:
            raise ValueError("--patch must be >= 15 to evaluate (SSIM uses an 11^3 window, HFEN a 15^3 LoG); "
                             "got %d (or pass --val-size 0)" % cfg.patch)

    def wrap_model(self, net, cfg):
        if cfg.residual == "tkd":
            return TKDResidual(net, cfg.tkd_threshold)
        return net

    def make_data(self, cfg, device):
        return SyntheticQSM(cfg.patch, seed=cfg.seed, stream="train", noise_std=cfg.noise, device=device)

    def loss(self, model, batch, cfg, amp_ctx):
        if not hasattr(self, "_loss_fn"):
            self._loss_fn = QSMMSELoss() if cfg.loss == "mse" else QSMLoss()
        field, chi = batch
        with amp_ctx:
            pred = model(field / cfg.data_scale)
        return self._loss_fn(pred.float(), chi / cfg.data_scale)

    def describe(self, cfg):
        return "patch %d^3, residual %s, loss %s, lr %g %s" % (cfg.patch, cfg.residual, cfg.loss, cfg.lr,
                                                               cfg.lr_schedule)

    def evaluate(self, model, cfg, device):
        val = SyntheticQSM(cfg.patch, seed=cfg.seed, stream="val", noise_std=cfg.noise, device=device)
        res = evaluate(model, val, cfg.val_size, cfg.data_scale, device, cfg.tkd_threshold)
        metrics = {model_label(cfg): res["model"], tkd_label(cfg): res["tkd"]}
        head = ("held-out set: %d synthetic volumes of %d^3 (seed %d, stream 'val'), noise %.4g ppm"
                % (cfg.val_size, cfg.patch, cfg.seed, cfg.noise))
        return metrics, head + "\n" + loop.format_table(metrics, METRIC_COLUMNS)


@torch.no_grad()
def evaluate(model, data: SyntheticQSM, n: int, scale: float, device, tkd_threshold=0.19, amp="none"):
    """Mean metrics over held-out samples 0..n-1 for the model and for TKD: {"model": .., "tkd": ..}."""
    model.eval()
    rows = {"model": [], "tkd": []}
    for i in range(n):
        field, chi = data.sample(i)
        field, chi = field.unsqueeze(0), chi.unsqueeze(0)
        with loop.autocast(device, amp):
            pred = model(field / scale)
        pred = pred.float() * scale
        rows["model"].append(qsm_metrics(pred, chi))
        rows["tkd"].append(qsm_metrics(data.tkd(field, tkd_threshold), chi))
    out = {}
    for k, lst in rows.items():
        out[k] = {m: sum(r[m] for r in lst) / len(lst) for m in lst[0]} if lst else {}
    return out


def run_qsm(cfg: QSMTrainConfig, *, resume: Optional[str] = None, given: Optional[set] = None, builder=None,
            log=print, stream=None) -> Dict:
    """Train (or continue training) and evaluate; see loop.run_training."""
    return loop.run_training(cfg, QSMTask(), resume=resume, given=given, builder=builder, log=log, stream=stream)


def train_step(model, opt, loss_fn, field, chi, scale, device, amp) -> Tuple[float, Dict[str, float]]:
    """One step of field -> chi training with `loss_fn` (a QSMLoss or QSMMSELoss); for tests and scripts."""
    task = QSMTask()
    task._loss_fn = loss_fn
    cfg = QSMTrainConfig(data_scale=scale, amp=amp)
    return loop.train_step(model, opt, task, (field, chi), cfg, device)
