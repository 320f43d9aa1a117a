"""The synthetic 2D segmentation example (`python -m medconv_ext.train seg`): a Rolling UNet (or
any 2D segmenter of medconv_ext.models, e.g. `--model medic_seg`) learns to segment the ellipses
of seg_data's images, and is compared on a held-out set with global thresholding (Otsu's and the
mean). Same loop, checkpoints, resume, progress and metrics.json as the QSM example."""
import dataclasses
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import loop
from .seg_data import SyntheticShapes, dice, otsu_threshold


@dataclasses.dataclass
class SegTrainConfig(loop.TrainConfig):
    model: str = "rolling_unet"
    size: int = 64                     # images are size x size
    batch_size: int = 8
    steps: int = 300
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    val_size: int = 32
    out: str = "runs/seg"


METRIC_COLUMNS = (("dice", "Dice", "%.4f"), ("iou", "IoU", "%.4f"))


class SegTask(loop.Task):
    name = "seg"
    locked = ("size",)
    cpu_features = 8

    def validate(self, cfg):
        pos_int = loop.validate_common(cfg)
        pos_int("size", 8)

    def builder_kwargs(self, fn):
        kw = {}
        if loop._accepts(fn, "in_channels"):
            kw["in_channels"] = 1
        if loop._accepts(fn, "num_classes"):
            kw["num_classes"] = 2
        return kw

    def make_data(self, cfg, device):
        return SyntheticShapes(cfg.size, seed=cfg.seed, stream="train", device=device)

    def loss(self, model, batch, cfg, amp_ctx):
        img, lab = batch
        with amp_ctx:
            logits = model(img)
        logits = logits.float()
        if logits.dim() != 4 or logits.shape[0] != img.shape[0] or logits.shape[2:] != lab.shape[1:]:
            raise ValueError("seg: the model must map (N, 1, H, W) images to (N, C, H, W) logits; got %s for an "
                             "input of %s" % (tuple(logits.shape), tuple(img.shape)))
        if logits.shape[1] == 1:
            ce = F.binary_cross_entropy_with_logits(logits[:, 0], lab.float())
        else:
            ce = F.cross_entropy(logits, lab)
        return ce, {"ce": ce.detach()}

    def describe(self, cfg):
        return "images %dx%d, lr %g %s" % (cfg.size, cfg.size, cfg.lr, cfg.lr_schedule)

    def evaluate(self, model, cfg, device):
        val = SyntheticShapes(cfg.size, seed=cfg.seed, stream="val", device=device)
        res = evaluate(model, val, cfg.val_size)
        metrics = {cfg.model: res["model"], "Otsu threshold": res["otsu"], "mean threshold": res["mean"]}
        head = "held-out set: %d synthetic images of %dx%d (seed %d, stream 'val'); Dice of the ellipses" % (
            cfg.val_size, cfg.size, cfg.size, cfg.seed)
        return metrics, head + "\n" + loop.format_table(metrics, METRIC_COLUMNS)


def predict_mask(model, img: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> (N, H, W) bool: argmax of the logits (or logit > 0 for one output map)."""
    logits = model(img).float()
    return logits[:, 0] > 0 if logits.shape[1] == 1 else logits.argmax(1) == 1


def _iou(a, b):
    a, b = a.bool(), b.bool()
    u = int((a | b).sum())
    return 1.0 if u == 0 else int((a & b).sum()) / u


@torch.no_grad()
def evaluate(model, data: SyntheticShapes, n: int) -> Dict[str, Dict[str, float]]:
    """Mean Dice and IoU over held-out images 0..n-1: the model, Otsu's threshold, the mean threshold."""
    model.eval()
    rows = {"model": [], "otsu": [], "mean": []}
    for i in range(n):
        img, lab = data.sample(i)
        masks = {"model": predict_mask(model, img.unsqueeze(0))[0],
                 "otsu": img[0] > otsu_threshold(img),
                 "mean": img[0] > img.mean()}
        for k, m in masks.items():
            rows[k].append({"dice": dice(m, lab), "iou": _iou(m, lab)})
    return {k: {m: sum(r[m] for r in lst) / len(lst) for m in lst[0]} for k, lst in rows.items() if lst}


def run_seg(cfg: SegTrainConfig, *, resume: Optional[str] = None, given: Optional[set] = None, builder=None,
            log=print, stream=None) -> Dict:
    return loop.run_training(cfg, SegTask(), resume=resume, given=given, builder=builder, log=log, stream=stream)
