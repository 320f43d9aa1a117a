"""File formats of python -m medconv_ext.tile: every format round-trips exactly (float32 and float64)
through a tiled run that equals full-image inference; NIfTI keeps affine and header; Zarr chunks
follow the tile grid; existing outputs and bad input get clear errors and stay untouched."""
import ast
import hashlib
import os
import sys

import numpy as np
import pytest
import torch

from _tiling_util import full_valid, integer_image, integer_weights_
from medconv_ext.models.valid_srnet import valid_srnet
from medconv_ext.tiling import io as tio
from medconv_ext.tiling import save_tiling_checkpoint
from medconv_ext import tile as tile_cli

zarr = pytest.importorskip("zarr")
tifffile = pytest.importorskip("tifffile")
nib = pytest.importorskip("nibabel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NP = {"float32": np.float32, "float64": np.float64}


def _net(dtype):
    net = integer_weights_(valid_srnet(features=3, blocks=2).double().eval())  # margin 6
    return net.to(torch.float32 if dtype == "float32" else torch.float64)


def _volume(dtype, z=2, h=33, w=27):
    """(Z, H, W) integer-valued volume and the full-image result of the 2D net slice by slice."""
    x = integer_image((z, 1, h, w)).numpy().astype(NP[dtype])
    return x


def _expected(net, x):
    with torch.no_grad():
        return full_valid(net, torch.from_numpy(x), (6, 6)).numpy()


# writer of the input in each format (by its library), and reader of the output in (Z, 1, H, W)
def _write(fmt, path, x):  # x: (Z, 1, H, W)
    if fmt == "npy":
        np.save(path, x)
    elif fmt == "zarr":
        a = zarr.create_array(store=str(path), shape=x.shape, chunks=(1, 1, 16, 16), dtype=x.dtype)
        a[...] = x
    elif fmt == "ome.zarr":  # zyx, no channel axis
        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        axes = [{"name": "z", "type": "space"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
        g.attrs.update({"ome": {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
            {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 0.5, 0.5]}]}]}]}})
        a = g.create_array("s0", shape=x[:, 0].shape, chunks=(1, 16, 16), dtype=x.dtype)
        a[...] = x[:, 0]
    elif fmt == "tif":
        tifffile.imwrite(str(path), x[:, 0], metadata={"axes": "ZYX"})
    elif fmt == "zlib.tif":  # compressed: read through tifffile's Zarr store, not memory-mapped
        tifffile.imwrite(str(path), x[:, 0], compression="zlib", metadata={"axes": "ZYX"})
    else:  # NIfTI (X, Y, Z) = (H, W, Z) of the volume: a 2D net runs on the (X, Y) slices
        aff = np.array([[0.5, 0, 0, -10], [0, 0.7, 0, 3], [0, 0, 2.0, 1], [0, 0, 0, 1]])
        img = nib.Nifti1Image(np.asfortranarray(x[:, 0].transpose(1, 2, 0)), aff)
        img.header["descrip"] = b"test volume"
        nib.save(img, str(path))


def _read(fmt, path):
    if fmt == "npy":
        return np.load(path)
    if fmt == "zarr":
        return zarr.open_array(str(path), mode="r")[...]
    if fmt == "ome.zarr":
        g = zarr.open_group(str(path), mode="r")
        return g["0"][...][:, None]
    if fmt.endswith("tif"):
        return tifffile.imread(str(path))[:, None]
    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 0, 1)[:, None]


def _cli(ck, inp, out, *extra):
    return tile_cli.main(["--model", str(ck), "--input", str(inp), "--output", str(out), "--tile", "20",
                          "--batch-size", "3", "--no-progress"] + list(extra))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("fmt", ["npy", "zarr", "ome.zarr", "tif", "zlib.tif", "nii", "nii.gz"])
def test_format_round_trip_equals_full_image(tmp_path, fmt, dtype):
    net = _net(dtype)
    ck = tmp_path / "net.pt"
    save_tiling_checkpoint(net, ck)
    x = _volume(dtype)
    inp, out = tmp_path / ("in." + fmt), tmp_path / ("out." + fmt.replace("zlib.", ""))
    _write(fmt, inp, x)
    assert _cli(ck, inp, out) == 0
    y = _read(fmt.replace("zlib.", ""), out)
    assert y.dtype == NP[dtype]
    np.testing.assert_array_equal(y, _expected(net, x))
    assert tio.Ledger(out).read_meta()["complete"]


def test_zarr_chunks_follow_tile_grid_and_ome_metadata(tmp_path):
    net = _net("float64")
    save_tiling_checkpoint(net, tmp_path / "net.pt")
    x = _volume("float64")
    _write("zarr", tmp_path / "in.zarr", x)
    assert _cli(tmp_path / "net.pt", tmp_path / "in.zarr", tmp_path / "out.zarr") == 0
    assert zarr.open_array(str(tmp_path / "out.zarr"), mode="r").chunks == (1, 1, 8, 8)  # tile 20 - 2 * margin 6
    _write("ome.zarr", tmp_path / "in.ome.zarr", x)
    assert _cli(tmp_path / "net.pt", tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr") == 0
    g = zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="r")
    ms = g.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [2.0, 0.5, 0.5]
    assert g["0"].chunks == (1, 8, 8)


def test_nifti_keeps_affine_and_header(tmp_path):
    net = _net("float32")
    save_tiling_checkpoint(net, tmp_path / "net.pt")
    x = _volume("float32")
    for ext in ("nii", "nii.gz"):
        _write(ext, tmp_path / ("in." + ext), x)
        assert _cli(tmp_path / "net.pt", tmp_path / ("in." + ext), tmp_path / ("out." + ext)) == 0
        a, b = nib.load(str(tmp_path / ("in." + ext))), nib.load(str(tmp_path / ("out." + ext)))
        np.testing.assert_array_equal(b.affine, a.affine)
        for key in ("pixdim", "qform_code", "sform_code", "srow_x", "srow_z", "descrip", "xyzt_units"):
            np.testing.assert_array_equal(b.header[key], a.header[key])
        assert b.shape == a.shape


def test_reader_layouts_and_channels(tmp_path):
    # a TIFF with a channel axis last (YXS) is read as (C, H, W); a 3D net takes a NIfTI as (1, X, Y, Z)
    rgb = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    tifffile.imwrite(str(tmp_path / "rgb.tif"), rgb, photometric="rgb")
    v = tio.open_image(tmp_path / "rgb.tif", 2).view
    assert v.shape == (3, 5, 4)
    np.testing.assert_array_equal(v[:, 1:3, :], rgb[1:3].transpose(2, 0, 1))
    vol = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii"))
    v = tio.open_image(tmp_path / "v.nii", 3).view
    assert v.shape == (1, 6, 5, 4)
    np.testing.assert_array_equal(v[:, 1:4, :, 2:3], vol[None, 1:4, :, 2:3])
    with pytest.raises(ValueError, match="cannot tell the format"):
        tio.open_image(tmp_path / "v.png", 2)


def _digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)) if os.path.isdir(path) else [("", [], [path])]:
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_existing_output_and_bad_input_leave_data_untouched(tmp_path, capsys):
    net = _net("float64")
    ck = tmp_path / "net.pt"
    save_tiling_checkpoint(net, ck)
    x = _volume("float64")
    np.save(tmp_path / "in.npy", x)
    out = tmp_path / "out.npy"
    np.save(out, np.full(x.shape, 7.0))  # someone's data
    before = _digest(str(out))
    assert _cli(ck, tmp_path / "in.npy", out) == 2
    assert "exists" in capsys.readouterr().err
    assert _cli(ck, tmp_path / "in.npy", out, "--resume") == 2
    assert "no ledger" in capsys.readouterr().err
    assert _cli(ck, tmp_path / "missing.npy", out, "--overwrite") == 2
    assert "does not exist" in capsys.readouterr().err
    np.save(tmp_path / "rank5.npy", x[None, None])
    assert _cli(ck, tmp_path / "rank5.npy", out, "--overwrite") == 2
    assert "has 6 axes" in capsys.readouterr().err
    assert tile_cli.main(["--model", str(ck), "--input", str(tmp_path / "in.npy"), "--output", str(out),
                          "--tile", "12", "--overwrite"]) == 2  # tile 12 <= 2 * margin 6
    assert "larger than twice the margin" in capsys.readouterr().err
    assert _digest(str(out)) == before and not os.path.exists(str(out) + ".ledger")
    # --overwrite replaces it; a second run on the finished output is refused, --resume has nothing to do
    assert _cli(ck, tmp_path / "in.npy", out, "--overwrite") == 0
    np.testing.assert_array_equal(np.load(out), _expected(net, x))
    done = _digest(str(out))
    assert _cli(ck, tmp_path / "in.npy", out) == 2
    assert _cli(ck, tmp_path / "in.npy", out, "--resume") == 0
    assert "complete" in capsys.readouterr().err
    # --resume with other parameters is refused
    assert _cli(ck, tmp_path / "in.npy", out, "--resume", "--pad-mode", "reflect") == 2
    assert "records another run" in capsys.readouterr().err
    assert _digest(str(out)) == done


def test_optional_packages_missing_gives_clear_error(tmp_path, monkeypatch):
    # no module of the package imports them at import time (only inside the functions that need them)
    pkg = os.path.join(ROOT, "medconv_ext", "tiling")
    for f in sorted(os.listdir(pkg)) + ["../tile.py"]:
        if f.endswith(".py"):
            tree = ast.parse(open(os.path.join(pkg, f)).read())
            for node in tree.body:  # module level only
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n.split(".")[0] in ("zarr", "tifffile", "nibabel") for n in names), (f, names)
    for mod, name in (("zarr", "x.zarr"), ("tifffile", "x.tif"), ("nibabel", "x.nii.gz")):
        (tmp_path / name).mkdir() if name.endswith("zarr") else (tmp_path / name).write_bytes(b"")
        monkeypatch.setitem(sys.modules, mod, None)
        with pytest.raises(ImportError, match="'%s' package" % mod):
            tio.open_image(tmp_path / name, 2)


def test_ome_zarr_channel_axis(tmp_path):
    # an OME-Zarr image with axes (c, y, x): read as (C, H, W); an output with 2 channels for a (z, y, x)
    # input gets a 'c' axis in front (OME order), its scale extended by 1
    g = zarr.open_group(str(tmp_path / "c.ome.zarr"), mode="w", zarr_format=3)
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    g.attrs.update({"ome": {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [{"path": "0"}]}]}})
    data = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)
    g.create_array("0", shape=data.shape, chunks=(1, 5, 4), dtype=data.dtype)[...] = data
    v = tio.open_image(tmp_path / "c.ome.zarr", 2).view
    assert v.shape == (2, 5, 4)
    np.testing.assert_array_equal(v[:, 1:3, 2:], data[:, 1:3, 2:])
    x = _volume("float32")
    _write("ome.zarr", tmp_path / "in.ome.zarr", x)
    src = tio.open_image(tmp_path / "in.ome.zarr", 2)
    assert src.view.shape == (2, 1, 33, 27)  # z is the batch axis of a 2D network
    (tmp_path / "o.ledger").mkdir()
    tio.create_output(tmp_path / "o.ome.zarr", src, 2, np.float32, 2, [8, 8], str(tmp_path / "o.ledger"))
    ms = zarr.open_group(str(tmp_path / "o.ome.zarr"), mode="r").attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 0.5, 0.5]
    out = tio.open_output(tmp_path / "o.ome.zarr", 2, str(tmp_path / "o.ledger"))
    assert out.shape == (2, 2, 33, 27)
    blk = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    out[(1, slice(None), slice(8, 16), slice(0, 8))] = blk
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "o.ome.zarr"), mode="r")["0"][:, 1, 8:16, 0:8], blk)


def test_nifti_3d_network_end_to_end(tmp_path):
    net = integer_weights_(valid_srnet(features=2, blocks=1, dims=3).double().eval())  # margin 4
    save_tiling_checkpoint(net, tmp_path / "net3.pt")
    vol = integer_image((13, 12, 11)).numpy()
    nib.save(nib.Nifti1Image(np.asfortranarray(vol), np.diag([1.0, 2.0, 3.0, 1.0])), str(tmp_path / "v.nii.gz"))
    assert tile_cli.main(["--model", str(tmp_path / "net3.pt"), "--input", str(tmp_path / "v.nii.gz"), "--output",
                          str(tmp_path / "o.nii.gz"), "--tile", "12,11,10", "--no-progress"]) == 0
    out = nib.load(str(tmp_path / "o.nii.gz"))
    assert out.shape == vol.shape
    with torch.no_grad():
        full = full_valid(net, torch.from_numpy(vol)[None, None], (4, 4, 4))[0, 0].numpy()
    np.testing.assert_array_equal(np.asarray(out.dataobj), full)
    np.testing.assert_array_equal(out.affine, np.diag([1.0, 2.0, 3.0, 1.0]))
