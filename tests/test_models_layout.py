"""Whole models keep the input's memory layout end to end: every layer of a UNet-family model given a
channels-last input returns channels-last (no layout copy between layers), an NC(D)HW input stays
NC(D)HW, and both layouts give the same values (float32 tolerance) as a float64 run of the dense-bank
reference backend. Eval folds BatchNorm + ReLU into the rolling layers' epilogue (nn/fuse.py): the
folded model must equal the module-by-module computation. Training (QSMnet, L1 + Adam step
inputs) gives the same gradients in both layouts."""
import importlib

import pytest
import torch

from medconv_ext import models as M
from medconv_ext.models import set_backend

from _models_util import rel_err

from medconv_ext.nn import RollingConv2d, RollingConv3d

_ROLL = (RollingConv2d, RollingConv3d)
U = importlib.import_module("medconv_ext.models.unet")  # the module (models.unet is the builder)
CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def _fmt_ok(t, channels_last):
    if channels_last:
        return t.is_contiguous(memory_format=CL[t.dim()])
    return t.is_contiguous()


def _run_recording_layouts(model, x):
    """(model(x), records): hooks record (module name, input / output) of every leaf-ish module but the rolling
    convs inside the conv units (a hook on one makes the unit call it as a module instead of the fused call,
    so the path under test would change) during the call, and are removed after it."""
    rec, handles = [], []
    inner = {id(u.conv) for u in model.modules() if isinstance(u, U.ConvUnit) and isinstance(u.conv, _ROLL)}
    for name, m in model.named_modules():
        if name and id(m) not in inner and type(m) not in (torch.nn.Sequential, torch.nn.ModuleList):
            handles.append(m.register_forward_hook(lambda mod, i, o, name=name: rec.append((name, o))))
            handles.append(m.register_forward_pre_hook(
                lambda mod, i, name=name: rec.append((name + " (input)", i[0]))))
    try:
        return model(x), rec
    finally:
        for h in handles:
            h.remove()


def _assert_layout_kept(rec, channels_last):
    bad = [(n, tuple(o.stride())) for n, o in rec if isinstance(o, torch.Tensor) and o.dim() >= 4
           and o.shape[1] > 1 and not _fmt_ok(o, channels_last)]
    assert not bad, "layers that changed the memory layout: %s" % bad


@pytest.mark.parametrize("builder,features", [("rolling_unet", 32), ("unet", 4), ("depthwise_unet", 4)])
def test_unet_eval_layout_end_to_end(builder, features):
    """features=32 gives C_in = 512 and 1024 at the deepest levels: the composition path (C_in > 256)
    runs as well as the fused kernel and the transposed up-sampling."""
    torch.manual_seed(0)
    model = getattr(M, builder)(features=features)
    # non-trivial BatchNorm statistics, so that a wrong fold would show
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(1, 1, 32, 48)
    ref = getattr(M, builder)(features=features)
    ref.load_state_dict(model.state_dict())
    ref = set_backend(ref.double().eval(), "reference")
    with torch.inference_mode():
        want = ref(x.double())
        for channels_last in (False, True):
            m = model.to(memory_format=CL[4] if channels_last else torch.contiguous_format)
            xi = x.contiguous(memory_format=CL[4]) if channels_last else x
            y, rec = _run_recording_layouts(m, xi)
            assert _fmt_ok(y, channels_last), (channels_last, y.stride())
            if channels_last:
                _assert_layout_kept(rec, channels_last)
            assert rel_err(y.double(), want) < 1e-4, (channels_last, rel_err(y.double(), want))


def test_rolling_unet_eval_fold_equals_unfused(monkeypatch):
    """The eval fold (BatchNorm + ReLU in the rolling layer's epilogue) equals conv -> BN -> ReLU run
    module by module, in both layouts."""
    torch.manual_seed(1)
    model = M.rolling_unet(features=8)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        folded = {cl: model.to(memory_format=CL[4] if cl else torch.contiguous_format)(
            x.contiguous(memory_format=CL[4]) if cl else x) for cl in (False, True)}
        monkeypatch.setattr(U, "can_fold", lambda conv, bn: False)
        plain = model.to(memory_format=torch.contiguous_format)(x)
    for cl in (False, True):
        assert rel_err(folded[cl], plain) < 1e-5, (cl, rel_err(folded[cl], plain))


def test_rolling_qsmnet_training_layout_end_to_end():
    """One training step's forward and backward in NCDHW and channels-last: same loss and parameter
    gradients (float32 tolerance), every layer's output in the input's layout."""
    torch.manual_seed(2)
    base = M.rolling_qsmnet(features=4)
    x = torch.randn(2, 1, 32, 32, 32)  # deepest level 2^3: a 1^3 level has no defined layout
    y = torch.randn(2, 1, 32, 32, 32)
    grads, outs = {}, {}
    for channels_last in (False, True):
        m = M.rolling_qsmnet(features=4)
        m.load_state_dict(base.state_dict())
        m = m.train().to(memory_format=CL[5] if channels_last else torch.contiguous_format)
        xi = x.contiguous(memory_format=CL[5]) if channels_last else x
        out, rec = _run_recording_layouts(m, xi)
        assert _fmt_ok(out, channels_last)
        if channels_last:
            _assert_layout_kept(rec, channels_last)
        (out - y).abs().mean().backward()
        outs[channels_last] = out.detach()
        grads[channels_last] = {n: p.grad for n, p in m.named_parameters()}
    assert rel_err(outs[True], outs[False]) < 1e-5
    # a conv bias followed by training-mode BatchNorm has a zero gradient up to rounding: the scale of the
    # comparison is the largest gradient of the model, not that parameter's own
    scale = max(g.abs().max().item() for g in grads[False].values())
    for n in grads[False]:
        err = (grads[True][n] - grads[False][n]).abs().max().item()
        assert err < 1e-4 * scale, (n, err, scale)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_output_conv_matches_torch_conv(dims, channels_last):
    """The UNet output conv (PointwiseConv2d/3d) equals torch's 1x1 conv with the same parameters, in
    value and gradients (float64 reference), and returns the input's layout; awkward channel counts."""
    torch.manual_seed(3)
    cls = U.PointwiseConv2d if dims == 2 else U.PointwiseConv3d
    m = cls(7, 5)
    ref = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(7, 5, 1).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, *([6, 5, 3][:dims]))
    if channels_last:
        x = x.contiguous(memory_format=CL[x.dim()])
    x.requires_grad_(True)
    y = m(x)
    assert _fmt_ok(y, channels_last), y.stride()
    xd = x.detach().double().requires_grad_(True)
    want = ref(xd)
    g = torch.randn_like(want)
    y.backward(g.float())
    want.backward(g)
    assert rel_err(y.double(), want) < 1e-6
    assert rel_err(x.grad.double(), xd.grad) < 1e-6
    assert rel_err(m.weight.grad.double(), ref.weight.grad) < 1e-6
    assert rel_err(m.bias.grad.double(), ref.bias.grad) < 1e-6
    assert isinstance(m, torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)
