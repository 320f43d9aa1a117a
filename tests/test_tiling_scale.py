"""Tiled inference at scale: 2 processes under torchrun, resume after SIGKILL, skipping empty space,
refusing layers that break crop equivariance, and the pre-run exactness check."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from _tiling_util import dilated_net, full_valid, integer_image, integer_weights_
from medconv_ext import tile as tile_cli
from medconv_ext.models.valid_srnet import valid_srnet
from medconv_ext.tiling import (check_crop_equivariance, io as tio, predict_tiled, save_tiling_checkpoint,
                                verify_tiling)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(tmp_path, shape=(3, 1, 41, 37)):
    net = integer_weights_(valid_srnet(features=3, blocks=2).double().eval())  # margin 6
    save_tiling_checkpoint(net, tmp_path / "net.pt")
    x = integer_image(shape)
    np.save(tmp_path / "in.npy", x.numpy())
    with torch.no_grad():
        return net, x, full_valid(net, x, (6, 6)).numpy()


def _env(**extra):
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                **extra)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tmp_path, out, *extra):
    return ["--model", str(tmp_path / "net.pt"), "--input", str(tmp_path / "in.npy"), "--output", str(out),
            "--tile", "24", "--batch-size", "2", "--no-progress", "--stats", str(tmp_path / "stats.json")] + list(extra)


def test_torchrun_two_processes_bit_identical(tmp_path):
    net, x, full = _setup(tmp_path)
    out = tmp_path / "out.zarr"  # Zarr: both processes write chunks of one array
    cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "medconv_ext.tile"] + \
        _args(tmp_path, out)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    zarr = pytest.importorskip("zarr")
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[...], full)
    stats = json.load(open(tmp_path / "stats.json"))
    assert stats["processes"] == 2 and stats["tiles_run"] == stats["tiles"] == 3 * 4 * 4


@pytest.mark.parametrize("where", ["", ":data"])
def test_sigkill_then_resume_bit_identical(tmp_path, where, capsys):
    net, x, full = _setup(tmp_path)
    out = tmp_path / "out.npy"
    cmd = [sys.executable, "-W", "ignore", "-m", "medconv_ext.tile"] + _args(tmp_path, out)
    # killed with SIGKILL after 5 tiles (after their ledger flags, or after their data but before the flags)
    r = subprocess.run(cmd, env=_env(MEDCONV_TILING_TEST_KILL="5" + where), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -9, r.stderr[-3000:]
    done = tio.Ledger(out).done()
    assert 0 < done.sum() < done.size and not tio.Ledger(out).read_meta()["complete"]
    n_before = int(done.sum())
    assert n_before == (6 if where == "" else 4)  # batches of 2: flags of 3 batches, or of 2
    # the rest in this process (a subprocess costs seconds of start-up)
    assert tile_cli.main(_args(tmp_path, out)) == 2  # no --resume: refused
    assert "--resume" in capsys.readouterr().err
    assert tile_cli.main(_args(tmp_path, out, "--resume")) == 0
    stats = json.load(open(tmp_path / "stats.json"))
    assert stats["tiles_before"] == n_before and stats["tiles_run"] == stats["tiles"] - n_before
    np.testing.assert_array_equal(np.load(out), full)


def test_skip_empty_space():
    net = integer_weights_(valid_srnet(features=3, blocks=2).double().eval())
    x = torch.zeros(1, 1, 40, 52, dtype=torch.float64)
    x[0, 0, 3:9, 30:37] = integer_image((6, 7), high=3) + 1
    full = full_valid(net, x, (6, 6))
    y_all = predict_tiled(net, x, 16, progress=False)
    assert torch.equal(y_all, full)  # off by default: every tile is run
    y = predict_tiled(net, x, 16, progress=False, foreground_threshold=0.5, background=-1.0)
    # tiles whose input window (output region + margin 6) touches the object are exact; others are -1
    near = torch.zeros(40, 52, dtype=torch.bool)
    for i0 in range(0, 40, 4):
        for j0 in range(0, 52, 4):
            if (x[0, 0, max(i0 - 6, 0):i0 + 4 + 6, max(j0 - 6, 0):j0 + 4 + 6] > 0.5).any():
                near[i0:i0 + 4, j0:j0 + 4] = True
    assert torch.equal(y[0, 0][near], full[0, 0][near])
    assert (y[0, 0][~near] == -1.0).all() and (~near).any()
    # a coarse mask (one voxel per 4x4 block of the image): only its nonzero area is run
    mask = np.zeros((10, 13), dtype=np.uint8)
    mask[0:3, 7:10] = 1
    ym = predict_tiled(net, x, 16, progress=False, mask=mask)
    assert torch.equal(ym[0, 0, 0:12, 28:40], full[0, 0, 0:12, 28:40])
    assert (ym[0, 0, 20:, :] == 0).all()
    with pytest.raises(ValueError, match="mask must have 2 spatial axes"):
        predict_tiled(net, x, 16, progress=False, mask=np.ones((2, 40, 52)))
    with pytest.raises(ValueError, match="larger than the image"):
        predict_tiled(net, x, 16, progress=False, mask=np.ones((41, 52)))


@pytest.mark.parametrize("layer, why", [
    (nn.InstanceNorm2d(2), "own mean and variance"),
    (nn.GroupNorm(1, 2), "all of space"),
    (nn.LayerNorm([8, 8]), "all of space"),
    (nn.AdaptiveAvgPool2d(1), "global pooling"),
    (nn.MultiheadAttention(2, 1), "attention over space"),
])
def test_layers_breaking_crop_equivariance_refused(layer, why):
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), layer, nn.Conv2d(2, 1, 1)).eval()
    with pytest.raises(ValueError, match=why):
        check_crop_equivariance(net)
    with pytest.raises(ValueError, match="exact tiled inference refused"):
        predict_tiled(net, torch.zeros(1, 1, 20, 20), 16, halo=2, progress=False)
    bn = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="model.eval"):
        predict_tiled(bn, torch.zeros(1, 1, 20, 20), 16, halo=2, progress=False)
    check_crop_equivariance(bn.eval())  # BatchNorm in eval mode is per-voxel: accepted
    check_crop_equivariance(nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, track_running_stats=True)).eval())


def test_verify_tiling_detects_too_small_halo():
    net = integer_weights_(dilated_net().double().eval())  # receptive radius 6
    x = integer_image((1, 1, 37, 50))
    res = verify_tiling(net, x, (20, 23), halo=6, n_tiles=3)
    assert res["bit_identical"] and res["max_abs_diff"] == 0 and len(res["tiles"]) >= 3
    with pytest.raises(ValueError, match="below the network's receptive field"):
        verify_tiling(net, x, (20, 23), halo=3, n_tiles=3)
    vnet = integer_weights_(valid_srnet(features=3, blocks=2).double().eval())
    assert verify_tiling(vnet, x, 16, pad_mode="reflect")["bit_identical"]
    with pytest.raises(ValueError, match="the margin \\[4, 4\\] is wrong"):
        verify_tiling(vnet, x, 16, margin=4, n_tiles=2)


def test_plan_regions_cover_once_on_chunk_grid():
    """Every output voxel is written by exactly one tile, and every tile's region starts and ends on the
    chunk grid (so parallel writers never share a Zarr chunk); tile origins stay on the align grid."""
    from medconv_ext.tiling.plan import _axis_plan
    rng = np.random.default_rng(0)
    for _ in range(400):
        a = int(rng.choice([1, 2, 4, 8]))
        h, m = int(rng.integers(0, 12)), int(rng.integers(0, 6))
        halo_mode = bool(rng.integers(0, 2))
        if halo_mode:
            t = -(-int(rng.integers(2 * h + a, 2 * h + a + 30)) // a) * a
            s = int(rng.integers(1, 150))
            s = -(-s // a) * a if s > t else s
            ext, plan, step = _axis_plan(s, t, 0, h, a)
        else:
            a, t, s = 1, int(rng.integers(2 * m + 1, 2 * m + 30)), int(rng.integers(1, 150))
            ext, plan, step = _axis_plan(s, t, m, 0, 1)
        hits = np.zeros(s, dtype=int)
        for q, d0, d1, off in plan:
            assert d0 % step == 0 and (d1 % step == 0 or d1 == s)
            if halo_mode:
                assert q % a == 0 and 0 <= q <= s - ext
                assert (q == 0 or d0 >= q + h) and (q + ext == s or d1 <= q + ext - h)
            hits[d0:d1] += 1
        assert (hits == 1).all()


def test_cli_mask_skips_tiles(tmp_path):
    net, x, full = _setup(tmp_path)
    mask = np.zeros((3, 1, 41, 37), dtype=np.uint8)  # one mask per image of the batch
    mask[:, :, :10, :10] = 1  # only the top-left corner is foreground...
    mask[2, :, 30:, 30:] = 1  # ...and, in the last image, the bottom-right one
    np.save(tmp_path / "mask.npy", mask)
    out = tmp_path / "out.npy"
    assert tile_cli.main(_args(tmp_path, out, "--mask", str(tmp_path / "mask.npy"), "--background", "-5")) == 0
    st = json.load(open(tmp_path / "stats.json"))
    assert st["tiles_skipped"] > 0 and st["tiles_run"] + st["tiles_skipped"] == st["tiles"]
    y = np.load(out)
    np.testing.assert_array_equal(y[:, :, :12, :12], full[:, :, :12, :12])  # tile 24, step 12
    assert (y[:2, :, 24:, :] == -5).all()
    np.testing.assert_array_equal(y[2, :, 36:, 36:], full[2, :, 36:, 36:])
