"""Exact tiled (crop-equivariant) inference for images and volumes larger than memory.

Two modes (docs/design.md section 3):

* valid networks (stride-1 unpadded convolutions, no resampling; `margin`): the image is padded once
  by the margin (virtually: a tile reads only what it needs, padding its border part with
  `pad_mode`), cut into tiles of `tile` with stride `tile - 2*margin`, and the tile outputs are
  placed side by side. No output voxel of a tile ever sees padding that full-image inference would
  not see, so the result equals full-image inference.
* other networks (padded stride-1 networks, U-Nets that down-sample by `align`; `halo`): every tile
  carries a halo of at least the receptive-field radius, tile origins are multiples of `align`,
  tiles at the image border are clamped to the image (not padded) so the network's own padding
  acts there exactly as in full-image inference, and the halos are cropped.

Each output voxel is written exactly once, by a tile in which it is at least margin/halo away from
any tile edge that is not an image edge. Tiles run in batches on the device and are streamed into
`out` (a tensor, a NumPy array or a numpy.memmap), so memory is bounded by tile and batch size.
"""
import contextlib
import itertools
import math
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

__all__ = ["predict_tiled", "receptive_margin", "receptive_radius", "save_tiling_checkpoint",
           "load_tiling_checkpoint", "register_tiling_builder"]

IntOrSeq = Union[int, Sequence[int]]
PAD_MODES = ("constant", "reflect", "replicate", "circular")

# ------------------------------------------------------------------ module classification
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax,  # Softmax: over channels in CNN heads
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,  # per-voxel affine in eval mode
)
# Layers whose output at a voxel depends on the whole image: tiling can never be exact with them.
_GLOBAL = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm,
           nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
           nn.Linear)
_RESAMPLE = (nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d, nn.Upsample, nn.PixelShuffle,
             nn.PixelUnshuffle, nn.ConvTranspose2d, nn.ConvTranspose3d)
_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
               nn.modules.batchnorm._BatchNorm)


def _conv_types():
    types = [nn.Conv2d, nn.Conv3d]
    try:  # the rolling convolutions have the same attributes as nn.Conv
        from .nn import RollingConv2d, RollingConv3d, RollingConvTranspose2d, RollingConvTranspose3d
        types += [RollingConv2d, RollingConv3d]
        resample = (RollingConvTranspose2d, RollingConvTranspose3d)
    except Exception:  # pragma: no cover - the package's own modules always import
        resample = ()
    return tuple(types), resample


def _conv_dims(m: nn.Module) -> int:
    return len(m.kernel_size)


def _conv_extents(m: nn.Module, op: str) -> Tuple[List[int], List[int]]:
    """(left, right) extents per axis: output voxel q reads input q-left .. q+right."""
    k, d = list(m.kernel_size), list(m.dilation)
    span = [di * (ki - 1) for ki, di in zip(k, d)]
    pad = m.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = [0] * len(k)
        elif pad == "same":  # torch pads the extra voxel of an even span on the right
            pad = [s // 2 for s in span]
        else:  # pragma: no cover
            raise ValueError("%s: unknown padding %r in %s" % (op, pad, m))
    pad = list(pad)
    return pad, [s - p for s, p in zip(span, pad)]


def _leaf_modules(model: nn.Module):
    for name, m in model.named_modules():
        if not any(True for _ in m.children()):
            yield name or type(m).__name__, m


def _known_dims(model) -> set:
    if not isinstance(model, nn.Module):
        return set()
    conv, conv_t = _conv_types()
    dims = set()
    for _, m in _leaf_modules(model):
        if isinstance(m, conv + conv_t + (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            dims.add(_conv_dims(m))
    return dims


def _check_spatial_dims(spatial_dims, op):
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ValueError("%s: spatial_dims must be 2 or 3, got %r" % (op, spatial_dims))


def _check_model(model, op):
    if not isinstance(model, nn.Module):
        raise TypeError("%s: model must be a torch.nn.Module, got %s" % (op, type(model).__name__))


def receptive_margin(model: nn.Module, spatial_dims: int) -> Tuple[int, ...]:
    """Margin per spatial axis of a valid network: the sum over its convolutions of
    dilation * (kernel - 1) / 2. A valid network has only stride-1, unpadded convolutions with odd
    extents, no resampling and otherwise only voxel-wise layers (activations, BatchNorm, Dropout);
    its output is smaller than its input by the margin on every side. Raises a ValueError naming the
    layer that makes the model not a valid network (use `halo` and `receptive_radius` for those).

    Assumes the model is a composition of its registered submodules (as nn.Sequential, residual
    blocks with cropped skips, or valid_srnet): a forward() that calls functional convolutions or
    pads itself is invisible here; predict_tiled checks the output size of every tile and reports a
    mismatch."""
    op = "receptive_margin"
    _check_model(model, op)
    _check_spatial_dims(spatial_dims, op)
    conv, conv_t = _conv_types()
    margin = [0] * spatial_dims
    n_conv = 0
    for name, m in _leaf_modules(model):
        if isinstance(m, conv):
            if _conv_dims(m) != spatial_dims:
                raise ValueError("%s: layer %r is a %dD convolution but spatial_dims=%d"
                                 % (op, name, _conv_dims(m), spatial_dims))
            if any(s != 1 for s in m.stride):
                raise ValueError("%s: layer %r has stride %s: a valid network has only stride-1 convolutions "
                                 "(for down-sampling networks pass halo= and align= to predict_tiled)"
                                 % (op, name, tuple(m.stride)))
            left, right = _conv_extents(m, op)
            if any(left):
                raise ValueError("%s: layer %r is padded (padding=%s): not a valid network; pass halo= to "
                                 "predict_tiled (see receptive_radius)" % (op, name, m.padding))
            if any(r % 2 for r in right):
                raise ValueError("%s: layer %r has an even extent dilation*(kernel-1) = %s: its margin is not "
                                 "symmetric; pass margin= explicitly" % (op, name, right))
            margin = [a + r // 2 for a, r in zip(margin, right)]
            n_conv += 1
        elif isinstance(m, conv_t + _RESAMPLE):
            raise ValueError("%s: layer %r (%s) resamples: not a valid network; pass halo= and align= to "
                             "predict_tiled" % (op, name, type(m).__name__))
        elif isinstance(m, _GLOBAL):
            raise ValueError("%s: layer %r (%s) mixes information across the whole image: tiled inference "
                             "cannot be exact with it" % (op, name, type(m).__name__))
        elif isinstance(m, _ELEMENTWISE) or not any(True for _ in m.parameters(recurse=False)):
            continue  # voxel-wise, or a parameterless helper (flatten/crop/add modules)
        else:
            raise ValueError("%s: cannot tell the receptive field of layer %r (%s); pass margin= to predict_tiled"
                             % (op, name, type(m).__name__))
    if n_conv == 0:
        raise ValueError("%s: the model has no convolution layers (nn.Conv%dd or RollingConv%dd) to compute a "
                         "margin from; pass margin= to predict_tiled" % (op, spatial_dims, spatial_dims))
    return tuple(margin)


def _analytic_radius(model, spatial_dims, op) -> Optional[Tuple[int, ...]]:
    """Sum of the per-layer extents for a chain (nn.Sequential, nested) of stride-1 convolutions and
    voxel-wise layers; None when the module graph is not such a chain (a custom forward() may do
    anything: residual sums, resampling, global means, so those are probed)."""
    conv, conv_t = _conv_types()
    for _, m in model.named_modules():
        if any(True for _ in m.children()) and type(m) is not nn.Sequential:
            return None
    left = [0] * spatial_dims
    right = [0] * spatial_dims
    for name, m in _leaf_modules(model):
        if isinstance(m, conv):
            if _conv_dims(m) != spatial_dims:
                raise ValueError("%s: layer %r is a %dD convolution but spatial_dims=%d"
                                 % (op, name, _conv_dims(m), spatial_dims))
            if any(s != 1 for s in m.stride):
                return None
            lft, rgt = _conv_extents(m, op)
            left = [a + b for a, b in zip(left, lft)]
            right = [a + b for a, b in zip(right, rgt)]
        elif isinstance(m, _GLOBAL):
            raise ValueError("%s: layer %r (%s) mixes information across the whole image: tiled inference "
                             "cannot be exact with it" % (op, name, type(m).__name__))
        elif isinstance(m, _ELEMENTWISE):
            continue
        else:
            return None  # resampling or unknown layers: probe
    return tuple(max(a, b) for a, b in zip(left, right))


def _first_in_channels(model) -> Optional[int]:
    for _, m in model.named_modules():
        c = getattr(m, "in_channels", None)
        if isinstance(c, int) and c > 0:
            return c
    return None


def _model_dtype_device(model) -> Tuple[Optional[torch.dtype], Optional[torch.device]]:
    dtype = device = None
    for t in itertools.chain(model.parameters(), model.buffers()):
        if device is None:
            device = t.device
        if dtype is None and t.is_floating_point():
            dtype = t.dtype
        if dtype is not None and device is not None:
            break
    return dtype, device


def _probe_radius(model, spatial_dims, in_channels, align, probe_size, op) -> Tuple[int, ...]:
    """Receptive radius by probing: a block of align^dims input voxels (all channels) set to NaN
    on a random probe image; NaN propagates through every arithmetic dependency (x * 0 too, and
    through ReLU, max-pooling, BatchNorm, sums), so the NaN outputs are exactly the voxels that
    structurally depend on the block, whatever the weights or ReLU gates. The probe doubles while
    the NaN region reaches its border. oneDNN and cuDNN are off during the probe: Winograd/FFT
    convolutions would smear a NaN over a whole transform tile."""
    if in_channels is None:
        in_channels = _first_in_channels(model)
        if in_channels is None:
            raise ValueError("%s: cannot find the model's input channels to probe it; pass in_channels=" % op)
    dtype, device = _model_dtype_device(model)
    dtype = dtype or torch.float32
    device = device or torch.device("cpu")
    limit = 2048 if spatial_dims == 2 else 128
    size = probe_size or (128 if spatial_dims == 2 else 48)
    size = -(-size // align) * align
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(1234)
    try:
        while True:
            shape = (1, in_channels) + (size,) * spatial_dims
            c = (size // 2 // align) * align
            x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            x[(slice(None), slice(None)) + (slice(c, c + align),) * spatial_dims] = float("nan")
            with torch.no_grad(), torch.backends.cudnn.flags(enabled=False), torch.backends.mkldnn.flags(
                    enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None):
                y = model(x)
            if tuple(y.shape[2:]) != shape[2:]:
                raise ValueError("%s: the model maps a %s probe to spatial size %s: not a same-size network (for "
                                 "valid networks use receptive_margin and margin=)" % (op, shape[2:], tuple(y.shape[2:])))
            nz = torch.isnan(y).any(dim=1)[0]
            if not nz.any():
                return (0,) * spatial_dims  # the output does not depend on the input
            lo, hi = [], []
            for ax in range(spatial_dims):
                other = tuple(a for a in range(spatial_dims) if a != ax)
                idx = torch.nonzero(nz.any(dim=other) if other else nz).flatten()
                lo.append(int(idx.min()))
                hi.append(int(idx.max()))
            if not any(a == 0 or b == size - 1 for a, b in zip(lo, hi)):
                # any input voxel q of the block reaches outputs within [lo, hi]
                return tuple(max(b - c, c + align - 1 - a) for a, b in zip(lo, hi))
            if size * 2 > limit:
                raise ValueError("%s: the receptive field reaches the border of a %d-voxel probe: the network may "
                                 "mix information across the whole image (global pooling, InstanceNorm, attention) "
                                 "or have a field wider than %d; pass halo= explicitly if you know it"
                                 % (op, size, size // 2))
            size *= 2
    finally:
        model.train(was_training)


def receptive_radius(model: nn.Module, spatial_dims: int, *, in_channels: Optional[int] = None, align: int = 1,
                     probe_size: Optional[int] = None, method: str = "auto") -> Tuple[int, ...]:
    """Receptive-field radius per spatial axis of a same-size network (padded convolutions, U-Nets):
    output voxel p depends only on input voxels within `radius` of p (for U-Nets that down-sample by
    `align`, of any voxel of p's align-block). Use it as `halo` in predict_tiled.

    method="analytic": sum of the convolution extents, for an nn.Sequential chain (nested chains
    included) of stride-1 convolutions and voxel-wise layers. method="probe": how far a
    NaN placed in a block of align^dims input voxels spreads through the network (structural, so
    independent of the weights and of ReLU gates), on a probe of `probe_size` voxels per axis
    (doubled while the NaN region reaches the probe border; 128 in 2D, 48 in 3D by default).
    method="auto": analytic when the layers allow it, else probe."""
    op = "receptive_radius"
    _check_model(model, op)
    _check_spatial_dims(spatial_dims, op)
    if method not in ("auto", "analytic", "probe"):
        raise ValueError("%s: method must be 'auto', 'analytic' or 'probe', got %r" % (op, method))
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError("%s: align must be an int >= 1, got %r" % (op, align))
    if method != "probe":
        r = _analytic_radius(model, spatial_dims, op)
        if r is not None:
            return r
        if method == "analytic":
            raise ValueError("%s: the model is not an nn.Sequential chain of stride-1 convolutions and voxel-wise "
                             "layers, which the analytic rule needs; use method='probe' or pass halo= explicitly" % op)
    return _probe_radius(model, spatial_dims, in_channels, align, probe_size, op)


# ------------------------------------------------------------------ exact mode
def _precision_objects():
    b = torch.backends
    objs = []
    for parent, names in ((b.cuda, ("matmul",)), (b.cudnn, ("conv", "rnn")), (b.mkldnn, ("conv", "matmul", "rnn"))):
        for n in names:
            o = getattr(parent, n, None)
            if o is not None and hasattr(o, "fp32_precision"):
                objs.append(o)
    return objs


def _set_deterministic(mode: bool, warn_only: bool = False):
    # torch.use_deterministic_algorithms also sets torch._inductor.config.deterministic, importing
    # Inductor for that (5-20 s on a loaded CPU). When Inductor is not loaded nothing compiled by it
    # can run, so set only the ATen flag then.
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if "torch._inductor.config" in sys.modules or setter is None:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


@contextlib.contextmanager
def _exact_mode(enabled: bool):
    """Deterministic algorithms, no TF32 / reduced-precision reductions; previous settings restored."""
    if not enabled:
        yield
        return
    b = torch.backends
    saved_det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    saved_cudnn = (b.cudnn.deterministic, b.cudnn.benchmark)
    objs = _precision_objects()
    saved_prec = [o.fp32_precision for o in objs]
    legacy = not objs  # torch < 2.9: only the allow_tf32 flags exist
    if legacy:
        saved_tf32 = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    saved_red = (b.cuda.matmul.allow_fp16_reduced_precision_reduction,
                 b.cuda.matmul.allow_bf16_reduced_precision_reduction)
    try:
        _set_deterministic(True)
        b.cudnn.deterministic, b.cudnn.benchmark = True, False
        for o in objs:
            o.fp32_precision = "ieee"
        if legacy:
            b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = False
        b.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        b.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        yield
    finally:
        _set_deterministic(saved_det[0], warn_only=saved_det[1])
        b.cudnn.deterministic, b.cudnn.benchmark = saved_cudnn
        for o, p in zip(objs, saved_prec):
            o.fp32_precision = p
        if legacy:
            b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved_tf32
        (b.cuda.matmul.allow_fp16_reduced_precision_reduction,
         b.cuda.matmul.allow_bf16_reduced_precision_reduction) = saved_red


# ------------------------------------------------------------------ progress
class _Progress:
    """A one-line progress bar on stderr, shown only once a run has lasted `delay` seconds."""

    def __init__(self, total: int, enabled: bool, delay: float = 2.0, every: float = 0.5):
        self.total, self.enabled, self.delay, self.every = total, enabled, delay, every
        self.t0 = time.perf_counter()
        self.last = -math.inf
        self.shown = False

    def update(self, done: int):
        if not self.enabled:
            return
        now = time.perf_counter()
        el = now - self.t0
        if (el < self.delay or now - self.last < self.every) and not (self.shown and done == self.total):
            return
        self.last = now
        self.shown = True
        frac = done / max(self.total, 1)
        eta = el / frac - el if frac > 0 else float("nan")
        bar = "#" * int(30 * frac)
        sys.stderr.write("\rpredict_tiled [%-30s] %d/%d tiles %5.1f%% %6.1fs ETA %6.1fs"
                         % (bar, done, self.total, 100 * frac, el, eta))
        sys.stderr.flush()

    def close(self):
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ------------------------------------------------------------------ argument checks
def _tuple_arg(value, dims, name, op, minimum):
    if isinstance(value, bool) or (not isinstance(value, (int, tuple, list))):
        raise TypeError("%s: %s must be an int or a sequence of %d ints, got %r" % (op, name, dims, value))
    vals = [value] * dims if isinstance(value, int) else list(value)
    if len(vals) != dims or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise ValueError("%s: %s must be an int or a sequence of %d ints (one per spatial axis), got %r"
                         % (op, name, dims, value))
    if any(v < minimum for v in vals):
        raise ValueError("%s: %s must be >= %d, got %r" % (op, name, minimum, value))
    return vals


def _seq_len(v):
    return len(v) if isinstance(v, (tuple, list)) else None


_WIDER = {torch.bfloat16: (torch.bfloat16, torch.float32, torch.float64),
          torch.float16: (torch.float16, torch.float32, torch.float64),
          torch.float32: (torch.float32, torch.float64), torch.float64: (torch.float64,)}
_NP2TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
             np.dtype(np.float64): torch.float64}


def _np_dtype_for(dtype: torch.dtype) -> np.dtype:
    return np.dtype({torch.float16: np.float16, torch.float64: np.float64}.get(dtype, np.float32))


def _out_torch_dtype(out):
    if isinstance(out, torch.Tensor):
        return out.dtype
    return _NP2TORCH.get(out.dtype)


def _axis_plan(size: int, tile: int, m: int, h: int, align: int) -> Tuple[int, List[Tuple[int, int, int, int]]]:
    """Tile extent along one axis and its tiles as (src_start, dst_start, dst_end, off): the tile
    reads image[src_start : src_start + extent] (may reach outside the image by the margin m in
    valid mode) and its output voxel off + j goes to dst_start + j for dst_start + j < dst_end."""
    if m:  # valid mode, in padded coordinates p (image coordinate p - m)
        padded = size + 2 * m
        ext = min(tile, padded)
        step = ext - 2 * m
        plan, p, end = [], 0, 0
        while True:
            last = p + ext >= padded
            q = padded - ext if last else p  # the last tile is clamped to the end
            plan.append((q - m, end, size if last else p + step, end - q))
            if last:
                return ext, plan
            end = p + step
            p += step
    ext = min(tile, size)
    step = ((tile - 2 * h) // align) * align
    plan, s, end = [], 0, 0
    while True:
        last = s + ext >= size
        q = size - ext if last else s
        plan.append((q, end, size if last else s + step + h, end - q))
        if last:
            return ext, plan
        end = s + step + h
        s += step


def _check_inputs(model, image, tile, margin, halo, align, batch_size, out, pad_mode):
    op = "predict_tiled"
    if not callable(model):
        raise TypeError("%s: model must be a torch.nn.Module (or a callable), got %s" % (op, type(model).__name__))
    if isinstance(image, torch.Tensor):
        if image.is_complex() or image.dtype == torch.bool:
            raise TypeError("%s: image must have a real numeric dtype, got %s" % (op, image.dtype))
    elif isinstance(image, np.ndarray):
        if image.dtype.kind not in "fiu":
            raise TypeError("%s: image must have a real numeric dtype, got %s" % (op, image.dtype))
    else:
        raise TypeError("%s: image must be a torch.Tensor, a numpy.ndarray or a numpy.memmap, got %s"
                        % (op, type(image).__name__))
    if margin is not None and halo is not None:
        raise ValueError("%s: pass margin= (valid networks) or halo= (padded networks, U-Nets), not both" % op)
    # spatial dims: from tile / margin / halo sequences and the model's convolutions; they must agree
    sources = {}
    for name, v in (("tile", tile), ("margin", margin), ("halo", halo), ("align", align)):
        n = _seq_len(v)
        if n is not None:
            sources[name] = n
    mdims = _known_dims(model)
    if len(mdims) > 1:
        raise ValueError("%s: the model mixes %s convolutions; cannot tell its spatial dims" % (op, sorted(mdims)))
    if mdims:
        sources["the model's convolutions"] = next(iter(mdims))
    if len(set(sources.values())) > 1:
        raise ValueError("%s: mismatched spatial dims: %s" % (
            op, ", ".join("%s -> %dD" % (k, v) for k, v in sources.items())))
    if not sources:
        raise ValueError("%s: cannot tell whether the model is 2D or 3D; pass tile as a tuple (one size per "
                         "spatial axis)" % op)
    dims = next(iter(sources.values()))
    if dims not in (2, 3):
        raise ValueError("%s: only 2D and 3D images are supported, got %d spatial dims" % (op, dims))
    if image.ndim not in (dims + 1, dims + 2):
        raise ValueError("%s: mismatched dims: a %dD model takes an image shaped (C, %s) or (N, C, %s), got shape %s"
                         % (op, dims, ", ".join("DHW"[3 - dims:]), ", ".join("DHW"[3 - dims:]), tuple(image.shape)))
    tile = _tuple_arg(tile, dims, "tile", op, 1)
    align = _tuple_arg(align, dims, "align", op, 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError("%s: batch_size must be an int >= 1, got %r" % (op, batch_size))
    if pad_mode not in PAD_MODES:
        raise ValueError("%s: pad_mode must be one of %s, got %r" % (op, PAD_MODES, pad_mode))
    if out is not None and not isinstance(out, (torch.Tensor, np.ndarray)):
        raise TypeError("%s: out must be a torch.Tensor, a numpy.ndarray or a numpy.memmap, got %s"
                        % (op, type(out).__name__))
    if out is not None and _out_torch_dtype(out) not in _WIDER:
        raise TypeError("%s: out must have a floating-point dtype (float16/bfloat16/float32/float64), got %s"
                        % (op, out.dtype))
    return dims, tile, align


def _gather_index(start, ext, size, pad_mode):
    """Source indices of image[start : start+ext] with the border mapped by pad_mode (constant: -1)."""
    i = np.arange(start, start + ext)
    if pad_mode == "replicate":
        return np.clip(i, 0, size - 1)
    if pad_mode == "circular":
        return np.mod(i, size)
    if pad_mode == "reflect":
        period = 2 * (size - 1)
        j = np.mod(i, period)
        return np.where(j < size, j, period - j)
    return np.where((i >= 0) & (i < size), i, -1)


def _read_tile(img, starts, ext, sizes, pad_mode, dtype, op):
    """img: one (C, *spatial) image (tensor or ndarray); returns a (C, *ext) tensor of `dtype`."""
    inside = all(s >= 0 and s + e <= n for s, e, n in zip(starts, ext, sizes))
    is_np = isinstance(img, np.ndarray)
    if inside:
        blk = img[(slice(None),) + tuple(slice(s, s + e) for s, e in zip(starts, ext))]
        if is_np:
            blk = torch.from_numpy(np.ascontiguousarray(blk))
        return blk.to(dtype)
    if pad_mode == "constant":
        lo = [max(s, 0) for s in starts]
        hi = [min(s + e, n) for s, e, n in zip(starts, ext, sizes)]
        blk = img[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))]
        if is_np:
            blk = torch.from_numpy(np.ascontiguousarray(blk))
        pads = []
        for s, e, a, b in reversed(list(zip(starts, ext, lo, hi))):
            pads += [a - s, s + e - b]
        return torch.nn.functional.pad(blk.to(dtype), pads)
    idx = [_gather_index(s, e, n, pad_mode) for s, e, n in zip(starts, ext, sizes)]
    if is_np:
        blk = img[(slice(None),) + np.ix_(*idx)]
        return torch.from_numpy(np.ascontiguousarray(blk)).to(dtype)
    d = len(idx)
    tix = []
    for a, ix in enumerate(idx):
        shape = [1] * d
        shape[a] = -1
        tix.append(torch.as_tensor(ix, device=img.device).view(shape))
    return img[(slice(None),) + tuple(tix)].to(dtype)


def predict_tiled(model, image, tile: IntOrSeq, *, margin: Optional[IntOrSeq] = None,
                  halo: Optional[IntOrSeq] = None, align: IntOrSeq = 1, batch_size: int = 4,
                  device=None, out=None, pad_mode: str = "constant", exact: bool = False, progress: bool = True):
    """Run `model` on `image` tile by tile with a result equal to full-image inference.

    image: torch tensor, NumPy array or numpy.memmap shaped (C, *spatial) or (N, C, *spatial), 2D or
    3D; cast tile by tile to the model's floating dtype. tile: tile size (int or one per axis),
    margins/halos included.
    margin: valid networks (no padding, stride 1): output smaller than input by `margin` per side.
        The image is padded once by the margin with `pad_mode` and the output has the image's size.
        When neither margin nor halo is given, margin = receptive_margin(model, dims).
    halo: padded networks and U-Nets (output the size of the input): each tile carries `halo` >= the
        receptive radius (receptive_radius(model, dims, align=align)); tile origins are multiples of
        `align` (the network's total down-sampling factor), border tiles are clamped to the image.
    out: tensor or numpy array/memmap of the output's shape ((N,) Cout, *spatial), floating dtype
        that holds the model's output dtype without loss; written in place and returned. Without it
        the output is a tensor on the image's device (tensor image) or a NumPy array (array image).
    device: where the tiles run (default: the model's device); the model is moved there.
    exact: deterministic algorithms and no TF32 / reduced-precision reductions for the call; the
        previous settings are restored afterwards.
    Raises a ValueError when the model is in training mode with BatchNorm or Dropout layers
    (tiles would not match and running statistics would change): call model.eval() first.
    """
    return _predict_tiled(model, image, tile, margin=margin, halo=halo, align=align, batch_size=batch_size,
                          device=device, out=out, pad_mode=pad_mode, exact=exact, progress=progress)


def _predict_tiled(model, image, tile, *, margin=None, halo=None, align=1, batch_size=4, device=None, out=None,
                   pad_mode="constant", exact=False, progress=True,
                   out_factory: Optional[Callable[[tuple, torch.dtype], object]] = None):
    op = "predict_tiled"
    dims, tile, align = _check_inputs(model, image, tile, margin, halo, align, batch_size, out, pad_mode)
    if isinstance(model, nn.Module) and model.training:
        bad = [n or type(m).__name__ for n, m in model.named_modules() if isinstance(m, _STOCHASTIC) and m.training]
        if bad:
            raise ValueError("%s: the model is in training mode and has BatchNorm/Dropout layers (%s): tiles would "
                             "differ from full-image inference; call model.eval() first"
                             % (op, ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")))
    batched = image.ndim == dims + 2
    sizes = list(image.shape[-dims:])
    n_img = image.shape[0] if batched else 1
    chans = image.shape[-dims - 1]
    if any(s == 0 for s in sizes):
        raise ValueError("%s: the image has an empty spatial axis: shape %s" % (op, tuple(image.shape)))
    if halo is None:
        if margin is None:
            if not isinstance(model, nn.Module):
                raise ValueError("%s: the margin of a plain callable cannot be determined: pass margin= or halo=" % op)
            try:
                margin = receptive_margin(model, dims)
            except ValueError as e:
                raise ValueError("%s: the model's margin cannot be determined (%s); pass margin= for a valid network "
                                 "or halo= (>= receptive_radius(model, %d)) for a padded one" % (op, e, dims)) from None
        margin = _tuple_arg(margin, dims, "margin", op, 0)
        halo_t = [0] * dims
        if any(a != 1 for a in align):
            raise ValueError("%s: align applies to halo mode (padded networks, U-Nets); a valid network's tiles need "
                             "no alignment, got align=%s with margin=%s" % (op, align, margin))
        for t, m in zip(tile, margin):
            if t <= 2 * m:
                raise ValueError("%s: tile %s must be larger than twice the margin %s along every axis"
                                 % (op, tile, margin))
        if pad_mode == "reflect" and any(s < 2 for s, m in zip(sizes, margin) if m):
            raise ValueError("%s: pad_mode='reflect' needs at least 2 voxels along every axis, got %s" % (op, sizes))
    else:
        halo_t = _tuple_arg(halo, dims, "halo", op, 0)
        margin = [0] * dims
        if pad_mode != "constant":
            raise ValueError("%s: pad_mode applies to valid networks (margin); in halo mode the tiles are clamped "
                             "to the image and the network pads itself, got pad_mode=%r" % (op, pad_mode))
        for ax, (t, h, a, s) in enumerate(zip(tile, halo_t, align, sizes)):
            if t <= 2 * h:
                raise ValueError("%s: tile %s must be larger than twice the halo %s along every axis"
                                 % (op, tile, halo_t))
            if a > 1 and t % a:
                raise ValueError("%s: tile %s must be a multiple of align %s (tile origins and sizes must follow "
                                 "the network's down-sampling grid)" % (op, tile, align))
            if a > 1 and s > t and s % a:
                raise ValueError("%s: image size %d along spatial axis %d is not a multiple of align %d: full-image "
                                 "inference of a network that down-samples by %d needs that too; pad the image"
                                 % (op, s, ax, a, a))
            if t - 2 * h < a:
                raise ValueError("%s: tile %s minus twice the halo %s leaves less than align %s per tile"
                                 % (op, tile, halo_t, align))
    plans = [_axis_plan(s, t, m, h, a) for s, t, m, h, a in zip(sizes, tile, margin, halo_t, align)]
    ext = [p[0] for p in plans]
    out_ext = [e - 2 * m for e, m in zip(ext, margin)]

    if isinstance(model, nn.Module):
        mdtype, mdevice = _model_dtype_device(model)
    else:
        mdtype, mdevice = None, None
    if device is None:
        device = mdevice or (image.device if isinstance(image, torch.Tensor) else torch.device("cpu"))
    device = torch.device(device)
    if isinstance(model, nn.Module) and mdevice is not None and mdevice != device:
        model.to(device)
    if mdtype is None:
        mdtype = image.dtype if isinstance(image, torch.Tensor) and image.is_floating_point() else torch.float32

    # out: checked up front for rank and spatial shape, at the first batch for channels and dtype
    out_shape_tail = tuple(sizes)
    if out is not None:
        exp_rank = dims + 2 if batched else dims + 1
        if out.ndim != exp_rank or tuple(out.shape[-dims:]) != out_shape_tail or (batched and out.shape[0] != n_img):
            raise ValueError("%s: out must have shape %s (C_out any), got %s" % (
                op, ((n_img,) if batched else ()) + ("C_out",) + out_shape_tail, tuple(out.shape)))

    tiles = [(n, combo) for n in range(n_img) for combo in itertools.product(*[p[1] for p in plans])]
    bar = _Progress(len(tiles), progress)
    result = out

    def check_out(y):
        nonlocal result
        c_out, ydt = y.shape[1], y.dtype
        shape = ((n_img,) if batched else ()) + (c_out,) + out_shape_tail
        if result is None:
            if out_factory is not None:
                result = out_factory(shape, ydt)
            elif isinstance(image, torch.Tensor):
                result = torch.empty(shape, dtype=ydt, device=image.device)
            else:
                result = np.empty(shape, dtype=_np_dtype_for(ydt))
            return
        if tuple(result.shape) != shape:
            raise ValueError("%s: out must have shape %s, got %s" % (op, shape, tuple(result.shape)))
        odt = _out_torch_dtype(result)
        if odt not in _WIDER.get(ydt, (ydt,)):
            raise TypeError("%s: out has dtype %s, which cannot hold the model's %s output without loss; use one of %s"
                            % (op, result.dtype, ydt, [str(d) for d in _WIDER.get(ydt, (ydt,))]))

    def write(n, combo, y):
        src = (slice(None),) + tuple(slice(off, off + d1 - d0) for (_, d0, d1, off) in combo)
        dst = ((n,) if batched else ()) + (slice(None),) + tuple(slice(d0, d1) for (_, d0, d1, _o) in combo)
        part = y[src]
        if isinstance(result, torch.Tensor):
            result[dst].copy_(part)
        else:
            if part.dtype == torch.bfloat16:
                part = part.float()
            result[dst] = part.cpu().numpy()

    with _exact_mode(exact), torch.inference_mode():
        if not tiles or n_img == 0:
            # empty batch: run the model on zero tiles to learn the output channels and dtype
            y = model(torch.empty((0, chans) + tuple(ext), dtype=mdtype, device=device))
            check_out(y)
            return result
        pin = device.type == "cuda"

        def load(b0):
            group = tiles[b0:b0 + batch_size]
            xs = [_read_tile(image[n] if batched else image, [c[0] for c in combo], ext, sizes, pad_mode, mdtype, op)
                  for n, combo in group]
            x = torch.stack(xs)
            if pin and x.device.type == "cpu":
                x = x.pin_memory()
            return group, x.to(device, non_blocking=True)

        done = 0
        try:
            group, x = load(0)
            for b0 in range(0, len(tiles), batch_size):
                y = model(x)  # asynchronous on a GPU: the next batch is read from disk meanwhile
                nxt = load(b0 + batch_size) if b0 + batch_size < len(tiles) else None
                if not isinstance(y, torch.Tensor) or y.dim() != dims + 2 or y.shape[0] != len(group) \
                        or list(y.shape[2:]) != out_ext:
                    got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    if any(margin):
                        why = ("margin %s is wrong or the network is not a valid (unpadded, stride-1) network"
                               % (list(margin),))
                    else:
                        why = ("halo mode needs a network whose output has its input's size; pass margin= for "
                               "valid networks")
                    raise ValueError("%s: the model maps a tile %s to %s, expected (%d, C_out, %s): %s"
                                     % (op, tuple(x.shape), got, len(group), ", ".join(map(str, out_ext)), why))
                if b0 == 0:
                    check_out(y)
                if isinstance(result, np.ndarray):
                    y = (y.float() if y.dtype == torch.bfloat16 else y).cpu()  # one copy per batch
                for (n, combo), yi in zip(group, y):
                    write(n, combo, yi)
                done += len(group)
                bar.update(done)
                if nxt is not None:
                    group, x = nxt
        finally:
            bar.close()
    return result


# ------------------------------------------------------------------ checkpoints for the CLI
_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}
CHECKPOINT_FORMAT = "medconv_ext.tiling_checkpoint.v1"


def register_tiling_builder(name: str, fn: Callable[..., nn.Module]) -> None:
    """Make `fn(**kwargs) -> nn.Module` loadable by name from tiling checkpoints."""
    if not isinstance(name, str) or not name or not callable(fn):
        raise TypeError("register_tiling_builder: need a non-empty name and a callable, got %r, %r" % (name, fn))
    _BUILDERS[name] = fn


def _builder(name: str):
    from .models.valid_srnet import SRNet, valid_srnet
    _BUILDERS.setdefault("valid_srnet", valid_srnet)
    _BUILDERS.setdefault("srnet", SRNet)
    if name in _BUILDERS:
        return _BUILDERS[name]
    if ":" in name and name.split(":", 1)[0].split(".")[0] == "medconv_ext":
        # "medconv_ext.models:rolling_unet": builders inside this package only (a checkpoint must not
        # name arbitrary code to run)
        import importlib
        mod, attr = name.split(":", 1)
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError("tiling checkpoint: builder %r not found (%s)" % (name, e)) from None
    raise ValueError("tiling checkpoint: unknown builder %r; known: %s, or 'medconv_ext.<module>:<function>'; "
                     "register others with register_tiling_builder" % (name, sorted(_BUILDERS)))


def _plain(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return False


def save_tiling_checkpoint(model: nn.Module, path, *, builder: Optional[str] = None, kwargs: Optional[dict] = None,
                           margin: Optional[IntOrSeq] = None, halo: Optional[IntOrSeq] = None,
                           align: IntOrSeq = 1) -> None:
    """Write a checkpoint for `python -m medconv_ext.tile`: a dict {format, builder, kwargs,
    state_dict, dtype, margin, halo, align} readable with torch.load(weights_only=True). The model is
    rebuilt as builder(**kwargs) (a name registered with register_tiling_builder, built-ins
    "valid_srnet" and "srnet", or "medconv_ext.<module>:<function>"). builder/kwargs default to
    model.builder_spec (set by the models of medconv_ext.models). margin/halo/align are stored as
    the CLI's defaults."""
    op = "save_tiling_checkpoint"
    _check_model(model, op)
    if builder is None:
        spec = getattr(model, "builder_spec", None)
        if spec is None:
            raise ValueError("%s: the model has no builder_spec; pass builder= (and kwargs=)" % op)
        builder, spec_kwargs = spec
        kwargs = dict(spec_kwargs) if kwargs is None else kwargs
    kwargs = dict(kwargs or {})
    _builder(builder)  # fail now rather than at load time
    if not all(_plain(v) for v in kwargs.values()):
        raise TypeError("%s: builder kwargs must be plain values (int, float, str, bool, None, lists), got %r"
                        % (op, kwargs))
    for name, v in (("margin", margin), ("halo", halo), ("align", align)):
        if not _plain(v):
            raise TypeError("%s: %s must be an int or a sequence of ints, got %r" % (op, name, v))
    dtype, _ = _model_dtype_device(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "builder": builder, "kwargs": kwargs, "state_dict": state,
                "dtype": str(dtype or torch.float32).replace("torch.", ""),
                "margin": list(margin) if isinstance(margin, tuple) else margin,
                "halo": list(halo) if isinstance(halo, tuple) else halo,
                "align": list(align) if isinstance(align, tuple) else align}, path)


def load_tiling_checkpoint(path, map_location="cpu") -> Tuple[nn.Module, dict]:
    """(model in eval mode, the checkpoint's dict without the state dict). Loads with weights_only=True."""
    ck = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("%s is not a tiling checkpoint (write one with medconv_ext.tiling.save_tiling_checkpoint)"
                         % (path,))
    fn = _builder(ck["builder"])
    model = fn(**ck["kwargs"])
    dtype = getattr(torch, ck.get("dtype") or "float32")
    model.to(dtype)
    model.load_state_dict(ck["state_dict"])
    model.eval()
    info = {k: v for k, v in ck.items() if k != "state_dict"}
    return model, info
