"""The shared progress display (redraws on a terminal, bounded lines in a log) in the tile and train
command lines, and `train --resume` restoring or refusing the options of the run."""
import io
import json
import os

import numpy as np
import pytest
import torch

from _tiling_util import integer_weights_
from _train_util import tiny_qsm
from medconv_ext._progress import Progress
from medconv_ext import tile as tile_cli
from medconv_ext.models.valid_srnet import valid_srnet
from medconv_ext.tiling import save_tiling_checkpoint
from medconv_ext.train import QSMTrainConfig, run_qsm
from medconv_ext.train.__main__ import main as train_main
from medconv_ext.train.loop import CKPT_NAME, METRICS_NAME, merge_resumed_config


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_log_gets_lines_at_a_bounded_rate_and_the_last_one():
    clock, s = Clock(), Stream(False)
    p = Progress(1000, unit="tiles", stream=s, interval=10.0, clock=clock)
    for done in range(1, 1001):
        clock.t += 0.1  # 100 s in all: the first update, one line every 10 s, the final line
        p.update(done)
    p.close()
    lines = s.getvalue().split("\n")
    assert lines[-1] == "" and "\r" not in s.getvalue()
    lines = lines[:-1]
    assert 10 <= len(lines) <= 12, lines
    assert lines[0].split("]")[1].startswith(" 1/1000 tiles") and " 1000/1000 tiles" in lines[-1]
    assert "100.0%" in lines[-1] and "eta 0:00" in lines[-1]


def test_log_lines_every_n_steps_when_asked():
    clock, s = Clock(), Stream(False)
    p = Progress(10, start=2, stream=s, every=4, clock=clock)
    for done in range(3, 11):
        clock.t += 1
        p.update(done, "loss %d" % done)
    p.close()
    lines = s.getvalue().splitlines()
    assert [ln.split("] ")[1].split()[0] for ln in lines] == ["6/10", "10/10"]
    assert "loss 6" in lines[0]


def test_terminal_redraws_in_place_and_ends_the_line():
    clock, s = Clock(), Stream(True)
    p = Progress(5, stream=s, interval=0.0, clock=clock)
    for done in range(1, 4):
        clock.t += 1
        p.update(done)
    p.close()  # stopped early: the redrawn line still gets its newline
    out = s.getvalue()
    assert out.count("\r") == 3 and out.endswith("\n") and out.count("\n") == 1


def test_nothing_before_the_delay_nor_when_disabled():
    clock, s = Clock(), Stream(False)
    p = Progress(3, stream=s, delay=5.0, clock=clock)
    clock.t += 1
    p.update(1)
    clock.t += 1
    p.update(3)  # a short run ends before the delay: nothing shown at all
    p.close()
    assert s.getvalue() == ""
    q = Progress(3, stream=s, enabled=False, clock=clock)
    q.update(3)
    q.close()
    assert s.getvalue() == ""


def test_tile_cli_progress_in_a_log_has_no_carriage_returns(tmp_path, capsys, monkeypatch):
    from medconv_ext.tiling import runner
    net = integer_weights_(valid_srnet(features=2, blocks=1).double().eval())
    save_tiling_checkpoint(net, tmp_path / "net.pt")
    np.save(tmp_path / "in.npy", np.random.default_rng(0).random((1, 64, 64)))
    # every update is due (no delay, no interval): the lines are what a long run writes to its log
    orig = runner._Progress.__init__
    monkeypatch.setattr(runner._Progress, "__init__",
                        lambda self, total, enabled, delay=2.0, every=None, **kw: orig(self, total, enabled, 0.0, 0.0,
                                                                                       **kw))
    monkeypatch.setattr("time.perf_counter", iter(np.arange(0, 1e6, 1.0)).__next__)
    assert tile_cli.main(["--model", str(tmp_path / "net.pt"), "--input", str(tmp_path / "in.npy"), "--output",
                          str(tmp_path / "out.npy"), "--tile", "16", "--batch-size", "2", "--verify", "0"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    bars = [ln for ln in err.splitlines() if ln.startswith("medconv_ext.tile [")]
    done, total = bars[-1].split("] ")[1].split()[0].split("/")
    assert len(bars) >= 3 and done == total, err


# ------------------------------------------------------------------ train
def test_train_progress_in_a_log(tmp_path):
    s = Stream(False)
    cfg = QSMTrainConfig(patch=16, batch_size=1, steps=4, out=str(tmp_path / "r"), val_size=0, log_every=2,
                         model="tiny", features=2)
    run_qsm(cfg, builder=tiny_qsm, log=lambda m: None, stream=s)
    out = s.getvalue()
    assert "\r" not in out
    assert [ln.split("] ")[1].split()[0] for ln in out.splitlines()] == ["2/4", "4/4"]
    assert "loss" in out


def _first_run(out, *extra):
    args = ["qsm", "--model", "_train_util:tiny_qsm", "--features", "2", "--patch", "16", "--batch-size", "1",
            "--steps", "2", "--val-size", "1", "--seed", "3", "--lr", "0.002", "--noise", "0.004", "--out", out,
            "--quiet"] + list(extra)
    assert train_main(args) == 0


def test_resume_restores_every_option_of_the_run(tmp_path, capsys):
    out = str(tmp_path / "run")
    _first_run(out, "--ckpt-every", "1")
    capsys.readouterr()
    # nothing but --steps: the run's --val-size 1, --seed 3, --noise 0.004, --lr ... come back
    assert train_main(["qsm", "--resume", "--out", out, "--steps", "3", "--quiet"]) == 0
    with open(os.path.join(out, METRICS_NAME)) as f:
        cfg = json.load(f)["config"]
    assert (cfg["val_size"], cfg["seed"], cfg["noise"], cfg["lr"], cfg["features"], cfg["patch"], cfg["steps"],
            cfg["ckpt_every"]) == (1, 3, 0.004, 0.002, 2, 16, 3, 1)
    assert "held-out set: 1 synthetic volumes of 16^3 (seed 3, stream 'val'), noise 0.004 ppm" in capsys.readouterr().out
    ck = torch.load(os.path.join(out, CKPT_NAME), weights_only=True)
    assert ck["step"] == 3 and ck["config"]["val_size"] == 1


@pytest.mark.parametrize("option, value", [("--val-size", "2"), ("--seed", "4"), ("--noise", "0.01"),
                                           ("--batch-size", "2"), ("--model", "_train_util:TinyQSMNet"),
                                           ("--amp", "bf16")])
def test_resume_refuses_a_changed_option_naming_it(tmp_path, capsys, option, value):
    out = str(tmp_path / "run")
    _first_run(out)
    capsys.readouterr()
    assert train_main(["qsm", "--resume", "--out", out, "--steps", "3", option, value, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and option + " " + value in err and "differs" in err, err
    assert torch.load(os.path.join(out, CKPT_NAME), weights_only=True)["step"] == 2  # nothing was run


def test_resume_may_change_steps_device_and_bookkeeping():
    saved = dataclasses_asdict(QSMTrainConfig(val_size=1, seed=3, steps=10, ckpt_every=5, device="cpu"))
    cfg = QSMTrainConfig(steps=20, device="auto", ckpt_every=2, val_size=1)
    merged = merge_resumed_config(cfg, saved, given={"steps", "device", "ckpt_every", "val_size"})
    assert (merged.steps, merged.device, merged.ckpt_every, merged.val_size, merged.seed) == (20, "auto", 2, 1, 3)
    merged = merge_resumed_config(QSMTrainConfig(), saved, given=set())
    assert (merged.steps, merged.device, merged.ckpt_every, merged.val_size) == (10, "cpu", 5, 1)
    with pytest.raises(ValueError, match=r"--seed 4 differs from the checkpoint's run \(--seed 3\)"):
        merge_resumed_config(QSMTrainConfig(seed=4), saved, given={"seed"})


def dataclasses_asdict(cfg):
    import dataclasses
    return dataclasses.asdict(cfg)
