"""Receptive field of a network, and whether tiled inference can be exact with it."""
from typing import List, Optional, Sequence, Tuple, Union
import itertools
import weakref

import torch
from torch import nn

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
        from ..nn import RollingConv2d, RollingConv3d, RollingConvTranspose2d, RollingConvTranspose3d
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


# ------------------------------------------------------------------ structural interval analysis
# Along one axis, the input voxels [a, b] reach the output voxels [lo, hi] of a layer (unbounded image,
# so padding and image borders play no part). Per layer type:
#   conv / pooling (kernel k, stride s, padding p, dilation d; output q reads q*s - p + t*d, t < k):
#       [ceil((a + p - (k-1)*d) / s), floor((b + p) / s)]
#   transposed conv (output q = i*s + t*d - p):  [a*s - p, b*s + (k-1)*d - p]
#   voxel-wise layers: [a, b]
# A concatenation or a sum reaches the union of its operands (their hull: the probe also measures extents).

def _as_tuple(v, dims):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


def _conv_interval(iv, k, s, p, d):
    a, b = iv
    return -((-(a + p - (k - 1) * d)) // s), (b + p) // s


def _tconv_interval(iv, k, s, p, d):
    a, b = iv
    return a * s - p, b * s + (k - 1) * d - p


_POOLS = (nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d)


def _chain_intervals(module, ivs, dims, op):
    """Push per-axis intervals through `module` taken as a chain of its leaves (an nn.Sequential, or one of
    the package's blocks that compute the same); None where a layer's reach is not known here."""
    conv, conv_t = _conv_types()
    inv = _involution_types()
    if isinstance(module, inv):
        if any(st != 1 for st in module.stride):
            return None  # its kernel generator average-pools: probe
        k, d, p = module.kernel_size, module.dilation, module.padding
        return [_conv_interval(iv, k[i], 1, p[i], d[i]) for i, iv in enumerate(ivs)]
    if isinstance(module, conv + (nn.Conv2d, nn.Conv3d)):
        if _conv_dims(module) != dims:
            return None
        left, _ = _conv_extents(module, op)  # padding="same"/"valid" included (stride 1 there)
        k, st, d = module.kernel_size, module.stride, module.dilation
        return [_conv_interval(iv, k[i], st[i], left[i], d[i]) for i, iv in enumerate(ivs)]
    if isinstance(module, conv_t + (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        if _conv_dims(module) != dims or isinstance(module.padding, str):
            return None
        k, st, p, d = module.kernel_size, module.stride, module.padding, module.dilation
        return [_tconv_interval(iv, k[i], st[i], p[i], d[i]) for i, iv in enumerate(ivs)]
    if isinstance(module, _POOLS):
        k, st, p = (_as_tuple(getattr(module, a), dims) for a in ("kernel_size", "stride", "padding"))
        d = _as_tuple(getattr(module, "dilation", 1), dims)
        return [_conv_interval(iv, k[i], st[i] or k[i], p[i], d[i]) for i, iv in enumerate(ivs)]
    if isinstance(module, _GLOBAL):
        raise ValueError("%s: layer %s mixes information across the whole image: tiled inference cannot be exact "
                         "with it" % (op, type(module).__name__))
    if isinstance(module, _ELEMENTWISE):
        return ivs
    if isinstance(module, nn.Sequential) and (type(module) is nn.Sequential
                                              or type(module).__module__.startswith("medconv_ext.models")):
        for m in module:
            ivs = _chain_intervals(m, ivs, dims, op)
            if ivs is None:
                return None
        return ivs
    return None


def _involution_types():
    try:
        from ..nn import Involution2d, Involution3d
        return (Involution2d, Involution3d)
    except Exception:  # pragma: no cover - the package's own modules always import
        return ()


def _unet_parts(model):
    """(stem, encoders, pool, middle, ups, decoders, out) of the zoo's U-Nets (medconv_ext.models.UNet,
    MedICSegmenter) when their forward is the package's own, else None."""
    try:
        from ..models.medic import MedICSegmenter
        from ..models.unet import UNet
    except Exception:  # pragma: no cover
        return None
    if type(model).forward is UNet.forward and isinstance(model, UNet):
        return None, model.encoders, model.pool, model.middle, model.ups, model.decoders, model.out
    if type(model).forward is MedICSegmenter.forward and isinstance(model, MedICSegmenter):
        return model.involution, model.encoders, model.pool, model.bottleneck, model.ups, model.decoders, model.out
    return None


def _unet_radius(model, spatial_dims, align, op) -> Optional[Tuple[int, ...]]:
    """The probe's answer (see _probe_radius), computed from the layers of a zoo U-Net: the output extent
    [lo, hi] reached by the input block [c, c + align), radius max(hi - c, c + align - 1 - lo), the largest
    over the block positions c on the align grid within one period of the network's down-sampling."""
    parts = _unet_parts(model)
    if parts is None:
        return None
    stem, encoders, pool, middle, ups, decoders, out = parts
    period = align * 2 ** len(encoders)
    best = [0] * spatial_dims
    for c in range(0, period, align):
        ivs = [(c, c + align - 1)] * spatial_dims
        if stem is not None:
            ivs = _chain_intervals(stem, ivs, spatial_dims, op)
        skips = []
        for enc in encoders:
            ivs = ivs and _chain_intervals(enc, ivs, spatial_dims, op)
            skips.append(ivs)
            ivs = ivs and _chain_intervals(pool, ivs, spatial_dims, op)
        ivs = ivs and _chain_intervals(middle, ivs, spatial_dims, op)
        for up, dec, skip in zip(ups, decoders, reversed(skips)):
            ivs = ivs and _chain_intervals(up, ivs, spatial_dims, op)
            if ivs is None:
                return None
            ivs = _chain_intervals(dec, [(min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(ivs, skip)],
                                   spatial_dims, op)
        ivs = ivs and _chain_intervals(out, ivs, spatial_dims, op)
        if ivs is None:
            return None
        best = [max(r, hi - c, c + align - 1 - lo) for r, (lo, hi) in zip(best, ivs)]
    return tuple(best)


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
    on a random probe image; in torch's ops NaN propagates through every arithmetic dependency
    (x * 0 too, and through torch.relu, max-pooling, BatchNorm, sums), so the NaN outputs are the
    voxels that structurally depend on the block, whatever the weights or ReLU gates.

    The probe cannot be fooled by an operator that maps NaN to a number:
    * every medconv_ext operator runs on the "reference" backend (torch's own ops on the expanded
      bank; backends.forced_backend), whatever backend the model's layers ask for, so no kernel's
      NaN handling (or a fused kernel's transform tiles) enters the answer;
    * the same block is also given other finite values, and every output that changes counts as
      reached too (a layer such as nn.Threshold or torch.nan_to_num hides NaN, not a change).
    The probe doubles while the reached region touches its border. oneDNN and cuDNN are off during
    the probe: Winograd/FFT convolutions would smear a NaN over a whole transform tile."""
    from ..backends import forced_backend
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
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            block = (slice(None), slice(None)) + (slice(c, c + align),) * spatial_dims
            x_alt = x.clone()
            x_alt[block] = torch.randn(x_alt[block].shape, generator=g, dtype=torch.float64) + 3.0
            x_nan = x.clone()
            x_nan[block] = float("nan")
            ys = []
            with torch.no_grad(), torch.backends.cudnn.flags(enabled=False), torch.backends.mkldnn.flags(
                    enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None), \
                    forced_backend("reference"):
                for xi in (x_nan, x, x_alt):
                    y = model(xi.to(device=device, dtype=dtype))
                    if not isinstance(y, torch.Tensor) or tuple(y.shape[2:]) != shape[2:]:
                        raise ValueError("%s: the model maps a %s probe to %s: not a same-size network (for valid "
                                         "networks use receptive_margin and margin=)"
                                         % (op, shape[2:], tuple(y.shape[2:]) if isinstance(y, torch.Tensor)
                                            else type(y).__name__))
                    ys.append(y)
            y_nan, y0, y1 = ys
            changed = (y0 != y1) & ~(torch.isnan(y0) & torch.isnan(y1))
            nz = (torch.isnan(y_nan) | changed).any(dim=1)[0]
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

    method="analytic": from the layers alone: the sum of the convolution extents for an nn.Sequential
    chain (nested chains included) of stride-1 convolutions and voxel-wise layers; for the zoo's
    U-Nets (medconv_ext.models.UNet: unet, rolling_unet, qsmnet, ...; MedICSegmenter: medic_seg) the
    probe's answer computed from their layer geometry (it needs no probe image, so it also covers
    fields wider than a probe, e.g. the 3D QSMnets). method="probe": how far a block of align^dims
    input voxels reaches into the output (structural, independent of the weights and of ReLU gates,
    and of the backends the model's layers use: see _probe_radius), on a probe of `probe_size` voxels
    per axis (doubled while the reached region touches the probe border; 128 in 2D, 48 in 3D by
    default). method="auto": analytic when the layers allow it, else probe.

    The answer is the same on every backend. It is cached per model (and its layer geometry), so
    predict_tiled's check of `halo` costs one probe per model at most."""
    op = "receptive_radius"
    _check_model(model, op)
    _check_spatial_dims(spatial_dims, op)
    if method not in ("auto", "analytic", "probe"):
        raise ValueError("%s: method must be 'auto', 'analytic' or 'probe', got %r" % (op, method))
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError("%s: align must be an int >= 1, got %r" % (op, align))
    key = (spatial_dims, in_channels, align, probe_size, method, _structure_key(model))
    cache = _RADIUS_CACHE.setdefault(model, {})
    if key not in cache:
        cache[key] = _receptive_radius(model, spatial_dims, in_channels, align, probe_size, method, op)
    return cache[key]


_RADIUS_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _structure_key(model) -> tuple:
    """What the receptive field depends on: the module tree and every layer's geometry (not the weights)."""
    attrs = ("kernel_size", "stride", "padding", "dilation", "output_padding", "scale_factor", "ceil_mode")
    return tuple((name, type(m), tuple(repr(getattr(m, a, None)) for a in attrs)) for name, m in model.named_modules())


def _min_halo(model: nn.Module, spatial_dims: int, in_channels: Optional[int], align: int) -> Tuple[int, ...]:
    """The smallest halo that tiled inference on the `align` grid can be exact with, as far as it can be told:
    exact from the layers (a chain: the radius; a zoo U-Net: the largest distance from an output voxel to an
    input voxel it depends on, over every position on the down-sampling grid), else a lower bound from the
    probe (its block of align voxels bounds the radius up to align - 1). Raises a ValueError where neither
    tells (see receptive_radius)."""
    op = "receptive_radius"
    r = _analytic_radius(model, spatial_dims, op)
    if r is not None:
        return r
    r = _unet_radius(model, spatial_dims, 1, op)
    if r is not None:
        return r
    r = receptive_radius(model, spatial_dims, in_channels=in_channels, align=align)
    return tuple(max(v - (align - 1), 0) for v in r)


def _receptive_radius(model, spatial_dims, in_channels, align, probe_size, method, op) -> Tuple[int, ...]:
    if method != "probe":
        r = _analytic_radius(model, spatial_dims, op)
        if r is not None:
            return r
        r = _unet_radius(model, spatial_dims, align, op)
        if r is not None:
            return r
        if method == "analytic":
            raise ValueError("%s: the model is neither an nn.Sequential chain of stride-1 convolutions and voxel-wise "
                             "layers nor one of the package's U-Nets, which the analytic rule needs; use "
                             "method='probe' or pass halo= explicitly" % op)
    return _probe_radius(model, spatial_dims, in_channels, align, probe_size, op)




# ------------------------------------------------------------------ crop equivariance
_ATTENTION = tuple(getattr(nn, n) for n in ("MultiheadAttention", "Transformer", "TransformerEncoder",
                                             "TransformerDecoder", "TransformerEncoderLayer",
                                             "TransformerDecoderLayer") if hasattr(nn, n))
_SPATIAL_NORM = tuple(getattr(nn, n) for n in ("GroupNorm", "LayerNorm", "RMSNorm") if hasattr(nn, n))
_GLOBAL_POOL = tuple(getattr(nn, n) for n in ("AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
                                             "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d")
                     if hasattr(nn, n))


def crop_equivariance_problems(model) -> List[str]:
    """Reasons why the model's output at a voxel may depend on more than a bounded neighbourhood
    (so no tiling can reproduce full-image inference), one line per offending layer; [] when
    none is found. Only registered submodules are seen: a forward() that takes a global mean
    itself is caught by receptive_radius's probe and by verify_tiling, not here."""
    if not isinstance(model, nn.Module):
        return []
    out = []
    for name, m in model.named_modules():
        name = name or type(m).__name__
        kind = type(m).__name__
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            if m.training or not m.track_running_stats:
                out.append("layer %r (%s) normalises every image by its own mean and variance over space"
                           % (name, kind))
        elif isinstance(m, _SPATIAL_NORM):
            out.append("layer %r (%s) normalises over a group of channels and all of space (or the last axes, "
                       "which are spatial in a channels-first CNN)" % (name, kind))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            out.append("layer %r (%s) is in training mode: it normalises by the statistics of the batch of tiles "
                       "(call model.eval())" % (name, kind))
        elif isinstance(m, _GLOBAL_POOL):
            out.append("layer %r (%s) pools over the whole image (global pooling)" % (name, kind))
        elif isinstance(m, _ATTENTION):
            out.append("layer %r (%s) attends over all positions (attention over space)" % (name, kind))
    return out


def check_crop_equivariance(model, op="predict_tiled") -> None:
    """Raise a ValueError naming the layers that break crop equivariance (InstanceNorm without
    running statistics, GroupNorm, LayerNorm, BatchNorm in training mode, global pooling, attention):
    exact tiled inference is impossible with them."""
    problems = crop_equivariance_problems(model)
    if problems:
        raise ValueError("%s: exact tiled inference refused: %s%s. With such layers the output at a voxel depends on "
                         "the whole image, so tiles cannot match full-image inference"
                         % (op, "; ".join(problems[:4]), "; ..." if len(problems) > 4 else ""))
