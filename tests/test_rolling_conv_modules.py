"""RollingConv2d/3d and RollingConvTranspose2d/3d: layout rule, parameters, expanded_weight,
initialisation, repr, state_dict."""
import math

import pytest
import torch
import torch.nn.functional as F

from medconv_ext.nn import RollingConv2d, RollingConv3d, RollingConvTranspose2d, RollingConvTranspose3d, rolling_layout


@pytest.mark.parametrize("cin,cout,nb,nr", [
    (64, 64, 1, 64), (64, 128, 2, 64), (64, 32, 1, 32), (3, 7, 3, None), (64, 96, 2, 48), (1, 5, 5, 1),
    (4, 12, 3, 4), (64, 200, 4, 50), (5, 1, 1, 1),
])
def test_layout_rule(cin, cout, nb, nr):
    """n_base = ceil(out / in), n_rolls = out / n_base; others raise a ValueError naming valid values."""
    assert nb == -(-cout // cin)
    if nr is None:
        with pytest.raises(ValueError, match=r"out_channels=7 has no rolling layout for in_channels=3.*nearest valid: .*6.*9"):
            rolling_layout(cin, cout)
        with pytest.raises(ValueError, match=r"RollingConv2d: out_channels=7"):
            RollingConv2d(cin, cout, 3)
        return
    assert rolling_layout(cin, cout) == (nb, nr)
    m = RollingConv2d(cin, cout, 3)
    assert (m.n_base, m.n_rolls) == (nb, nr) and m.weight.shape == (nb, cin, 3, 3)


@pytest.mark.parametrize("cin,cout", [(64, 130), (4, 13), (8, 0), (0, 4)])
def test_invalid_out_channels(cin, cout):
    with pytest.raises(ValueError, match=r"out_channels|in_channels"):
        RollingConv3d(cin, cout, 3)


@pytest.mark.parametrize("cls,dims,transposed", [
    (RollingConv2d, 2, False), (RollingConv3d, 3, False),
    (RollingConvTranspose2d, 2, True), (RollingConvTranspose3d, 3, True),
])
def test_parameters_expanded_weight_and_forward(cls, dims, transposed):
    torch.manual_seed(3)
    cin, cout, k = 6, 12, 3  # n_base 2, n_rolls 6
    m = cls(cin, cout, k, stride=2, padding=1, bias=True).double()
    nb, nr = m.n_base, m.n_rolls
    assert (nb, nr) == (2, 6)
    wshape = (cin, nb) + (k,) * dims if transposed else (nb, cin) + (k,) * dims
    assert m.weight.shape == wshape
    assert sum(p.numel() for p in m.parameters()) == nb * cin * k ** dims + cout
    assert set(m.state_dict().keys()) == {"weight", "bias"}
    W = m.expanded_weight()
    assert W.shape == ((cin, cout) if transposed else (cout, cin)) + (k,) * dims
    # rolled bank, written out: W[r*nb + b, c] = base[b, (c - r) mod C]
    for r in range(nr):
        for b in range(nb):
            for c in range(cin):
                if transposed:
                    assert torch.equal(W[c, r * nb + b], m.weight[(c - r) % cin, b])
                else:
                    assert torch.equal(W[r * nb + b, c], m.weight[b, (c - r) % cin])
    x = torch.randn(2, cin, *(5,) * dims, dtype=torch.float64)
    if transposed:
        dense = {2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims](x, W, m.bias, 2, 1)
    else:
        dense = {2: F.conv2d, 3: F.conv3d}[dims](x, W, m.bias, 2, 1)
    torch.testing.assert_close(m(x), dense, rtol=1e-10, atol=1e-10)
    no_bias = cls(cin, cout, k, bias=False)
    assert no_bias.bias is None and set(no_bias.state_dict().keys()) == {"weight"}


@pytest.mark.parametrize("cls", [RollingConv2d, RollingConvTranspose2d])
def test_init_statistics(cls):
    """Kaiming-normal (fan-in, gain sqrt(2)) on the base; bias uniform in +-1/sqrt(fan_in)."""
    torch.manual_seed(0)
    m = cls(256, 512, 3)
    w = m.weight.detach()
    fan_in = w.shape[1] * 9  # torch's fan-in of the stored base tensor
    std = math.sqrt(2.0 / fan_in)
    n = w.numel()
    assert abs(w.mean().item()) < 4 * std / math.sqrt(n)
    assert abs(w.std().item() / std - 1) < 4 / math.sqrt(2 * n) + 0.01
    bound = 1 / math.sqrt(fan_in)
    b = m.bias.detach()
    assert b.abs().max().item() <= bound
    assert b.max().item() > 0.9 * bound and b.min().item() < -0.9 * bound
    assert abs(b.std().item() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3)


def test_repr_shows_layout():
    r = repr(RollingConv2d(64, 128, 3, padding=1, bias=False))
    assert "n_base=2" in r and "n_rolls=64" in r and "bias=False" in r and "padding=(1, 1)" in r
    r = repr(RollingConvTranspose3d(64, 32, 2, stride=2))
    assert "n_base=1" in r and "n_rolls=32" in r and "stride=(2, 2, 2)" in r
