"""Small helpers shared by the model builders."""
from torch import nn

from ..nn import RollingConv2d, RollingConv3d, RollingConvTranspose2d, RollingConvTranspose3d

ROLLING_MODULES = (RollingConv2d, RollingConv3d, RollingConvTranspose2d, RollingConvTranspose3d)


def record_builder_spec(model: nn.Module, builder: str, **kwargs) -> nn.Module:
    """Set model.builder_spec = (builder, kwargs): `builder(**kwargs)` rebuilds the architecture (the
    weights come from a state dict). medconv_ext.tiling.save_tiling_checkpoint reads it; `builder` is
    a builder name of medconv_ext.models (see BUILDERS there) or "medconv_ext.<module>:<function>".
    Returns the model."""
    model.builder_spec = (builder, dict(kwargs))
    return model


def set_backend(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Set the backend of every rolling layer of `model` ("auto", "reference", "spectral", "cpu", "cuda",
    "triton"); returns the model. An unavailable backend raises when the layer runs, saying why."""
    if not isinstance(backend, str):
        raise TypeError("set_backend: backend must be a string, got %r" % (backend,))
    for m in model.modules():
        if isinstance(m, ROLLING_MODULES):
            m.backend = backend
    return model
