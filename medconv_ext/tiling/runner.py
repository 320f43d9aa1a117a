"""Exact mode, progress bar, reading tiles, and the runner behind predict_tiled."""
import contextlib
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .._progress import Progress
from .plan import _WIDER, _check_inputs, _np_dtype_for, _out_torch_dtype, make_plan
from .receptive import (_STOCHASTIC, IntOrSeq, _min_halo, _model_dtype_device, check_crop_equivariance,
                        receptive_margin)

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
class _Progress(Progress):
    """The tile count of a run on stderr (medconv_ext._progress.Progress: redraws on a terminal, one
    line at a bounded rate in a log), shown only once a run has lasted `delay` seconds."""

    def __init__(self, total: int, enabled: bool, delay: float = 2.0, every: Optional[float] = None,
                 label: str = "predict_tiled", start: int = 0, stream=None):
        super().__init__(total, label=label, unit="tiles", start=start, enabled=bool(enabled), delay=delay,
                         interval=every, stream=stream)


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


def _to_tensor(blk):
    if isinstance(blk, torch.Tensor):
        return blk
    a = np.ascontiguousarray(blk)
    if a.dtype.byteorder not in "=|":  # big-endian TIFF / NIfTI data
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype == np.uint16 or a.dtype == np.uint32:  # torch has no arithmetic on these
        a = a.astype(np.int64 if a.dtype == np.uint32 else np.int32)
    if not a.flags.writeable:  # a read-only memory map: torch wants writable memory
        a = a.copy()
    return torch.from_numpy(a)


def _read_tile(img, prefix, starts, ext, sizes, pad_mode, dtype):
    """img[prefix] is one (C, *spatial) image (tensor, ndarray or an array view of
    medconv_ext.tiling.io); returns a (C, *ext) tensor of `dtype`, the border filled by pad_mode.
    Array-likes are only ever indexed with ints and slices (one bounding box per tile)."""
    inside = all(s >= 0 and s + e <= n for s, e, n in zip(starts, ext, sizes))
    is_tensor = isinstance(img, torch.Tensor)
    if inside:
        blk = img[prefix + (slice(None),) + tuple(slice(s, s + e) for s, e in zip(starts, ext))]
        return _to_tensor(blk).to(dtype)
    if pad_mode == "constant":
        lo = [max(s, 0) for s in starts]
        hi = [min(s + e, n) for s, e, n in zip(starts, ext, sizes)]
        blk = _to_tensor(img[prefix + (slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))])
        pads = []
        for s, e, a, b in reversed(list(zip(starts, ext, lo, hi))):
            pads += [a - s, s + e - b]
        return torch.nn.functional.pad(blk.to(dtype), pads)
    idx = [_gather_index(s, e, n, pad_mode) for s, e, n in zip(starts, ext, sizes)]
    if not is_tensor:  # read the bounding box of the source voxels, gather in memory
        lo = [int(i.min()) for i in idx]
        hi = [int(i.max()) + 1 for i in idx]
        box = np.asarray(img[prefix + (slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))])
        blk = box[(slice(None),) + np.ix_(*[i - a for i, a in zip(idx, lo)])]
        return _to_tensor(blk).to(dtype)
    d = len(idx)
    tix = []
    for a, ix in enumerate(idx):
        shape = [1] * d
        shape[a] = -1
        tix.append(torch.as_tensor(ix, device=img.device).view(shape))
    return img[prefix + (slice(None),) + tuple(tix)].to(dtype)


def predict_tiled(model, image, tile: IntOrSeq, *, margin: Optional[IntOrSeq] = None,
                  halo: Optional[IntOrSeq] = None, align: IntOrSeq = 1, batch_size: int = 4,
                  device=None, out=None, pad_mode: str = "constant", exact: bool = False, progress: bool = True,
                  foreground_threshold: Optional[float] = None, mask=None, background: float = 0.0,
                  check_receptive_field: bool = True):
    """Run `model` on `image` tile by tile with a result equal to full-image inference.

    image: torch tensor, NumPy array or numpy.memmap (or an array view from
    medconv_ext.tiling.io.open_image: Zarr, OME-Zarr, TIFF, NIfTI) shaped (C, *spatial) or
    (N, C, *spatial), 2D or 3D; cast tile by tile to the model's floating dtype. tile: tile size
    (int or one per axis), margins/halos included.
    margin: valid networks (no padding, stride 1): output smaller than input by `margin` per side.
        The image is padded once by the margin with `pad_mode` and the output has the image's size.
        When neither margin nor halo is given, margin = receptive_margin(model, dims).
    halo: padded networks and U-Nets (output the size of the input): each tile carries `halo` >= the
        receptive radius (receptive_radius(model, dims, align=align)); tile origins are multiples of
        `align` (the network's total down-sampling factor), border tiles are clamped to the image.
    out: tensor, numpy array/memmap (or a writable array view) of the output's shape ((N,) Cout,
        *spatial), floating dtype that holds the model's output dtype without loss; written in place
        and returned. Without it the output is a tensor on the image's device (tensor image) or a
        NumPy array (otherwise).
    device: where the tiles run (default: the model's device); the model is moved there.
    exact: deterministic algorithms and no TF32 / reduced-precision reductions for the call; the
        previous settings are restored afterwards.
    foreground_threshold / mask: skip empty space (off by default). A tile whose input window has no
        voxel above `foreground_threshold`, or whose output region has no nonzero voxel of `mask`
        (an array of the image's spatial shape or a coarser one, scaled by nearest neighbour), is not
        run: its output region is filled with `background`. This is NOT what the network computes
        there; use it only where the output of empty space does not matter.
    check_receptive_field: refuse (ValueError) a `halo` below receptive_radius(model, dims, align=align)
        or a `margin` below receptive_margin(model, dims) along an axis that is cut into several tiles,
        whenever the model's field can be computed (analytically, or by one probe cached per model);
        False skips the check (a plain callable, or a field you know better than the rule).
    Raises a ValueError for layers that break crop equivariance (InstanceNorm, GroupNorm, LayerNorm,
    BatchNorm or Dropout in training mode, global pooling, attention; call model.eval() first for
    BatchNorm/Dropout).
    """
    return _predict_tiled(model, image, tile, margin=margin, halo=halo, align=align, batch_size=batch_size,
                          device=device, out=out, pad_mode=pad_mode, exact=exact, progress=progress,
                          foreground_threshold=foreground_threshold, mask=mask, background=background,
                          check_receptive_field=check_receptive_field)


def _check_model_for_tiling(model, op):
    if isinstance(model, nn.Module) and model.training:
        bad = [n or type(m).__name__ for n, m in model.named_modules() if isinstance(m, _STOCHASTIC) and m.training]
        if bad:
            raise ValueError("%s: the model is in training mode and has BatchNorm/Dropout layers (%s): tiles would "
                             "differ from full-image inference; call model.eval() first"
                             % (op, ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")))
    check_crop_equivariance(model, op)


def _check_receptive_field(model, plan, margin, halo, check, op):
    """Refuse a halo (margin) below the model's receptive radius (margin) along an axis cut into several
    tiles, whenever the field can be computed; the error names check_receptive_field=False, which skips it."""
    if not isinstance(check, bool):
        raise TypeError("%s: check_receptive_field must be a bool, got %r" % (op, check))
    if not check or not isinstance(model, nn.Module):
        return
    cut = [len(tiles) > 1 for tiles in plan.axis_plans]
    if not any(cut):
        return  # one tile per image: full-image inference, whatever the halo
    dims = plan.dims
    try:
        if halo is not None:
            need = [0] * dims
            for a in sorted(set(plan.align)):  # the radius depends on the align grid of each axis
                r = _min_halo(model, dims, plan.chans, a)
                need = [r[i] if plan.align[i] == a else need[i] for i in range(dims)]
            what, given, rule = "halo", plan.halo, "; receptive_radius(model, %d, align=%s) is a safe one" % (
                dims, plan.align[0] if len(set(plan.align)) == 1 else tuple(plan.align))
        elif margin is not None:
            need = list(receptive_margin(model, dims))
            what, given, rule = "margin", plan.margin, ", receptive_margin(model, %d)" % dims
        else:
            return  # the margin came from receptive_margin itself
    except Exception:  # the field cannot be computed (unknown layers, wider than the probe, ...): no check
        return
    short = [i for i in range(dims) if cut[i] and given[i] < need[i]]
    if short:
        raise ValueError("%s: %s %s is smaller than the model's receptive field %s along spatial axis %s: the tiles "
                         "would differ from full-image inference. Pass a %s of at least %s%s; or pass "
                         "check_receptive_field=False to skip this check"
                         % (op, what, tuple(given), tuple(need), ", ".join(map(str, short)), what, tuple(need), rule))


def _resolve_device(model, image, device):
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
    return device, mdtype


def output_spec(model, plan, device, mdtype):
    """(C_out, dtype) of the model's output, from a forward pass on an empty batch of tiles."""
    with torch.inference_mode():
        y = model(torch.empty((0, plan.chans) + tuple(plan.ext), dtype=mdtype, device=device))
    if not isinstance(y, torch.Tensor) or y.dim() != plan.dims + 2:
        raise ValueError("predict_tiled: the model maps a batch of tiles to %s, expected a (N, C_out, %s) tensor"
                         % (tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__,
                            ", ".join("DHW"[3 - plan.dims:])))
    return int(y.shape[1]), y.dtype


class _Skip:
    """Which tiles are empty space (foreground_threshold / mask). The mask is (*spatial), (1, *spatial)
    or (N, 1, *spatial) (one mask per image of a batch), at the image's resolution or a coarser one."""

    def __init__(self, plan, threshold, mask, op):
        self.plan, self.threshold, self.mask = plan, threshold, mask
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise TypeError("%s: foreground_threshold must be a number, got %r" % (op, threshold))
        if mask is not None:
            shp = tuple(mask.shape)
            lead, sp = shp[:-plan.dims], shp[-plan.dims:]
            ok = len(shp) >= plan.dims and all(s >= 1 for s in sp) and (
                lead == () or lead == (1,) or (len(lead) == 2 and lead[1] == 1 and lead[0] in (1, plan.n_img)))
            if not ok:
                raise ValueError("%s: mask must have %d spatial axes (the image's spatial shape %s or a coarser one), "
                                 "optionally after (1,) or (N, 1), got shape %s" % (op, plan.dims, tuple(plan.sizes), shp))
            if any(m > s for m, s in zip(sp, plan.sizes)):
                raise ValueError("%s: mask shape %s is larger than the image's spatial shape %s"
                                 % (op, sp, tuple(plan.sizes)))
            self.lead, self.sp = len(lead), sp

    @property
    def active(self):
        return self.threshold is not None or self.mask is not None

    def empty_by_mask(self, i):
        if self.mask is None:
            return False
        n, combo = self.plan.tiles[i]
        key = []
        for (_, d0, d1, _o), s, ms in zip(combo, self.plan.sizes, self.sp):
            key.append(slice(d0 * ms // s, -(-d1 * ms // s)))
        pre = () if self.lead == 0 else (0,) if self.lead == 1 else (n if self.mask.shape[0] > 1 else 0, 0)
        return not np.any(np.asarray(self.mask[pre + tuple(key)]))

    def empty_by_value(self, x):
        return self.threshold is not None and not bool((x > self.threshold).any())


class RunStats:
    """Counters of one run: tiles run and skipped, seconds spent reading, computing, writing."""

    def __init__(self):
        self.tiles_run = self.tiles_skipped = 0
        self.read_s = self.compute_s = self.write_s = 0.0

    def as_list(self):
        return [float(self.tiles_run), float(self.tiles_skipped), self.read_s, self.compute_s, self.write_s]

    @classmethod
    def from_list(cls, v):
        s = cls()
        s.tiles_run, s.tiles_skipped = int(v[0]), int(v[1])
        s.read_s, s.compute_s, s.write_s = float(v[2]), float(v[3]), float(v[4])
        return s


def run_tiles(model, image, plan, tile_ids, *, device, mdtype, batch_size, sink, on_done=None, skip=None,
              background=0.0, stats=None, progress=None, op="predict_tiled"):
    """Run the tiles `tile_ids` of `plan` and hand every tile's output region to
    sink(i, block) (block: a (C_out, *region) tensor on `device`); on_done(ids) after each batch has
    been handed over; skipped tiles (empty space) get a block filled with `background`. sink is
    also called as sink(None, y) once with the first batch's output, to check or create the output."""
    stats = stats if stats is not None else RunStats()
    prefix = (lambda n: (n,)) if plan.batched else (lambda n: ())
    pin = device.type == "cuda"
    cuda_sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    state = {"spec": None}

    def load(b0):
        t0 = time.perf_counter()
        group = tile_ids[b0:b0 + batch_size]
        run, empty, xs = [], [], []
        for i in group:
            if skip is not None and skip.empty_by_mask(i):
                empty.append(i)
                continue
            n, combo = plan.tiles[i]
            x = _read_tile(image, prefix(n), [c[0] for c in combo], plan.ext, plan.sizes, plan.pad_mode, mdtype)
            if skip is not None and skip.empty_by_value(x):
                empty.append(i)
                continue
            run.append(i)
            xs.append(x)
        x = None
        if xs:
            x = torch.stack(xs)
            if pin and x.device.type == "cpu":
                x = x.pin_memory()
            x = x.to(device, non_blocking=True)
        stats.read_s += time.perf_counter() - t0
        return group, run, empty, x

    def write_empty(ids):
        if not ids:
            return
        c_out, ydt = state["spec"]
        for i in ids:
            _, combo = plan.tiles[i]
            sink(i, torch.full((c_out,) + tuple(d1 - d0 for (_, d0, d1, _o) in combo), background, dtype=ydt))
        stats.tiles_skipped += len(ids)

    if not tile_ids:
        return stats
    nxt = load(0)
    b0 = 0
    while nxt is not None:
        group, run, empty, x = nxt
        y = None
        if x is not None:
            t0 = time.perf_counter()
            y = model(x)  # asynchronous on a GPU: the next batch is read from disk meanwhile
            if not isinstance(y, torch.Tensor) or y.dim() != plan.dims + 2 or y.shape[0] != len(run) \
                    or list(y.shape[2:]) != plan.out_ext:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                if any(plan.margin):
                    why = ("margin %s is wrong or the network is not a valid (unpadded, stride-1) network"
                           % (list(plan.margin),))
                else:
                    why = "halo mode needs a network whose output has its input's size; pass margin= for valid networks"
                raise ValueError("%s: the model maps a tile %s to %s, expected (%d, C_out, %s): %s"
                                 % (op, tuple(x.shape), got, len(run), ", ".join(map(str, plan.out_ext)), why))
            if state["spec"] is None:
                sink(None, y)
                state["spec"] = (y.shape[1], y.dtype)
            stats.compute_s += time.perf_counter() - t0
        b0 += batch_size
        nxt = load(b0) if b0 < len(tile_ids) else None
        if y is not None:
            t0 = time.perf_counter()
            cuda_sync()
            t1 = time.perf_counter()
            stats.compute_s += t1 - t0
            for i, yi in zip(run, y):
                sink(i, yi[plan.src_crop(i)])
            stats.tiles_run += len(run)
            stats.write_s += time.perf_counter() - t1
        if empty:
            if state["spec"] is None:
                state["spec"] = output_spec(model, plan, device, mdtype)
                sink(None, torch.empty((0, state["spec"][0]) + tuple(plan.out_ext), dtype=state["spec"][1]))
            t1 = time.perf_counter()
            write_empty(empty)
            stats.write_s += time.perf_counter() - t1
        if on_done is not None:
            on_done(group)
        if progress is not None:
            progress(len(group))
    return stats


def _predict_tiled(model, image, tile, *, margin=None, halo=None, align=1, batch_size=4, device=None, out=None,
                   pad_mode="constant", exact=False, progress=True,
                   out_factory: Optional[Callable[[tuple, torch.dtype], object]] = None,
                   foreground_threshold=None, mask=None, background=0.0, check_receptive_field=True):
    op = "predict_tiled"
    dims, tile, align = _check_inputs(model, image, tile, margin, halo, align, batch_size, out, pad_mode)
    _check_model_for_tiling(model, op)
    plan = make_plan(model, tuple(image.shape), dims, tile, align, margin, halo, pad_mode, op)
    skip = _Skip(plan, foreground_threshold, mask, op)
    device, mdtype = _resolve_device(model, image, device)
    _check_receptive_field(model, plan, margin, halo, check_receptive_field, op)

    # out: checked up front for rank and spatial shape, at the first batch for channels and dtype
    out_tail = tuple(plan.sizes)
    if out is not None:
        exp_rank = dims + 2 if plan.batched else dims + 1
        if out.ndim != exp_rank or tuple(out.shape[-dims:]) != out_tail or (plan.batched and out.shape[0] != plan.n_img):
            raise ValueError("%s: out must have shape %s (C_out any), got %s" % (
                op, ((plan.n_img,) if plan.batched else ()) + ("C_out",) + out_tail, tuple(out.shape)))

    result = out

    def check_out(y):
        nonlocal result
        shape = plan.out_shape(y.shape[1])
        ydt = y.dtype
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

    def sink(i, block):
        if i is None:
            check_out(block)
            return
        _write_block(result, plan.dst(i), block)

    bar = _Progress(len(plan), progress)
    done = [0]

    def tick(k):
        done[0] += k
        bar.update(done[0])

    with _exact_mode(exact), torch.inference_mode():
        if len(plan) == 0:
            # empty batch: run the model on zero tiles to learn the output channels and dtype
            c_out, ydt = output_spec(model, plan, device, mdtype)
            check_out(torch.empty((0, c_out), dtype=ydt))
            return result
        try:
            run_tiles(model, image, plan, list(range(len(plan))), device=device, mdtype=mdtype,
                      batch_size=batch_size, sink=sink, skip=skip if skip.active else None, background=background,
                      progress=tick, op=op)
        finally:
            bar.close()
    return result


def _write_block(result, dst, block):
    """result[dst] = block (a tensor), for tensors, NumPy arrays and the writable array views."""
    if isinstance(result, torch.Tensor):
        result[dst].copy_(block)
        return
    if block.dtype == torch.bfloat16:
        block = block.float()
    arr = block.cpu().numpy()
    if arr.dtype != result.dtype:
        arr = arr.astype(result.dtype)
    result[dst] = arr


# ------------------------------------------------------------------ exactness check
def verify_tiling(model, image, tile: IntOrSeq, *, margin: Optional[IntOrSeq] = None,
                  halo: Optional[IntOrSeq] = None, align: IntOrSeq = 1, pad_mode: str = "constant",
                  n_tiles: int = 2, extra: Optional[int] = None, device=None, ulps: int = 64) -> dict:
    """Check on a few tiles that tiled inference agrees with inference on a larger window, before a
    long run. For each checked tile (the first, the last and middle ones), its output region is
    computed (1) from the tile as predict_tiled cuts it and (2) from a window `extra` voxels larger
    on every side (clamped to the image in halo mode, where a window covering the image is full-image
    inference; padded by pad_mode in valid mode, as full-image inference does). Raises a ValueError
    when they differ by more than `ulps` units in the last place of the largest output magnitude
    (a margin/halo below the receptive field, a wrong align, a network that is not crop-equivariant).
    `extra` defaults to twice the largest margin/halo (at least 8), rounded up to align.
    Returns {"tiles": ids checked, "max_abs_diff": float, "bit_identical": bool}."""
    op = "verify_tiling"
    dims, tile, align = _check_inputs(model, image, tile, margin, halo, align, 1, None, pad_mode)
    _check_model_for_tiling(model, op)
    plan = make_plan(model, tuple(image.shape), dims, tile, align, margin, halo, pad_mode, op)
    device, mdtype = _resolve_device(model, image, device)
    if isinstance(n_tiles, bool) or not isinstance(n_tiles, int) or n_tiles < 1:
        raise ValueError("%s: n_tiles must be an int >= 1, got %r" % (op, n_tiles))
    n = len(plan)
    picks = sorted({0, n - 1} | {int(round(k * (n - 1) / (n_tiles + 1))) for k in range(1, n_tiles + 1)})
    picks = picks[:max(n_tiles, 1)] if n_tiles < 2 else picks[:n_tiles + 2]
    a_max = max(plan.align)
    e = extra if extra is not None else max(8, 2 * max(plan.margin + plan.halo))
    e = -(-e // a_max) * a_max
    prefix = (lambda k: (k,)) if plan.batched else (lambda k: ())
    worst, identical = 0.0, True
    with torch.inference_mode():
        for i in picks:
            nimg, combo = plan.tiles[i]
            x = _read_tile(image, prefix(nimg), [c[0] for c in combo], plan.ext, plan.sizes, plan.pad_mode, mdtype)
            y_full_tile = model(x[None].to(device))[0]
            if list(y_full_tile.shape[1:]) != plan.out_ext:
                raise ValueError("%s: the model maps a tile %s to %s, expected spatial size %s: the margin %s is wrong or "
                                 "the network is not what the mode assumes" % (op, tuple(x.shape), tuple(y_full_tile.shape),
                                                                               plan.out_ext, plan.margin))
            y_tile = y_full_tile[plan.src_crop(i)]
            starts, exts, crop = [], [], []
            for (q, d0, d1, _o), s, m, ext in zip(combo, plan.sizes, plan.margin, plan.ext):
                if m:  # valid: any window; its output voxel j is image voxel start + m + j
                    a, b = q - e, q + ext + e
                    crop.append(slice(d0 - (a + m), d1 - (a + m)))
                else:  # halo: window clamped to the image, on the align grid
                    a, b = max(q - e, 0), min(q + ext + e, s)
                    crop.append(slice(d0 - a, d1 - a))
                starts.append(a)
                exts.append(b - a)
            xw = _read_tile(image, prefix(nimg), starts, exts, plan.sizes, plan.pad_mode, mdtype)
            y_win = model(xw[None].to(device))[0][(slice(None),) + tuple(crop)]
            if y_win.shape != y_tile.shape:
                raise ValueError("%s: the model maps a %s window to %s: cannot compare with the tile's %s"
                                 % (op, tuple(exts), tuple(y_win.shape), tuple(y_tile.shape)))
            d = float((y_tile.double() - y_win.double()).abs().max()) if y_tile.numel() else 0.0
            identical = identical and torch.equal(y_tile, y_win)
            tol = ulps * torch.finfo(y_win.dtype).eps * float(y_win.double().abs().max()) if y_win.numel() else 0.0
            if d > tol or d != d:
                raise ValueError("%s: tile %d (origin %s) differs from inference on a window %d voxels larger by %.3g "
                                 "(tolerance %.3g): the margin/halo %s is below the network's receptive field, align %s "
                                 "is wrong, or the network is not crop-equivariant"
                                 % (op, i, [c[0] for c in combo], e, d, tol, plan.margin if any(plan.margin)
                                    else plan.halo, plan.align))
            worst = max(worst, d)
    return {"tiles": picks, "max_abs_diff": worst, "bit_identical": identical}
