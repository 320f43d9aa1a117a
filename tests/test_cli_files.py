"""File errors of the command-line tools and missing optional packages: one line naming the file (or
the extra to install), exit status 2, nothing left behind."""
import ast
import gzip
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from _tiling_util import integer_weights_
from medconv_ext import _errors
from medconv_ext import tile as tile_cli
from medconv_ext.analysis.__main__ import main as analysis_main
from medconv_ext.models.valid_srnet import valid_srnet
from medconv_ext.tiling import save_tiling_checkpoint
from medconv_ext.train.__main__ import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_error_line(err, path):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and str(path) in lines[0] and "error" in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    net = integer_weights_(valid_srnet(features=2, blocks=1).double().eval())
    save_tiling_checkpoint(net, d / "net.pt")
    x = np.random.default_rng(0).random((1, 30, 30))
    np.save(d / "in.npy", x)
    raw = (d / "in.npy").read_bytes()
    (d / "truncated.npy").write_bytes(raw[:len(raw) // 2])
    (d / "text.npy").write_text("0.5 0.25\n0.125 1.0\n")
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "empty.npy").write_bytes(b"")
    ck = (d / "net.pt").read_bytes()
    (d / "truncated.pt").write_bytes(ck[:len(ck) // 2])
    (d / "text.pt").write_text("not a checkpoint\n")
    return d


def _optional(name):
    return pytest.importorskip(name)


def _make(kind, d):
    """The path of a broken input of `kind` in folder d (made on demand: optional packages)."""
    if kind == "nii.gz":
        nib = _optional("nibabel")
        nib.save(nib.Nifti1Image(np.ones((30, 30, 2), np.float32), np.eye(4)), str(d / "good.nii.gz"))
        raw = (d / "good.nii.gz").read_bytes()
        (d / "truncated.nii.gz").write_bytes(raw[:len(raw) // 2])
        return d / "truncated.nii.gz"
    if kind == "nii":
        nib = _optional("nibabel")
        nib.save(nib.Nifti1Image(np.ones((30, 30, 2), np.float32), np.eye(4)), str(d / "good.nii"))
        raw = (d / "good.nii").read_bytes()
        (d / "truncated.nii").write_bytes(raw[:len(raw) - 100])
        return d / "truncated.nii"
    if kind == "gzip-garbage.nii.gz":
        _optional("nibabel")
        (d / "garbage.nii.gz").write_bytes(gzip.compress(b"\x00" * 10)[:12] + b"\x17" * 50)
        return d / "garbage.nii.gz"
    if kind == "tif":
        tifffile = _optional("tifffile")
        tifffile.imwrite(str(d / "good.tif"), np.ones((2, 30, 30), np.float32))
        raw = (d / "good.tif").read_bytes()
        (d / "truncated.tif").write_bytes(raw[:len(raw) // 2])
        return d / "truncated.tif"
    if kind == "corrupt.tif":
        _optional("tifffile")
        (d / "corrupt.tif").write_bytes(b"II*\x00" + b"\xff" * 64)
        return d / "corrupt.tif"
    if kind == "text.tif":
        _optional("tifffile")
        (d / "text.tif").write_text("hello\n")
        return d / "text.tif"
    if kind == "empty.zarr":
        _optional("zarr")
        (d / "empty.zarr").mkdir(exist_ok=True)
        return d / "empty.zarr"
    if kind == "bad.zarr":
        _optional("zarr")
        (d / "bad.zarr").mkdir(exist_ok=True)
        (d / "bad.zarr" / "zarr.json").write_text("{not json")
        return d / "bad.zarr"
    return d / kind


@pytest.mark.parametrize("kind, problem", [
    ("truncated.npy", "truncated"),
    ("text.npy", "not a NumPy .npy file"),
    ("empty.npy", "not a NumPy .npy file"),
    ("objects.npy", "Python objects"),
    ("missing.npy", "does not exist"),
    ("nii.gz", "truncated"),
    ("nii", "truncated"),
    ("gzip-garbage.nii.gz", "corrupt"),
    ("tif", "truncated"),
    ("corrupt.tif", "not a valid TIFF"),
    ("text.tif", "TIFF"),
    ("empty.zarr", "not a Zarr array or group"),
    ("bad.zarr", "corrupt metadata"),
])
def test_tile_cli_bad_input_one_line_status_2_nothing_written(files, tmp_path, capsys, kind, problem):
    inp = _make(kind, files)
    out = tmp_path / "out.npy"
    rc = tile_cli.main(["--model", str(files / "net.pt"), "--input", str(inp), "--output", str(out),
                        "--tile", "16", "--no-progress"])
    line = _one_error_line(capsys.readouterr().err, inp)
    assert rc == 2 and problem in line, line
    assert sorted(os.listdir(tmp_path)) == []  # no output, no ledger


@pytest.mark.parametrize("name, problem", [("truncated.pt", "truncated"), ("text.pt", "not a PyTorch checkpoint"),
                                           ("missing.pt", "does not exist"), ("in.npy", "not a PyTorch checkpoint")])
def test_tile_cli_unreadable_checkpoint(files, tmp_path, capsys, name, problem):
    out = tmp_path / "out.npy"
    rc = tile_cli.main(["--model", str(files / name), "--input", str(files / "in.npy"), "--output", str(out),
                        "--tile", "16", "--no-progress"])
    line = _one_error_line(capsys.readouterr().err, files / name)
    assert rc == 2 and problem in line, line
    assert sorted(os.listdir(tmp_path)) == []


def test_tile_cli_input_that_fails_while_running_leaves_no_output(files, tmp_path, capsys):
    # a compressed TIFF whose last strip is corrupt: found when that tile is read, after the output
    # was created; the new output and its ledger are removed again
    tifffile = _optional("tifffile")
    _optional("zarr")
    path = tmp_path / "in" / "strips.tif"
    path.parent.mkdir()
    tifffile.imwrite(str(path), np.ones((40, 40), np.float32), compression="zlib", rowsperstrip=8)
    with tifffile.TiffFile(str(path)) as tf:
        off = tf.pages[0].dataoffsets[-1]
    raw = bytearray(path.read_bytes())
    raw[off:off + 16] = b"\x07" * 16
    path.write_bytes(bytes(raw))
    out = tmp_path / "out" / "o.npy"
    out.parent.mkdir()
    rc = tile_cli.main(["--model", str(files / "net.pt"), "--input", str(path), "--output", str(out),
                        "--tile", "16", "--no-progress", "--verify", "0"])
    line = _one_error_line(capsys.readouterr().err, path)
    assert rc == 2 and "corrupt" in line
    assert os.listdir(out.parent) == []


def test_tile_cli_unwritable_output_folder(files, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        rc = tile_cli.main(["--model", str(files / "net.pt"), "--input", str(files / "in.npy"), "--output",
                            str(ro / "o.npy"), "--tile", "16", "--no-progress", "--verify", "0"])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and str(ro) in err and "ermission" in err, err
        assert os.listdir(ro) == []
    finally:
        os.chmod(ro, 0o755)


def test_train_resume_from_unreadable_checkpoint(files, tmp_path, capsys):
    for name, problem in (("truncated.pt", "truncated"), ("text.pt", "not a PyTorch checkpoint"),
                          ("net.pt", "not a checkpoint of python -m medconv_ext.train")):
        rc = train_main(["qsm", "--resume", str(files / name), "--out", str(tmp_path / "run"), "--quiet"])
        line = _one_error_line(capsys.readouterr().err, files / name)
        assert rc == 2 and problem in line, line
    assert not (tmp_path / "run").exists()


def test_analysis_unreadable_checkpoint(files, tmp_path, capsys):
    for name, problem in (("truncated.pt", "truncated"), ("text.pt", "not a PyTorch checkpoint")):
        rc = analysis_main(["report", str(files / name), "--out", str(tmp_path / "rep")])
        err = capsys.readouterr().err
        line = [ln for ln in err.splitlines() if ln.startswith("error")]
        assert rc == 2 and len(line) == 1 and str(files / name) in line[0] and problem in line[0], err
        assert "Traceback" not in err
    assert not (tmp_path / "rep").exists()


# ------------------------------------------------------------------ optional packages
def test_missing_matplotlib_names_the_analysis_extra(tmp_path, monkeypatch, capsys):
    p = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3)).state_dict(), p)
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = analysis_main(["report", str(p), "--out", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "'matplotlib'" in lines[0] and "medconv_ext[analysis]" in lines[0]
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("mod, extra", [("onnxscript", "onnx"), ("onnx", "onnx"), ("zarr", "io"), ("nibabel", "io")])
def test_missing_optional_package_is_one_line_naming_the_extra(monkeypatch, mod, extra):
    monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError) as info:
        _errors.need(mod, "something")
    msg = str(info.value)
    assert "\n" not in msg and "'%s'" % mod in msg and "medconv_ext[%s]" % extra in msg


def test_onnx_export_without_onnxscript_names_the_extra(monkeypatch):
    from medconv_ext.export import onnx_export
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"medconv_ext\[onnx\]"):
        onnx_export(nn.Conv2d(1, 1, 3), (torch.zeros(1, 1, 4, 4),))


def test_setup_extras_cover_every_optional_package():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    extras = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXTRAS" for t in node.targets):
            extras = ast.literal_eval(node.value)
    assert extras is not None, "setup.py defines _EXTRAS"
    names = {e: {r.split(">")[0].split("=")[0].split("<")[0] for r in reqs} for e, reqs in extras.items()}
    assert "matplotlib" in names["analysis"]
    for pkg, extra in _errors.EXTRAS.items():  # every package the messages name is in its extra
        assert pkg in names[extra], (pkg, extra)
    union = set().union(*(v for v in extras.values()))
    src = open(os.path.join(ROOT, "setup.py")).read()
    assert "_EXTRAS[\"all\"] = sorted({req for reqs in _EXTRAS.values() for req in reqs})" in src
    assert union  # 'all' is computed from every extra
