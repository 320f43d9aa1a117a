"""Randomized comparison of every CPU backend with the float64 ground truth (reference/rolling_conv.py): 2D and
3D layers with strides 1-3, dilation 1-2, any padding up to (k - 1) * dilation, partial rolls, several bases,
transposed with output_padding, NC(D)HW / channels-last / strided input, float32 and float64, forward and
both gradients. Fixed seeds: the same layers every run. A longer run of the same comparison found torch's
over-padded 3D weight-gradient fault (docs/rolling_conv_cpu.md, "Over-padded 3D layers")."""
import random

import pytest
import torch

import medconv_ext as mc
from medconv_ext import _ext
from medconv_ext.reference import rolling_conv as ref

BACKENDS = ["auto", "reference", "spectral_unfused"] + (["cpu", "spectral"] if _ext.has_compiled_ops() else [])
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}
CL = {2: torch.channels_last, 3: torch.channels_last_3d}


def _layer(rng):
    dims = rng.choice([2, 2, 3])
    c = rng.choice([1, 2, 3, 5, 8, 9, 12, 16, 17, 24, 32])
    k = [rng.choice([1, 2, 3, 3, 4, 5]) for _ in range(dims)]
    stride = [rng.choice([1, 1, 2, 3]) for _ in range(dims)]
    dilation = [rng.choice([1, 1, 2]) for _ in range(dims)]
    transposed = rng.random() < 0.3
    return dict(dims=dims, n=rng.choice([1, 2]), c=c, n_base=rng.choice([1, 1, 2, 3]),
                n_rolls=rng.choice([c, rng.randint(1, c)]), k=k, stride=stride, dilation=dilation,
                padding=[rng.randint(0, (kk - 1) * d) for kk, d in zip(k, dilation)],
                output_padding=[rng.randint(0, max(s, d) - 1) if transposed else 0 for s, d in zip(stride, dilation)],
                size=[rng.randint(1, 9 if dims == 2 else 5) for _ in range(dims)], transposed=transposed,
                dtype=rng.choice([torch.float32, torch.float64]), layout=rng.choice(["contiguous", "cl", "strided"]),
                bias=rng.random() < 0.5)


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


@pytest.mark.parametrize("seed", range(6))
def test_random_layers_match_the_float64_ground_truth(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    checked = 0
    for _ in range(40):
        L = _layer(rng)
        dims, dt = L["dims"], L["dtype"]
        x = torch.randn(L["n"], L["c"], *L["size"], generator=gen, dtype=torch.float64)
        wshape = (L["c"], L["n_base"]) if L["transposed"] else (L["n_base"], L["c"])
        w = torch.randn(*wshape, *L["k"], generator=gen, dtype=torch.float64)
        b = torch.randn(L["n_rolls"] * L["n_base"], generator=gen, dtype=torch.float64) if L["bias"] else None
        xd, wd = x.clone().requires_grad_(), w.clone().requires_grad_()
        try:
            if L["transposed"]:
                want = ref.rolling_conv_transpose(xd, wd, b, L["stride"], L["padding"], L["output_padding"],
                                                  L["dilation"], L["n_rolls"])
            else:
                want = ref.rolling_conv(xd, wd, b, L["stride"], L["padding"], L["dilation"], L["n_rolls"])
        except RuntimeError:  # no output (the kernel does not fit): covered by the bad-input tests
            continue
        if want.numel() == 0:
            continue
        g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        gx_want, gw_want = torch.autograd.grad(want, (xd, wd), g)
        xt = x.to(dt)
        if L["layout"] == "cl":
            xt = xt.contiguous(memory_format=CL[dims])
        elif L["layout"] == "strided":
            big = torch.zeros(*xt.shape[:2], *[s * 2 for s in xt.shape[2:]], dtype=dt)
            view = big[(slice(None), slice(None)) + (slice(None, None, 2),) * dims]
            view.copy_(xt)
            xt = view
        for backend in BACKENDS:
            xi, wi = xt.detach().requires_grad_(), w.to(dt).requires_grad_()
            bi = b.to(dt) if b is not None else None
            if L["transposed"]:
                f = mc.rolling_conv_transpose2d if dims == 2 else mc.rolling_conv_transpose3d
                y = f(xi, wi, bi, L["stride"], L["padding"], L["output_padding"], L["n_rolls"], backend, L["dilation"])
            else:
                f = mc.rolling_conv2d if dims == 2 else mc.rolling_conv3d
                y = f(xi, wi, bi, L["stride"], L["padding"], L["dilation"], L["n_rolls"], backend)
            gx, gw = torch.autograd.grad(y, (xi, wi), g.to(dt))
            where = (backend, L)
            assert y.shape == want.shape and y.dtype == dt, where
            assert y.is_contiguous() or y.is_contiguous(memory_format=CL[dims]), (y.stride(), where)
            for name, got, exp in (("y", y, want), ("grad_x", gx, gx_want), ("grad_w", gw, gw_want)):
                err = _rel(got, exp)
                assert err < TOL[dt], (name, err, where)
        checked += 1
    assert checked >= 20  # most drawn layers have an output
