"""receptive_margin / receptive_radius values, bad input, checkpoints, the CLI, the progress bar."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from _tiling_util import UNet, dilated_net, full_valid, integer_image, integer_weights_
from medconv_ext.models.valid_srnet import SRNet, valid_srnet
from medconv_ext.nn import RollingConv2d
from medconv_ext.tiling import (_Progress, load_tiling_checkpoint, predict_tiled, receptive_margin,
                                receptive_radius, register_tiling_builder, save_tiling_checkpoint)
from medconv_ext import tile as tile_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ receptive field
def test_receptive_margin_values():
    assert receptive_margin(valid_srnet(features=2), 2) == (16, 16)
    assert receptive_margin(valid_srnet(features=2, blocks=2, dims=3), 3) == (6, 6, 6)
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2), nn.ReLU(), nn.Conv2d(2, 2, (3, 5)), nn.BatchNorm2d(2),
                        RollingConv2d(2, 2, 3), nn.Dropout(0.1))
    assert receptive_margin(seq, 2) == (2 + 1 + 1, 2 + 2 + 1)
    out = seq.eval()(torch.zeros(1, 1, 20, 20))
    assert out.shape[2:] == (20 - 8, 20 - 10)


@pytest.mark.parametrize("model, msg", [
    (SRNet(1, 2, 1, 2, padding=1), "padded"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, stride=2)), "stride"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)), "resamples"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, affine=True)), "whole image"),
    (nn.Sequential(nn.Conv2d(1, 2, 2)), "even extent"),
    (nn.Sequential(nn.ReLU()), "no convolution"),
    (nn.Sequential(nn.Conv3d(1, 2, 3)), "3D convolution"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Bilinear(2, 2, 2)), "cannot tell"),
])
def test_receptive_margin_errors(model, msg):
    with pytest.raises(ValueError, match=msg):
        receptive_margin(model, 2)


def test_receptive_radius_values():
    assert receptive_radius(SRNet(1, 2, 7, 2, padding=1), 2) == (16, 16)
    assert receptive_radius(dilated_net(), 2) == (6, 6)
    assert receptive_radius(dilated_net(), 2, method="probe") == (6, 6)
    assert receptive_radius(dilated_net(dims=3), 3, method="probe", probe_size=24) == (6, 6, 6)
    unet = UNet(levels=2).eval()
    assert receptive_radius(unet, 2, align=4) == (14, 14)  # <= true radius + align - 1
    with pytest.raises(ValueError, match="analytic"):
        receptive_radius(unet, 2, method="analytic")
    glob = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.InstanceNorm2d(2))
    with pytest.raises(ValueError, match="whole image"):
        receptive_radius(glob, 2)

    class Global(nn.Module):  # unknown module: probed; the field covers the whole probe
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y - y.mean(dim=(2, 3), keepdim=True)

    with pytest.raises(ValueError, match="border"):
        receptive_radius(Global(), 2, probe_size=16)
    with pytest.raises(ValueError, match="same-size"):
        receptive_radius(valid_srnet(features=2, blocks=1), 2, method="probe")
    with pytest.raises(ValueError, match="spatial_dims"):
        receptive_radius(dilated_net(), 4)
    with pytest.raises(TypeError, match="nn.Module"):
        receptive_margin(lambda x: x, 2)


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def vnet():
    return valid_srnet(features=2, blocks=1).eval()  # margin 4


def test_bad_tile_margin_halo_align(vnet):
    x = torch.zeros(1, 1, 20, 20)
    with pytest.raises(ValueError, match="larger than twice the margin"):
        predict_tiled(vnet, x, 8)
    with pytest.raises(ValueError, match="larger than twice the margin"):
        predict_tiled(vnet, x, (9, 8), margin=4)
    pnet = SRNet(1, 2, 1, 2, padding=1).eval()
    with pytest.raises(ValueError, match="larger than twice the halo"):
        predict_tiled(pnet, x, 8, halo=4)
    unet = UNet(levels=2).eval()
    x32 = torch.zeros(1, 1, 64, 64)
    with pytest.raises(ValueError, match="multiple of align"):
        predict_tiled(unet, x32, 30, halo=4, align=4)
    with pytest.raises(ValueError, match="not a multiple of align"):
        predict_tiled(unet, torch.zeros(1, 1, 66, 64), 32, halo=4, align=4)
    with pytest.raises(ValueError, match="less than align"):
        predict_tiled(unet, x32, 32, halo=15, align=4)
    with pytest.raises(ValueError, match="align applies to halo mode"):
        predict_tiled(vnet, x, 16, align=2)
    with pytest.raises(ValueError, match="not both"):
        predict_tiled(vnet, x, 16, margin=4, halo=4)
    with pytest.raises(TypeError, match="tile"):
        predict_tiled(vnet, x, 16.0)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        predict_tiled(vnet, x, 16, margin=-1)


def test_margin_undeterminable_and_wrong(vnet):
    x = torch.zeros(1, 1, 20, 20)
    with pytest.raises(ValueError, match="cannot be determined.*halo="):
        predict_tiled(SRNet(1, 2, 1, 2, padding=1).eval(), x, 16)
    with pytest.raises(ValueError, match="cannot be determined"):
        predict_tiled(lambda t: t, x, (16, 16))
    with pytest.raises(ValueError, match=r"margin \(3, 3\) is smaller than the model's receptive field \(4, 4\).*"
                                         r"check_receptive_field=False"):
        predict_tiled(vnet, x, 16, margin=3)
    with pytest.raises(ValueError, match="margin \\[3, 3\\] is wrong"):  # the tile-size check behind it
        predict_tiled(vnet, x, 16, margin=3, check_receptive_field=False)
    with pytest.raises(ValueError, match="output has its input.s size"):
        predict_tiled(vnet, x, 16, halo=2)


def test_mismatched_dims(vnet):
    with pytest.raises(ValueError, match="mismatched dims"):
        predict_tiled(vnet, torch.zeros(1, 1, 1, 20, 20), 16)
    with pytest.raises(ValueError, match="mismatched dims"):
        predict_tiled(vnet, torch.zeros(20, 20), 16)
    with pytest.raises(ValueError, match="mismatched spatial dims"):
        predict_tiled(vnet, torch.zeros(1, 20, 20, 20), (16, 16, 16))
    with pytest.raises(ValueError, match="mismatched spatial dims"):
        predict_tiled(vnet, torch.zeros(1, 20, 20), 16, margin=(4, 4, 4))
    with pytest.raises(ValueError, match="2D or 3D"):
        predict_tiled(lambda t: t, torch.zeros(1, 20, 20), 16, margin=0)


def test_bad_out(vnet):
    x = torch.zeros(2, 1, 20, 18)
    with pytest.raises(ValueError, match="out must have shape"):
        predict_tiled(vnet, x, 16, out=torch.empty(2, 1, 20, 20))
    with pytest.raises(ValueError, match="out must have shape"):
        predict_tiled(vnet, x, 16, out=torch.empty(1, 20, 18))
    with pytest.raises(ValueError, match="out must have shape"):  # wrong channel count, found at the first batch
        predict_tiled(vnet, x, 16, out=torch.empty(2, 3, 20, 18), progress=False)
    with pytest.raises(TypeError, match="floating-point"):
        predict_tiled(vnet, x, 16, out=torch.empty(2, 1, 20, 18, dtype=torch.int32))
    with pytest.raises(TypeError, match="floating-point"):
        predict_tiled(vnet, x, 16, out=np.empty((2, 1, 20, 18), dtype=np.int16))
    with pytest.raises(TypeError, match="without loss"):
        predict_tiled(vnet, x, 16, out=torch.empty(2, 1, 20, 18, dtype=torch.float16), progress=False)
    with pytest.raises(TypeError, match="out must be"):
        predict_tiled(vnet, x, 16, out=[0.0])


def test_bad_image_and_options(vnet):
    with pytest.raises(TypeError, match="image must be"):
        predict_tiled(vnet, [[0.0]], 16)
    with pytest.raises(TypeError, match="real numeric"):
        predict_tiled(vnet, torch.zeros(1, 20, 20, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="empty spatial"):
        predict_tiled(vnet, torch.zeros(1, 0, 20), 16)
    with pytest.raises(ValueError, match="pad_mode must be"):
        predict_tiled(vnet, torch.zeros(1, 20, 20), 16, pad_mode="zeros")
    with pytest.raises(ValueError, match="pad_mode applies"):
        predict_tiled(SRNet(1, 2, 1, 2, padding=1).eval(), torch.zeros(1, 20, 20), 16, halo=4, pad_mode="reflect")
    with pytest.raises(ValueError, match="batch_size"):
        predict_tiled(vnet, torch.zeros(1, 20, 20), 16, batch_size=0)
    with pytest.raises(TypeError, match="nn.Module"):
        predict_tiled(42, torch.zeros(1, 20, 20), 16)


def test_training_mode_with_batchnorm_is_an_error():
    unet = UNet(levels=1)
    assert unet.training
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        predict_tiled(unet, torch.zeros(1, 1, 16, 16), 16, halo=2, align=2)
    # training mode without BatchNorm/Dropout is harmless
    net = valid_srnet(features=2, blocks=1).train()
    y = predict_tiled(net, torch.zeros(1, 1, 16, 16), 16, progress=False)
    assert y.shape == (1, 1, 16, 16)


def test_image_smaller_than_tile_and_dtype_cast():
    net = integer_weights_(valid_srnet(features=2, blocks=1).double().eval())
    x = integer_image((1, 3, 2), dtype=torch.float32)  # smaller than the margin itself
    y = predict_tiled(net, x, 64, progress=False)
    assert y.dtype == torch.float64 and y.shape == (1, 3, 2)
    assert torch.equal(y, full_valid(net, x[None].double(), (4, 4))[0])


def test_progress_bar(capsys):
    bar = _Progress(10, True, delay=0.0, every=0.0)
    bar.update(5)
    bar.update(10)
    bar.close()
    err = capsys.readouterr().err
    assert "5/10 tiles" in err and "10/10 tiles" in err and err.endswith("\n")
    quiet = _Progress(10, False, delay=0.0)
    quiet.update(10)
    quiet.close()
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ checkpoints and CLI
def test_checkpoint_roundtrip_and_errors(tmp_path):
    net = SRNet(1, 3, 2, 3, padding=1).double().eval()
    path = tmp_path / "m.pt"
    save_tiling_checkpoint(net, path, halo=6)
    model, info = load_tiling_checkpoint(path)
    assert info["builder"] == "srnet" and info["halo"] == 6 and info["dtype"] == "float64"
    assert not model.training
    for a, b in zip(net.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="builder_spec"):
        save_tiling_checkpoint(nn.Conv2d(1, 1, 3), tmp_path / "x.pt")
    with pytest.raises(ValueError, match="unknown builder"):
        save_tiling_checkpoint(net, tmp_path / "x.pt", builder="os:system")
    # a builder named by module path inside the package, and a registered one
    v = valid_srnet(features=2, blocks=1)
    save_tiling_checkpoint(v, tmp_path / "v.pt", builder="medconv_ext.models.valid_srnet:valid_srnet",
                           kwargs=dict(features=2, blocks=1))
    assert torch.equal(load_tiling_checkpoint(tmp_path / "v.pt")[0].head.weight, v.head.weight)
    register_tiling_builder("test_dilated", lambda dims=2: dilated_net(dims=dims))
    d = dilated_net()
    save_tiling_checkpoint(d, tmp_path / "d.pt", builder="test_dilated", kwargs={}, halo=6)
    assert torch.equal(load_tiling_checkpoint(tmp_path / "d.pt")[0][2].weight, d[2].weight)
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a tiling checkpoint"):
        load_tiling_checkpoint(tmp_path / "plain.pt")


def _ckpt_and_input(tmp_path):
    net = integer_weights_(valid_srnet(features=3, blocks=2).double().eval())
    save_tiling_checkpoint(net, tmp_path / "srnet.pt")
    x = integer_image((2, 1, 33, 27))
    np.save(tmp_path / "in.npy", x.numpy())
    return net, x, full_valid(net, x, (6, 6)).numpy()


def test_cli_in_process(tmp_path, capsys):
    net, x, full = _ckpt_and_input(tmp_path)
    rc = tile_cli.main(["--model", str(tmp_path / "srnet.pt"), "--input", str(tmp_path / "in.npy"),
                        "--output", str(tmp_path / "out.npy"), "--tile", "20", "--batch-size", "3", "--no-progress"])
    assert rc == 0
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, full)
    # halo checkpoint of the padded twin, float32 output file
    pnet = integer_weights_(SRNet(1, 3, 2, 2, padding=1).double().eval())
    save_tiling_checkpoint(pnet, tmp_path / "p.pt", halo=6)
    rc = tile_cli.main(["--model", str(tmp_path / "p.pt"), "--input", str(tmp_path / "in.npy"),
                        "--output", str(tmp_path / "out2.npy"), "--tile", "18,16", "--out-dtype", "float32",
                        "--no-progress"])
    assert rc == 0
    with torch.no_grad():
        np.testing.assert_array_equal(np.load(tmp_path / "out2.npy"), pnet(x).numpy().astype(np.float32))
    # a bad request: a clear message and exit status 2
    rc = tile_cli.main(["--model", str(tmp_path / "srnet.pt"), "--input", str(tmp_path / "in.npy"),
                        "--output", str(tmp_path / "out3.npy"), "--tile", "12"])
    assert rc == 2
    assert "larger than twice the margin" in capsys.readouterr().err


def test_cli_subprocess(tmp_path):
    net, x, full = _ckpt_and_input(tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "medconv_ext.tile", "--model", str(tmp_path / "srnet.pt"),
                        "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "out.npy"), "--tile", "24"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), full)
