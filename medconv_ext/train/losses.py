"""Losses of the training examples.

QSMMSELoss: the mean squared error on chi (the default of the QSM example).

QSMLoss: the QSMnet loss used by the Rolling-Filters paper for QSM:

    loss = L1(chi_pred, chi) + 0.5 * L1(D * chi_pred, D * chi) + 0.1 * sum_axes L1(grad chi_pred, grad chi)

L1 is the mean absolute difference; D * chi is the dipole convolution of qsm_data (the field
the map implies, compared with the true, noise-free field); the gradients are forward
differences along x, y and z. Computed in float32 (float64 inputs stay float64) whatever
the autocast dtype of the model.
"""
from typing import Dict, Tuple

import torch
from torch import nn

from .qsm_data import dipole_convolve


def spatial_gradients(x: torch.Tensor):
    """Forward differences along the last three axes."""
    return (x[..., 1:, :, :] - x[..., :-1, :, :],
            x[..., :, 1:, :] - x[..., :, :-1, :],
            x[..., :, :, 1:] - x[..., :, :, :-1])


class QSMLoss(nn.Module):
    def __init__(self, w_model: float = 0.5, w_grad: float = 0.1, voxel_size=(1.0, 1.0, 1.0),
                 b0_dir=(0.0, 0.0, 1.0), pad: bool = True):
        super().__init__()
        self.w_model, self.w_grad = float(w_model), float(w_grad)
        self.voxel_size, self.b0_dir, self.pad = tuple(voxel_size), tuple(b0_dir), bool(pad)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if pred.shape != target.shape:
            raise ValueError("QSMLoss: the model output has shape %s but the target has shape %s; the model must "
                             "map a (N, 1, X, Y, Z) field to a (N, 1, X, Y, Z) map" % (tuple(pred.shape), tuple(target.shape)))
        dt = torch.float64 if target.dtype == torch.float64 else torch.float32
        pred, target = pred.to(dt), target.to(dt)
        l1 = (pred - target).abs().mean()
        lm = (dipole_convolve(pred, self.voxel_size, self.b0_dir, self.pad)
              - dipole_convolve(target, self.voxel_size, self.b0_dir, self.pad)).abs().mean()
        lg = sum((gp - gt).abs().mean() for gp, gt in zip(spatial_gradients(pred), spatial_gradients(target)))
        total = l1 + self.w_model * lm + self.w_grad * lg
        return total, {"l1": l1.detach(), "model": lm.detach(), "grad": lg.detach()}


class QSMMSELoss(nn.Module):
    """mean((chi_pred - chi)^2), in float32 (float64 inputs stay float64). Unlike the L1 terms of
    QSMLoss it does not score an all-zero map of the mostly-zero phantoms almost as well as a
    TKD-quality map (see docs/training.md). Returns (loss, {"mse": loss})."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if pred.shape != target.shape:
            raise ValueError("QSMMSELoss: the model output has shape %s but the target has shape %s"
                             % (tuple(pred.shape), tuple(target.shape)))
        dt = torch.float64 if target.dtype == torch.float64 else torch.float32
        mse = (pred.to(dt) - target.to(dt)).square().mean()
        return mse, {"mse": mse.detach()}
