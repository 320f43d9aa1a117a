"""Parameter counts of every model builder at the published sizes, and forward shapes at small ones."""
import pytest
import torch

import medconv_ext.nn as mnn
from _models_util import count_params
from medconv_ext import models as M

PAPER = {  # exact (published checkpoints, or the paper's dense figures)
    "unet": 31_042_499,
    "rolling_unet": 88_899,
    "qsmnet": 99_453_985,
    "rolling_qsmnet": 445_025,
}
APPROX = {  # the paper's rounded figures: within 2%
    "depthwise_unet": 6.01e6,
    "flattened_unet": 6.01e6,
    "depthwise_qsmnet": 2.5e6,
    "flattened_qsmnet": 2.2e6,
}
OURS = {  # our constructions (docstrings), pinned so a silent change of construction fails
    "depthwise_unet": 5_988_236,
    "flattened_unet": 5_971_139,
    "depthwise_qsmnet": 2_547_582,
    "flattened_qsmnet": 2_227_617,
}

needs_involution = pytest.mark.skipif(
    not hasattr(mnn, "Involution2d"),
    reason="medconv_ext.nn.Involution2d is not in this tree yet (the involution work provides it)")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_exact_counts(name):
    assert count_params(getattr(M, name)) == PAPER[name]


@pytest.mark.parametrize("name", sorted(APPROX))
def test_paper_counts_within_2_percent(name):
    n = count_params(getattr(M, name))
    assert n == OURS[name]
    assert abs(n - APPROX[name]) / APPROX[name] < 0.02


def test_resnet18_counts():
    assert count_params(M.resnet18) == 11_689_512            # torchvision's resnet18 count
    assert count_params(M.rolling_resnet18, num_classes=2) == 226_626
    assert count_params(M.rolling_resnet18, 2) == count_params(M.rolling_resnet18)


def test_rolling_resnet18_layers():
    model = M.rolling_resnet18(features=8)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["conv1"] == "Conv2d" and kinds["fc"] == "Linear"
    assert kinds["layer2.0.downsample.0"] == "Conv2d"
    assert kinds["layer1.0.conv1"] == "RollingConv2d" and kinds["layer4.1.conv2"] == "RollingConv2d"
    assert model.layer2[0].conv1.n_base == 2 and model.layer2[0].conv1.bias is None
    assert sum(k.startswith("Rolling") for k in kinds.values()) == 16


SMALL_2D = ["unet", "rolling_unet", "depthwise_unet", "flattened_unet"]
SMALL_3D = ["qsmnet", "rolling_qsmnet", "depthwise_qsmnet", "flattened_qsmnet"]


@pytest.mark.parametrize("name", SMALL_2D)
def test_unet_forward_shapes(name):
    model = getattr(M, name)(in_channels=2, num_classes=5, features=4)
    x = torch.randn(2, 2, 32, 48)
    y = model(x)
    assert y.shape == (2, 5, 32, 48) and y.dtype == torch.float32 and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", SMALL_3D)
def test_qsmnet_forward_shapes(name):
    model = getattr(M, name)(in_channels=1, out_channels=2, features=2).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 1, 16, 16, 32))
    assert y.shape == (1, 2, 16, 16, 32) and torch.isfinite(y).all()


def test_resnet18_forward_shapes():
    for builder in (M.resnet18, M.rolling_resnet18):
        model = builder(num_classes=3, in_channels=1, features=8)
        y = model(torch.randn(2, 1, 40, 24))
        assert y.shape == (2, 3) and torch.isfinite(y).all()


def test_unet_input_errors():
    model = M.rolling_unet(features=2)
    with pytest.raises(ValueError, match="multiple of 2\\*\\*depth = 16"):
        model(torch.randn(1, 1, 24, 32))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4D input"):
        model(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="features"):
        M.unet(features=0)


@needs_involution
def test_medic_counts_and_shapes():
    cls = M.medic_cls()
    assert sum(p.numel() for p in cls.involution.parameters()) == 23   # C + 2 + 18 for C = 3
    assert sum(p.numel() for p in cls.parameters()) == 1_756_478
    y = cls.eval()(torch.randn(2, 3, 28, 28))
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    assert count_params(M.medic_seg) == 11_716_776
    # the variant whose count matches the paper's 6,988,139 (module docstring)
    assert count_params(M.medic_seg, batch_norm=False, bottleneck_convs=1) == 6_988_136
    seg = M.medic_seg(features=2).eval()
    with torch.no_grad():
        y = seg(torch.randn(2, 3, 64, 32))
    assert y.shape == (2, 1, 64, 32) and torch.isfinite(y).all()
    small = M.medic_cls(in_channels=1, num_classes=4, features=4)
    assert small(torch.randn(3, 1, 28, 28)).shape == (3, 4)
    with pytest.raises(ValueError, match="expected input"):
        small(torch.randn(3, 1, 32, 32))


def test_roll_loop_and_set_backend_keep_the_function():
    model = M.rolling_qsmnet(features=2).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        want = model(x)
        loop = M.to_roll_loop(model)
        assert sum(type(m).__name__ == "RollLoopConv" for m in loop.modules()) == 17 + 4
        assert ((loop(x) - want).abs().max() <= 1e-5 * want.abs().max())
        ref = M.set_backend(model, "reference")
        assert all(m.backend == "reference" for m in ref.modules() if hasattr(m, "n_rolls"))
        assert ((ref(x) - want).abs().max() <= 1e-5 * want.abs().max())
