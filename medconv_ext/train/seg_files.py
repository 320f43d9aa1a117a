"""Segmentation on the user's own labelled scans: `python -m medconv_ext.train seg --data DIR`.

DIR is a dataset in the Medical Segmentation Decathlon layout or nnU-Net's raw layout
(seg_dataset). The run:

1. reads and checks every case (before training starts), holds out `--val-cases` (or 20 % of the
   cases, at least one) and fixes the intensity normalisation from the training cases
   (medconv_ext.tiling.normalize: CT-style clip + scale for channels named CT, else a z-score);
2. trains in 3D on patches (or 2D on slices: `--dims 2`, or automatically for images with fewer
   than 16 voxels along an axis) with foreground-oversampled patch sampling (`--fg-fraction` of the
   patches are centred on a voxel of a random foreground class) and random flips along every axis,
   the Dice + cross-entropy loss, on the shared loop (checkpoints, exact resume, progress, torchrun);
3. labels the held-out cases by whole-volume inference (exact tiled inference for large volumes:
   the same result) and writes RUN/metrics.json (per-class Dice under "dice", their mean over the
   foreground labels under "mean_dice"), RUN/model.pt (a tiling checkpoint carrying the
   normalisation, halo and align, for `python -m medconv_ext.tile ... --argmax`) and
   RUN/heldout_overlay.png (a held-out slice with the prediction and the truth drawn on it).

MONAI is not needed: the loss and the Dice metric are written here to MONAI's definitions
(DiceCELoss(to_onehot_y=True, softmax=True, include_background=False) and DiceMetric(
include_background=False, ignore_empty=True)); the tests check them against MONAI when it is
installed. The patch sampler is the package's own because every sample must be a pure function of
(seed, index) for exact resume and torchrun sharding, which MONAI's stateful random transforms are not.
"""
import dataclasses
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import loop
from .qsm_data import sample_seed
from .seg_dataset import DatasetError, LoadedCase, SegDataset, load_cases, read_dataset, split_cases

MODEL_NAME = "model.pt"
PNG_NAME = "heldout_overlay.png"
DEFAULT_MODEL = {2: "rolling_unet", 3: "rolling_unet3d"}
DEFAULT_PATCH = {2: 64, 3: 32}
NORMS = ("auto", "ct", "zscore", "none")


@dataclasses.dataclass
class SegDataConfig(loop.TrainConfig):
    data: str = ""
    model: str = ""                    # "": rolling_unet3d (3D) or rolling_unet (2D)
    dims: Optional[int] = None         # None: 3, or 2 for images with an axis shorter than 16 voxels
    patch: Optional[int] = None        # cubic (3D) / square (2D) patch; None: 32 (3D), 64 (2D)
    norm: str = "auto"
    val_cases: str = ""                # comma-separated case names; "": val_size cases drawn with the seed
    val_size: Optional[int] = None     # None: 20 % of the cases (at least 1)
    fg_fraction: float = 0.33
    batch_size: int = 2
    steps: int = 2000
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    ckpt_every: int = 50
    out: str = "runs/seg_data"


# ------------------------------------------------------------------ loss and metric
def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool = False,
                 smooth: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Dice + cross-entropy, Dice loss, CE) of logits (N, K, *sp) against integer labels (N, *sp).
    Soft Dice per sample and class (1 - (2 I + s) / (|P| + |T| + s)), averaged; the classes without
    the background unless include_background. MONAI's DiceCELoss(to_onehot_y=True, softmax=True,
    include_background=...) computes the same."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the loss in float32 (float64 inputs stay float64) under autocast
    k = logits.shape[1]
    ce = F.cross_entropy(logits, target.long())
    prob = logits.softmax(1)
    onehot = F.one_hot(target.long(), k).movedim(-1, 1).to(prob.dtype)
    if not include_background and k > 1:
        prob, onehot = prob[:, 1:], onehot[:, 1:]
    axes = tuple(range(2, prob.dim()))
    inter = (prob * onehot).sum(axes)
    den = prob.sum(axes) + onehot.sum(axes)
    dl = (1.0 - (2.0 * inter + smooth) / (den + smooth)).mean()
    return dl + ce, dl, ce


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes: Sequence[int]) -> Dict[int, float]:
    """Dice of each class between two label maps; NaN where the class is in neither (MONAI's
    DiceMetric(ignore_empty=True) convention: such a case does not count)."""
    out = {}
    for c in classes:
        p, t = pred == c, truth == c
        s = int(p.sum()) + int(t.sum())
        out[c] = float("nan") if int(t.sum()) == 0 else 2.0 * int((p & t).sum()) / s
    return out


# ------------------------------------------------------------------ patches
def _fg_index(label: np.ndarray, classes: Sequence[int]) -> Dict[int, np.ndarray]:
    """Flat indices of each foreground class (at most 200k per class, a fixed subsample)."""
    flat = label.reshape(-1)
    out = {}
    for c in classes:
        idx = np.flatnonzero(flat == c)
        if idx.size > 200_000:
            idx = idx[:: int(math.ceil(idx.size / 200_000))]
        if idx.size:
            out[c] = idx
    return out


def _crop_pad(arr: torch.Tensor, starts: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """arr[..., s:s+n per spatial axis] with zeros outside (trailing len(size) axes are spatial)."""
    d = len(size)
    sp = arr.shape[-d:]
    lo = [max(s, 0) for s in starts]
    hi = [min(s + n, m) for s, n, m in zip(starts, size, sp)]
    blk = arr[(Ellipsis,) + tuple(slice(a, b) for a, b in zip(lo, hi))]
    pads = []
    for s, n, a, b in reversed(list(zip(starts, size, lo, hi))):
        pads += [a - s, (s + n) - b]
    if any(pads):
        blk = F.pad(blk, pads)
    return blk


class PatchSampler:
    """sample(i) -> (image (C, *patch) float32, label (*patch) int64): a pure function of (seed, i).
    3D: a patch of the volume; 2D: a patch of one axial slice (last axis). A fraction `fg_fraction`
    of the patches is centred (with a random offset of up to a quarter patch) on a voxel of a random
    foreground class present in the case; the others lie anywhere. Every spatial axis is flipped with
    probability 1/2. Volumes smaller than the patch are padded with zeros (label 0)."""

    def __init__(self, images: List[np.ndarray], labels: List[np.ndarray], classes: Sequence[int], dims: int,
                 patch: int, seed: int, fg_fraction: float = 0.33, stream: str = "train"):
        self.images = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in images]
        self.labels = [torch.from_numpy(np.ascontiguousarray(l).astype(np.int64)) for l in labels]
        self.fg = [_fg_index(l, classes) for l in labels]
        self.dims, self.patch, self.seed, self.fg_fraction, self.stream = dims, int(patch), seed, fg_fraction, stream

    def sample(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.stream, i))

        def rint(n):  # uniform in [0, n)
            return int(torch.randint(int(n), (1,), generator=g)) if n > 1 else 0

        k = rint(len(self.images))
        img, lab = self.images[k], self.labels[k]
        shape = list(lab.shape)  # (X, Y, Z)
        p = self.patch
        size = [p, p, p] if self.dims == 3 else [p, p, 1]
        centre = None
        if float(torch.rand(1, generator=g)) < self.fg_fraction and self.fg[k]:
            cls = sorted(self.fg[k])[rint(len(self.fg[k]))]
            idx = self.fg[k][cls]
            centre = list(np.unravel_index(int(idx[rint(len(idx))]), shape))
        starts = []
        for ax, (n, s) in enumerate(zip(shape, size)):
            if centre is not None:
                jitter = rint(s // 2 + 1) - s // 4 if s > 1 else 0
                st = centre[ax] - s // 2 + jitter
                st = min(max(st, 0), max(n - s, 0)) if n >= s else min(max(st, n - s), 0)
            else:
                st = rint(n - s + 1) if n >= s else -rint(s - n + 1)
            starts.append(st)
        x = _crop_pad(img, starts, size)
        y = _crop_pad(lab, starts, size)
        if self.dims == 2:
            x, y = x[..., 0], y[..., 0]
        flips = [ax for ax in range(self.dims) if float(torch.rand(1, generator=g)) < 0.5]
        if flips:
            x = x.flip([1 + a for a in flips])
            y = y.flip(flips)
        return x.contiguous(), y.contiguous()


# ------------------------------------------------------------------ network facts and inference
def network_align(model: nn.Module, dims: int, in_channels: int) -> int:
    """The factor every spatial size must be a multiple of: 2**depth for the package's U-Nets,
    else input size / smallest feature map (a forward pass of 64^3 or 256^2 zeros)."""
    from ..models.unet import UNet
    if isinstance(model, UNet):
        return 2 ** model.depth
    a = getattr(model, "align", None)
    if isinstance(a, int) and a >= 1:
        return a
    s = 64 if dims == 3 else 256
    smallest = [s]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor) and out.dim() == dims + 2:
            smallest[0] = min(smallest[0], min(out.shape[2:]))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros((1, in_channels) + (s,) * dims, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return max(1, s // max(1, smallest[0]))


def network_halo(model: nn.Module, dims: int, align: int):
    """A halo for exact tiled inference: for the package's U-Nets an upper bound of the receptive
    radius from the layout (cheap; tested against the probe), else receptive_radius(model, dims,
    align=align) with larger probes for deep 3D networks."""
    from ..models.unet import UNet
    from ..tiling import receptive_radius
    if isinstance(model, UNet):
        return (unet_radius_bound(model),) * dims
    last = None
    for probe in (None, 128, 192) if dims == 3 else (None, 512):
        try:
            return tuple(int(v) for v in receptive_radius(model, dims, align=align, probe_size=probe))
        except ValueError as e:
            last = e
    raise last


def unet_radius_bound(model) -> int:
    """Upper bound of the receptive radius of medconv_ext.models.UNet: every k-conv at level i
    (scale 2**i) reaches (k // 2) * 2**i voxels, every 2x pooling and every 2x transposed conv at
    level i at most 2**i more (the position inside a coarse voxel)."""
    h = max([max(_ks(m)) for m in model.modules() if _is_kconv(m)] or [1]) // 2
    enc = [sum(1 for m in blk.modules() if _is_kconv(m)) for blk in model.encoders]
    mid = sum(1 for m in model.middle.modules() if _is_kconv(m))
    dec = [sum(1 for m in blk.modules() if _is_kconv(m)) for blk in model.decoders][::-1]  # level 0 first
    r = sum(n * h * 2 ** i for i, n in enumerate(enc)) + mid * h * 2 ** model.depth
    r += sum(n * h * 2 ** i for i, n in enumerate(dec)) + sum(2 * 2 ** i for i in range(model.depth))
    return int(r)


def _ks(m):
    ks = getattr(m, "kernel_size", 1)
    return tuple(ks) if isinstance(ks, (tuple, list)) else (int(ks),)


def _is_kconv(m) -> bool:
    """A spatial (k > 1) convolution, counted once per conv of a block (a depthwise-separable or
    flattened conv counts as its widest part)."""
    if getattr(m, "kernel_size", None) is None or list(m.children()):
        return False
    st = getattr(m, "stride", 1)
    st = st[0] if isinstance(st, (tuple, list)) else st
    return max(_ks(m)) > 1 and st == 1


def _pad_to(x: torch.Tensor, align: int, dims: int) -> torch.Tensor:
    pads = []
    for n in reversed(x.shape[-dims:]):
        pads += [0, (-n) % align]
    return F.pad(x, pads) if any(pads) else x


@torch.no_grad()
def predict_volume(model: nn.Module, image: torch.Tensor, dims: int, align: int, halo=None,
                   max_voxels: int = 128 ** 3, batch_slices: int = 8) -> torch.Tensor:
    """Class scores (K, X, Y, Z) of a normalised volume (C, X, Y, Z): padded with zeros at the high end
    to a multiple of `align`, inferred (whole volume, or by exact tiled inference above `max_voxels`,
    which gives the same result; slice by slice for 2D models), cropped back."""
    model.eval()
    p = next(model.parameters())
    x = image.to(p.device, p.dtype)
    X, Y, Z = x.shape[1:]
    if dims == 2:
        xs = _pad_to(x.permute(3, 0, 1, 2), align, 2)  # (Z, C, X', Y')
        outs = [model(xs[i:i + batch_slices]).float() for i in range(0, Z, batch_slices)]
        return torch.cat(outs, 0)[:, :, :X, :Y].permute(1, 2, 3, 0).cpu()
    xp = _pad_to(x, align, 3)
    if xp[0].numel() <= max_voxels or halo is None:
        y = model(xp[None]).float()[0]
    else:
        from ..tiling import predict_tiled
        tile = [min(n, 128) for n in xp.shape[1:]]
        tile = [n if n >= xp.shape[1 + a] else max(align, (t // align) * align) for a, (t, n) in
                enumerate(zip(tile, xp.shape[1:]))]
        h = [hh if t < n else 0 for hh, t, n in zip(halo, tile, xp.shape[1:])]
        y = predict_tiled(model, xp, tuple(tile), halo=tuple(h), align=align, progress=False).float()
    return y[:, :X, :Y, :Z].cpu()


# ------------------------------------------------------------------ the task
class SegDataTask(loop.Task):
    name = "seg-data"
    locked = ("data", "dims", "patch", "norm", "val_cases", "val_size", "fg_fraction")
    cpu_features = 8

    def __init__(self, ds: SegDataset, train: List[LoadedCase], val: List[LoadedCase], norm: Dict, dims: int):
        from ..tiling.normalize import apply_normalization
        self.ds, self.dims, self.norm = ds, dims, norm
        self.train_cases, self.val_cases = train, val
        self.train_images = [apply_normalization(c.image, norm) for c in train]
        self.val_images = [apply_normalization(c.image, norm) for c in val]
        self.align = None
        self.halo = None
        self.builder_kw: Dict = {}
        self.last_pred = None

    def validate(self, cfg):
        pos_int = loop.validate_common(cfg)
        pos_int("patch", 4)
        if cfg.dims not in (2, 3):
            raise ValueError("--dims must be 2 or 3, got %r" % (cfg.dims,))
        if not (isinstance(cfg.fg_fraction, (int, float)) and 0.0 <= cfg.fg_fraction <= 1.0):
            raise ValueError("--fg-fraction must be in [0, 1], got %r" % (cfg.fg_fraction,))

    def builder_kwargs(self, fn):
        kw = {}
        for name, v in (("in_channels", len(self.ds.channel_names)), ("num_classes", self.ds.num_classes)):
            if loop._accepts(fn, name):
                kw[name] = v
        if loop._accepts(fn, "out_channels") and "num_classes" not in kw:
            kw["out_channels"] = self.ds.num_classes
        for name in ("spatial_dims", "dims"):
            if loop._accepts(fn, name):
                kw[name] = self.dims
        self.builder_kw = dict(kw)
        return kw

    def wrap_model(self, net, cfg):
        self.align = network_align(net, self.dims, len(self.ds.channel_names))
        if cfg.patch % self.align:
            raise ValueError("--patch %d must be a multiple of the network's alignment %d (its total down-sampling)"
                             % (cfg.patch, self.align))
        if cfg.batch_size * (cfg.patch // self.align) ** self.dims < 2 and any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
            raise ValueError("--patch %d with --batch-size %d leaves one voxel per channel at the network's deepest "
                             "level (patch / %d = 1), where BatchNorm needs more: use --patch >= %d or "
                             "--batch-size >= 2"
                             % (cfg.patch, cfg.batch_size, self.align, 2 * self.align))
        return net

    def make_data(self, cfg, device):
        return PatchSampler(self.train_images, [c.label for c in self.train_cases], self.ds.foreground, self.dims,
                            cfg.patch, cfg.seed, cfg.fg_fraction)

    def loss(self, model, batch, cfg, amp_ctx):
        img, lab = batch
        with amp_ctx:
            logits = model(img)
        if (logits.dim() != img.dim() or logits.shape[0] != img.shape[0] or logits.shape[2:] != lab.shape[1:]
                or logits.shape[1] != self.ds.num_classes):
            raise ValueError("seg --data: the model must map (N, %d, *patch) to (N, %d, *patch) logits; got %s for "
                             "an input of %s" % (img.shape[1], self.ds.num_classes, tuple(logits.shape),
                                                 tuple(img.shape)))
        total, dl, ce = dice_ce_loss(logits, lab)
        return total, {"dice_loss": dl.detach(), "ce": ce.detach()}

    def describe(self, cfg):
        return "%dD, %s layout, %d training / %d held-out cases, %d classes, patch %d, lr %g %s" % (
            self.dims, self.ds.layout, len(self.train_cases), len(self.val_cases), self.ds.num_classes, cfg.patch,
            cfg.lr, cfg.lr_schedule)

    def predict(self, model, image: np.ndarray) -> torch.Tensor:
        if self.halo is None and self.dims == 3 and image[0].size > 128 ** 3:
            self.halo = network_halo(model, 3, self.align)
        return predict_volume(model, torch.from_numpy(image), self.dims, self.align, self.halo)

    def evaluate(self, model, cfg, device):
        fg = self.ds.foreground
        per = {c: [] for c in fg}
        preds = []
        for case, img in zip(self.val_cases, self.val_images):
            pred = self.predict(model, img).argmax(0).numpy()
            preds.append(pred)
            for c, v in dice_per_class(pred, case.label, fg).items():
                per[c].append(v)
        self.last_pred = preds
        dice = {}
        for c in fg:
            vals = [v for v in per[c] if not math.isnan(v)]
            dice[self.ds.labels[c]] = float(np.mean(vals)) if vals else float("nan")
        finite = [v for v in dice.values() if not math.isnan(v)]
        mean = float(np.mean(finite)) if finite else float("nan")
        metrics = {cfg.model: {**{"dice " + k: v for k, v in dice.items()}, "mean dice": mean}}
        self.dice, self.mean_dice = dice, mean
        cols = [("dice " + k, k[:10], "%.4f") for k in dice] + [("mean dice", "mean Dice", "%.4f")]
        head = "held-out cases (%d): %s; Dice per label" % (len(self.val_cases),
                                                           ", ".join(c.name for c in self.val_cases))
        return metrics, head + "\n" + loop.format_table(metrics, cols)


# ------------------------------------------------------------------ outputs
def _overlay_png(path, image: np.ndarray, pred: np.ndarray, truth: np.ndarray, labels: Dict[int, str], title: str):
    """A held-out slice (the axial slice with the most foreground) with the truth and the prediction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    z = int(np.argmax((truth > 0).reshape(-1, truth.shape[-1]).sum(0))) if truth.shape[-1] > 1 else 0
    img = image[0, :, :, z].T
    cols = plt.get_cmap("tab10")
    k = max(labels) + 1
    cmap = ListedColormap([(0, 0, 0, 0)] + [cols(i % 10) for i in range(k - 1)])
    fig, axs = plt.subplots(1, 3, figsize=(10.5, 3.8))
    for ax, (name, lab) in zip(axs, (("image", None), ("truth", truth), ("prediction", pred))):
        ax.imshow(img, cmap="gray", origin="lower")
        if lab is not None:
            ax.imshow(lab[:, :, z].T, cmap=cmap, vmin=0, vmax=k - 1, alpha=0.45, origin="lower",
                      interpolation="nearest")
            for c in range(1, k):
                if (lab[:, :, z] == c).any():
                    ax.contour((lab[:, :, z] == c).T, levels=[0.5], colors=[cols((c - 1) % 10)], linewidths=0.8)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    handles = [plt.Line2D([], [], color=cols((c - 1) % 10), lw=3, label=labels[c]) for c in range(1, k)]
    fig.legend(handles=handles, loc="lower center", ncol=min(k - 1, 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _builder_name(cfg, fn, model) -> Tuple[Optional[str], Dict]:
    spec = getattr(model, "builder_spec", None)
    if spec is not None:
        return spec[0], dict(spec[1])
    mod = getattr(fn, "__module__", "") or ""
    if mod.split(".")[0] != "medconv_ext":
        return None, {}
    kw = dict(getattr(fn, "_seg_kwargs", {}))
    pub = "medconv_ext.models" if mod.startswith("medconv_ext.models") else mod
    return "%s:%s" % (pub, fn.__name__), kw


def resolve_model(name: str):
    from .seg_models import BUILDERS
    if name in BUILDERS:
        return BUILDERS[name]
    return loop.resolve_builder(name)


def _resolve(cfg: SegDataConfig, ds: SegDataset, cases: List[LoadedCase]) -> SegDataConfig:
    if cfg.dims is None:
        thin = any(min(c.label.shape) < 16 for c in cases)
        cfg = dataclasses.replace(cfg, dims=2 if thin else 3)
    if cfg.dims not in (2, 3):
        raise ValueError("--dims must be 2 or 3, got %r" % (cfg.dims,))
    if not cfg.model:
        cfg = dataclasses.replace(cfg, model=DEFAULT_MODEL[cfg.dims])
    if cfg.patch is None:
        cfg = dataclasses.replace(cfg, patch=DEFAULT_PATCH[cfg.dims])
    if cfg.norm not in NORMS:
        raise ValueError("--norm must be one of %s, got %r" % (", ".join(NORMS), cfg.norm))
    return cfg


def run_seg_data(cfg: SegDataConfig, *, resume: Optional[str] = None, given: Optional[set] = None, builder=None,
                 log=print, stream=None) -> Dict:
    from ..tiling.normalize import fit_normalization
    given = set(given or ())
    if not cfg.data:
        raise ValueError("seg --data: give the dataset folder")
    cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))
    task_locked = loop.LOCKED + SegDataTask.locked
    if resume is not None:  # the split, dims and patch of the run being continued
        saved = loop.load_checkpoint(os.path.join(cfg.out, loop.CKPT_NAME) if resume == "auto" else resume)
        cfg = loop.merge_resumed_config(cfg, saved["config"], given | {"data"}, task_locked)
    main = int(os.environ.get("RANK", "0")) == 0
    say = log if main else (lambda s: None)
    ds = read_dataset(cfg.data)
    cases = load_cases(ds, log=say)  # every case is checked before training starts
    cfg = _resolve(cfg, ds, cases)
    train_names, val_names = split_cases(ds, cfg.val_cases or None, cfg.val_size, cfg.seed)
    if cfg.val_size is None:
        cfg = dataclasses.replace(cfg, val_size=len(val_names))
    by_name = {c.name: c for c in cases}
    train = [by_name[n] for n in train_names]
    val = [by_name[n] for n in val_names]
    if cfg.dims == 3 and any(min(c.label.shape) < 2 for c in train):
        raise DatasetError("%s: --dims 3 needs volumes; case %s is a single slice (use --dims 2)"
                           % (cfg.data, next(c.name for c in train if min(c.label.shape) < 2)))
    norm = fit_normalization([c.image for c in train], [c.label for c in train], ds.channel_names, cfg.norm)
    say("normalisation (from the %d training cases): %s" % (len(train), "; ".join(
        "%s: %s%s mean %.4g std %.4g" % (ch["name"], ch["scheme"], " clip [%.4g, %.4g]" % tuple(ch["clip"])
                                         if ch["clip"] else "", ch["mean"], ch["std"]) for ch in norm["channels"])))
    task = SegDataTask(ds, train, val, norm, cfg.dims)
    fn = builder or resolve_model(cfg.model)
    res = loop.run_training(cfg, task, resume=resume, given=given, builder=fn, log=log, stream=stream)
    cfg = res["config"]
    if main:
        _write_outputs(cfg, task, fn, res, say)
    return res


def _write_outputs(cfg, task: SegDataTask, fn, res, log):
    from ..tiling import save_tiling_checkpoint
    model = res["model"]
    model.eval()
    align = task.align
    halo = network_halo(model, task.dims, align)
    name, kw = _builder_name(cfg, fn, model)
    if name is not None and not kw:
        kw = dict(task.builder_kw)
        if cfg.features is not None and loop._accepts(fn, "features"):
            kw["features"] = int(cfg.features)
    model_path = os.path.join(cfg.out, MODEL_NAME)
    if name is None:
        log("note: %s is not written: the builder %r is outside medconv_ext, so the tile CLI could not rebuild it"
            % (model_path, cfg.model))
    else:
        save_tiling_checkpoint(model.float().cpu(), model_path, builder=name, kwargs=kw, halo=list(halo),
                               align=[align] * task.dims, normalization=task.norm)
        log("wrote %s (halo %s, align %d, normalisation stored)" % (model_path, list(halo), align))
    mpath = os.path.join(cfg.out, loop.METRICS_NAME)
    if os.path.isfile(mpath) and task.val_cases:
        with open(mpath) as f:
            report = json.load(f)
        report.update({"dice": task.dice, "mean_dice": task.mean_dice, "labels": {str(k): v for k, v in
                                                                                  task.ds.labels.items()},
                       "held_out_cases": [c.name for c in task.val_cases],
                       "train_cases": [c.name for c in task.train_cases], "layout": task.ds.layout,
                       "dims": task.dims, "halo": list(halo), "align": align, "normalization": task.norm})
        with open(mpath, "w") as f:
            json.dump(report, f, indent=2)
        if task.last_pred:
            try:
                c0 = task.val_cases[0]
                _overlay_png(os.path.join(cfg.out, PNG_NAME), task.val_images[0], task.last_pred[0], c0.label,
                             task.ds.labels, "%s, held-out case %s (mean held-out Dice %.3f)" % (cfg.model, c0.name,
                                                                                       task.mean_dice))
            except ImportError:
                log("note: matplotlib is not installed: no %s" % PNG_NAME)


# ------------------------------------------------------------------ command line
DATA_ONLY = ("dims", "patch", "norm", "val_cases", "fg_fraction")


def add_data_args(s):
    """The `seg` options of training on a dataset folder (`--data`)."""
    a = s.add_argument
    a("--data", default=None, metavar="DIR",
      help="train on a labelled dataset: a folder in the Medical Segmentation Decathlon layout or nnU-Net's raw "
           "layout (dataset.json, imagesTr/, labelsTr/; NIfTI); without it the synthetic 2D example runs")
    a("--dims", type=int, default=None, choices=(2, 3),
      help="--data: 3 (patches of the volumes) or 2 (slices); default 3, or 2 for images thinner than 16 voxels")
    a("--patch", type=int, default=None, help="--data: patch size (cubic in 3D); default 32 (3D), 64 (2D)")
    a("--norm", default=None, choices=NORMS,
      help="--data: intensity normalisation fixed from the training cases: ct (clip to the foreground's 0.5-99.5 "
           "percentiles, then scale), zscore, none; default auto (ct for channels named CT, else zscore)")
    a("--val-cases", default=None, metavar="A,B,...",
      help="--data: held-out cases by name; default --val-size cases (20%% of the cases) drawn with the seed")
    a("--fg-fraction", type=float, default=None,
      help="--data: fraction of the patches centred on a foreground voxel; default 0.33")


def check_mode_args(args) -> Optional[str]:
    """An error message when options of one `seg` mode are given to the other."""
    if args.data is None:
        if getattr(args, "resume", None) is not None:
            path = args.resume if args.resume != "auto" else os.path.join(args.out or "runs/seg", loop.CKPT_NAME)
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)["config"]
            except Exception:  # no or another checkpoint: the synthetic example reports it
                saved = {}
            if isinstance(saved, dict) and saved.get("data"):
                return "%s was written by `seg --data %s`: pass --data again to resume it" % (path, saved["data"])
        given = [k for k in DATA_ONLY if getattr(args, k, None) is not None]
        if given:
            return "%s apply to training on a dataset folder: add --data DIR" % ", ".join(
                "--" + k.replace("_", "-") for k in given)
    elif getattr(args, "size", None) is not None:
        return "--size applies to the synthetic example; with --data the cases have their own sizes (see --patch)"
    return None
