"""Segmentation example: synthetic shapes, Dice, Otsu's threshold, a few steps, resume, CLI."""
import json
import math
import os

import pytest
import torch

from medconv_ext.train import SegTrainConfig, SyntheticShapes, dice, otsu_threshold, run_seg
from medconv_ext.train import loop
from medconv_ext.train.__main__ import main
from medconv_ext.train.loop import CKPT_NAME, LOG_NAME, METRICS_NAME
from medconv_ext.train.seg import SegTask

from _train_util import no_log


def test_shapes_are_deterministic_and_labelled():
    data = SyntheticShapes(48, seed=1)
    img, lab = data.sample(5)
    assert img.shape == (1, 48, 48) and lab.shape == (48, 48) and lab.dtype == torch.int64
    img2, lab2 = SyntheticShapes(48, seed=1).sample(5)
    assert torch.equal(img, img2) and torch.equal(lab, lab2)
    assert not torch.equal(SyntheticShapes(48, seed=1).sample(6)[1], lab)
    assert not torch.equal(SyntheticShapes(48, seed=1, stream="val").sample(5)[1], lab)
    assert set(lab.unique().tolist()) <= {0, 1}
    fracs = [SyntheticShapes(48, seed=1).sample(i)[1].float().mean().item() for i in range(8)]
    assert all(0.005 < f < 0.8 for f in fracs), fracs
    # the objects are brighter than the background on average (contrast 0.6-1.0, noise 0.15-0.3)
    assert img[0][lab.bool()].mean() > img[0][~lab.bool()].mean() + 0.3
    with pytest.raises(ValueError, match="size"):
        SyntheticShapes(4)


def test_lines_are_bright_but_not_labelled():
    # without noise, illumination and ellipses, only the distractor lines are bright: label stays empty
    data = SyntheticShapes(32, seed=0, n_objects=(0, 0), n_lines=(2, 2), noise=(0.0, 0.0), bias=0.0)
    img, lab = data.sample(0)
    assert lab.sum() == 0 and (img > 0.5).sum() > 20


def test_dice_hand_cases():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2] = True                                   # 8 pixels
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[1:3] = True                                  # 8 pixels, 4 shared
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
    assert dice(torch.zeros(3), torch.zeros(3)) == 1.0     # both empty
    assert dice(torch.zeros(3), torch.tensor([0, 1, 0])) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        dice(a, b[:2])


def test_otsu_threshold_separates_two_levels():
    img = torch.zeros(10, 10)
    img[:3] = 10.0                                 # 30 % bright
    t = otsu_threshold(img)
    assert 0.0 <= t < 10.0 and torch.equal(img > t, img == 10.0)
    g = torch.Generator().manual_seed(0)
    noisy = img + 0.5 * torch.randn(img.shape, generator=g)
    t = otsu_threshold(noisy)   # any cut between the clusters is optimal: it must split them
    assert noisy[3:].max() <= t < noisy[:3].min()
    # two overlapping Gaussians of equal weight and spread: the cut lies near the midpoint
    two = torch.cat([torch.randn(5000, generator=g), 4 + torch.randn(5000, generator=g)])
    assert 1.6 < otsu_threshold(two) < 2.4
    assert otsu_threshold(torch.full((3, 3), 2.0)) == 2.0


def _rolling_unet():
    try:
        from medconv_ext.models import rolling_unet
    except ImportError:
        pytest.skip("medconv_ext.models.rolling_unet is not available")
    return rolling_unet


def _cfg(out, **kw):
    base = dict(size=32, batch_size=4, features=2, steps=4, lr=1e-2, lr_schedule="constant", out=str(out), val_size=0,
                ckpt_every=2, quiet=True)
    base.update(kw)
    return SegTrainConfig(**base)


def test_a_few_steps_lower_the_held_out_loss():
    _rolling_unet()
    task, cfg = SegTask(), _cfg("unused")
    torch.manual_seed(0)
    model = loop.build_model(cfg, torch.device("cpu"), log=no_log, task=task)
    assert model.out.out_channels == 2 and model.in_channels == 1
    val = loop.collate(SyntheticShapes(32, seed=0, stream="val"), range(8))
    data = task.make_data(cfg, "cpu")

    def held_out():
        model.train()   # BatchNorm with batch statistics: its running averages lag after 8 steps
        with torch.no_grad():
            return task.loss(model, val, cfg, loop.autocast(torch.device("cpu"), "none"))[0].item()

    before = held_out()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(8):
        loss, parts = loop.train_step(model, opt, task, loop.collate(data, loop.sample_indices(step, 4)), cfg, "cpu")
        assert math.isfinite(loss) and set(parts) == {"ce"}
    after = held_out()
    assert after < 0.8 * before, (before, after)


def test_resume_continues_identically(tmp_path):
    _rolling_unet()
    full = run_seg(_cfg(tmp_path / "a"), log=no_log)
    run_seg(_cfg(tmp_path / "b", steps=2), log=no_log)
    resumed = run_seg(_cfg(tmp_path / "b", steps=4), resume="auto", log=no_log)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    sa, sb = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with open(os.path.join(tmp_path / "b", LOG_NAME)) as f:
        lines = f.read().split()
    assert lines[0] == "step,loss,ce" and [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3", "4"]
    with pytest.raises(ValueError, match="size"):
        run_seg(_cfg(tmp_path / "b", steps=6, size=48), resume="auto", given={"size"}, log=no_log)


def test_cli_end_to_end(tmp_path, capsys):
    _rolling_unet()
    out = str(tmp_path / "run")
    assert main(["seg", "--features", "2", "--size", "32", "--batch-size", "2", "--steps", "2", "--val-size", "2",
                 "--out", out, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Otsu threshold" in printed and "Dice" in printed
    with open(os.path.join(out, METRICS_NAME)) as f:
        rep = json.load(f)
    assert rep["task"] == "seg" and rep["step"] == 2 and rep["world_size"] == 1
    assert set(rep["metrics"]) == {"rolling_unet", "Otsu threshold", "mean threshold"}
    for vals in rep["metrics"].values():
        assert set(vals) == {"dice", "iou"} and all(0.0 <= v <= 1.0 for v in vals.values())
    assert main(["seg", "--resume", "--out", out, "--steps", "3", "--quiet"]) == 0
    assert torch.load(os.path.join(out, CKPT_NAME), weights_only=True)["step"] == 3
    assert main(["seg", "--size", "4", "--out", out]) == 2
    assert "--size must be an int >= 8" in capsys.readouterr().err
