"""Intensity normalisation stored with a model, and the input view of the tile CLI that applies it.

A normalisation is a plain dict (it travels inside a tiling checkpoint, readable with
torch.load(weights_only=True)):

    {"format": "medconv_ext.normalization.v1",
     "channels": [{"name": "CT", "scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}, ...]}

one entry per input channel, applied as x -> (clip(x, lo, hi) - mean) / std ("clip" is None for
z-score channels; scheme "none" has mean 0, std 1 and no clip). It is fixed from the training set
by `fit_normalization` (medconv_ext.train's `seg --data`):

* "ct": CT-style. lo/hi are the 0.5 and 99.5 percentiles of the foreground voxels (label > 0) of
  all training cases, mean/std those of the clipped foreground voxels (as nnU-Net does for CT).
* "zscore": mean/std of all voxels of all training cases (one value per channel for the whole
  dataset, so that a volume is normalised the same way whatever its size or crop).
* "none": the input as it is.

`NormalizedView` shows an image (array view of .io, (C, *spatial) or (N, C, *spatial)) normalised
and padded with zeros at the high end of each spatial axis (after normalisation) up to `sizes`,
reading only the part of the source a tile needs.
"""
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

NORM_FORMAT = "medconv_ext.normalization.v1"
SCHEMES = ("ct", "zscore", "none")


def _check_channel(ch, i, what):
    if not isinstance(ch, dict):
        raise ValueError("%s: channel %d must be a dict, got %r" % (what, i, ch))
    if ch.get("scheme") not in SCHEMES:
        raise ValueError("%s: channel %d has scheme %r, expected one of %s" % (what, i, ch.get("scheme"), SCHEMES))
    for k in ("mean", "std"):
        v = ch.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError("%s: channel %d needs a finite %s, got %r" % (what, i, k, v))
    if not ch["std"] > 0:
        raise ValueError("%s: channel %d has std %r, must be > 0" % (what, i, ch["std"]))
    clip = ch.get("clip")
    if clip is not None and (not isinstance(clip, (list, tuple)) or len(clip) != 2 or not clip[0] <= clip[1]):
        raise ValueError("%s: channel %d has clip %r, expected [lo, hi] with lo <= hi or None" % (what, i, clip))


def check_normalization(norm, what="normalization") -> Dict:
    """Validate a stored normalisation dict (ValueError naming the problem); returns it."""
    if not isinstance(norm, dict) or norm.get("format") != NORM_FORMAT:
        raise ValueError("%s: not a medconv_ext normalisation (format %r expected), got %r"
                         % (what, NORM_FORMAT, norm if not isinstance(norm, dict) else norm.get("format")))
    chans = norm.get("channels")
    if not isinstance(chans, list) or not chans:
        raise ValueError("%s: needs a non-empty list 'channels'" % what)
    for i, ch in enumerate(chans):
        _check_channel(ch, i, what)
    return norm


def _finite_values(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return x[np.isfinite(x)]


def fit_normalization(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], channel_names: Sequence[str],
                      scheme: str = "auto", max_samples: int = 10_000_000) -> Dict:
    """The normalisation of a training set. images: arrays (C, *spatial); labels: integer arrays
    (*spatial) (foreground = label > 0). scheme: "auto" (ct for channels named CT, else zscore),
    "ct", "zscore" or "none", for every channel."""
    if scheme not in ("auto",) + SCHEMES:
        raise ValueError("normalisation scheme must be one of auto, %s, got %r" % (", ".join(SCHEMES), scheme))
    if not images:
        raise ValueError("fit_normalization: no training images")
    n_ch = images[0].shape[0]
    chans: List[Dict] = []
    for c in range(n_ch):
        name = str(channel_names[c]) if c < len(channel_names) else "channel %d" % c
        kind = scheme if scheme != "auto" else ("ct" if name.strip().lower() == "ct" else "zscore")
        if kind == "none":
            chans.append({"name": name, "scheme": "none", "clip": None, "mean": 0.0, "std": 1.0})
            continue
        if kind == "ct":
            fg = [_finite_values(im[c][lab > 0]) for im, lab in zip(images, labels)]
            vals = np.concatenate(fg) if fg else np.zeros(0)
            if vals.size == 0:  # no foreground anywhere: all voxels
                vals = np.concatenate([_finite_values(im[c]) for im in images])
            if vals.size > max_samples:  # a deterministic subsample for the percentiles
                vals = vals[:: int(math.ceil(vals.size / max_samples))]
            lo, hi = (float(v) for v in np.percentile(vals, [0.5, 99.5]))
            v = np.clip(vals, lo, hi)
            mean, std = float(v.mean()), float(v.std())
            chans.append({"name": name, "scheme": "ct", "clip": [lo, hi], "mean": mean, "std": std if std > 0 else 1.0})
            continue
        s = s2 = n = 0.0
        for im in images:  # exact sums in float64 over every voxel
            v = _finite_values(im[c])
            s += float(v.sum())
            s2 += float(np.square(v).sum())
            n += v.size
        if n == 0:
            raise ValueError("fit_normalization: channel %d (%s) has no finite voxel in the training set" % (c, name))
        mean = s / n
        std = math.sqrt(max(s2 / n - mean * mean, 0.0))
        chans.append({"name": name, "scheme": "zscore", "clip": None, "mean": mean, "std": std if std > 0 else 1.0})
    return {"format": NORM_FORMAT, "channels": chans}


def apply_normalization(x, norm: Dict, channel_axis: int = 0, out_dtype=np.float32):
    """Normalise x (NumPy array or torch tensor) whose channels lie on `channel_axis`."""
    chans = norm["channels"]
    if x.shape[channel_axis] != len(chans):
        raise ValueError("the image has %d channels but the stored normalisation has %d (%s)"
                         % (x.shape[channel_axis], len(chans), ", ".join(c["name"] for c in chans)))
    try:
        import torch
        is_tensor = isinstance(x, torch.Tensor)
    except ImportError:  # pragma: no cover
        is_tensor = False
    if is_tensor:
        y = x.float() if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16) else x.clone()
    else:
        y = np.array(x, dtype=np.dtype(out_dtype) if np.dtype(out_dtype).kind == "f" else np.float32, copy=True)
    for c, ch in enumerate(chans):
        idx = [slice(None)] * y.ndim
        idx[channel_axis] = c
        idx = tuple(idx)
        v = y[idx]
        if ch.get("clip") is not None:
            lo, hi = ch["clip"]
            v = v.clamp(lo, hi) if is_tensor else np.clip(v, lo, hi)
        y[idx] = (v - ch["mean"]) / ch["std"]
    return y


def padded_sizes(sizes: Sequence[int], align: Sequence[int]) -> List[int]:
    """Each size rounded up to a multiple of its align."""
    return [-(-int(s) // int(a)) * int(a) for s, a in zip(sizes, align)]


class NormalizedView:
    """An array view ((N,) C, *spatial) of `base` normalised with `norm` (None: as is), in float64,
    and zero-padded at the high end of the spatial axes up to `sizes`. Indexed with ints and
    slices (step 1), as the tile runner does."""

    def __init__(self, base, norm: Optional[Dict], sizes: Sequence[int], dims: int):
        self.base, self.norm, self.dims = base, norm, dims
        self.src_sizes = [int(s) for s in base.shape[-dims:]]
        self.shape = tuple(base.shape[:-dims]) + tuple(int(s) for s in sizes)
        if any(s < b for s, b in zip(sizes, self.src_sizes)):
            raise ValueError("NormalizedView: sizes %s smaller than the image %s" % (list(sizes), self.src_sizes))
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float64)  # normalised in float64; the runner casts tiles to the model's dtype

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        lead, sp = key[:-self.dims], key[-self.dims:]
        src_key, pads, out_shape = [], [], []
        for k, n, s in zip(sp, self.shape[-self.dims:], self.src_sizes):
            if not isinstance(k, slice):
                raise TypeError("NormalizedView: spatial axes take slices only, got %r" % (k,))
            a, b, step = k.indices(n)
            if step != 1:
                raise ValueError("NormalizedView: slice steps must be 1, got %r" % (k,))
            b = max(a, b)
            src_key.append(slice(min(a, s), min(b, s)))
            pads.append((0, (b - a) - max(0, min(b, s) - min(a, s))))
            out_shape.append(b - a)
        blk = np.asarray(self.base[tuple(lead) + tuple(src_key)])
        ch_axis = blk.ndim - self.dims - 1  # the channel axis is kept (a slice), any leading int dropped it
        if self.norm is not None:
            blk = apply_normalization(blk, self.norm, channel_axis=ch_axis, out_dtype=np.float64)
        else:
            blk = blk.astype(np.float64, copy=False)
        if any(p[1] for p in pads):
            blk = np.pad(blk, [(0, 0)] * (blk.ndim - self.dims) + pads)  # zeros after normalisation
        return blk


# ------------------------------------------------------------------ the tile CLI's input and output steps
def label_dtype(n_classes: int) -> np.dtype:
    """The dtype of a label map of n_classes classes: uint8 up to 256 classes, else uint16."""
    return np.dtype(np.uint8 if n_classes <= 256 else np.uint16)


def prepare_input(image, info: Dict, dims: int, tile: List[int], align: List[int], margin, halo,
                  normalize: bool = True, argmax: bool = False, warn=None):
    """What `python -m medconv_ext.tile` does between opening the input and planning the tiles:

    * warns when the checkpoint was written by another package version;
    * applies the checkpoint's stored normalisation (unless normalize=False), or warns with
      argmax=True when it has none (labels from raw intensities are rarely what was meant);
    * pads the image with zeros at the high end of every axis to a multiple of `align` (halo mode),
      after normalisation;
    * a tile at least as large as the (padded) image along an axis becomes one tile there.
    Returns (image view, the image's own spatial sizes, tile, halo)."""
    from .._version import __version__
    warn = warn or (lambda s: None)
    ver = info.get("version")
    if ver is None:
        warn("warning: the checkpoint carries no package version (written before medconv_ext stored one); this is "
             "medconv_ext %s" % __version__)
    elif str(ver) != str(__version__):
        warn("warning: the checkpoint was written by medconv_ext %s, this is %s; if the result looks wrong, "
             "re-save the model with this version" % (ver, __version__))
    norm = info.get("normalization")
    if norm is not None and normalize:
        check_normalization(norm, "the checkpoint's normalization")
        c = image.shape[-dims - 1]
        if c != len(norm["channels"]):
            raise ValueError("the input has %d channel(s) but the model's stored normalisation has %d (%s)"
                             % (c, len(norm["channels"]), ", ".join(ch["name"] for ch in norm["channels"])))
    elif norm is None and argmax and normalize:
        warn("warning: the checkpoint stores no intensity normalisation, so the input is used as it is; a model "
             "trained with `python -m medconv_ext.train seg --data` stores the one of its training set")
    if not normalize:
        norm = None
    sizes = [int(s) for s in image.shape[-dims:]]
    halo_mode = margin is None and halo is not None
    target = padded_sizes(sizes, align) if halo_mode else list(sizes)
    if norm is not None or target != sizes:
        image = NormalizedView(image, norm, target, dims)
    tile = list(tile)
    if halo_mode:
        halo = list(halo) if isinstance(halo, (list, tuple)) else [int(halo)] * dims
        for ax in range(dims):
            if tile[ax] >= target[ax]:  # one tile along this axis: no halo needed
                tile[ax], halo[ax] = target[ax], 0
        halo = tuple(halo)
    return image, sizes, tuple(tile), halo


def crop_region(dst, block, sizes: Sequence[int], dims: int):
    """(dst, block) cut to the image's own spatial `sizes` (the padding is dropped); (None, None)
    when the region lies entirely in the padding."""
    lead, sp = dst[:-dims], dst[-dims:]
    new, cut = [], []
    for sl, n in zip(sp, sizes):
        a, b = sl.start, min(sl.stop, n)
        if b <= a:
            return None, None
        new.append(slice(a, b))
        cut.append(slice(0, b - a))
    return tuple(lead) + tuple(new), block[(slice(None),) + tuple(cut)]


def label_source(src):
    """The Source the --argmax output mirrors: for NIfTI inputs with a channel axis (X, Y, Z, C), the
    same without it, so that the label map is (X, Y, Z); other formats keep a channel axis of 1."""
    import copy
    if src.fmt not in ("nii", "nii.gz") or "c" not in src.names:
        return src
    i = src.names.index("c")
    out = copy.copy(src)
    out.names = src.names[:i] + src.names[i + 1:]
    out.phys_shape = src.phys_shape[:i] + src.phys_shape[i + 1:]
    return out
