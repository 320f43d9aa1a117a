"""Test helpers of the models tests: the published Rolling-Filters forward pass, written from
the checkpoints' key layout (docs/data.md) on the raw state dict, independently of
medconv_ext.models (torch.roll loop + torch.cat + F.conv, BatchNorm, ReLU, max-pool, transposed
roll, cat [up, skip], 1x1 out)."""
import os

import torch
import torch.nn.functional as F

from conftest import data_file, needs_data  # noqa: F401  (re-exported for the tests)

SEGMENT = data_file("segment.pth")  # None without MEDCONV_DATA_DIR: tests using it carry needs_data
RECON = data_file("recon.pth")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _bank(w, n_rolls):
    # roll the base (n_base, C_in, ...) by +1 along dim 1, n_rolls times, concatenate along dim 0
    parts, cur = [], w
    for _ in range(n_rolls):
        parts.append(cur)
        cur = torch.roll(cur, shifts=1, dims=1)
    return torch.cat(parts, dim=0)


def _bank_t(w, n_rolls):
    # transposed: roll (C_in, 1, ...) along dim 0, concatenate along dim 1
    parts, cur = [], w
    for _ in range(n_rolls):
        parts.append(cur)
        cur = torch.roll(cur, shifts=1, dims=0)
    return torch.cat(parts, dim=1)


def published_forward(sd, x):
    """Logits of the published Rolling UNet / QSMnet (state dict `sd`) on x (eval-mode BatchNorm)."""
    segment = "weight_00" in sd
    first = sd["weight_00"] if segment else sd["weight_10"]
    dims = first.dim() - 2
    conv = F.conv2d if dims == 2 else F.conv3d
    conv_t = F.conv_transpose2d if dims == 2 else F.conv_transpose3d
    pool = F.max_pool2d if dims == 2 else F.max_pool3d
    pad = first.shape[-1] // 2

    def unit(x, tag, mode):
        w = sd["weight_" + tag]
        c_in = x.shape[1]
        if mode == "dense":
            bank = w
        elif mode in ("single", "double"):   # n_base 1 or 2, C_in rolls
            bank = _bank(w, c_in)
        else:                                 # half roll: C_in / 2 rolls
            bank = _bank(w, c_in // 2)
        y = conv(x, bank, sd["biases_" + tag], padding=pad)
        bn = "bnormn_" + tag + "."
        y = F.batch_norm(y, sd[bn + "running_mean"], sd[bn + "running_var"], sd[bn + "weight"], sd[bn + "bias"],
                         training=False, momentum=0.0, eps=1e-5)
        return F.relu(y)

    skips = []
    if segment:
        x = unit(x, "00", "dense")
        x = unit(x, "10", "single")
        x = unit(x, "11", "single")
    else:
        x = unit(x, "10", "dense")
        x = unit(x, "11", "single")
    skips.append(x)
    x = pool(x, 2)
    for lvl in (2, 3, 4):
        x = unit(x, "%d0" % lvl, "double")
        x = unit(x, "%d1" % lvl, "single")
        skips.append(x)
        x = pool(x, 2)
    x = unit(x, "m0", "double")
    x = unit(x, "m1", "single")
    for n in (1, 2, 3, 4):
        wu = sd["weight_u%d" % n]
        up = conv_t(x, _bank_t(wu, x.shape[1] // 2), sd["biases_u%d" % n], stride=2)
        x = torch.cat([up, skips[-n]], dim=1)
        x = unit(x, "%d0" % (n + 4), "half")
        x = unit(x, "%d1" % (n + 4), "single")
    return conv(x, sd["out.weight"], sd["out.bias"])


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def count_params(builder, *args, **kwargs):
    """Parameter count of builder(...) without allocating or initialising weights: built on the meta
    device with normal-distribution init skipped (normal_ on meta tensors costs ~9 s the first time)."""
    from unittest import mock
    with torch.device("meta"), mock.patch("torch.nn.init.kaiming_normal_", lambda t, *a, **k: t), \
            mock.patch("torch.nn.init.normal_", lambda t, *a, **k: t):
        model = builder(*args, **kwargs)
    return sum(p.numel() for p in model.parameters())


def assert_close(got, want, rtol=1e-7, atol=1e-7):
    """torch.allclose with a useful message (torch.testing.assert_close imports torch.distributed.tensor
    on first use, ~10 s on 2 busy CPU cores)."""
    assert got.shape == want.shape, "shape %s != %s" % (tuple(got.shape), tuple(want.shape))
    assert got.dtype == want.dtype, "dtype %s != %s" % (got.dtype, want.dtype)
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        err = (got - want).abs()
        raise AssertionError("not close: max abs err %.3g (at %s), max |want| %.3g, rtol=%g atol=%g"
                             % (err.max().item(), tuple(torch.nonzero(err == err.max())[0].tolist()),
                                want.abs().max().item(), rtol, atol))
