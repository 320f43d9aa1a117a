"""Rolling conv and involution under torch.autocast (CPU here; CUDA when present): inputs are
cast to the autocast dtype like torch's convolutions, and gradients reach float32 parameters."""
import pytest
import torch

import medconv_ext as mc
from medconv_ext.reference.involution import involution as ref_involution
from medconv_ext.reference.rolling_conv import rolling_conv as ref_rolling_conv

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}  # relative to the output's max magnitude


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_rolling_conv_autocast(device, dtype, transposed):
    layer = (mc.nn.RollingConvTranspose2d(6, 12, 3, stride=2, padding=1) if transposed
             else mc.nn.RollingConv2d(6, 12, 3, padding=1)).to(device)
    x = torch.randn(2, 6, 9, 7, device=device)
    with torch.autocast(device, dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    if transposed:
        from medconv_ext.reference.rolling_conv import rolling_conv_transpose
        expect = rolling_conv_transpose(x.double(), w, b, [2, 2], [1, 1], [0, 0], [1, 1], layer.n_rolls)
    else:
        expect = ref_rolling_conv(x.double(), w, b, [1, 1], [1, 1], [1, 1], layer.n_rolls)
    assert _rel_err(y, expect) < TOL[dtype]
    y.float().square().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_involution_autocast(device, dtype):
    x = torch.randn(2, 8, 9, 9, device=device)
    weight = torch.randn(2, 2, 3, 3, 9, 9, device=device)
    with torch.autocast(device, dtype=dtype):
        y = mc.involution2d(x, weight, 3, padding=1)
    assert y.dtype == dtype
    expect = ref_involution(x.double(), weight.double(), [3, 3], [1, 1], [1, 1], [1, 1])
    assert _rel_err(y, expect) < TOL[dtype]


@pytest.mark.parametrize("transposed", [False, True])
def test_spectral_composition_computes_in_float32_under_autocast(transposed):
    """Under bf16 autocast the spectral composition computes in float32 like outside it: the same
    result as casting the inputs to bf16 by hand and calling it without autocast (its DFT matmul and
    depthwise conv are not re-cast to bf16)."""
    torch.manual_seed(0)
    c = 64
    x = torch.randn(1, c, 11, 9)
    w = torch.randn(c, 1, 3, 3) if transposed else torch.randn(1, c, 3, 3)
    fn = mc.rolling_conv_transpose2d if transposed else mc.rolling_conv2d
    kw = dict(padding=1, backend="spectral_unfused")
    expect = fn(x.bfloat16(), w.bfloat16(), **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, w, **kw)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expect)
