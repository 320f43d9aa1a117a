"""Export of models that use medconv_ext's operators (see docs/export.md).

Plain `torch.onnx.export(model, args, f, dynamo=True)` works for every module and model of the
package, with no wrapper and no translation table:
  * while torch.onnx.export runs (outside `exporting()`), every rolling convolution and involution
    layer computes with its "reference" backend (pure PyTorch: the gathered filter bank + convolution,
    the unfolded involution), so the exported graph holds only operators the exporter knows
    (ops.rolling_conv.plain_onnx_export); this also serves the TorchScript-based exporter (dynamo=False);
  * every forward operator of the package (compiled, Triton, fused spectral) has a decomposition into
    that same pure-PyTorch form, registered on import in torch's decomposition table, which the
    dynamo-based exporter applies to operators it has no ONNX function for; so an ExportedProgram that
    already holds torch.ops.medconv.* operators (torch.export.export(model, ...)) exports too.

`onnx_export(model, args, f)` is the convenience that keeps the package's operators in the graph and
translates them with ONNX Script, in standard ONNX operators only:

  torch.ops.medconv.rolling_conv, .rolling_conv_triton
      the rolled filter bank gathered from the base (one Gather over a rolled channel index),
      then Conv: W[r*n_base + b, c] = base[b, (c - r) mod C_in]
  torch.ops.medconv.rolling_conv_transpose, .rolling_conv_transpose_triton
      the transposed bank W_t[c, r*n_base + b] = base[(c - r) mod C_in, b] (one Gather), then ConvTranspose
  torch.ops.medconv.involution, .involution_triton
      zero Pad, one strided Slice per kernel tap (the unfolded windows), Mul by the per-pixel
      kernels broadcast over the channels of a group, ReduceSum over the taps

`onnx_translation_table()` returns that table; `onnx_export(model, args, f)` calls torch.onnx.export
with it. The spectral backend (channel FFT) is not translated: while a model is exported or traced
(`exporting()`, torch.onnx export, torch.jit.trace) rolling convolution that would take the
spectral path takes the "reference" backend instead, the same gathered bank + convolution as the
translation above (same result up to rounding, see docs/rolling_conv_spectral.md).

The involution translation builds its reshapes from the runtime shapes (Shape ops), so exported
graphs accept other batch and image sizes when the export declares them dynamic.
"""
import contextlib
import itertools
from typing import Callable, Dict, Optional, Sequence

import torch

from .ops import rolling_conv as _rc
from .ops._common import apply_epilogue
from .reference import involution as _ref_inv
from .reference import rolling_conv as _ref_rc

__all__ = ["decompositions", "exporting", "is_exporting", "onnx_export", "onnx_translation_table"]

_INT64_MAX = 2 ** 63 - 1


# --------------------------------------------------------------------------------------
# export mode: the spectral path becomes the gathered bank
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def exporting():
    """Within this context rolling convolution never takes the spectral path (the channel FFT,
    which exporters do not translate): it takes the gathered filter bank + convolution instead.
    onnx_export() enters it; torch.onnx.export and torch.jit.trace are detected without it."""
    _rc._EXPORT_DEPTH[0] += 1
    try:
        yield
    finally:
        _rc._EXPORT_DEPTH[0] -= 1


def is_exporting() -> bool:
    """True inside exporting(), a torch.onnx export or a torch.jit trace."""
    return _rc._bank_for_export()


# --------------------------------------------------------------------------------------
# decompositions: every forward operator as the pure-PyTorch reference (plain torch.onnx.export)
# --------------------------------------------------------------------------------------
def _decomp_rolling_conv(x, weight, bias, stride, padding, dilation, n_rolls):
    return _ref_rc.rolling_conv(x, weight, bias, stride, padding, dilation, n_rolls)


def _decomp_rolling_conv_transpose(x, weight, bias, stride, padding, output_padding, dilation, n_rolls):
    return _ref_rc.rolling_conv_transpose(x, weight, bias, stride, padding, output_padding, dilation, n_rolls)


def _decomp_rolling_conv_spectral(x, weight, bias, scale, shift, relu, stride, padding, dilation, n_rolls):
    return apply_epilogue(_ref_rc.rolling_conv(x, weight, bias, stride, padding, dilation, n_rolls),
                          scale, shift, relu)


def _decomp_rolling_conv_spectral_cat(x, x2, weight, bias, scale, shift, relu, stride, padding, dilation, n_rolls):
    return _decomp_rolling_conv_spectral(torch.cat([x, x2], 1), weight, bias, scale, shift, relu, stride, padding,
                                         dilation, n_rolls)


def _decomp_rolling_conv_transpose_spectral(x, weight, bias, scale, shift, relu, stride, padding, output_padding,
                                            dilation, n_rolls):
    y = _ref_rc.rolling_conv_transpose(x, weight, bias, stride, padding, output_padding, dilation, n_rolls)
    return apply_epilogue(y, scale, shift, relu)


def _decomp_involution(x, weight, kernel_size, stride, padding, dilation):
    return _ref_inv.involution(x, weight, kernel_size, stride, padding, dilation)


# forward operators only: exporters see inference graphs (the gradient operators never reach them)
_DECOMPOSITIONS = {
    "rolling_conv": _decomp_rolling_conv,
    "rolling_conv_triton": _decomp_rolling_conv,
    "rolling_conv_transpose": _decomp_rolling_conv_transpose,
    "rolling_conv_transpose_triton": _decomp_rolling_conv_transpose,
    "rolling_conv_spectral": _decomp_rolling_conv_spectral,
    "rolling_conv_spectral_triton": _decomp_rolling_conv_spectral,
    "rolling_conv_spectral_cat": _decomp_rolling_conv_spectral_cat,
    "rolling_conv_transpose_spectral": _decomp_rolling_conv_transpose_spectral,
    "rolling_conv_transpose_spectral_triton": _decomp_rolling_conv_transpose_spectral,
    "involution": _decomp_involution,
    "involution_triton": _decomp_involution,
}


def _by_overload(by_name: Dict[str, Callable]) -> Dict[Callable, Callable]:
    """{torch.ops.medconv.<name>.default: fn} for the names whose operator is registered."""
    return {target: fn for target, fn in ((_overload(name), fn) for name, fn in by_name.items())
            if target is not None}


def decompositions() -> Dict[Callable, Callable]:
    """{torch.ops.medconv.<op>.default: pure-PyTorch function} for every registered forward operator:
    the gathered bank + convolution (spectral ops: then the epilogue), the unfolded involution. Also
    usable as ExportedProgram.run_decompositions(decompositions())."""
    return _by_overload(_DECOMPOSITIONS)


def _register_decompositions() -> None:
    """Enter decompositions() in torch's global decomposition table (torch._decomp.decomposition_table),
    from which torch.onnx.export (dynamo=True) decomposes the operators it has no ONNX function for.
    torch.export, torch.compile and eager runs do not read that table for these operators: they keep
    the operators (and their kernels). Idempotent; a torch without the table leaves export to onnx_export."""
    try:
        from torch._decomp import decomposition_table, register_decomposition
    except ImportError:  # pragma: no cover - every supported torch has it
        return
    for target, fn in decompositions().items():
        if target not in decomposition_table:
            register_decomposition(target)(fn)


# --------------------------------------------------------------------------------------
# ONNX translations (ONNX Script, traced: plain Python building standard ONNX operators)
# --------------------------------------------------------------------------------------
def _op():
    from ._errors import need  # one line naming the extra when onnxscript is not installed

    return need("onnxscript", "ONNX export and its translations").opset18


def _static_shape(value, what: str) -> list:
    shape = getattr(value, "shape", None)
    dims = []
    for d in (shape if shape is not None else ()):
        if not isinstance(d, int):
            try:
                d = int(d)
            except (TypeError, ValueError):
                d = None
        dims.append(d)
    if shape is None or any(d is None for d in dims):
        raise ValueError("medconv_ext ONNX export: the %s must have a static shape, got %s" % (what, shape))
    return dims


def _rolled_bank(op, weight, n_rolls: int, transposed: bool):
    """The dense bank from the base by ONE Gather over the flattened (channel, base) rows:
    conv        weight (n_base, C_in, *k) -> (n_rolls * n_base, C_in, *k), W[r*nb + b, c] = w[b, (c-r) % C]
    transposed  weight (C_in, n_base, *k) -> (C_in, n_rolls * n_base, *k), W[c, r*nb + b] = w[(c-r) % C, b]"""
    shape = _static_shape(weight, "rolling convolution weight")
    k = shape[2:]
    if transposed:
        c_in, n_base = shape[0], shape[1]
        index = [((c - r) % c_in) * n_base + b for c in range(c_in) for r in range(n_rolls) for b in range(n_base)]
        out_shape = [c_in, n_rolls * n_base] + k
    else:
        n_base, c_in = shape[0], shape[1]
        index = [b * c_in + (c - r) % c_in for r in range(n_rolls) for b in range(n_base) for c in range(c_in)]
        out_shape = [n_rolls * n_base, c_in] + k
    rows = op.Reshape(weight, op.Constant(value_ints=[shape[0] * shape[1]] + k))
    bank = op.Gather(rows, op.Constant(value_ints=index), axis=0)
    return op.Reshape(bank, op.Constant(value_ints=out_shape))


def _conv_args(x, w, bias):
    return (x, w) if bias is None else (x, w, bias)


def onnx_rolling_conv(x, weight, bias, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                      n_rolls: int):
    """ONNX translation of medconv::rolling_conv(_triton): gathered bank + Conv."""
    op = _op()
    bank = _rolled_bank(op, weight, int(n_rolls), transposed=False)
    pads = [int(p) for p in padding] * 2
    return op.Conv(*_conv_args(x, bank, bias), strides=[int(s) for s in stride], pads=pads,
                   dilations=[int(d) for d in dilation], group=1)


def onnx_rolling_conv_transpose(x, weight, bias, stride: Sequence[int], padding: Sequence[int],
                                output_padding: Sequence[int], dilation: Sequence[int], n_rolls: int):
    """ONNX translation of medconv::rolling_conv_transpose(_triton): gathered bank + ConvTranspose.
    ONNX's ConvTranspose output size, stride*(in-1) + output_padding + dilation*(k-1) + 1 - 2*pad, is torch's."""
    op = _op()
    bank = _rolled_bank(op, weight, int(n_rolls), transposed=True)
    pads = [int(p) for p in padding] * 2
    return op.ConvTranspose(*_conv_args(x, bank, bias), strides=[int(s) for s in stride], pads=pads,
                            dilations=[int(d) for d in dilation], output_padding=[int(o) for o in output_padding],
                            group=1)


def onnx_involution(x, weight, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int]):
    """ONNX translation of medconv::involution(_triton), x (N, C, *S), weight (N, G, *K, *S_out):
        out[n, c, p] = sum_t weight[n, c // (C/G), t, p] * x_pad[n, c, p*s + t*d]
    The windows are one strided Slice per tap t of the zero-padded input (start t*d, end
    -(K-1-t)*d, step s: exactly S_out positions for any input size), stacked on a tap axis."""
    op = _op()
    dims = len(kernel_size)
    kernel_size = [int(k) for k in kernel_size]
    stride, padding, dilation = ([int(v) for v in seq] for seq in (stride, padding, dilation))
    c = _static_shape_dim(x, 1, "involution input channels")
    g = _static_shape_dim(weight, 1, "involution kernel groups")
    taps = 1
    for k in kernel_size:
        taps *= k
    if any(padding):
        xp = op.Pad(x, op.Constant(value_ints=[0, 0] + padding + [0, 0] + padding))
    else:
        xp = x
    axes = op.Constant(value_ints=list(range(2, 2 + dims)))
    steps = op.Constant(value_ints=stride)
    tap_axis = op.Constant(value_ints=[2])
    windows = []
    for t in itertools.product(*(range(k) for k in kernel_size)):
        starts = [ti * d for ti, d in zip(t, dilation)]
        ends = [-(k - 1 - ti) * d if k - 1 - ti > 0 else _INT64_MAX for ti, k, d in zip(t, kernel_size, dilation)]
        win = op.Slice(xp, op.Constant(value_ints=starts), op.Constant(value_ints=ends), axes, steps)
        windows.append(op.Unsqueeze(win, tap_axis))
    cols = windows[0] if len(windows) == 1 else op.Concat(*windows, axis=2)        # (N, C, T, *S_out)
    # (N, G, C/G, T, *S_out) * (N, G, 1, T, *S_out), summed over T
    cols = op.Reshape(cols, op.Concat(op.Shape(cols, end=1), op.Constant(value_ints=[g, c // g]),
                                      op.Shape(cols, start=2), axis=0))
    w = op.Reshape(weight, op.Concat(op.Shape(weight, end=2), op.Constant(value_ints=[1, taps]),
                                     op.Shape(weight, start=2 + dims), axis=0))
    out = op.ReduceSum(op.Mul(cols, w), op.Constant(value_ints=[3]), keepdims=0)   # (N, G, C/G, *S_out)
    return op.Reshape(out, op.Concat(op.Shape(x, end=2), op.Shape(weight, start=2 + dims), axis=0))


def _static_shape_dim(value, i: int, what: str) -> int:
    shape = getattr(value, "shape", None)
    try:
        return int(shape[i])
    except (TypeError, ValueError, IndexError):
        raise ValueError("medconv_ext ONNX export: the %s (dim %d) must be static, got shape %s"
                         % (what, i, shape)) from None


def _overload(name: str):
    """torch.ops.medconv.<name>.default, or None when that op is not registered (no compiled extension)."""
    try:
        return getattr(torch.ops.medconv, name).default
    except (AttributeError, RuntimeError):
        return None


_TRANSLATIONS = {
    "rolling_conv": onnx_rolling_conv,
    "rolling_conv_triton": onnx_rolling_conv,
    "rolling_conv_transpose": onnx_rolling_conv_transpose,
    "rolling_conv_transpose_triton": onnx_rolling_conv_transpose,
    "involution": onnx_involution,
    "involution_triton": onnx_involution,
}


def onnx_translation_table() -> Dict[Callable, Callable]:
    """{torch.ops.medconv.<op>.default: ONNX Script translation} for every registered forward op,
    to pass as torch.onnx.export(..., dynamo=True, custom_translation_table=...)."""
    return _by_overload(_TRANSLATIONS)


def onnx_export(model, args, f=None, *, custom_translation_table: Optional[dict] = None, **kwargs):
    """torch.onnx.export(model, args, f, dynamo=True, ...) with medconv_ext's translations (merged with
    custom_translation_table, whose entries win) and the spectral path routed through the bank.
    Returns the torch.onnx.ONNXProgram; other keywords go to torch.onnx.export."""
    if kwargs.get("dynamo", True) is not True:
        raise ValueError("onnx_export: the translations of medconv_ext's operators need dynamo=True "
                         "(the torch.export-based exporter)")
    kwargs["dynamo"] = True
    from ._errors import need
    for mod in ("onnx", "onnxscript"):  # torch.onnx.export needs both: one line naming the extra
        need(mod, "ONNX export")
    table = onnx_translation_table()
    table.update(custom_translation_table or {})
    if not isinstance(args, tuple):
        args = (args,)
    with exporting():
        return torch.onnx.export(model, args, f, custom_translation_table=table, **kwargs)


_register_decompositions()
