"""Tiling checkpoints for the command line: a builder name, kwargs and a state dict."""
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .receptive import (_RESAMPLE, IntOrSeq, _check_model, _conv_types, _known_dims, _leaf_modules,
                         _model_dtype_device, crop_equivariance_problems, receptive_margin, receptive_radius)

# ------------------------------------------------------------------ checkpoints for the CLI
_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}
CHECKPOINT_FORMAT = "medconv_ext.tiling_checkpoint.v1"


def register_tiling_builder(name: str, fn: Callable[..., nn.Module]) -> None:
    """Make `fn(**kwargs) -> nn.Module` loadable by name from tiling checkpoints."""
    if not isinstance(name, str) or not name or not callable(fn):
        raise TypeError("register_tiling_builder: need a non-empty name and a callable, got %r, %r" % (name, fn))
    _BUILDERS[name] = fn


def _builder(name: str):
    from .. import models
    for zoo in models.BUILDERS:  # the builders of medconv_ext.models, by the names their builder_spec records
        _BUILDERS.setdefault(zoo, getattr(models, zoo))
    _BUILDERS.setdefault("srnet", models.SRNet)
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


def _default_align(model: nn.Module, op: str) -> int:
    """The tile-origin alignment a model needs: its `tiling_align` (the zoo's U-Nets: 2**depth), 1 for a
    network without resampling layers; otherwise unknown (a ValueError asks for align=)."""
    a = getattr(model, "tiling_align", None)
    if a is not None:
        return a
    conv, conv_t = _conv_types()
    for name, m in _leaf_modules(model):
        strided = isinstance(m, conv) and any(st != 1 for st in m.stride)
        if strided or isinstance(m, conv_t + _RESAMPLE):
            raise ValueError("%s: the model resamples (layer %r, %s) and has no tiling_align attribute: pass align= "
                             "(the product of its down-sampling factors, 2**depth for a U-Net)"
                             % (op, name, type(m).__name__))
    return 1


def _radius(model: nn.Module, dims: int, align: int, op: str):
    try:
        return receptive_radius(model, dims, align=align)
    except ValueError as e:
        raise ValueError("%s: cannot compute the halo (%s); pass halo= (and align=)" % (op, e)) from None


def _tiling_defaults(model: nn.Module, align: Optional[IntOrSeq], op: str):
    """(margin, halo, align) for a model given neither margin nor halo: a valid network's margin
    (receptive_margin), else the halo (receptive radius) on the model's align grid."""
    dims = _known_dims(model)
    if len(dims) != 1:
        raise ValueError("%s: cannot tell whether the model is 2D or 3D (its convolutions: %s); pass margin= or halo="
                         % (op, sorted(dims) or "none"))
    dims = dims.pop()
    was_training = model.training
    model.eval()  # the checkpoint is run in eval mode (BatchNorm on running statistics)
    try:
        problems = crop_equivariance_problems(model)
    finally:
        model.train(was_training)
    problems += ["layer %r (%s) mixes every voxel of its input" % (name, type(m).__name__)
                 for name, m in _leaf_modules(model) if isinstance(m, nn.Linear)]
    if problems:
        raise ValueError("%s: the model cannot be tiled: %s. Its output at a voxel depends on the whole image (a "
                         "classifier's output is not an image), so no tiling reproduces full-image inference; "
                         "pass margin= or halo= to store a checkpoint anyway"
                         % (op, "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")))
    if align is None or all(a == 1 for a in (align if isinstance(align, (list, tuple)) else [align])):
        try:
            return list(receptive_margin(model, dims)), None, 1
        except ValueError:
            pass  # not a valid network: halo mode
    if align is None:
        align = _default_align(model, op)
    if not isinstance(align, int):
        if len(set(align)) != 1:
            raise ValueError("%s: computing the halo needs one align for every axis, got %r; pass halo=" % (op, align))
        align = align[0]
    return None, list(_radius(model, dims, align, op)), align


def save_tiling_checkpoint(model: nn.Module, path, *, builder: Optional[str] = None, kwargs: Optional[dict] = None,
                           margin: Optional[IntOrSeq] = None, halo: Optional[IntOrSeq] = None,
                           align: Optional[IntOrSeq] = None, normalization: Optional[dict] = None) -> None:
    """Write a checkpoint for `python -m medconv_ext.tile`: a dict {format, builder, kwargs,
    state_dict, dtype, margin, halo, align, normalization, version} readable with
    torch.load(weights_only=True). The model is
    rebuilt as builder(**kwargs) (a name registered with register_tiling_builder, the builders of
    medconv_ext.models by name, "srnet", or "medconv_ext.<module>:<function>"). builder/kwargs default
    to model.builder_spec, which every model of medconv_ext.models records.

    margin/halo/align are stored as the CLI's defaults. Given neither margin nor halo, they are
    computed: a valid network (receptive_margin) stores its margin; any other network its halo,
    receptive_radius(model, dims, align=align), and its align: `align` if given, else the model's `tiling_align` (2**depth for the zoo's U-Nets),
    else 1 for a network without resampling (a resampling network without tiling_align needs align=).
    A model whose output depends on the whole image (global pooling, a linear classifier head,
    GroupNorm, ...) cannot be tiled: a ValueError says which layer.

    normalization: the input's intensity normalisation (a dict of medconv_ext.tiling.normalize, e.g.
    from the `seg --data` trainer), applied by the CLI before inference; the package version is
    stored too, and the CLI warns when it differs."""
    op = "save_tiling_checkpoint"
    _check_model(model, op)
    if builder is None:
        spec = getattr(model, "builder_spec", None)
        if spec is None:
            raise ValueError("%s: the model has no builder_spec (the models of medconv_ext.models record one; "
                             "rollify() and to_roll_loop() drop it, as the builder would rebuild other layers); "
                             "pass builder= (and kwargs=)" % op)
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
    if margin is None and halo is None:
        margin, halo, align = _tiling_defaults(model, align, op)
    elif align is None and halo is not None:
        align = getattr(model, "tiling_align", None)
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
