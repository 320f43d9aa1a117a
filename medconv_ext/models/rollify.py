"""rollify: convert a model's dense convolutions into rolling convolutions in place, the way the
rolling-filters paper converts UNet, QSMnet and ResNet18."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..nn import RollingConv2d, RollingConv3d, RollingConvTranspose2d, RollingConvTranspose3d, rolling_layout

# dense class -> rolling class (Conv1d has no rolling counterpart: reported, never converted)
_TARGET = {
    nn.Conv2d: RollingConv2d,
    nn.Conv3d: RollingConv3d,
    nn.ConvTranspose2d: RollingConvTranspose2d,
    nn.ConvTranspose3d: RollingConvTranspose3d,
}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class RollifyRow:
    layer: str                      # qualified module name (all names, comma-separated, for a shared module)
    kind: str                       # e.g. "Conv2d -> RollingConv2d", or "Conv2d" when kept dense
    shape_before: Tuple[int, ...]   # dense weight shape
    shape_after: Tuple[int, ...]    # rolling base shape (== shape_before when kept dense)
    params_before: int              # weight + bias
    params_after: int
    converted: bool
    note: str                       # "n_base=.., n_rolls=.." when converted, else the reason it stayed dense


class RollifyReport(list):
    """The rows of a rollify() call (one per conv layer met) with totals and a readable table."""

    def __init__(self, rows=(), model_params_before: int = 0, model_params_after: int = 0):
        super().__init__(rows)
        self.model_params_before = model_params_before
        self.model_params_after = model_params_after

    @property
    def converted(self) -> List[RollifyRow]:
        return [r for r in self if r.converted]

    @property
    def kept(self) -> List[RollifyRow]:
        return [r for r in self if not r.converted]

    @property
    def conv_params_before(self) -> int:
        return sum(r.params_before for r in self)

    @property
    def conv_params_after(self) -> int:
        return sum(r.params_after for r in self)

    def __str__(self) -> str:
        head = ("layer", "kind", "shape before", "shape after", "params before", "params after", "note")
        body = [(r.layer, r.kind, "x".join(map(str, r.shape_before)), "x".join(map(str, r.shape_after)),
                 "{:,}".format(r.params_before), "{:,}".format(r.params_after),
                 r.note if r.converted else "kept dense: " + r.note) for r in self]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        right = {4, 5}

        def fmt(cells):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
        lines.append("%d of %d conv layers converted; conv parameters %s -> %s; model parameters %s -> %s (%.2f%%)" % (
            len(self.converted), len(self), "{:,}".format(self.conv_params_before), "{:,}".format(self.conv_params_after),
            "{:,}".format(self.model_params_before), "{:,}".format(self.model_params_after),
            100.0 * self.model_params_after / max(self.model_params_before, 1)))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "RollifyReport(%d rows, %d converted, params %d -> %d)" % (
            len(self), len(self.converted), self.model_params_before, self.model_params_after)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False))


def _model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() already skips shared duplicates


def project_to_rolling(dense: torch.Tensor, n_base: int, n_rolls: int) -> torch.Tensor:
    """Least-squares closest rolling base (n_base, C_in, *k) to a dense bank (n_rolls * n_base, C_in, *k):
    w[b, m] = mean_r W[r * n_base + b, (m + r) mod C_in] (each roll rolled back, then averaged).
    Exact inverse of expand_rolling_weight when `dense` is itself a rolled bank."""
    acc = torch.zeros((n_base,) + tuple(dense.shape[1:]), dtype=dense.dtype, device=dense.device)
    for r in range(n_rolls):
        acc += torch.roll(dense[r * n_base:(r + 1) * n_base], shifts=-r, dims=1)
    return acc / n_rolls


def _why_not(conv, min_kernel: int) -> Optional[str]:
    t = type(conv)
    if t not in _TARGET:
        if isinstance(conv, (nn.Conv1d, nn.ConvTranspose1d)):
            return "1-D convolutions have no rolling layer"
        return "%s is a subclass of a torch conv; only exact nn.Conv2d/3d and nn.ConvTranspose2d/3d are converted" % t.__name__
    if conv.groups != 1:
        return "groups=%d (rolling layers need groups=1)" % conv.groups
    if max(conv.kernel_size) < min_kernel:
        return "kernel %s < min_kernel=%d" % ("x".join(map(str, conv.kernel_size)), min_kernel)
    try:
        rolling_layout(conv.in_channels, conv.out_channels)
    except ValueError:
        return "out_channels=%d has no rolling layout for in_channels=%d (out must be n_base * n_rolls, " \
               "n_base = ceil(out/in))" % (conv.out_channels, conv.in_channels)
    return None


def _convert(conv, bias: Optional[bool], init: str) -> nn.Module:
    cls = _TARGET[type(conv)]
    use_bias = (conv.bias is not None) if bias is None else bool(bias)
    transposed = cls in (RollingConvTranspose2d, RollingConvTranspose3d)
    w = conv.weight
    # the rolling layers take torch's padding rules ('same'/'valid', padding_mode) as they are
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=use_bias)
    if transposed:
        kw["output_padding"] = conv.output_padding
    else:
        kw["padding_mode"] = conv.padding_mode
    with torch.device(w.device):  # create the new parameters where the old ones live (also "meta")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, **kw)
    new = new.to(dtype=w.dtype)
    if init == "project" and w.device.type != "meta":
        with torch.no_grad():
            dense = w.transpose(0, 1) if transposed else w      # as (C_out, C_in, *k)
            base = project_to_rolling(dense, new.n_base, new.n_rolls)
            new.weight.copy_(base.transpose(0, 1) if transposed else base)
            if use_bias:
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
                else:
                    new.bias.zero_()
    new.weight.requires_grad_(w.requires_grad)
    if new.bias is not None and conv.bias is not None:
        new.bias.requires_grad_(conv.bias.requires_grad)
    new.train(conv.training)
    return new


def rollify(model: nn.Module, *, keep_first: bool = True, min_kernel: int = 2, bias: Optional[bool] = None,
            init: str = "reset") -> RollifyReport:
    """Replace the dense convolutions of `model` with rolling convolutions, in place.

    Converted: exact nn.Conv2d / Conv3d / ConvTranspose2d / ConvTranspose3d with groups=1 (any
    padding and padding_mode: the rolling layers follow torch's rules) and a kernel of at least
    `min_kernel` along some axis (so 1x1 convs stay dense by default), whose out_channels has a rolling layout (n_base = ceil(out / in) must divide out).
    keep_first: keep the input layer dense (the first conv in `model.modules()` order, which is
        the input layer for models that register layers in forward order).
    bias: None keeps each layer's bias setting; True / False forces a bias on / off.
    init: "reset" (default) initialises the rolling bases afresh as published (Kaiming normal,
        for training from scratch, as the paper does); "project" starts from the least-squares
        closest rolling bank to the dense weights (average of the rolled-back filters) and copies
        the bias.
    Returns a RollifyReport: one row per conv met (converted, or kept dense with the reason),
    with totals; print() it for a table. A model whose layers were converted loses its
    `builder_spec` (its builder would rebuild the dense layers): pass builder= to
    save_tiling_checkpoint, or build with a builder that rollifies (e.g. rolling_resnet18).
    """
    if not isinstance(model, nn.Module):
        raise TypeError("rollify: model must be a torch.nn.Module, got %s" % type(model).__name__)
    if isinstance(min_kernel, bool) or not isinstance(min_kernel, int) or min_kernel < 1:
        raise ValueError("rollify: min_kernel must be a positive int, got %r" % (min_kernel,))
    if bias is not None and not isinstance(bias, bool):
        raise TypeError("rollify: bias must be None, True or False, got %r" % (bias,))
    if init not in ("reset", "project"):
        raise ValueError("rollify: init must be 'reset' or 'project', got %r" % (init,))

    before = _model_params(model)
    # every path to every conv (a module shared under two names is converted once, replaced everywhere)
    paths: Dict[int, List[str]] = {}
    convs: Dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, _CONV_TYPES):
            paths.setdefault(id(m), []).append(name)
            convs.setdefault(id(m), m)
    if not paths:
        return RollifyReport([], before, before)
    first_id = next(iter(paths))

    rows = []
    for key, conv in convs.items():
        names = paths[key]
        shape = tuple(conv.weight.shape)
        p_before = _n_params(conv)
        reason = "input layer (keep_first=True)" if (keep_first and key == first_id) else _why_not(conv, min_kernel)
        if reason is not None:
            rows.append(RollifyRow(", ".join(names), type(conv).__name__, shape, shape, p_before, p_before, False, reason))
            continue
        new = _convert(conv, bias, init)
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if not attr:  # the model itself is a conv: cannot be replaced in place
                raise ValueError("rollify: the model itself is a %s; wrap it in a module (e.g. nn.Sequential) "
                                 "so it can be replaced in place" % type(conv).__name__)
            setattr(parent, attr, new)
        rows.append(RollifyRow(", ".join(names), "%s -> %s" % (type(conv).__name__, type(new).__name__), shape,
                               tuple(new.weight.shape), p_before, _n_params(new), True,
                               "n_base=%d, n_rolls=%d" % (new.n_base, new.n_rolls)))
    if any(r.converted for r in rows) and getattr(model, "builder_spec", None) is not None:
        # the recorded builder rebuilds the dense layers: the spec no longer describes the model
        model.builder_spec = None
    return RollifyReport(rows, before, _model_params(model))
