"""Argument checks and the tile plan: where each tile reads and which output voxels it writes."""
import itertools
from typing import List, Tuple

import numpy as np
import torch
from torch import nn

from .receptive import PAD_MODES, _known_dims, receptive_margin

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


def _halo_step(tile: int, h: int, align: int) -> int:
    """Chunk step of halo mode: the larger of a step on the align grid (tile origins d0 - halo rounded
    up to align) and any step with origins rounded down to align (worst case tile - 2*halo - align + 1)."""
    lead = -(-h // align) * align
    return max(((tile - h - lead) // align) * align, tile - 2 * h - align + 1)


def _axis_plan(size: int, tile: int, m: int, h: int, align: int) -> Tuple[int, List[Tuple[int, int, int, int]], int]:
    """Tile extent along one axis, its tiles as (src_start, dst_start, dst_end, off), and the chunk
    step. A tile reads image[src_start : src_start + extent] (may reach outside the image by the
    margin m in valid mode) and its output voxel off + j goes to dst_start + j for
    dst_start + j < dst_end.

    Every output region starts and ends on a multiple of the step (or at the image end): valid
    mode writes exactly one step (tile - 2*margin) per tile; halo mode as many whole steps as the
    tile's interior holds. A chunk grid of that step therefore never has two tiles in one chunk."""
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
                return ext, plan, min(step, size)
            end = p + step
            p += step
    ext = min(tile, size)
    if ext == size:
        return ext, [(0, 0, size, 0)], size
    step = _halo_step(tile, h, align)
    plan, d0 = [], 0
    while True:
        q = min(max(((d0 - h) // align) * align, 0), size - ext)  # on the align grid, clamped to the image
        d1 = size if q + ext >= size else ((q + ext - h) // step) * step  # whole steps of the interior
        # every written voxel is >= h away from each tile edge that is not an image edge
        assert d1 > d0 and (q == 0 or d0 >= q + h) and (q + ext == size or d1 <= q + ext - h), (size, tile, h, align)
        plan.append((q, d0, d1, d0 - q))
        if d1 == size:
            return ext, plan, step
        d0 = d1


class TilePlan:
    """Everything about one tiled run that does not depend on the data: the image layout, tile
    extent, and for every tile (in a fixed order: image n, then the axes in C order) where it
    reads and which output region it writes. Tile ids index `tiles`."""

    def __init__(self, dims, sizes, n_img, batched, chans, tile, margin, halo, align, pad_mode):
        self.dims, self.sizes, self.n_img, self.batched, self.chans = dims, list(sizes), n_img, batched, chans
        self.tile, self.margin, self.halo, self.align, self.pad_mode = list(tile), list(margin), list(halo), \
            list(align), pad_mode
        axes = [_axis_plan(s, t, m, h, a) for s, t, m, h, a in zip(sizes, tile, margin, halo, align)]
        self.ext = [a[0] for a in axes]
        self.axis_plans = [a[1] for a in axes]
        self.out_ext = [e - 2 * m for e, m in zip(self.ext, margin)]
        # spatial chunk (Zarr): every output region starts and ends on this grid
        self.chunk = [a[2] for a in axes]
        self.tiles = [(n, combo) for n in range(n_img) for combo in itertools.product(*self.axis_plans)]

    def __len__(self):
        return len(self.tiles)

    def out_shape(self, c_out):
        return ((self.n_img,) if self.batched else ()) + (c_out,) + tuple(self.sizes)

    def dst(self, i):
        """The output index (a tuple of ints and slices) that tile i writes."""
        n, combo = self.tiles[i]
        return ((n,) if self.batched else ()) + (slice(None),) + tuple(slice(d0, d1) for (_, d0, d1, _o) in combo)

    def src_crop(self, i):
        """The part of tile i's network output that it writes (index into a (C, *out_ext) tensor)."""
        _, combo = self.tiles[i]
        return (slice(None),) + tuple(slice(off, off + d1 - d0) for (_, d0, d1, off) in combo)

    def describe(self):
        return {"dims": self.dims, "sizes": self.sizes, "n_img": self.n_img, "batched": self.batched,
                "chans": self.chans, "tile": self.tile, "margin": self.margin, "halo": self.halo,
                "align": self.align, "pad_mode": self.pad_mode, "n_tiles": len(self.tiles)}


def make_plan(model, shape, dims, tile, align, margin, halo, pad_mode, op="predict_tiled") -> TilePlan:
    """The tile plan for an image of `shape` ((C, *spatial) or (N, C, *spatial)); checks that the
    tile, margin/halo and align fit together (clear ValueErrors otherwise)."""
    batched = len(shape) == dims + 2
    sizes = list(shape[-dims:])
    n_img = shape[0] if batched else 1
    chans = shape[-dims - 1]
    if any(s == 0 for s in sizes):
        raise ValueError("%s: the image has an empty spatial axis: shape %s" % (op, tuple(shape)))
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
    return TilePlan(dims, sizes, n_img, batched, chans, tile, margin, halo_t, align, pad_mode)


def _is_array_like(x):
    return all(hasattr(x, a) for a in ("shape", "dtype", "ndim", "__getitem__"))


def _check_inputs(model, image, tile, margin, halo, align, batch_size, out, pad_mode):
    op = "predict_tiled"
    if not callable(model):
        raise TypeError("%s: model must be a torch.nn.Module (or a callable), got %s" % (op, type(model).__name__))
    if isinstance(image, torch.Tensor):
        if image.is_complex() or image.dtype == torch.bool:
            raise TypeError("%s: image must have a real numeric dtype, got %s" % (op, image.dtype))
    elif isinstance(image, np.ndarray) or (_is_array_like(image) and isinstance(image.dtype, np.dtype)):
        # NumPy arrays, memmaps, and the array views of medconv_ext.tiling.io (Zarr, TIFF, NIfTI)
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
    if out is not None and not isinstance(out, (torch.Tensor, np.ndarray)) and not _is_array_like(out):
        raise TypeError("%s: out must be a torch.Tensor, a numpy.ndarray or a numpy.memmap, got %s"
                        % (op, type(out).__name__))
    if out is not None and _out_torch_dtype(out) not in _WIDER:
        raise TypeError("%s: out must have a floating-point dtype (float16/bfloat16/float32/float64), got %s"
                        % (op, out.dtype))
    return dims, tile, align


