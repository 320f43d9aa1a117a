"""`seg --data`: Decathlon and nnU-Net raw datasets (2D, 3D, multi-channel), resume, outputs, the
normalisation round trip through `tile --argmax` on volumes that are not multiples of the
network's alignment, and every bad input (one clear error naming the file, before training)."""
import json
import os

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel", reason="the dataset readers need nibabel (the 'io' extra)")

from medconv_ext.tiling import load_tiling_checkpoint, save_tiling_checkpoint  # noqa: E402
from medconv_ext.tiling.cli import main as tile_main  # noqa: E402
from medconv_ext.tiling.normalize import (NORM_FORMAT, NormalizedView, apply_normalization,  # noqa: E402
                                          fit_normalization)
from medconv_ext.train.__main__ import main as train_main  # noqa: E402
from medconv_ext.train.seg_dataset import DatasetError, load_cases, read_dataset, split_cases  # noqa: E402
from medconv_ext.train.seg_demo import make_case, make_demo_data  # noqa: E402
from medconv_ext.train.seg_files import (PatchSampler, SegDataConfig, dice_ce_loss, dice_per_class,  # noqa: E402
                                         run_seg_data, unet_radius_bound)
from medconv_ext.train.seg_models import rolling_unet3d  # noqa: E402

from _train_util import no_log  # noqa: E402


def _demo(tmp_path, name="ds", **kw):
    kw.setdefault("cases", 4)
    kw.setdefault("size", (16, 16, 16))
    return make_demo_data(str(tmp_path / name), **kw)


def _cfg(data, out, **kw):
    base = dict(data=data, out=str(out), steps=2, batch_size=1, patch=16, features=2, ckpt_every=1, quiet=True,
                val_size=1)
    base.update(kw)
    return SegDataConfig(**base)


# ------------------------------------------------------------------ layouts
def test_both_layouts_are_detected_and_read(tmp_path):
    d = read_dataset(_demo(tmp_path, "dec"))
    assert d.layout == "decathlon" and d.labels == {0: "background", 1: "organ", 2: "lesion"}
    assert d.channel_names == ["MR"] and len(d.cases) == 4
    n = read_dataset(_demo(tmp_path, "nn", layout="nnunet", channels=2, modality="MR"))
    assert n.layout == "nnunet" and n.labels == d.labels and n.channel_names == ["MR0", "MR1"]
    assert [len(c.images) for c in n.cases] == [2] * 4 and n.cases[0].images[1].endswith("_0001.nii.gz")
    cases = load_cases(n)
    assert cases[0].image.shape == (2, 16, 16, 16) and cases[0].label.shape == (16, 16, 16)
    # the same case in both layouts reads the same (channel by channel)
    dd = read_dataset(_demo(tmp_path, "dec2", channels=2))
    a, b = load_cases(dd)[1], cases[1]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert set(np.unique(a.label)) == {0, 1, 2}


def test_demo_data_is_deterministic():
    i1, l1 = make_case(3, (20, 18, 16), seed=5)
    i2, l2 = make_case(3, (20, 18, 16), seed=5)
    assert np.array_equal(i1, i2) and np.array_equal(l1, l2) and i1.shape == (20, 18, 16)
    i3, _ = make_case(4, (20, 18, 16), seed=5)
    assert not np.array_equal(i1, i3)


def test_split_is_seeded_and_named(tmp_path):
    d = read_dataset(_demo(tmp_path, cases=5))
    tr, va = split_cases(d, None, None, seed=0)
    assert len(va) == 1 and sorted(tr + va) == [c.name for c in d.cases]
    assert split_cases(d, None, None, seed=0) == (tr, va)
    tr2, va2 = split_cases(d, "demo_001,demo_004", None, 0)
    assert va2 == ["demo_001", "demo_004"] and "demo_001" not in tr2
    with pytest.raises(DatasetError, match="demo_999"):
        split_cases(d, "demo_999", None, 0)
    with pytest.raises(DatasetError, match="at least one case must remain"):
        split_cases(d, None, 5, 0)


# ------------------------------------------------------------------ normalisation, sampler, loss
def test_normalization_ct_and_zscore():
    rng = np.random.default_rng(0)
    imgs = [rng.normal(40, 10, (2, 6, 6, 6)).astype(np.float32) for _ in range(3)]
    imgs[0][0, 0, 0, 0] = 5000.0  # an outlier the CT clip removes
    labs = [np.zeros((6, 6, 6), np.uint8) for _ in range(3)]
    for lab in labs:
        lab[1:5, 1:5, 1:5] = 1
    norm = fit_normalization(imgs, labs, ["CT", "T1"])
    ct, t1 = norm["channels"]
    assert norm["format"] == NORM_FORMAT and ct["scheme"] == "ct" and t1["scheme"] == "zscore"
    fg = np.concatenate([im[0][lab > 0] for im, lab in zip(imgs, labs)]).astype(np.float64)
    lo, hi = np.percentile(fg, [0.5, 99.5])
    assert ct["clip"] == pytest.approx([lo, hi]) and ct["mean"] == pytest.approx(np.clip(fg, lo, hi).mean())
    allv = np.concatenate([im[1].ravel() for im in imgs]).astype(np.float64)
    assert t1["mean"] == pytest.approx(allv.mean()) and t1["std"] == pytest.approx(allv.std())
    y = apply_normalization(imgs[1], norm)
    assert np.allclose(y[1], (imgs[1][1] - t1["mean"]) / t1["std"], atol=1e-5)
    assert y[0].max() <= (hi - ct["mean"]) / ct["std"] + 1e-5
    # the padded, normalised view of the tile CLI: normalised inside, zeros in the padding
    v = NormalizedView(imgs[1], norm, [8, 7, 6], 3)
    assert v.shape == (2, 8, 7, 6)
    full = v[:, :, :, :]
    assert np.allclose(full[:, :6, :6, :6], y, atol=1e-6) and not full[:, 6:].any() and not full[:, :, 6:].any()
    assert np.allclose(v[:, 3:8, 2:5, 1:4], full[:, 3:8, 2:5, 1:4])
    with pytest.raises(ValueError, match="channels"):
        apply_normalization(imgs[1][:1], norm)


def test_sampler_is_pure_oversamples_foreground_and_pads():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(1, 40, 40, 12)).astype(np.float32)
    lab = np.zeros((40, 40, 12), np.uint8)
    lab[30:33, 5:8, 4:7] = 2
    s = PatchSampler([img], [lab], [1, 2], 3, 16, seed=3, fg_fraction=1.0)
    x, y = s.sample(7)
    x2, y2 = PatchSampler([img], [lab], [1, 2], 3, 16, seed=3, fg_fraction=1.0).sample(7)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (1, 16, 16, 16) and y.dtype == torch.int64
    assert all((s.sample(i)[1] == 2).any() for i in range(10))  # every patch holds the small structure
    assert (x[:, :, :, 12:] == 0).all() or (x[:, :, :, :4] == 0).all()  # z is padded (12 < 16), flips allowed
    s0 = PatchSampler([img], [lab], [1, 2], 3, 16, seed=3, fg_fraction=0.0)
    frac = np.mean([(s0.sample(i)[1] == 2).any().item() for i in range(30)])
    assert frac < 0.8
    s2 = PatchSampler([img], [lab], [1, 2], 2, 16, seed=3)
    x, y = s2.sample(0)
    assert x.shape == (1, 16, 16) and y.shape == (16, 16)


def test_dice_ce_loss_and_dice_metric():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 6, 4))
    total, dl, ce = dice_ce_loss(logits, target)
    p = logits.softmax(1)
    oh = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).double()
    ref = []
    for b in range(2):
        for c in (1, 2):
            inter = (p[b, c] * oh[b, c]).sum()
            ref.append(1 - (2 * inter + 1e-5) / (p[b, c].sum() + oh[b, c].sum() + 1e-5))
    assert dl.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-6)
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-6)
    total.backward()
    assert torch.isfinite(logits.grad).all()
    pred = np.array([[0, 1, 1, 2]])
    truth = np.array([[0, 1, 2, 2]])
    d = dice_per_class(pred, truth, [1, 2, 3])
    assert d[1] == pytest.approx(2 / 3) and d[2] == pytest.approx(2 / 3) and np.isnan(d[3])


def test_unet_radius_bound_covers_the_probe():
    from medconv_ext.models.unet import UNet
    from medconv_ext.tiling import receptive_radius
    for m in (UNet(2, 1, 2, 2, 3, kind="rolling", first_kind="dense", first_level_convs=3, depth=2),
              UNet(2, 1, 2, 2, 3, kind="depthwise", depth=3), UNet(3, 1, 2, 2, 3, kind="dense", depth=1)):
        r = receptive_radius(m.eval(), m.dims, align=2 ** m.depth, probe_size=128 if m.dims == 2 else 32)
        assert unet_radius_bound(m) >= max(r), (m.kind, r)


# ------------------------------------------------------------------ training
def test_train_3d_decathlon_outputs(tmp_path):
    data = _demo(tmp_path)
    out = tmp_path / "run"
    res = run_seg_data(_cfg(data, out), log=no_log)
    assert res["config"].dims == 3 and res["config"].model == "rolling_unet3d"
    for f in ("checkpoint.pt", "metrics.json", "model.pt", "heldout_overlay.png", "train_log.csv"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["dice"]) == {"organ", "lesion"}
    assert m["mean_dice"] == pytest.approx(np.mean(list(m["dice"].values())))
    assert len(m["held_out_cases"]) == 1 and m["normalization"]["channels"][0]["scheme"] == "zscore"
    model, info = load_tiling_checkpoint(str(out / "model.pt"))
    assert info["normalization"] == m["normalization"] and info["align"] == [8, 8, 8]
    assert info["version"] and max(info["halo"]) >= 1
    sd = res["model"].state_dict()
    assert all(torch.equal(v.cpu(), model.state_dict()[k]) for k, v in sd.items())


def test_train_2d_nnunet_multichannel_ct(tmp_path):
    data = _demo(tmp_path, layout="nnunet", channels=2, modality="CT", size=(20, 18, 6))
    out = tmp_path / "run2d"
    with pytest.raises(ValueError, match="BatchNorm needs more"):  # 16 / 16 = one voxel at the deepest level
        run_seg_data(_cfg(data, tmp_path / "bad"), log=no_log)
    res = run_seg_data(_cfg(data, out, batch_size=2), log=no_log)  # 6 slices: 2D chosen from the data
    cfg = res["config"]
    assert cfg.dims == 2 and cfg.model == "rolling_unet"
    m = json.loads((out / "metrics.json").read_text())
    assert m["layout"] == "nnunet" and set(m["dice"]) == {"organ", "lesion"}
    assert [c["scheme"] for c in m["normalization"]["channels"]] == ["ct", "ct"]
    model, info = load_tiling_checkpoint(str(out / "model.pt"))
    assert info["align"] == [16, 16] and model.in_channels == 2
    # the tile CLI labels a volume slice by slice; nnU-Net's channel files stacked on the 4th axis
    chans = [nib.load(os.path.join(data, "imagesTr", "demo_001_%04d.nii.gz" % k)) for k in range(2)]
    stacked = str(tmp_path / "stacked.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([np.asarray(c.dataobj) for c in chans], -1), chans[0].affine), stacked)
    seg = str(tmp_path / "seg2d.nii.gz")
    assert tile_main(["--model", str(out / "model.pt"), "--input", stacked, "--output", seg, "--tile", "64",
                      "--argmax", "--no-progress"]) == 0
    got = np.asarray(nib.load(seg).dataobj)
    assert got.shape == (20, 18, 6) and got.dtype == np.uint8
    from medconv_ext.tiling.normalize import apply_normalization as norm_
    x = torch.from_numpy(norm_(np.stack([np.asarray(c.dataobj) for c in chans], 0), info["normalization"]))
    xs = torch.nn.functional.pad(x.permute(3, 0, 1, 2), (0, 14, 0, 12))  # (Z, C, 32, 32)
    with torch.no_grad():
        ref = model(xs)[:, :, :20, :18].argmax(1).permute(1, 2, 0).numpy()
    assert np.array_equal(got, ref)


def test_cli_trains_and_resume_matches_uninterrupted(tmp_path):
    data = _demo(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["seg", "--data", data, "--patch", "16", "--features", "2", "--batch-size", "1", "--ckpt-every", "2",
              "--val-size", "1", "--lr-schedule", "constant", "--quiet"]  # cosine depends on --steps
    assert train_main(common + ["--out", str(a), "--steps", "4"]) == 0
    assert train_main(common + ["--out", str(b), "--steps", "2"]) == 0
    assert train_main(common + ["--out", str(b), "--steps", "4", "--resume"]) == 0
    ca = torch.load(str(a / "checkpoint.pt"), weights_only=True)
    cb = torch.load(str(b / "checkpoint.pt"), weights_only=True)
    assert ca["step"] == cb["step"] == 4
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert [r["loss"] for r in ca["history"]] == [r["loss"] for r in cb["history"]]
    assert train_main(["seg", "--out", str(b), "--steps", "5", "--resume"]) == 2  # without --data
    # a resumed run keeps the trajectory settings
    assert train_main(common[:-1] + ["--out", str(b), "--steps", "5", "--resume", "--patch", "8"]) == 2


# ------------------------------------------------------------------ tile --argmax round trip
def _norm_case(tmp_path, shape=(37, 30, 27)):
    img, lab = make_case(2, shape, seed=4)
    aff = np.diag([0.8, 0.9, 1.2, 1.0])
    aff[:3, 3] = [10.0, -5.0, 3.0]
    p = str(tmp_path / "case.nii.gz")
    nib.save(nib.Nifti1Image(img, aff), p)
    return p, img, aff


def test_tile_argmax_roundtrip_non_multiple_of_align(tmp_path, capsys):
    torch.manual_seed(0)
    model = rolling_unet3d(in_channels=1, num_classes=3, features=2, depth=1).double().eval()
    with torch.no_grad():  # an untrained network whose label map is not constant
        model.out.weight.mul_(40.0)
        model.out.bias.zero_()
    path, img, aff = _norm_case(tmp_path)
    norm = {"format": NORM_FORMAT, "channels": [{"name": "MR", "scheme": "zscore", "clip": None,
                                                 "mean": float(img.mean()), "std": float(img.std())}]}
    from medconv_ext.tiling import receptive_radius
    halo = receptive_radius(model, 3, align=2)
    ck = str(tmp_path / "model.pt")
    save_tiling_checkpoint(model, ck, halo=list(halo), align=[2, 2, 2], normalization=norm)
    # reference: normalise, pad with zeros to a multiple of 2, full-image inference, crop
    x = torch.from_numpy(apply_normalization(img[None], norm, out_dtype=np.float64)).double()
    xp = torch.nn.functional.pad(x, (0, 1, 0, 0, 0, 1))[None]
    with torch.no_grad():
        ref = model(xp)[0, :, :37, :30, :27]
    seg = str(tmp_path / "seg.nii.gz")
    tile = 2 * max(halo) + 4
    assert tile < 30  # several tiles along every axis
    argv = ["--model", ck, "--input", path, "--tile", str(tile), "--no-progress"]
    assert tile_main(argv + ["--output", seg, "--argmax"]) == 0
    out = nib.load(seg)
    got = np.asarray(out.dataobj)
    assert got.shape == (37, 30, 27) and out.get_data_dtype() == np.uint8 and np.allclose(out.affine, aff)
    assert np.array_equal(got, ref.argmax(0).numpy())
    assert sum(0.02 < (got == c).mean() for c in range(3)) >= 2, [(got == c).mean() for c in range(3)]
    # class scores without --argmax: the same as full-image inference
    scores = str(tmp_path / "scores.nii.gz")
    assert tile_main(argv + ["--output", scores]) == 0
    s = np.asarray(nib.load(scores).dataobj)
    assert s.shape == (37, 30, 27, 3)
    np.testing.assert_allclose(np.moveaxis(s, 3, 0), ref.numpy(), rtol=0, atol=1e-12)
    # a tile larger than the volume: one tile, the same labels
    one = str(tmp_path / "one.nii.gz")
    assert tile_main(argv[:4] + ["--tile", "500", "--no-progress", "--output", one, "--argmax"]) == 0
    assert np.array_equal(np.asarray(nib.load(one).dataobj), got)
    # a resumed run must normalise as the first one did
    assert tile_main(argv + ["--output", seg, "--argmax", "--resume"]) == 0
    assert tile_main(argv + ["--output", seg, "--argmax", "--resume", "--no-normalize"]) == 2
    assert "normalization" in capsys.readouterr().err
    # --no-normalize gives another result (the stored normalisation was applied above)
    raw = str(tmp_path / "raw.nii.gz")
    assert tile_main(argv + ["--output", raw, "--argmax", "--no-normalize"]) == 0
    assert not np.array_equal(np.asarray(nib.load(raw).dataobj), got)


def test_tile_cli_trained_model_on_larger_case(tmp_path):
    data = _demo(tmp_path, test_cases=1, test_size=(26, 21, 19))
    out = tmp_path / "run"
    run_seg_data(_cfg(data, out), log=no_log)
    case = os.path.join(data, "imagesTs", "demo_004.nii.gz")
    seg = str(tmp_path / "seg.nii.gz")
    assert tile_main(["--model", str(out / "model.pt"), "--input", case, "--output", seg, "--tile", "32", "--argmax",
                      "--no-progress"]) == 0
    got = nib.load(seg)
    assert got.shape == (26, 21, 19) and got.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(got.dataobj))) <= {0, 1, 2}


def test_tile_cli_warns_about_missing_normalization_and_version(tmp_path, capsys):
    model = rolling_unet3d(features=2, depth=1).eval()
    path, img, _ = _norm_case(tmp_path, (12, 10, 9))
    ck = str(tmp_path / "plain.pt")
    save_tiling_checkpoint(model, ck, halo=[4, 4, 4], align=[2, 2, 2])
    assert tile_main(["--model", ck, "--input", path, "--output", str(tmp_path / "a.nii.gz"), "--tile", "64",
                      "--argmax", "--no-progress"]) == 0
    assert "stores no intensity normalisation" in capsys.readouterr().err
    ckd = torch.load(ck, weights_only=True)
    ckd["version"] = "0.0.1"
    torch.save(ckd, ck)
    assert tile_main(["--model", ck, "--input", path, "--output", str(tmp_path / "b.nii.gz"), "--tile", "64",
                      "--no-progress"]) == 0
    assert "written by medconv_ext 0.0.1" in capsys.readouterr().err
    # a stored normalisation for two channels, a one-channel input: a clear error
    two = {"format": NORM_FORMAT, "channels": [{"name": n, "scheme": "zscore", "clip": None, "mean": 0.0, "std": 1.0}
                                               for n in ("T1", "T2")]}
    ck2 = str(tmp_path / "two.pt")
    save_tiling_checkpoint(model, ck2, halo=[4, 4, 4], align=[2, 2, 2], normalization=two)
    assert tile_main(["--model", ck2, "--input", path, "--output", str(tmp_path / "c.nii.gz"), "--tile", "64",
                      "--argmax", "--no-progress"]) == 2
    assert "2 (T1, T2)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="std"):
        save_tiling_checkpoint(model, ck2, normalization={"format": NORM_FORMAT, "channels": [
            {"name": "x", "scheme": "zscore", "clip": None, "mean": 0.0, "std": 0.0}]})


# ------------------------------------------------------------------ bad input
def _train_error(tmp_path, data, capsys):
    out = tmp_path / "bad_run"
    rc = train_main(["seg", "--data", str(data), "--out", str(out), "--steps", "1", "--patch", "16", "--features",
                     "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not (out / "checkpoint.pt").exists()  # nothing was trained
    return err


def test_bad_missing_label_file(tmp_path, capsys):
    data = _demo(tmp_path)
    os.remove(os.path.join(data, "labelsTr", "demo_002.nii.gz"))
    err = _train_error(tmp_path, data, capsys)
    assert "labelsTr/demo_002.nii.gz" in err and "missing label" in err
    nn_ = _demo(tmp_path, "nn", layout="nnunet")
    os.remove(os.path.join(nn_, "labelsTr", "demo_001.nii.gz"))
    err = _train_error(tmp_path, nn_, capsys)
    assert "demo_001" in err and "missing label" in err


def test_bad_shape_and_affine_mismatch(tmp_path, capsys):
    data = _demo(tmp_path)
    lab = os.path.join(data, "labelsTr", "demo_001.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 15), np.uint8), np.eye(4)), lab)
    err = _train_error(tmp_path, data, capsys)
    assert "imagesTr/demo_001.nii.gz" in err and "does not match" in err and "(16, 16, 15)" in err
    data2 = _demo(tmp_path, "ds2")
    lab2 = os.path.join(data2, "labelsTr", "demo_003.nii.gz")
    a = nib.load(lab2)
    shifted = a.affine.copy()
    shifted[0, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asarray(a.dataobj), shifted), lab2)
    err = _train_error(tmp_path, data2, capsys)
    assert "imagesTr/demo_003.nii.gz" in err and "affine" in err


def test_bad_labels_not_in_dataset_json(tmp_path, capsys):
    data = _demo(tmp_path)
    lab = os.path.join(data, "labelsTr", "demo_000.nii.gz")
    a = nib.load(lab)
    arr = np.asarray(a.dataobj).copy()
    arr[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(arr, a.affine), lab)
    err = _train_error(tmp_path, data, capsys)
    assert "labelsTr/demo_000.nii.gz" in err and "[7]" in err


def test_bad_unreadable_file(tmp_path, capsys):
    data = _demo(tmp_path)
    img = os.path.join(data, "imagesTr", "demo_003.nii.gz")
    with open(img, "wb") as f:
        f.write(b"this is not a NIfTI file")
    err = _train_error(tmp_path, data, capsys)
    assert "imagesTr/demo_003.nii.gz" in err and "unreadable" in err


def test_bad_empty_training_list_and_json(tmp_path, capsys):
    data = _demo(tmp_path)
    meta = json.load(open(os.path.join(data, "dataset.json")))
    meta["training"] = []
    json.dump(meta, open(os.path.join(data, "dataset.json"), "w"))
    err = _train_error(tmp_path, data, capsys)
    assert "dataset.json" in err and "no training cases" in err
    with open(os.path.join(data, "dataset.json"), "w") as f:
        f.write("{not json")
    err = _train_error(tmp_path, data, capsys)
    assert "dataset.json" in err and "JSON" in err
    err = _train_error(tmp_path, tmp_path / "nowhere", capsys)
    assert "nowhere" in err
    meta["training"] = [{"image": "./imagesTr/demo_000.nii.gz", "label": "./labelsTr/demo_000.nii.gz"}]
    meta["labels"] = {"0": "background", "2": "lesion"}
    json.dump(meta, open(os.path.join(data, "dataset.json"), "w"))
    err = _train_error(tmp_path, data, capsys)
    assert "0, 1, ..., K-1" in err


def test_mode_options_are_checked(tmp_path, capsys):
    assert train_main(["seg", "--patch", "16", "--steps", "1"]) == 2
    assert "add --data" in capsys.readouterr().err
    assert train_main(["seg", "--data", str(tmp_path), "--size", "32"]) == 2
    assert "--size applies" in capsys.readouterr().err
