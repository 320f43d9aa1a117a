"""QSM metrics against hand-computed cases and direct (non-separable, non-FFT) implementations."""
import math

import pytest
import torch
import torch.nn.functional as F

from medconv_ext.train.metrics import gaussian_window3d, hfen, log_kernel3d, nmse, psnr, qsm_metrics, ssim3d


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_psnr_of_known_mse():
    ref = torch.zeros(6, 7, 8, dtype=torch.float64)
    ref[0, 0, 0], ref[1, 1, 1] = -0.1, 0.3          # range L = 0.4
    sign = (torch.arange(6 * 7 * 8) % 2 * 2 - 1).reshape(6, 7, 8).to(torch.float64)
    pred = ref + 0.02 * sign                         # every error is +-0.02: MSE = 4e-4
    assert psnr(pred, ref) == pytest.approx(10 * math.log10(0.4 ** 2 / 4e-4), abs=1e-9)   # 26.0206 dB
    assert psnr(pred, ref, data_range=1.0) == pytest.approx(10 * math.log10(1 / 4e-4), abs=1e-9)
    assert psnr(ref, ref) == math.inf


def test_nmse_hand_cases():
    ref = _rand(5, 6, 7) - 0.3
    assert nmse(1.1 * ref, ref) == pytest.approx(0.01, rel=1e-12)
    assert nmse(torch.zeros_like(ref), ref) == pytest.approx(1.0, rel=1e-12)
    assert nmse(ref, ref) == 0
    with pytest.raises(ValueError, match="all zero"):
        nmse(ref, torch.zeros_like(ref))


def test_ssim_identical_is_one():
    ref = _rand(16, 15, 14)
    assert ssim3d(ref, ref) == pytest.approx(1.0, abs=1e-12)
    assert ssim3d(ref.float(), ref.float()) == pytest.approx(1.0, abs=1e-6)


def test_ssim_constant_offset_hand_computed():
    # ref constant a, pred = a + c: no variance, so SSIM = (2 a (a + c) + C1) / (a^2 + (a + c)^2 + C1),
    # C1 = (0.01 L)^2, in every window.
    a, c, L = 0.2, 0.05, 1.0
    ref = torch.full((12, 12, 12), a, dtype=torch.float64)
    c1 = (0.01 * L) ** 2
    expected = (2 * a * (a + c) + c1) / (a * a + (a + c) ** 2 + c1)      # 0.975633...
    assert ssim3d(ref + c, ref, data_range=L) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="constant"):
        ssim3d(ref + c, ref)                          # L from a constant reference is 0


def _ssim_direct(p, r, L, k1=0.01, k2=0.03):
    w = gaussian_window3d()[None, None]
    p, r = p[None, None], r[None, None]
    f = lambda v: F.conv3d(v, w)  # noqa: E731
    mp, mr = f(p), f(r)
    spp, srr, spr = f(p * p) - mp ** 2, f(r * r) - mr ** 2, f(p * r) - mp * mr
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    return (((2 * mp * mr + c1) * (2 * spr + c2)) / ((mp ** 2 + mr ** 2 + c1) * (spp + srr + c2))).mean().item()


def test_ssim_matches_direct_3d_window():
    ref = _rand(13, 12, 14, seed=1)
    pred = ref + 0.1 * _rand(13, 12, 14, seed=2) + 0.05
    L = (ref.max() - ref.min()).item()
    assert ssim3d(pred, ref) == pytest.approx(_ssim_direct(pred, ref, L), abs=1e-12)
    w = gaussian_window3d()
    assert w.shape == (11, 11, 11) and w.sum().item() == pytest.approx(1.0)
    assert w[5, 5, 5] / w[5, 5, 6] == pytest.approx(math.exp(1 / (2 * 1.5 ** 2)))  # sigma 1.5
    # batched volumes: the mean of the per-volume values
    both = ssim3d(torch.stack([pred, ref]), torch.stack([ref, ref]))
    assert both == pytest.approx((ssim3d(pred, ref) + 1) / 2, abs=1e-12)


def test_hfen_hand_cases_and_log_kernel():
    ref = _rand(18, 17, 16, seed=3)
    assert hfen(ref, ref) == 0
    assert hfen(torch.zeros_like(ref), ref) == pytest.approx(1.0, abs=1e-12)   # LoG(0) = 0
    assert hfen(2 * ref, ref) == pytest.approx(1.0, abs=1e-12)                 # LoG is linear
    k = log_kernel3d()
    assert k.shape == (15, 15, 15) and abs(k.sum().item()) < 1e-14
    assert torch.equal(k, k.flip(0)) and torch.equal(k, k.permute(1, 2, 0))
    # the MATLAB-style formula at the centre: h(0) (0 - 3 / sigma^2) - mean
    x = torch.arange(15, dtype=torch.float64) - 7
    g = torch.exp(-x * x / 4.5)
    h0 = 1 / g.sum() ** 3
    X, Y, Z = torch.meshgrid(x, x, x, indexing="ij")
    h = torch.exp(-(X * X + Y * Y + Z * Z) / 4.5)
    h = h / h.sum()
    raw = h * ((X * X + Y * Y + Z * Z) / 1.5 ** 4 - 3 / 1.5 ** 2)
    assert k[7, 7, 7].item() == pytest.approx((h0 * (-3 / 1.5 ** 2) - raw.mean()).item(), rel=1e-12)


def test_hfen_matches_direct_log_filtering():
    # HFEN filters by FFT; compare with plain 'same' zero-padded conv3d with the 15^3 kernel
    ref, pred = _rand(10, 11, 9, seed=4), _rand(10, 11, 9, seed=5)
    k = log_kernel3d()[None, None]
    lp = F.conv3d(pred[None, None], k, padding=7)
    lr = F.conv3d(ref[None, None], k, padding=7)
    assert hfen(pred, ref) == pytest.approx(((lp - lr).norm() / lr.norm()).item(), rel=1e-10)


def test_metric_input_errors():
    a = torch.zeros(12, 12, 12)
    with pytest.raises(ValueError, match="same shape"):
        nmse(a, torch.zeros(12, 12, 11))
    with pytest.raises(ValueError, match=">= 11"):
        ssim3d(torch.rand(10, 12, 12), torch.rand(10, 12, 12))
    with pytest.raises(ValueError, match="at least 3 dims"):
        psnr(torch.rand(4, 4), torch.rand(4, 4))
    with pytest.raises(TypeError):
        hfen([1, 2, 3], a)
    m = qsm_metrics(_rand(12, 12, 12, seed=6) * 0.9, _rand(12, 12, 12, seed=6))
    assert set(m) == {"psnr", "ssim", "nmse", "hfen"} and all(math.isfinite(v) for v in m.values())
