"""predict_tiled equals full-image inference: bit-identical in float64 with integer-valued weights
and inputs (exact arithmetic whatever the summation order), a few ulps in float32."""
import numpy as np
import pytest
import torch

from _tiling_util import (UNet, assert_exact_regime, dilated_net, full_valid, integer_image,
                          integer_weights_)
from medconv_ext.models.valid_srnet import SRNet, valid_srnet
from medconv_ext.tiling import predict_tiled, receptive_radius


def _srnet(dims=2, features=4, blocks=7, padding=0, seed=0):
    return integer_weights_(SRNet(1, features, blocks, dims, padding=padding).double().eval(), seed=seed)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect", "replicate", "circular"])
def test_valid_srnet_2d_bit_identical(pad_mode):
    net = _srnet()  # 7 blocks: margin 16
    x = integer_image((2, 1, 45, 39))
    full = assert_exact_regime(net, torch.nn.functional.pad(x, (16,) * 4, mode=pad_mode))
    y = predict_tiled(net, x, 40, pad_mode=pad_mode, progress=False)  # margin from receptive_margin
    assert y.shape == x.shape and y.dtype == torch.float64
    assert torch.equal(y, full)


def test_valid_srnet_3d_bit_identical():
    net = _srnet(dims=3, features=3, blocks=2)  # margin 6
    x = integer_image((1, 1, 15, 17, 13))
    full = assert_exact_regime(net, torch.nn.functional.pad(x, (6,) * 6))
    # anisotropic tile; along the last axis the tile (30) is larger than the padded image (25)
    y = predict_tiled(net, x[0], (16, 14, 30), margin=6, batch_size=3, progress=False)
    assert y.shape == x.shape[1:]
    assert torch.equal(y, full[0])


def test_valid_tile_stride_and_odd_sizes():
    net = _srnet(blocks=2, features=3)  # margin 6
    x = integer_image((3, 1, 23, 1 + 2 * 7))
    full = full_valid(net, x, (6, 6))
    for tile, bs in ((13, 1), (14, 5), (17, 100), (200, 2)):  # smallest tile, batch > tiles, tile > image
        y = predict_tiled(net, x, tile, batch_size=bs, progress=False)
        assert torch.equal(y, full), (tile, bs)


def _halo_case(net, x, halo, tile, align=1, bs=4):
    full = assert_exact_regime(net, x)
    y = predict_tiled(net, x, tile, halo=halo, align=align, batch_size=bs, progress=False)
    return full, y


def test_padded_srnet_halo_bit_identical():
    net = _srnet(blocks=3, padding=1)
    r = receptive_radius(net, 2)
    assert r == (8, 8)
    x = integer_image((2, 1, 41, 35))
    for tile, bs in ((24, 4), (17, 1), (64, 9)):  # tile > image along both axes in the last case
        full, y = _halo_case(net, x, r, tile, bs=bs)
        assert torch.equal(y, full), tile


def test_dilated_padded_halo_and_too_small_halo_differs():
    net = integer_weights_(dilated_net().double().eval())
    x = integer_image((1, 1, 37, 50))
    full, y = _halo_case(net, x, 6, (20, 23))
    assert torch.equal(y, full)
    # the test can fail: a halo below the receptive radius gives a different result; predict_tiled refuses it
    with pytest.raises(ValueError, match=r"halo \(3, 3\) is smaller than the model's receptive field \(6, 6\)"):
        predict_tiled(net, x, (20, 23), halo=3, progress=False)
    y_bad = predict_tiled(net, x, (20, 23), halo=3, progress=False, check_receptive_field=False)
    assert not torch.equal(y_bad, full)


def test_unet_halo_align_bit_identical():
    net = integer_weights_(UNet(levels=2).double().eval())
    r = receptive_radius(net, 2, align=4)
    assert r == (14, 14)  # the NaN probe bounds the radius up to align - 1 (11 when probed voxel by voxel)
    x = integer_image((2, 1, 104, 56))
    full, y = _halo_case(net, x, r, 48, align=4, bs=3)
    assert torch.equal(y, full)
    y13 = predict_tiled(net, x, 48, halo=13, align=4, progress=False)
    assert torch.equal(y13, full)
    # the test can fail: with align=1 the same halo 13 puts tile origins off the max-pool grid
    # (0, 9, 31, 53, 56 along the first axis), and the result differs
    y_bad = predict_tiled(net, x, 48, halo=13, progress=False)
    assert not torch.equal(y_bad, full)


def test_unet_3d_halo_align_bit_identical():
    net = integer_weights_(UNet(levels=1, dims=3, base=2).double().eval())
    r = receptive_radius(net, 3, align=2, probe_size=24)
    x = integer_image((1, 1, 20, 16, 22))
    full = assert_exact_regime(net, x)
    y = predict_tiled(net, x[0], (16, 14, 16), halo=r, align=2, progress=False)  # (C, D, H, W) image
    assert torch.equal(y, full[0])


def _ulp_check(y, full, ulps=8):
    # ulps of the largest output magnitude: different conv algorithms per tile size may round differently
    tol = ulps * torch.finfo(full.dtype).eps * float(full.abs().max())
    assert float((y - full).abs().max()) <= tol


def test_float32_valid_and_padded_few_ulps():
    torch.manual_seed(0)
    net = valid_srnet(features=8, blocks=3).eval()  # margin 8
    x = torch.randn(1, 1, 53, 61)
    with torch.no_grad():
        full = net(torch.nn.functional.pad(x, (8,) * 4))
    _ulp_check(predict_tiled(net, x, 32, progress=False, exact=True), full)
    pnet = SRNet(1, 8, 3, 2, padding=1).eval()
    with torch.no_grad():
        full = pnet(x)
    _ulp_check(predict_tiled(pnet, x, 32, halo=8, progress=False), full)


def test_numpy_memmap_in_and_out(tmp_path):
    net = _srnet(blocks=2, features=3)
    x = integer_image((2, 1, 30, 27))
    inp = np.lib.format.open_memmap(tmp_path / "in.npy", mode="w+", dtype=np.uint8, shape=tuple(x.shape))
    inp[...] = x.numpy().astype(np.uint8)
    inp.flush()
    inp = np.load(tmp_path / "in.npy", mmap_mode="r")
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float64, shape=(2, 1, 30, 27))
    out[...] = np.nan  # poison: every voxel must be written
    res = predict_tiled(net, inp, 20, out=out, progress=False)
    assert res is out
    out.flush()
    full = full_valid(net, x, (6, 6)).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), full)
    # plain ndarray in: ndarray out
    y = predict_tiled(net, x.numpy(), 20, progress=False)
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    np.testing.assert_array_equal(y, full)


def test_out_tensor_wider_dtype_and_poisoned():
    net = valid_srnet(features=4, blocks=1).eval()  # float32 model
    x = torch.randn(1, 1, 21, 19)
    out = torch.full((1, 1, 21, 19), float("nan"), dtype=torch.float64)
    res = predict_tiled(net, x, 12, out=out, progress=False)
    assert res is out and not torch.isnan(out).any()
    with torch.no_grad():
        full = net(torch.nn.functional.pad(x, (4,) * 4))
    _ulp_check(out.float(), full)


def test_noncontiguous_and_channels_last_input():
    net = _srnet(blocks=2, features=3)
    base = integer_image((1, 1, 31, 26))
    full = full_valid(net, base, (6, 6))
    xt = base.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    assert not xt.is_contiguous()
    assert torch.equal(predict_tiled(net, xt, 19, progress=False), full)
    xc = base.expand(1, 1, 31, 26).contiguous(memory_format=torch.channels_last)
    assert torch.equal(predict_tiled(net, xc, 19, progress=False), full)


def test_multichannel_and_empty_batch():
    net = integer_weights_(SRNet(2, 3, 1, 2).double().eval())  # 2 input channels, margin 4
    x = integer_image((2, 2, 17, 14))
    full = full_valid(net, x, (4, 4))
    assert torch.equal(predict_tiled(net, x, 11, progress=False), full)
    y = predict_tiled(net, x[:0], 11, progress=False)
    assert y.shape == (0, 2, 17, 14)


def test_exact_mode_restores_settings():
    net = _srnet(blocks=1, features=2)
    x = integer_image((1, 1, 12, 12))
    b = torch.backends
    before = (torch.are_deterministic_algorithms_enabled(), b.cudnn.deterministic, b.cudnn.benchmark,
              b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, t):
            seen.append((torch.are_deterministic_algorithms_enabled(), b.cuda.matmul.fp32_precision,
                         b.cudnn.conv.fp32_precision))
            return net(t)

    spy = Spy()
    y = predict_tiled(spy, x, (12, 12), margin=4, exact=True, progress=False)
    assert seen and all(s == (True, "ieee", "ieee") for s in seen)
    after = (torch.are_deterministic_algorithms_enabled(), b.cudnn.deterministic, b.cudnn.benchmark,
             b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision)
    assert after == before
    assert torch.equal(y, full_valid(net, x, (4, 4)))
