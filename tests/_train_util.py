"""Shared helpers of the training tests: a tiny 3D QSM network of rolling layers."""
import torch
from torch import nn

from medconv_ext.nn import RollingConv3d


class TinyQSMNet(nn.Module):
    """field (N, 1, X, Y, Z) -> chi (N, 1, X, Y, Z): two padded 3x3x3 rolling convs, a 1x1x1 head,
    plus a learned global scale of the input (a useful shortcut for dipole inversion)."""

    def __init__(self, features: int = 4, backend: str = "auto"):
        super().__init__()
        self.c1 = RollingConv3d(1, features, 3, padding=1, backend=backend)
        self.c2 = RollingConv3d(features, features, 3, padding=1, backend=backend)
        self.head = nn.Conv3d(features, 1, 1)
        self.skip = nn.Parameter(torch.tensor(1.0))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.head(self.act(self.c2(self.act(self.c1(x))))) + self.skip * x


def tiny_qsm(features: int = 4, backend: str = "auto") -> nn.Module:
    return TinyQSMNet(features, backend)


def no_log(s):
    pass


def dist_worker(rank, world, port, out, result_dir):
    """One process of a gloo run: 2 steps, then a resume up to 3 steps; saves its final weights."""
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from medconv_ext.train import QSMTrainConfig, run_qsm
    dist.init_process_group("gloo")  # as torchrun's processes would; run_qsm joins this group
    cfg = dict(patch=16, batch_size=1, lr=3e-3, lr_schedule="constant", out=out, val_size=1, ckpt_every=1, quiet=True, model="tiny",
               device="cpu")
    res = run_qsm(QSMTrainConfig(steps=2, **cfg), builder=tiny_qsm, log=no_log)
    assert res["world_size"] == world
    res = run_qsm(QSMTrainConfig(steps=3, **cfg), resume="auto", builder=tiny_qsm, log=no_log)
    torch.save({"state": res["model"].state_dict(), "history": res["history"]},
               os.path.join(result_dir, "rank%d.pt" % rank))
    dist.destroy_process_group()
