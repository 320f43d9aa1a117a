"""Synthetic 2D segmentation data made on the fly, Dice, and the thresholding baselines.

An image (1, H, W) shows 2-6 bright ellipses (the objects to segment, label 1) and 1-3 thin
bright lines (distractors of the same brightness, label 0) over a background with a smooth
random illumination (a low-order polynomial "bias field") and white Gaussian noise. A global
threshold separates bright from dark, so it keeps the lines and suffers from the illumination;
a network can learn the shapes. Every sample is a pure function of (seed, stream, index), as in
qsm_data, so a resumed run sees the same data as an uninterrupted one.
"""
import math
from typing import Tuple

import torch

from .qsm_data import sample_seed


def _uni(g, lo, hi):
    return float(lo + (hi - lo) * torch.rand(1, generator=g, dtype=torch.float64))


def random_shapes(size, g: torch.Generator, *, n_objects=(2, 6), n_lines=(1, 3), radius_frac=(0.05, 0.16),
                  line_width=(0.8, 1.6), contrast=(0.6, 1.0), bias=0.5, noise=(0.15, 0.3),
                  device=None, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image (H, W) float, label (H, W) int64) from the CPU generator g."""
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype),
                            indexing="ij")
    label = torch.zeros(h, w, dtype=torch.bool, device=device)
    bright = torch.zeros(h, w, device=device, dtype=dtype)
    n_min = min(h, w)
    for _ in range(int(torch.randint(n_objects[0], n_objects[1] + 1, (1,), generator=g))):
        cy, cx = _uni(g, 0.1, 0.9) * h, _uni(g, 0.1, 0.9) * w
        a, b = _uni(g, *radius_frac) * n_min, _uni(g, *radius_frac) * n_min
        th = _uni(g, 0, math.pi)
        c, s = math.cos(th), math.sin(th)
        u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        label |= inside
        bright = torch.where(inside, torch.full_like(bright, _uni(g, *contrast)), bright)
    for _ in range(int(torch.randint(n_lines[0], n_lines[1] + 1, (1,), generator=g))):
        # a straight line through a random point at a random angle, `width` pixels wide
        py, px, th = _uni(g, 0, h), _uni(g, 0, w), _uni(g, 0, math.pi)
        dist = ((xx - px) * math.sin(th) - (yy - py) * math.cos(th)).abs()
        on = dist <= _uni(g, *line_width) / 2
        bright = torch.where(on & ~label, torch.full_like(bright, _uni(g, *contrast)), bright)
    # smooth illumination: a random quadratic polynomial in (x, y) scaled to [-bias, bias]
    x, y = xx / max(w - 1, 1) * 2 - 1, yy / max(h - 1, 1) * 2 - 1
    coef = torch.rand(6, generator=g, dtype=torch.float64) * 2 - 1
    field = coef[0] * x + coef[1] * y + coef[2] * x * y + coef[3] * x * x + coef[4] * y * y
    field = field - field.mean()
    field = field / field.abs().max().clamp_min(1e-6) * bias
    sigma = _uni(g, *noise)
    n = torch.randn(h, w, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    return bright + field.to(dtype) + sigma * n, label.long()


class SyntheticShapes:
    """Deterministic stream of (image (1, H, W), label (H, W) int64) samples."""

    def __init__(self, size=64, *, seed: int = 0, stream: str = "train", device="cpu", dtype=torch.float32, **kw):
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        size = tuple(size)
        if len(size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 8 for n in size):
            raise ValueError("SyntheticShapes: size must be an int >= 8 or 2 such ints, got %r" % (size,))
        self.size, self.seed, self.stream = size, int(seed), str(stream)
        self.device, self.dtype, self.kw = torch.device(device), dtype, kw

    def sample(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, "shapes-" + self.stream, index))
        img, lab = random_shapes(self.size, g, device=self.device, dtype=self.dtype, **self.kw)
        return img.unsqueeze(0), lab


def dice(pred: torch.Tensor, target: torch.Tensor, eps: float = 0.0) -> float:
    """Dice of two binary masks (any shape): 2|A n B| / (|A| + |B|); 1 when both are empty."""
    if pred.shape != target.shape:
        raise ValueError("dice: shapes differ: %s vs %s" % (tuple(pred.shape), tuple(target.shape)))
    a, b = pred.bool(), target.bool()
    denom = int(a.sum()) + int(b.sum())
    if denom == 0:
        return 1.0
    return (2.0 * int((a & b).sum()) + eps) / (denom + eps)


def otsu_threshold(img: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold: the cut of the intensity histogram that maximises the between-class variance."""
    x = img.detach().flatten().double()
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return lo
    hist = torch.histc(x, bins=bins, min=lo, max=hi)
    centers = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    p = hist / hist.sum()
    w0 = p.cumsum(0)
    m = (p * centers).cumsum(0)
    mt = m[-1]
    w1 = 1 - w0
    between = (mt * w0 - m) ** 2 / (w0 * w1).clamp_min(1e-12)
    between[(w0 <= 0) | (w1 <= 0)] = -1
    k = int(between.argmax())
    return float(lo + (k + 1) * (hi - lo) / bins)  # upper edge of bin k: class 0 is bins 0..k
