"""Every builder of medconv_ext.models through a tiling checkpoint: the model records its builder_spec,
save_tiling_checkpoint(model, path) computes and stores margin or halo and align, load_tiling_checkpoint
rebuilds it, and the tile command line (which takes margin/halo/align from the checkpoint) reproduces
full-image inference. Small instances, float64 (tiled and full-image results agree to rounding)."""
import numpy as np
import pytest
import torch
from torch import nn

from medconv_ext import models as Z
from medconv_ext.tiling import cli as tile_cli
from medconv_ext.tiling import load_tiling_checkpoint, receptive_radius, save_tiling_checkpoint

SEG2D = dict(in_channels=1, num_classes=2, features=2)
QSM3D = dict(in_channels=1, out_channels=1, features=1)

# builder, kwargs, image (C, *spatial), tile (None: one tile larger than the image), stored mode, align.
# The U-Nets' halo is their receptive radius on the 2**depth grid (109 for the 2D UNets at any width),
# so a 2D tile of 256 leaves 38 voxels per tile and a 384-voxel axis takes several tiles.
CASES = [
    ("unet", SEG2D, (1, 384, 48), 256, "halo", 16),
    ("rolling_unet", SEG2D, (1, 384, 48), 256, "halo", 16),
    ("depthwise_unet", SEG2D, (1, 384, 48), 256, "halo", 16),
    ("flattened_unet", SEG2D, (1, 384, 48), 256, "halo", 16),
    ("medic_seg", dict(in_channels=3, num_classes=2, features=2, convs_per_block=1), (3, 448, 64), 288, "halo", 32),
    ("valid_srnet", dict(in_channels=1, features=2, blocks=1), (1, 41, 33), 16, "margin", 1),
    ("valid_srnet", dict(in_channels=1, features=2, blocks=1, dims=3), (1, 19, 17, 21), 12, "margin", 1),
    # the 3D QSMnets' receptive radius (about 200 voxels at depth 4 with 5x5x5 kernels) asks for tiles
    # above 400^3: here one tile covers the 32^3 image, which checks the checkpoint and the command line
    ("qsmnet", QSM3D, (1, 32, 32, 32), None, "halo", 16),
    ("rolling_qsmnet", QSM3D, (1, 32, 32, 32), None, "halo", 16),
    ("depthwise_qsmnet", QSM3D, (1, 32, 32, 32), None, "halo", 16),
    ("flattened_qsmnet", QSM3D, (1, 32, 32, 32), None, "halo", 16),
]
CLASSIFIERS = [
    ("resnet18", dict(num_classes=3, in_channels=3, features=2), (1, 3, 32, 32)),
    ("rolling_resnet18", dict(num_classes=3, in_channels=3, features=2), (1, 3, 32, 32)),
    ("medic_cls", dict(in_channels=3, num_classes=4, features=2), (1, 3, 28, 28)),
]


def test_every_builder_is_covered():
    assert sorted({c[0] for c in CASES} | {c[0] for c in CLASSIFIERS}) == sorted(Z.BUILDERS)


def _build(name, kwargs, seed=0):
    torch.manual_seed(seed)
    model = getattr(Z, name)(**kwargs)
    for m in model.modules():  # BatchNorm statistics away from the identity, so that the state dict matters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


def _save(model, path, dims):
    if dims == 3 and isinstance(model, Z.UNet):
        # the 3D QSMnet field (radius about 200) is wider than receptive_radius's largest 3D probe (128
        # voxels): only an analytic U-Net radius measures it
        try:
            receptive_radius(model, 3, align=model.tiling_align, method="analytic")
        except ValueError as e:
            pytest.skip("receptive_radius has no analytic radius for the 3D U-Nets in this version (%s)" % e)
    save_tiling_checkpoint(model, path)


@pytest.mark.parametrize("name,kwargs,shape,tile,mode,align", CASES,
                         ids=["%s-%dd" % (c[0], len(c[2]) - 1) for c in CASES])
def test_zoo_checkpoint_and_tile_cli_equal_full_image(tmp_path, name, kwargs, shape, tile, mode, align):
    model = _build(name, kwargs)
    assert model.builder_spec[0] == name
    dims = len(shape) - 1
    ck = tmp_path / "model.pt"
    _save(model, ck, dims)
    info = torch.load(ck, weights_only=True)
    assert info["builder"] == name and info["kwargs"] == model.builder_spec[1]
    assert info["align"] == align
    if mode == "margin":
        assert info["halo"] is None and info["margin"] == [model.margin] * dims
    else:
        assert info["margin"] is None and len(info["halo"]) == dims and min(info["halo"]) > 0
        if tile is None:  # one tile for the whole image: the smallest tile the halo allows
            tile = -(-(2 * max(info["halo"]) + align) // align) * align
        else:
            assert tile > 2 * max(info["halo"]) + align - 1
    # the rebuilt model is the saved one
    loaded, _ = load_tiling_checkpoint(ck)
    assert type(loaded) is type(model) and not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    np.save(tmp_path / "in.npy", x.numpy())
    rc = tile_cli.main(["--model", str(ck), "--input", str(tmp_path / "in.npy"), "--output",
                        str(tmp_path / "out.npy"), "--tile", str(tile), "--verify", "0", "--no-progress"])
    assert rc == 0
    got = torch.from_numpy(np.load(tmp_path / "out.npy"))
    with torch.no_grad():  # a valid network's output keeps the image size: the image is padded by the margin
        full = model(torch.nn.functional.pad(x[None], [model.margin] * 2 * dims) if mode == "margin" else x[None])[0]
    assert got.shape == full.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-9 * float(full.abs().max()))


@pytest.mark.parametrize("name,kwargs,shape", CLASSIFIERS, ids=[c[0] for c in CLASSIFIERS])
def test_classifiers_record_their_spec_but_cannot_be_tiled(tmp_path, name, kwargs, shape):
    """A classifier's output is not an image: save_tiling_checkpoint refuses to compute a halo (naming the
    layer); its builder_spec still rebuilds it (a checkpoint with an explicit halo loads)."""
    model = _build(name, kwargs)
    assert model.builder_spec[0] == name and kwargs.items() <= model.builder_spec[1].items()
    with pytest.raises(ValueError, match="cannot be tiled: layer '.*'"):
        save_tiling_checkpoint(model, tmp_path / "c.pt")
    save_tiling_checkpoint(model, tmp_path / "c.pt", halo=1)
    loaded, info = load_tiling_checkpoint(tmp_path / "c.pt")
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_classes_built_directly_record_their_spec(tmp_path):
    """A UNet built from the class (as from_published does) records the class and every argument."""
    net = Z.UNet(2, 1, 2, 2, 3, kind="rolling", first_kind="dense", depth=2).double().eval()
    assert net.builder_spec[0] == "medconv_ext.models:UNet" and net.tiling_align == 4
    save_tiling_checkpoint(net, tmp_path / "u.pt")
    loaded, info = load_tiling_checkpoint(tmp_path / "u.pt")
    assert info["align"] == 4 and info["halo"] is not None
    x = torch.randn(1, 1, 16, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    seg = Z.MedICSegmenter(3, 2, 2, levels=3, convs_per_block=1)
    assert seg.builder_spec[0] == "medconv_ext.models:MedICSegmenter" and seg.tiling_align == 4


def test_models_that_change_layout_drop_their_spec(tmp_path):
    net = Z.unet(1, 2, features=2)
    assert net.builder_spec[0] == "unet"
    assert Z.to_roll_loop(Z.rolling_unet(1, 2, features=2)).builder_spec is None
    Z.rollify(net)
    assert net.builder_spec is None  # unet(...) would rebuild the dense layers
    with pytest.raises(ValueError, match="no builder_spec.*rollify"):
        save_tiling_checkpoint(net, tmp_path / "r.pt")


def test_halo_and_align_arguments(tmp_path):
    """Given values are stored as they are; a resampling model without tiling_align needs align=."""
    net = _build("rolling_unet", SEG2D)
    save_tiling_checkpoint(net, tmp_path / "a.pt", halo=120)
    info = torch.load(tmp_path / "a.pt", weights_only=True)
    assert (info["halo"], info["align"], info["margin"]) == (120, 16, None)
    plain = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.ConvTranspose2d(2, 1, 2, stride=2))
    with pytest.raises(ValueError, match="pass align="):
        save_tiling_checkpoint(plain, tmp_path / "p.pt", builder="unet", kwargs={})
