"""MONAI interop: ExactTiledInferer against full-image inference on MONAI networks, rollify on MONAI's
BasicUNet / UNet / SegResNet / DynUNet (forward and one training step), the rollified MONAI builders
in `seg --data`, and the seg --data loss / metric against MONAI's definitions. Skipped without MONAI
(the optional 'monai' extra), except the check of the error without it."""
import sys

import pytest
import torch

import medconv_ext.monai as mm


def test_missing_monai_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)  # import monai -> ImportError
    monkeypatch.setattr(mm, "_CLASSES", {})
    with pytest.raises(ImportError, match=r"medconv_ext\[monai\]"):
        mm.ExactTiledInferer
    with pytest.raises(ImportError, match=r"medconv_ext\[monai\]"):
        mm.rolling_basic_unet()
    import medconv_ext  # noqa: F401  the core package needs no MONAI
    import medconv_ext.train  # noqa: F401


monai = pytest.importorskip("monai", reason="MONAI is not installed (the optional 'monai' extra)")
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet  # noqa: E402

from medconv_ext.models import rollify  # noqa: E402


def _record(net):
    shapes = []
    net.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape[2:])))
    return shapes


def test_inferer_equals_full_image_basicunet_2d():
    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=2, in_channels=2, out_channels=3, features=(2, 2, 4, 4, 8, 2),
                    norm=("batch", {"affine": True})).double()
    with torch.no_grad():  # BatchNorm statistics other than the identity
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    net.eval()
    inferer = mm.ExactTiledInferer(tile=240, align=16, batch_size=3)
    assert isinstance(inferer, monai.inferers.Inferer)
    x = torch.randn(2, 2, 272, 304, dtype=torch.float64)
    shapes = _record(net)
    with torch.no_grad():
        y = inferer(x, net)
        tiled_calls = list(shapes)
        ref = net(x)
    assert y.shape == ref.shape == (2, 3, 272, 304)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    assert tiled_calls and all(max(s) <= 240 for s in tiled_calls), set(tiled_calls)
    assert inferer.radius(net, 2) == (109, 109)
    # float32, a size that is not a multiple of 16: zero-padded at the high end, cropped back
    net32 = net.float()
    x32 = torch.randn(1, 2, 250, 263)
    with torch.no_grad():
        y32 = mm.ExactTiledInferer(tile=240, halo=109, align=16)(x32, net32)
        ref32 = net32(torch.nn.functional.pad(x32, (0, 9, 0, 6)))[:, :, :250, :263]
    torch.testing.assert_close(y32, ref32, rtol=1e-5, atol=2e-5)


def test_inferer_monai_unet_3d_and_args():
    torch.manual_seed(1)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(2, 4), strides=(2,), num_res_units=1,
               norm="batch").double().eval()
    x = torch.randn(1, 1, 40, 36, 30, dtype=torch.float64)
    inferer = mm.ExactTiledInferer(tile=(32, 32, 64), align=2)
    shapes = _record(net)
    with torch.no_grad():
        y = inferer(x, net)
        ref = net(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    assert all(a <= b for s in shapes[:-1] for a, b in zip(s, (32, 32, 64)))
    with pytest.raises(ValueError, match="tile"):
        mm.ExactTiledInferer(tile=8, align=2)(x, net)  # no halo fits in 8 voxels
    with pytest.raises(TypeError):
        mm.ExactTiledInferer(tile=1.5)
    with pytest.raises(ValueError, match="eval"):
        mm.ExactTiledInferer(tile=32, halo=6, align=2)(x, net.train())


@pytest.mark.parametrize("name", ["BasicUNet", "UNet", "SegResNet", "DynUNet"])
def test_rollify_monai_networks_forward_and_step(name):
    torch.manual_seed(0)
    nets = {
        "BasicUNet": lambda: BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(8, 8, 16, 32, 64, 8),
                                       norm="batch"),
        "UNet": lambda: UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64),
                             strides=(2, 2, 2), num_res_units=2, norm="batch"),
        "SegResNet": lambda: SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8, norm="batch"),
        "DynUNet": lambda: DynUNet(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3, 3],
                                   strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2], filters=[8, 16, 32, 64],
                                   norm_name="batch"),
    }
    net = nets[name]()
    before = sum(p.numel() for p in net.parameters())
    report = rollify(net)
    after = sum(p.numel() for p in net.parameters())
    assert report.model_params_before == before and report.model_params_after == after
    assert len(report.converted) >= 10 and after < before / 8, (before, after)  # the counts of docs/models.md
    from medconv_ext.nn.rolling_conv import _RollingConvNd
    assert sum(isinstance(m, _RollingConvNd) for m in net.modules()) == len(report.converted)
    x = torch.randn(2, 1, 16, 16, 16)
    target = torch.randint(0, 2, (2, 16, 16, 16))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    y = net(x)
    y = y[0] if isinstance(y, (list, tuple)) else y
    assert y.shape == (2, 2, 16, 16, 16)
    loss = torch.nn.functional.cross_entropy(y, target)
    loss.backward()
    rolling = [m for m in net.modules() if isinstance(m, _RollingConvNd)]
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in rolling)
    w0 = rolling[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(w0, rolling[0].weight)
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert torch.isfinite(out).all()


def test_loss_and_metric_match_monai():
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from medconv_ext.train.seg_files import dice_ce_loss, dice_per_class
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 4, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 6, 5, 4))
    ours, _, _ = dice_ce_loss(logits, target)
    ref = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)(logits, target[:, None])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    pred = torch.randint(0, 3, (1, 9, 8, 7))
    truth = torch.randint(0, 3, (1, 9, 8, 7))
    truth[truth == 2] = 1  # class 2 absent from the truth: NaN (ignored) in both
    oh = lambda t: torch.nn.functional.one_hot(t, 3).movedim(-1, 1)  # noqa: E731
    m = DiceMetric(include_background=False, ignore_empty=True)(oh(pred), oh(truth))[0]
    d = dice_per_class(pred[0].numpy(), truth[0].numpy(), [1, 2])
    assert d[1] == pytest.approx(m[0].item()) and torch.isnan(m[1]) and d[2] != d[2]


def test_seg_data_with_a_rollified_monai_unet(tmp_path):
    pytest.importorskip("nibabel")
    from medconv_ext.tiling import load_tiling_checkpoint
    from medconv_ext.train.seg_demo import make_demo_data
    from medconv_ext.train.seg_files import SegDataConfig, run_seg_data
    data = make_demo_data(str(tmp_path / "ds"), cases=3, size=(16, 16, 16))
    cfg = SegDataConfig(data=data, out=str(tmp_path / "run"), model="medconv_ext.monai:rolling_monai_unet",
                        steps=1, batch_size=2, patch=16, features=4, val_size=1, quiet=True)
    res = run_seg_data(cfg, log=lambda s: None)
    model, info = load_tiling_checkpoint(str(tmp_path / "run" / "model.pt"))
    assert info["builder"] == "medconv_ext.monai:rolling_monai_unet" and info["align"] == [8, 8, 8]
    assert info["kwargs"]["spatial_dims"] == 3 and info["kwargs"]["num_classes"] == 3
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), res["model"].eval()(x))


def test_network_align_of_monai_networks():
    from medconv_ext.train.seg_files import network_align
    assert network_align(SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=4, norm="batch"),
                         3, 1) == 8
    assert network_align(UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                              norm="batch"), 3, 1) == 4
    assert network_align(BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4,) * 6, norm="batch"),
                         2, 1) == 16
