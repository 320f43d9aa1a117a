"""Image-quality metrics for QSM, on volumes (X, Y, Z) (or (..., X, Y, Z): leading axes are
flattened and the metric is computed per volume, then averaged).

  nmse(pred, ref)  = ||pred - ref||^2 / ||ref||^2
  psnr(pred, ref)  = 10 log10(L^2 / MSE), L = max(ref) - min(ref) unless data_range is given
  ssim3d           = mean SSIM map (Wang et al. 2004) with a 3D Gaussian window (sigma 1.5,
                     11^3), K = (0.01, 0.03), L as for PSNR, 'valid' filtering (only windows
                     that lie inside the volume), so a volume needs >= 11 voxels per axis
  hfen(pred, ref)  = ||LoG(pred) - LoG(ref)|| / ||LoG(ref)||, LoG: the 15^3, sigma 1.5
                     zero-sum kernel of the QSM reconstruction challenges, zero-padded 'same'
                     filtering (as MATLAB imfilter). Reported as a ratio (the challenges print
                     100 x this, in percent).
All are computed in float64.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def _pair(pred, ref, fn, min_size=1):
    for name, t in (("pred", pred), ("ref", ref)):
        if not isinstance(t, torch.Tensor):
            raise TypeError("%s: %s must be a torch.Tensor, got %s" % (fn, name, type(t).__name__))
        if t.dim() < 3:
            raise ValueError("%s: %s must have at least 3 dims (..., X, Y, Z), got shape %s" % (fn, name, tuple(t.shape)))
    if pred.shape != ref.shape:
        raise ValueError("%s: pred and ref must have the same shape, got %s and %s"
                         % (fn, tuple(pred.shape), tuple(ref.shape)))
    if min(pred.shape[-3:]) < min_size:
        raise ValueError("%s: every spatial size must be >= %d, got %s" % (fn, min_size, tuple(pred.shape[-3:])))
    if pred.numel() == 0:
        raise ValueError("%s: empty input, shape %s" % (fn, tuple(pred.shape)))
    p = pred.detach().to(torch.float64).reshape(-1, *pred.shape[-3:])
    r = ref.detach().to(torch.float64).reshape(-1, *ref.shape[-3:])
    return p, r


def _range(r, data_range):
    if data_range is None:
        rng = r.flatten(1).amax(1) - r.flatten(1).amin(1)
    else:
        rng = torch.full((r.shape[0],), float(data_range), dtype=r.dtype, device=r.device)
    if (rng <= 0).any():
        raise ValueError("the reference is constant (max - min = 0): pass data_range explicitly")
    return rng


def nmse(pred: torch.Tensor, ref: torch.Tensor) -> float:
    p, r = _pair(pred, ref, "nmse")
    den = (r * r).flatten(1).sum(1)
    if (den == 0).any():
        raise ValueError("nmse: the reference is all zero; NMSE is undefined")
    return float((((p - r) ** 2).flatten(1).sum(1) / den).mean())


def psnr(pred: torch.Tensor, ref: torch.Tensor, data_range: Optional[float] = None) -> float:
    p, r = _pair(pred, ref, "psnr")
    mse = ((p - r) ** 2).flatten(1).mean(1)
    rng = _range(r, data_range)
    out = 10 * torch.log10(rng * rng / mse)  # inf where pred == ref
    return float(out.mean())


def _gauss1d(radius, sigma, dtype, device):
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return g / g.sum()


def _separable(v, kernels, pad):
    """Correlate (N, 1, X, Y, Z) with the outer product of three 1D kernels (zero padding `pad`)."""
    for axis, k in enumerate(kernels):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        padding = [0, 0, 0]
        padding[axis] = pad
        v = F.conv3d(v, k.reshape(shape), padding=padding)
    return v


def gaussian_window3d(radius: int = 5, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None, None] * g[None, :, None] * g[None, None, :]


def ssim3d(pred: torch.Tensor, ref: torch.Tensor, data_range: Optional[float] = None, *, radius: int = 5,
           sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    p, r = _pair(pred, ref, "ssim3d", min_size=2 * radius + 1)
    rng = _range(r, data_range).view(-1, 1, 1, 1, 1)
    c1, c2 = (k1 * rng) ** 2, (k2 * rng) ** 2
    g = _gauss1d(radius, sigma, p.dtype, p.device)
    p, r = p.unsqueeze(1), r.unsqueeze(1)

    def filt(v):
        return _separable(v, (g, g, g), 0)  # 'valid'

    mu_p, mu_r = filt(p), filt(r)
    s_pp = filt(p * p) - mu_p * mu_p
    s_rr = filt(r * r) - mu_r * mu_r
    s_pr = filt(p * r) - mu_p * mu_r
    smap = ((2 * mu_p * mu_r + c1) * (2 * s_pr + c2)) / ((mu_p ** 2 + mu_r ** 2 + c1) * (s_pp + s_rr + c2))
    return float(smap.flatten(1).mean(1).mean())


def log_kernel3d(size: int = 15, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    """Laplacian-of-Gaussian kernel as in the QSM challenges' HFEN (MATLAB fspecial-style):
    normalised Gaussian h, H = h * (|x|^2 / sigma^4 - 3 / sigma^2), minus its mean (sums to 0)."""
    half = (size - 1) / 2
    x = torch.arange(size, dtype=dtype, device=device) - half
    X, Y, Z = torch.meshgrid(x, x, x, indexing="ij")
    r2 = X * X + Y * Y + Z * Z
    h = torch.exp(-r2 / (2 * sigma * sigma))
    h = h / h.sum()
    H = h * (r2 / sigma ** 4 - 3 / sigma ** 2)
    return H - H.mean()


def _log_filter(v, size, sigma):
    """'same' zero-padded filtering of (N, 1, X, Y, Z) with log_kernel3d(size, sigma) (symmetric,
    so correlation = convolution), as one linear convolution by FFT (size^3 = 3375 taps)."""
    k = log_kernel3d(size, sigma, v.dtype, v.device)
    n = v.shape[-3:]
    full = [a + size - 1 for a in n]
    y = torch.fft.irfftn(torch.fft.rfftn(v, s=full, dim=(-3, -2, -1)) * torch.fft.rfftn(k, s=full), s=full,
                         dim=(-3, -2, -1))
    h = size // 2
    return y[..., h:h + n[0], h:h + n[1], h:h + n[2]]


def hfen(pred: torch.Tensor, ref: torch.Tensor, *, size: int = 15, sigma: float = 1.5) -> float:
    p, r = _pair(pred, ref, "hfen")
    lp, lr = _log_filter(p.unsqueeze(1), size, sigma), _log_filter(r.unsqueeze(1), size, sigma)
    den = lr.flatten(1).norm(dim=1)
    if (den == 0).any():
        raise ValueError("hfen: the reference has no high-frequency content (LoG(ref) = 0); HFEN is undefined")
    return float(((lp - lr).flatten(1).norm(dim=1) / den).mean())


def qsm_metrics(pred: torch.Tensor, ref: torch.Tensor) -> dict:
    """{'psnr', 'ssim', 'nmse', 'hfen'} of one volume or a batch of volumes (averaged)."""
    return {"psnr": psnr(pred, ref), "ssim": ssim3d(pred, ref), "nmse": nmse(pred, ref), "hfen": hfen(pred, ref)}
