"""Tiling checkpoints for the command line: a builder name, kwargs and a state dict."""
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .receptive import IntOrSeq, _check_model, _model_dtype_device

# ------------------------------------------------------------------ checkpoints for the CLI
_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}
CHECKPOINT_FORMAT = "medconv_ext.tiling_checkpoint.v1"


def register_tiling_builder(name: str, fn: Callable[..., nn.Module]) -> None:
    """Make `fn(**kwargs) -> nn.Module` loadable by name from tiling checkpoints."""
    if not isinstance(name, str) or not name or not callable(fn):
        raise TypeError("register_tiling_builder: need a non-empty name and a callable, got %r, %r" % (name, fn))
    _BUILDERS[name] = fn


def _builder(name: str):
    from ..models.valid_srnet import SRNet, valid_srnet
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
                           align: IntOrSeq = 1, normalization: Optional[dict] = None) -> None:
    """Write a checkpoint for `python -m medconv_ext.tile`: a dict {format, builder, kwargs,
    state_dict, dtype, margin, halo, align, normalization, version} readable with
    torch.load(weights_only=True). The model is
    rebuilt as builder(**kwargs) (a name registered with register_tiling_builder, built-ins
    "valid_srnet" and "srnet", or "medconv_ext.<module>:<function>"). builder/kwargs default to
    model.builder_spec (set by the models of medconv_ext.models). margin/halo/align are stored as
    the CLI's defaults. normalization: the input's intensity normalisation (a dict of
    medconv_ext.tiling.normalize, e.g. from the `seg --data` trainer), applied by the CLI before
    inference; the package version is stored too, and the CLI warns when it differs."""
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
    if normalization is not None:
        from .normalize import check_normalization
        check_normalization(normalization, op + ": normalization")
    dtype, _ = _model_dtype_device(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "builder": builder, "kwargs": kwargs, "state_dict": state,
                "dtype": str(dtype or torch.float32).replace("torch.", ""),
                "margin": list(margin) if isinstance(margin, tuple) else margin,
                "halo": list(halo) if isinstance(halo, tuple) else halo,
                "align": list(align) if isinstance(align, tuple) else align,
                "normalization": normalization, "version": _package_version()}, path)


def _package_version() -> str:
    from .._version import __version__
    return str(__version__)


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
