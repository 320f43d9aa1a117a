"""Readers and writers chosen by the path, and the ledger of finished tiles that makes a run resumable.

Formats (by the path's ending):
  .npy              NumPy, memory-mapped (numpy only)
  .zarr, .ome.zarr  a Zarr v3 (or v2) array, or an OME-Zarr image (level 0)   needs `zarr`
  .tif, .tiff       a TIFF stack, memory-mapped when uncompressed and contiguous  needs `tifffile`
  .nii, .nii.gz     NIfTI-1/2; the output keeps the input's affine and header     needs `nibabel`

Every array is shown to the runner as a view with the logical layout (C, *spatial) or
(N, C, *spatial) (`AxesView`): a missing channel axis is inserted (size 1), a channel axis
anywhere (OME-Zarr 'c', TIFF 'C'/'S', the 4th NIfTI axis) is moved in front of the spatial axes,
singleton axes are dropped, and with a 2D network on a volume the 'z' axis becomes the batch axis
(slice by slice). The output has the input's physical layout with the model's channels.
"""
import contextlib
import gzip
import hashlib
import json
import logging
import os
import shutil
import time
from typing import List

import numpy as np
import torch

from .._errors import FileError, check_readable, need, reading

FORMATS = ("npy", "zarr", "tiff", "nii", "nii.gz")
LEDGER_FORMAT = "medconv_ext.tiling_ledger.v1"


def _need(module, fmt):
    return need(module, "%s files" % fmt)


def _check_npy(path) -> None:
    """A FileError unless `path` is a complete .npy file of numbers (checked before mapping it, so
    that a truncated file or a text file named .npy is named and explained)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise FileError(path, "is not a NumPy .npy file (no .npy header%s)"
                            % (": it is empty" if size == 0 else ""))
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # format 3.0 (utf-8 field names): np.load checks it (its errors name the file too)
                return
        except (ValueError, EOFError, SyntaxError) as e:
            raise FileError(path, "has a corrupt .npy header (%s)" % str(e).splitlines()[0]) from None
        offset = f.tell()
    if dtype.hasobject:
        raise FileError(path, "holds Python objects (pickled data), not numbers: save the image as a numeric "
                              "array")
    need_bytes = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < need_bytes:
        raise FileError(path, "is truncated: %d bytes, its header (shape %s, %s) needs %d"
                        % (size, tuple(shape), dtype, need_bytes))


def detect_format(path) -> str:
    p = str(path).rstrip("/").rstrip(os.sep)
    low = p.lower()
    if low.endswith(".npy"):
        return "npy"
    if low.endswith(".nii.gz"):
        return "nii.gz"
    if low.endswith(".nii"):
        return "nii"
    if low.endswith((".tif", ".tiff")):
        return "tiff"
    if low.endswith(".zarr") or (os.path.isdir(p) and any(
            os.path.exists(os.path.join(p, f)) for f in ("zarr.json", ".zarray", ".zgroup"))):
        return "zarr"
    raise ValueError("cannot tell the format of %r from its name: use .npy, .zarr (a Zarr array or an OME-Zarr "
                     "image), .tif/.tiff or .nii/.nii.gz" % (str(path),))


# ------------------------------------------------------------------ layouts
_SPATIAL = "xyzs"  # s: a spatial axis without a name


def _default_names(ndim, dims, what):
    sp = "zyx"[3 - dims:]
    if ndim == dims:
        return sp
    if ndim == dims + 1:
        return "c" + sp
    if ndim == dims + 2:
        return "nc" + sp
    raise ValueError("%s has %d axes: a %dD network takes (C, %s) or (N, C, %s) arrays (or just (%s))"
                     % (what, ndim, dims, ", ".join(sp.upper()), ", ".join(sp.upper()), ", ".join(sp.upper())))


def _logical(names, shape, dims, what):
    """(logical, dropped): logical[i] is the physical axis of logical axis i of ((N,) C, *spatial)
    (None: an inserted size-1 channel axis); dropped: physical singleton axes indexed with 0."""
    names = list(names)
    if len(names) != len(shape):
        raise ValueError("%s: %d axis names %r for shape %s" % (what, len(names), "".join(names), tuple(shape)))
    sp = [i for i, n in enumerate(names) if n in _SPATIAL]
    while len(sp) > dims:  # a 2D network on a volume: slice by slice along z (else the first spatial axis)
        z = next((i for i in sp if names[i] == "z"), sp[0])
        names[z] = "n"
        sp.remove(z)
    if len(sp) < dims:  # unnamed TIFF axes (Q, I) count as spatial when needed
        for i in reversed(range(len(names))):
            if len(sp) < dims and names[i] == "q" and (not sp or i < sp[0]):
                names[i] = "s"
                sp.insert(0, i)
    if len(sp) < dims:
        raise ValueError("%s: axes %r of shape %s have %d spatial axes, the %dD network needs %d"
                         % (what, "".join(names), tuple(shape), len(sp), dims, dims))
    ch = [i for i, n in enumerate(names) if n == "c"]
    if len([i for i in ch if shape[i] != 1]) > 1:
        raise ValueError("%s: more than one channel axis in %r (shape %s)" % (what, "".join(names), tuple(shape)))
    c = next((i for i in ch if shape[i] != 1), ch[0] if ch else None)
    batch = [i for i, n in enumerate(names) if i not in sp and i != c]
    big = [i for i in batch if shape[i] != 1]
    if len(big) > 1:
        raise ValueError("%s: axes %r of shape %s leave %d non-singleton axes besides the channel and the %d "
                         "spatial axes; at most one (a batch of images) is supported"
                         % (what, "".join(names), tuple(shape), len(big), dims))
    # keep a batch axis that the array has by its rank (an (N, C, ...) .npy with N == 1)
    keep = big or [i for i in batch if names[i] == "n" and len(names) == dims + 2 and i == 0]
    logical = keep[:1] + [c] + sp
    dropped = [i for i in batch if i not in keep[:1]]
    return logical, dropped


class AxesView:
    """An array (NumPy, memmap, zarr.Array, nibabel ArrayProxy) seen in the layout ((N,) C, *spatial):
    indexed with ints and slices only; __setitem__ writes through when the array is writable."""

    def __init__(self, arr, logical, dropped, dtype=None):
        self.arr, self.logical, self.dropped = arr, list(logical), list(dropped)
        self.shape = tuple(1 if p is None else int(arr.shape[p]) for p in self.logical)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype if dtype is not None else arr.dtype)
        self.path = None  # set for inputs: a failed read names the file

    def _phys(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        phys: List[object] = [slice(None)] * len(self.arr.shape)
        for d in self.dropped:
            phys[d] = 0
        kept = []  # logical axes kept in the result, in logical order: (physical axis or None)
        for k, p in zip(key, self.logical):
            if p is not None:
                phys[p] = k
            if isinstance(k, slice):
                kept.append(p)
        return tuple(phys), kept

    def __getitem__(self, key):
        phys, kept = self._phys(key)
        if self.path is None:
            blk = np.asarray(self.arr[phys])
        else:
            with reading(self.path):
                blk = np.asarray(self.arr[phys])
        real = [p for p in kept if p is not None]
        order = sorted(real)  # the block's axes are the kept physical axes in physical order
        blk = blk.transpose([order.index(p) for p in real]) if real != order else blk
        for pos, p in enumerate(kept):
            if p is None:
                blk = np.expand_dims(blk, pos)
        return blk

    def __setitem__(self, key, value):
        phys, kept = self._phys(key)
        value = np.asarray(value)
        for pos in reversed([pos for pos, p in enumerate(kept) if p is None]):
            value = value.reshape(value.shape[:pos] + value.shape[pos + 1:])
        real = [p for p in kept if p is not None]
        order = sorted(real)
        if real != order:
            value = value.transpose([real.index(p) for p in order])
        self.arr[phys] = value


def _view(arr, names, dims, what, dtype=None):
    logical, dropped = _logical(names, arr.shape, dims, what)
    if logical == list(range(len(arr.shape))) and not dropped and isinstance(arr, np.ndarray):
        return arr
    return AxesView(arr, logical, dropped, dtype)


# ------------------------------------------------------------------ reading
class Source:
    """An opened input: `view` in the logical layout, and what the writer needs to mirror it."""

    def __init__(self, path, fmt, view, names, phys_shape, dtype, **extra):
        self.path, self.fmt, self.view, self.names = str(path), fmt, view, names
        self.phys_shape, self.dtype, self.extra = tuple(int(s) for s in phys_shape), np.dtype(dtype), extra

    def describe(self):
        return {"path": os.path.abspath(self.path), "format": self.fmt, "axes": self.names,
                "shape": list(self.phys_shape), "dtype": self.dtype.str}


def _zarr_names(arr):
    dn = getattr(getattr(arr, "metadata", None), "dimension_names", None)
    if not dn:
        dn = arr.attrs.get("_ARRAY_DIMENSIONS") if hasattr(arr, "attrs") else None
    if not dn or any(d is None for d in dn):
        return None
    out = ""
    for d in dn:
        d = str(d).lower()
        out += d if d in ("x", "y", "z") else "c" if d in ("c", "channel") else "n"
    return out


def _ome_multiscales(attrs):
    ome = attrs.get("ome")
    if isinstance(ome, dict) and ome.get("multiscales"):
        return ome["multiscales"], ome.get("version", "0.5")
    if attrs.get("multiscales"):
        ms = attrs["multiscales"]
        return ms, (ms[0].get("version", "0.4") if isinstance(ms[0], dict) else "0.4")
    return None, None


def _ome_axis_letter(ax):
    if isinstance(ax, str):
        name, typ = ax, None
    else:
        name, typ = str(ax.get("name", "")), ax.get("type")
    name = name.lower()
    if typ == "channel" or name in ("c", "channel"):
        return "c"
    if name in ("x", "y", "z"):
        return name
    if typ == "space":
        return "s"
    return "n"


def open_image(path, dims: int, mode: str = "r") -> Source:
    """Open an input image (or, with mode='r+', an output created by create_output) by its path."""
    fmt = detect_format(path)
    what = "%s (%s)" % (path, fmt)
    check_readable(path, "input" if mode == "r" else "file")
    if fmt == "npy":
        if os.path.isdir(str(path)):
            raise FileError(path, "is a folder, not a .npy file")
        _check_npy(str(path))
        with reading(path):
            arr = np.load(path, mmap_mode=mode, allow_pickle=False)
        names = _default_names(arr.ndim, dims, what)
        return Source(path, fmt, _view(arr, names, dims, what), names, arr.shape, arr.dtype)
    if fmt == "zarr":
        zarr = _need("zarr", "Zarr")
        if not os.path.isdir(str(path)):
            raise FileError(path, "is a file, not a Zarr folder")
        if not any(os.path.exists(os.path.join(str(path), f)) for f in ("zarr.json", ".zarray", ".zgroup")):
            raise FileError(path, "is not a Zarr array or group (no zarr.json, .zarray or .zgroup in it)")
        with reading(path):
            node = zarr.open(str(path), mode=mode)
        extra = {}
        if isinstance(node, zarr.Group):
            ms, version = _ome_multiscales(node.attrs.asdict())
            if not ms:
                raise ValueError("%s is a Zarr group without OME-Zarr multiscales metadata: pass the path of an array "
                                 "or of an OME-Zarr image" % (path,))
            ds = ms[0]["datasets"][0]
            arr = node[ds["path"]]
            axes = ms[0].get("axes") or ["t", "c", "z", "y", "x"][-arr.ndim:]
            names = "".join(_ome_axis_letter(a) for a in axes)
            extra = {"ome": {"axes": axes, "dataset": ds, "version": version, "name": ms[0].get("name")}}
        else:
            arr = node
            names = _zarr_names(arr) or _default_names(arr.ndim, dims, what)
        return Source(path, fmt, _named(_view(arr, names, dims, what), path), names, arr.shape, arr.dtype, **extra)
    if fmt == "tiff":
        tifffile = _need("tifffile", "TIFF")
        with reading(path), _quiet_logger("tifffile"):
            with tifffile.TiffFile(str(path)) as tf:
                if not tf.series or not tf.pages:
                    raise FileError(path, "is not a valid TIFF file (no readable image in it)")
                series = tf.series[0]
                axes, shape, dtype = series.axes, tuple(series.shape), series.dtype
                _check_tiff_extent(path, tf)
        try:
            arr = tifffile.memmap(str(path), mode=mode)
            if tuple(arr.shape) != shape:
                arr = arr.reshape(shape)
        except (ValueError, OSError):
            if mode != "r":
                raise
            with reading(path):
                try:  # compressed or scattered: read through tifffile's Zarr store, chunk by chunk
                    zarr = __import__("zarr")
                    arr = zarr.open(tifffile.TiffFile(str(path)).series[0].aszarr(), mode="r")
                except ImportError:
                    arr = tifffile.imread(str(path))  # no zarr: the whole stack in memory
        names = "".join("c" if a in "CS" else a.lower() if a in "XYZ" else "q" if a in "QI" else "n" for a in axes)
        return Source(path, fmt, _named(_view(arr, names, dims, what), path), names, shape, dtype, tiff_axes=axes)
    nib = _need("nibabel", "NIfTI")
    with reading(path):
        img = nib.load(str(path), mmap=fmt == "nii")
        shape = img.shape
        if fmt == "nii":
            need_bytes = int(img.dataobj.offset) + int(np.prod(shape, dtype=np.int64)) * \
                img.header.get_data_dtype().itemsize
            if os.path.getsize(str(path)) < need_bytes:
                raise FileError(path, "is truncated: %d bytes, its header (shape %s, %s) needs %d"
                                % (os.path.getsize(str(path)), tuple(shape), img.header.get_data_dtype(),
                                   need_bytes))
    if fmt == "nii" and mode == "r+":
        arr = np.memmap(str(path), dtype=img.header.get_data_dtype(), mode="r+",
                        offset=int(img.dataobj.offset), shape=shape, order="F")
    elif fmt == "nii":
        arr = img.dataobj  # sliced on demand from the memory-mapped file
    else:
        with reading(path):
            arr = np.asanyarray(img.dataobj)  # gzip cannot seek cheaply: decompressed once
    names = {2: "xy", 3: "xyz", 4: "xyzc", 5: "xyznc"}.get(len(shape))
    if names is None:
        raise ValueError("%s: a NIfTI image with %d axes is not supported (2 to 5)" % (path, len(shape)))
    dtype = img.header.get_data_dtype()
    slope, inter = img.header.get_slope_inter()
    if (slope not in (None, 1.0) and slope == slope) or (inter not in (None, 0.0) and inter == inter):
        dtype = np.dtype(np.float64)  # scaled data are read as floats
    return Source(path, fmt, _named(_view(arr, names, dims, what, dtype=dtype), path), names, shape, dtype,
                  header=img.header, affine=img.affine, nifti_class=type(img))


@contextlib.contextmanager
def _quiet_logger(name):
    """tifffile logs a warning before raising on a corrupt file: the error alone is reported."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _named(view, path):
    """Reads of a lazily read input (Zarr chunks, compressed TIFF, .nii proxies) that fail name the file."""
    if isinstance(view, AxesView):
        view.path = str(path)
    return view


def _check_tiff_extent(path, tf) -> None:
    """A FileError when an image's data lie beyond the end of the file (a truncated TIFF)."""
    size = os.path.getsize(str(path))
    for page in tf.pages:
        offs, counts = getattr(page, "dataoffsets", ()), getattr(page, "databytecounts", ())
        for o, c in zip(offs, counts):
            if o + c > size:
                raise FileError(path, "is truncated: image data up to byte %d, the file has %d" % (o + c, size))


# ------------------------------------------------------------------ writing
def output_layout(src: Source, c_out: int, fmt: str):
    """(names, physical shape) of the output: the input's layout with c_out channels."""
    names, shape = list(src.names), list(src.phys_shape)
    ch = [i for i, n in enumerate(names) if n == "c" and shape[i] != 1] or [i for i, n in enumerate(names) if n == "c"]
    if ch:
        shape[ch[0]] = c_out
    elif c_out != 1:
        pos = len(names) if fmt in ("nii", "nii.gz") else next(i for i, n in enumerate(names) if n in _SPATIAL + "q")
        if fmt in ("nii", "nii.gz") and len(names) == 3:
            names.insert(pos, "c")
        elif fmt in ("nii", "nii.gz"):
            raise ValueError("NIfTI output of %d channels for an input without a channel axis" % c_out)
        else:
            names.insert(pos, "c")
        shape.insert(pos, c_out)
    return "".join(names), tuple(shape)


def _zarr_chunks(names, shape, dims, plan_chunk, what):
    logical, dropped = _logical(names, shape, dims, what)
    chunks = [1] * len(shape)
    sp = logical[-dims:]
    for p, c in zip(sp, plan_chunk):
        chunks[p] = int(c)
    if logical[-dims - 1] is not None:
        chunks[logical[-dims - 1]] = int(shape[logical[-dims - 1]])
    return chunks


def partial_path(out_path, fmt, ledger_dir):
    """Where the data are written during a run: the output itself, except for .nii.gz (an
    uncompressed .nii in the ledger folder, compressed into place at the end)."""
    return os.path.join(ledger_dir, "partial.nii") if fmt == "nii.gz" else str(out_path)


def create_output(out_path, src: Source, c_out: int, np_dtype, dims: int, plan_chunk, ledger_dir) -> None:
    """Create an empty output (zero-filled, or sparse) mirroring `src` with c_out channels. For Zarr
    the chunks are the tile plan's output regions, so that no two tiles ever write the same chunk."""
    fmt = detect_format(out_path)
    np_dtype = np.dtype(np_dtype)
    what = "output %s (%s)" % (out_path, fmt)
    names, shape = output_layout(src, c_out, fmt)
    _logical(names, shape, dims, what)  # the output must read back in the same logical layout
    target = partial_path(out_path, fmt, ledger_dir)
    parent = os.path.dirname(os.path.abspath(str(out_path)))
    if not os.path.isdir(parent):
        raise FileNotFoundError("the folder of the output %s does not exist" % (out_path,))
    if fmt == "npy":
        mm = np.lib.format.open_memmap(target, mode="w+", dtype=np_dtype, shape=shape)
        del mm
    elif fmt == "zarr":
        zarr = _need("zarr", "Zarr")
        chunks = _zarr_chunks(names, shape, dims, plan_chunk, what)
        ome = src.extra.get("ome") if src.fmt == "zarr" else None
        if ome is not None:
            axes = list(ome["axes"])
            ds = json.loads(json.dumps(ome["dataset"]))
            ds["path"] = "0"
            if len(names) > len(src.names):  # a channel axis was inserted
                pos = names.index("c")
                axes.insert(pos, {"name": "c", "type": "channel"})
                for tr in ds.get("coordinateTransformations", []):
                    for key in ("scale", "translation"):
                        if key in tr:
                            tr[key].insert(pos, 1.0 if key == "scale" else 0.0)
            ms = {"version": "0.5", "axes": axes, "datasets": [ds]}
            if ome.get("name"):
                ms["name"] = ome["name"]
            g = zarr.open_group(target, mode="w-", zarr_format=3)
            g.attrs.update({"ome": {"version": "0.5", "multiscales": [ms]}})
            g.create_array("0", shape=shape, chunks=chunks, dtype=np_dtype, fill_value=0,
                           dimension_names=[a["name"] if isinstance(a, dict) else a for a in axes])
        else:
            zarr.create_array(store=target, shape=shape, chunks=chunks, dtype=np_dtype, fill_value=0,
                              zarr_format=3)
    elif fmt == "tiff":
        tifffile = _need("tifffile", "TIFF")
        in_axes = src.extra.get("tiff_axes") if src.fmt == "tiff" else None
        if in_axes is not None and len(in_axes) == len(names):
            axes = in_axes
        else:
            axes = "".join("C" if n == "c" else n.upper() if n in "xyz" else "Q" for n in names)
        mm = tifffile.memmap(target, shape=shape, dtype=np_dtype, bigtiff=np_dtype.itemsize * int(np.prod(shape)) > 2 ** 31,
                             metadata={"axes": axes})
        del mm
    else:
        nib = _need("nibabel", "NIfTI")
        if src.fmt in ("nii", "nii.gz"):
            hdr = src.extra["header"].copy()
        else:  # from another format: a plain header with an identity affine
            hdr = nib.Nifti1Header()
            hdr.set_sform(np.eye(4), code="aligned")
            hdr.set_qform(np.eye(4), code="aligned")
        hdr.set_data_shape(shape)
        hdr.set_data_dtype(np_dtype)
        hdr.set_slope_inter(1.0, 0.0)
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        with open(target, "wb") as f:
            hdr.write_to(f)
            off = max(int(hdr.get_data_offset()), f.tell())
        if off != int(hdr.get_data_offset()):
            hdr.set_data_offset(off)
            with open(target, "wb") as f:
                hdr.write_to(f)
        with open(target, "r+b") as f:
            f.truncate(off + np_dtype.itemsize * int(np.prod(shape)))


def open_output(out_path, dims: int, ledger_dir):
    """The created output, writable, as a view in the logical layout ((N,) C_out, *spatial)."""
    fmt = detect_format(out_path)
    target = partial_path(out_path, fmt, ledger_dir)
    what = "output %s (%s)" % (out_path, fmt)
    if fmt in ("nii", "nii.gz"):
        nib = _need("nibabel", "NIfTI")
        img = nib.load(target)  # (a loaded header reports offset 0; the array proxy has the real one)
        shape = img.header.get_data_shape()
        arr = np.memmap(target, dtype=img.header.get_data_dtype(), mode="r+", offset=int(img.dataobj.offset),
                        shape=shape, order="F")
        names = {2: "xy", 3: "xyz", 4: "xyzc", 5: "xyznc"}[len(shape)]
        return AxesView(arr, *_logical(names, shape, dims, what))
    src = open_image(target, dims, mode="r+")
    v = src.view
    return v if isinstance(v, AxesView) else AxesView(v, list(range(v.ndim)), [])


def finalize_output(out_path, ledger_dir) -> None:
    """After every tile is written: flush, and for .nii.gz compress the partial file into place."""
    fmt = detect_format(out_path)
    if fmt != "nii.gz":
        return
    part = partial_path(out_path, fmt, ledger_dir)
    tmp = str(out_path) + ".tmp-gz"
    with open(part, "rb") as fin, open(tmp, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)
        raw.flush()
        os.fsync(raw.fileno())  # durable before it replaces anything and before the ledger says complete
    os.replace(tmp, str(out_path))
    _fsync_path(os.path.dirname(os.path.abspath(str(out_path))), directory=True)


def remove_output(out_path, ledger_dir) -> None:
    for p in (str(out_path), ledger_dir):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


# ------------------------------------------------------------------ the ledger
def model_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fsync_path(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs():
    """libc's syncfs(fd) (Linux): one call makes every file of a file system durable."""
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
        fn.argtypes = [ctypes.c_int]
        return fn
    except (OSError, AttributeError):
        return None


_SYNCFS = _load_syncfs()


def _syncfs(path) -> bool:
    """syncfs on the file system of `path`; False when unavailable (then fsync file by file)."""
    if _SYNCFS is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            import ctypes
            raise OSError(ctypes.get_errno(), "syncfs failed", path)
    finally:
        os.close(fd)
    return True


def sync_output(out_path, ledger_dir, view, since_ns: int = 0) -> None:
    """Make the output's written data durable (on the disk, not only in the page cache).
    Memory-mapped files (.npy, TIFF, .nii and the .nii of a .nii.gz run): the mapping is flushed
    (msync) and the file fsync'ed. Zarr (one file per chunk): syncfs of its file system where the
    system has it (Linux; one call instead of one fsync per chunk file), else every chunk file and
    folder changed since `since_ns` (st_mtime_ns) is fsync'ed (a new file's folder entry needs its
    folder's fsync)."""
    fmt = detect_format(out_path)
    target = partial_path(out_path, fmt, ledger_dir)
    arr = getattr(view, "arr", view)
    if fmt != "zarr":
        if hasattr(arr, "flush"):
            arr.flush()
        _fsync_path(target)
        return
    if _syncfs(target):
        return
    slack = 2_000_000_000  # file systems with coarse timestamps: look 2 s further back
    stack = [target]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            entries = list(it)
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mtime_ns >= since_ns - slack:
                _fsync_path(e.path)
        if os.stat(d).st_mtime_ns >= since_ns - slack:
            _fsync_path(d, directory=True)


class Ledger:
    """A folder `<output>.ledger` beside the output: ledger.json (what the run computes, so that a
    resumed run can check it is the same run, and whether it finished) and done.u8, one byte per
    tile. A tile's byte is set to 1 only after its data are durable, in group commits (`commit`):
    the output's data written so far are flushed and fsync'ed (sync_output), then the bytes of the
    tiles of the group are written with pwrite and done.u8 is fsync'ed. So neither a killed process
    nor a machine losing power leaves a byte at 1 whose data are incomplete; a byte still 0 (a tile
    whose flag was not yet committed) is recomputed on resume. sync=False skips both fsyncs: the
    ledger then survives a killed process (the page cache is the system's) but not a power loss."""

    def __init__(self, out_path, sync: bool = True):
        self.out_path = str(out_path)
        self.dir = str(out_path).rstrip("/").rstrip(os.sep) + ".ledger"
        self.meta_path = os.path.join(self.dir, "ledger.json")
        self.flags_path = os.path.join(self.dir, "done.u8")
        self.fd = None
        self.sync = sync
        self.pending: List[int] = []
        self.last_commit = time.monotonic()
        self.synced_ns = 0  # data changed before this (st_mtime_ns) are durable

    def exists(self) -> bool:
        return os.path.isfile(self.meta_path)

    def _write_meta(self, meta):
        tmp = self.meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.meta_path)
        _fsync_path(self.dir, directory=True)  # the rename itself

    def create(self, fingerprint: dict, n_tiles: int) -> None:
        os.makedirs(self.dir, exist_ok=True)
        with open(self.flags_path, "wb") as f:
            f.truncate(n_tiles)
            f.flush()
            os.fsync(f.fileno())
        self._write_meta({"format": LEDGER_FORMAT, "fingerprint": fingerprint, "n_tiles": n_tiles,
                          "complete": False})

    def read_meta(self) -> dict:
        with open(self.meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != LEDGER_FORMAT:
            raise ValueError("%s is not a tiling ledger" % self.meta_path)
        return meta

    def mismatch(self, fingerprint: dict) -> List[str]:
        old = json.loads(json.dumps(self.read_meta()["fingerprint"]))
        new = json.loads(json.dumps(fingerprint))
        return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))

    def open(self) -> "Ledger":
        self.fd = os.open(self.flags_path, os.O_RDWR)
        self.synced_ns = time.time_ns()
        self.last_commit = time.monotonic()
        return self

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def mark(self, ids) -> None:
        """Tiles whose data were written (not yet durable): flagged at the next commit."""
        self.pending.extend(int(i) for i in ids)

    def due(self, interval: float) -> bool:
        return bool(self.pending) and time.monotonic() - self.last_commit >= interval

    def commit(self, view=None) -> None:
        """Make the pending tiles' data durable, then their flags (see the class)."""
        if not self.pending:
            return
        start_ns = time.time_ns()
        if self.sync and view is not None:
            sync_output(self.out_path, self.dir, view, self.synced_ns)
        for i in self.pending:
            os.pwrite(self.fd, b"\x01", i)
        if self.sync:
            os.fsync(self.fd)
        self.pending = []
        self.synced_ns = start_ns
        self.last_commit = time.monotonic()

    def done(self) -> np.ndarray:
        return np.fromfile(self.flags_path, dtype=np.uint8) != 0

    def set_complete(self) -> None:
        meta = self.read_meta()
        meta["complete"] = True
        self._write_meta(meta)
