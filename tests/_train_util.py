"""Shared helpers of the training tests: a tiny 3D QSM network of rolling layers."""
import torch
from torch import nn

from medconv_ext.nn import RollingConv3d


class TinyQSMNet(nn.Module):
    """field (N, 1, X, Y, Z) -> chi (N, 1, X, Y, Z): two padded 3x3x3 rolling convs, a 1x1x1 head,
    plus a learned global scale of the input (a useful shortcut for dipole inversion)."""

    def __init__(self, features: int = 4, backend: str = "auto"):
        super().__init__()
        self.c1 = RollingConv3d(1, features, 3, padding=1, backend=backend)
        self.c2 = RollingConv3d(features, features, 3, padding=1, backend=backend)
        self.head = nn.Conv3d(features, 1, 1)
        self.skip = nn.Parameter(torch.tensor(1.0))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.head(self.act(self.c2(self.act(self.c1(x))))) + self.skip * x


def tiny_qsm(features: int = 4, backend: str = "auto") -> nn.Module:
    return TinyQSMNet(features, backend)
