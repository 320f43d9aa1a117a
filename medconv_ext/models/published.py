"""The published Rolling-Filters checkpoints (segment.pth, recon.pth) and the published way of
running them.

from_published(path) builds the matching `rolling_unet` / `rolling_qsmnet`, loads the weights and
returns it in eval mode. to_roll_loop(model) returns a copy that rebuilds every rolling filter bank
on each call with a Python torch.roll loop + torch.cat, as the published code does (the
benchmark's "roll_loop" path); it computes the same function as the original.
"""
import copy
import os
from typing import Dict, List, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import RollingConv2d, RollingConv3d, RollingConvTranspose2d, RollingConvTranspose3d
from .unet import UNet

_REQUIRED = ("weight_m0", "weight_m1", "weight_u1", "out.weight", "out.bias")


def _published_names(model: UNet, first_level_convs: int) -> Dict[str, str]:
    """{published key prefix: module path} for every conv / BatchNorm of a rolling UNet."""
    out: Dict[str, str] = {}

    def unit(path: str, tag: str):
        out["weight_" + tag] = path + ".conv.weight"
        out["biases_" + tag] = path + ".conv.bias"
        for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            out["bnormn_%s.%s" % (tag, s)] = path + ".bn." + s

    # level 1: segment.pth has 00, 10, 11; recon.pth has 10, 11
    tags1 = ["00", "10", "11"] if first_level_convs == 3 else ["10", "11"]
    for j, tag in enumerate(tags1):
        unit("encoders.0.%d" % j, tag)
    for i in range(1, model.depth):
        for j in range(2):
            unit("encoders.%d.%d" % (i, j), "%d%d" % (i + 1, j))
    for j in range(2):
        unit("middle.%d" % j, "m%d" % j)
    for i in range(model.depth):
        out["weight_u%d" % (i + 1)] = "ups.%d.weight" % i
        out["biases_u%d" % (i + 1)] = "ups.%d.bias" % i
        for j in range(2):
            unit("decoders.%d.%d" % (i, j), "%d%d" % (model.depth + 1 + i, j))
    out["out.weight"] = "out.weight"
    out["out.bias"] = "out.bias"
    return out


def _load_state(path_or_state) -> Mapping[str, torch.Tensor]:
    if isinstance(path_or_state, Mapping):
        return path_or_state
    if not isinstance(path_or_state, (str, os.PathLike)):
        raise TypeError("from_published: expected a path to a .pth file or a state dict, got %s"
                        % type(path_or_state).__name__)
    if not os.path.isfile(path_or_state):
        raise FileNotFoundError("from_published: no such file: %s" % os.fspath(path_or_state))
    state = torch.load(path_or_state, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError("from_published: %s holds a %s, not a state dict" % (path_or_state, type(state).__name__))
    return state


def from_published(path: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> UNet:
    """Build the model of a published Rolling-Filters checkpoint and load its weights.

    `path`: segment.pth (2D Rolling UNet, 3x3, 3 convs in level 1: weight_00 dense) or recon.pth
    (3D Rolling QSMnet, 5x5x5, 2 convs in level 1: weight_10 dense); the layout (dims, kernel size,
    widths, input channels, classes) is read from the keys and shapes, so checkpoints of the same
    layout at other widths load too. A state dict may be passed instead of a path.
    Returns the model in eval mode (BatchNorm uses the stored running statistics); its forward
    returns logits (the published code's softmax + argmax is left to the caller).
    """
    state = _load_state(path)
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError("from_published: not a published Rolling-Filters (Rolling UNet / QSMnet) checkpoint: "
                         "missing keys %s (has %d keys, e.g. %s)" % (missing, len(state), list(state)[:5]))
    if "weight_00" in state:
        first, first_level_convs = state["weight_00"], 3      # segment.pth layout
    elif "weight_10" in state and state["weight_10"].shape[0] > 2:
        first, first_level_convs = state["weight_10"], 2      # recon.pth layout (weight_10 is the dense input conv)
    else:
        raise ValueError("from_published: unknown layout: neither a dense input conv 'weight_00' (segment.pth) "
                         "nor a dense 'weight_10' (recon.pth) was found")
    dims = first.dim() - 2
    if dims not in (2, 3) or first.shape[-1] != first.shape[-2]:
        raise ValueError("from_published: unknown layout: input conv weight has shape %s" % (tuple(first.shape),))
    features, in_channels, k = first.shape[0], first.shape[1], first.shape[-1]
    num_out = state["out.weight"].shape[0]
    depth = sum(1 for key in state if key.startswith("weight_u"))
    model = UNet(dims, in_channels, num_out, features, k, kind="rolling", first_kind="dense",
                 first_level_convs=first_level_convs, depth=depth)
    names = _published_names(model, first_level_convs)
    unknown = sorted(set(state) - set(names))
    absent = sorted(set(names) - set(state))
    if unknown or absent:
        raise ValueError("from_published: unknown layout: keys not in a %dD Rolling UNet of depth %d: %s; missing: %s"
                         % (dims, depth, unknown[:8], absent[:8]))
    own = model.state_dict()
    mapped = {}
    for key, value in state.items():
        target = names[key]
        if tuple(own[target].shape) != tuple(value.shape):
            raise ValueError("from_published: %s has shape %s, but the %dD Rolling UNet inferred from the checkpoint "
                             "(features=%d, kernel %d, %d input channels) expects %s for it"
                             % (key, tuple(value.shape), dims, features, k, in_channels, tuple(own[target].shape)))
        mapped[target] = value
    model.load_state_dict(mapped, strict=True)
    return model.eval()


# ------------------------------------------------------------------ the published roll loop
class RollLoopConv(nn.Module):
    """Runs a rolling (transposed) conv module the published way: the bank is rebuilt on every call by
    rolling the base by +1 along its input-channel axis in a Python loop and concatenating."""

    def __init__(self, rolling: nn.Module):
        super().__init__()
        self.rolling = rolling
        self.transposed = isinstance(rolling, (RollingConvTranspose2d, RollingConvTranspose3d))
        self.dims = 3 if isinstance(rolling, (RollingConv3d, RollingConvTranspose3d)) else 2

    def bank(self) -> torch.Tensor:
        m = self.rolling
        w = m.weight
        if self.transposed:  # (C_in, n_base, *k): roll along dim 0, concatenate along dim 1
            parts: List[torch.Tensor] = [w]
            for _ in range(1, m.n_rolls):
                parts.append(torch.roll(parts[-1], shifts=1, dims=0))
            return torch.cat(parts, dim=1)
        parts = [w]                # (n_base, C_in, *k): roll along dim 1, concatenate along dim 0
        for _ in range(1, m.n_rolls):
            parts.append(torch.roll(parts[-1], shifts=1, dims=1))
        return torch.cat(parts, dim=0)

    def forward(self, x):
        m = self.rolling
        if self.transposed:
            fn = F.conv_transpose2d if self.dims == 2 else F.conv_transpose3d
            return fn(x, self.bank(), m.bias, m.stride, m.padding, m.output_padding, 1, m.dilation)
        fn = F.conv2d if self.dims == 2 else F.conv3d
        x, padding = m._conv_input(x)  # the module's rule for 'same'/'valid' and padding_mode
        return fn(x, self.bank(), m.bias, m.stride, padding, m.dilation)


_ROLLING = (RollingConv2d, RollingConv3d, RollingConvTranspose2d, RollingConvTranspose3d)


def to_roll_loop(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose rolling layers rebuild their bank with a torch.roll loop on every
    call (the published implementation); parameters are copied, not shared."""
    model = copy.deepcopy(model)
    if getattr(model, "builder_spec", None) is not None:
        model.builder_spec = None  # the copy's layout (and state-dict keys) differ from the builder's
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, _ROLLING):
                setattr(m, child_name, RollLoopConv(child))
    return model
