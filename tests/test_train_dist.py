"""Training under DistributedDataParallel: 2 CPU processes with gloo (a few steps, then a resume)."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medconv_ext.train import QSMTrainConfig, run_qsm
from medconv_ext.train.loop import CKPT_NAME, METRICS_NAME, sample_indices

from _train_util import dist_worker, no_log, tiny_qsm


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sample_indices_split_the_global_batch():
    # one process: samples step*B .. step*B+B-1 (the single-process runs' data)
    assert sample_indices(3, 2) == [6, 7]
    # two processes: disjoint shares that together are the global batch of 2*B
    assert sample_indices(3, 2, 0, 2) + sample_indices(3, 2, 1, 2) == list(range(12, 16))
    seen = [i for s in range(4) for r in range(3) for i in sample_indices(s, 2, r, 3)]
    assert sorted(seen) == list(range(24))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    out, res_dir = str(tmp_path / "run"), str(tmp_path / "res")
    os.makedirs(res_dir)
    mp.spawn(dist_worker, args=(2, _free_port(), out, res_dir), nprocs=2, join=True)
    r0 = torch.load(os.path.join(res_dir, "rank0.pt"), weights_only=True)
    r1 = torch.load(os.path.join(res_dir, "rank1.pt"), weights_only=True)
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # the logged losses are the mean over the processes, the same in both
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]
    assert [h["step"] for h in r0["history"]] == [1, 2, 3]
    # rank 0 wrote the checkpoint (after the resume: step 3) and metrics.json with the world size
    ck = torch.load(os.path.join(out, CKPT_NAME), weights_only=True)
    assert ck["step"] == 3 and ck["world_size"] == 2
    assert all(torch.equal(ck["model"][k], r0["state"][k]) for k in ck["model"])
    with open(os.path.join(out, METRICS_NAME)) as f:
        rep = json.load(f)
    assert rep["world_size"] == 2 and rep["step"] == 3
    # the tiny model has no BatchNorm: 2 processes x batch 1 take the steps of 1 process x batch 2
    # (the mean of the two gradients is the gradient of the mean loss), up to rounding
    single = run_qsm(QSMTrainConfig(patch=16, batch_size=2, lr=3e-3, lr_schedule="constant", steps=3, out=str(tmp_path / "single"),
                                    val_size=0, quiet=True, model="tiny", device="cpu"),
                     builder=tiny_qsm, log=no_log)
    for k, v in single["model"].state_dict().items():
        torch.testing.assert_close(v, r0["state"][k], rtol=1e-4, atol=1e-6)
