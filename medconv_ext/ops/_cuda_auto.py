"""The CUDA `auto` rule of rolling convolution: measured, never predicted.

On CUDA, backend="auto" runs "reference" (materialized bank + cuDNN) unless a committed GPU benchmark
(bench/results/<gpu>/rolling_conv.csv, by bench/bench_rolling_conv.py) measured another backend faster
than "reference" for the same kind of layer on the same GPU. bench/make_cuda_auto_table.py turns those
CSVs into a small table shipped inside the package (medconv_ext/data/cuda_auto_table.json), keyed by the
GPU name as `nvidia-smi --query-gpu=name` prints it, lower-cased, runs of other characters than letters
and digits as '-' (e.g. "nvidia-h100-80gb-hbm3"). A GPU that is not in the table gets "reference".

A table entry names one measured kind of layer and the backend that won there:
    {"dims": 2, "transposed": false, "c_min": 256, "c_max": 256, "taps": 9, "n_base": 1, "full_roll": true,
     "dtype": "bfloat16", "tf32": null, "training": false, "backend": "spectral", "speedup": 1.3}
`tf32` is the value of torch.backends.cudnn.allow_tf32 during the measurement for float32 rows (the
dense conv of "reference" runs in TF32 when it is true, PyTorch's default), null for other dtypes;
`training` is whether gradients were computed (forward + backward) or not (inference); the channel range
covers the measured C_in values where the backend won, without extrapolating beyond them.

The rule reads only the tensors' device, shape, dtype and requires_grad, torch.is_grad_enabled() and
torch.backends.cudnn.allow_tf32. The GPU name is read once per device index (torch.cuda.get_device_name,
cached; never nvidia-smi). MEDCONV_CUDA_AUTO_TABLE names another table file in the same format (your own
measurements), read once per path.
"""
import functools
import json
import os
import re
from typing import List, NamedTuple, Optional

import torch

TABLE_ENV = "MEDCONV_CUDA_AUTO_TABLE"
SHIPPED_TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                             "cuda_auto_table.json")
# Backends a table may name (besides "reference", the default).
TABLE_BACKENDS = ("spectral", "cuda", "triton")


class Layer(NamedTuple):
    """What the CUDA rule looks at."""
    gpu: str             # gpu_slug of the device's name
    dims: int
    transposed: bool
    c_in: int
    taps: int
    n_base: int
    full_roll: bool      # n_rolls == C_in
    dtype: str           # "float32", "bfloat16", ...
    tf32: Optional[bool]  # cuDNN TF32 flag, float32 only (None otherwise)
    training: bool


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the folder name of bench/results/<gpu>/)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def _device_slug(index: int) -> str:
    return gpu_slug(torch.cuda.get_device_name(index))


def device_gpu_slug(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_slug(index)


def _check_entry(e, where: str) -> None:
    need = {"dims": int, "transposed": bool, "c_min": int, "c_max": int, "taps": int, "n_base": int,
            "full_roll": bool, "dtype": str, "training": bool, "backend": str}
    for key, typ in need.items():
        if not isinstance(e.get(key), typ):
            raise ValueError("%s: entry %r needs %r of type %s" % (where, e, key, typ.__name__))
    if e["backend"] not in TABLE_BACKENDS:
        raise ValueError("%s: entry %r names backend %r (allowed: %s)" % (where, e, e["backend"],
                                                                          ", ".join(TABLE_BACKENDS)))
    if e.get("tf32") is not None and not isinstance(e["tf32"], bool):
        raise ValueError("%s: entry %r: 'tf32' must be true, false or null" % (where, e))


@functools.lru_cache(maxsize=8)
def load_table(path: str) -> dict:
    """{gpu slug: [entry, ...]} from a table file (validated; a malformed file raises ValueError)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("gpus"), dict):
        raise ValueError("%s: not a CUDA auto table (expected {'format': 1, 'gpus': {...}})" % path)
    for gpu, entries in data["gpus"].items():
        if not isinstance(entries, list):
            raise ValueError("%s: gpus[%r] must be a list of entries" % (path, gpu))
        for e in entries:
            _check_entry(e, path)
    return data["gpus"]


def table_path() -> str:
    return os.environ.get(TABLE_ENV) or SHIPPED_TABLE


def choose(layer: Layer, table: dict) -> List[str]:
    """The pure rule: [backend, "reference"] for the first table entry of this GPU that matches the layer,
    else ["reference"]."""
    for e in table.get(layer.gpu, ()):
        if (e["dims"] == layer.dims and e["transposed"] == layer.transposed
                and e["c_min"] <= layer.c_in <= e["c_max"] and e["taps"] == layer.taps
                and e["n_base"] == layer.n_base and e["full_roll"] == layer.full_roll
                and e["dtype"] == layer.dtype and e.get("tf32") == layer.tf32 and e["training"] == layer.training):
            return [e["backend"], "reference"]
    return ["reference"]


def describe(x: torch.Tensor, weight: torch.Tensor, transposed: bool, n_rolls: Optional[int]) -> Layer:
    c_in = int(x.shape[1])
    taps = 1
    for k in weight.shape[2:]:
        taps *= int(k)
    n_base = int(weight.shape[1] if transposed else weight.shape[0])
    n_rolls = c_in if n_rolls is None else int(n_rolls)
    dtype = str(x.dtype).replace("torch.", "")
    tf32 = bool(torch.backends.cudnn.allow_tf32) if x.dtype == torch.float32 else None
    training = torch.is_grad_enabled() and bool(x.requires_grad or weight.requires_grad)
    return Layer(device_gpu_slug(x.device), weight.dim() - 2, bool(transposed), c_in, taps, n_base,
                 n_rolls == c_in, dtype, tf32, training)


def cuda_auto_candidates(x: torch.Tensor, weight: torch.Tensor, transposed: bool, n_rolls: Optional[int]) -> List[str]:
    table = load_table(table_path())
    if not table:  # the shipped table is empty until a GPU benchmark is committed: no name lookup needed
        return ["reference"]
    return choose(describe(x, weight, transposed, n_rolls), table)
