"""Involution2d / Involution3d: published kernel generation, train/eval, sizes not divisible by
the stride, RedNet-style state dicts, torch.compile, bad arguments."""
import pytest
import torch
import torch.nn.functional as F

import medconv_ext as M
from medconv_ext import available_backends
from medconv_ext.nn import Involution2d, Involution3d

from _involution_util import PublishedInvolution, involution_loop

BACKENDS = ["reference"] + (["cpu"] if available_backends()["cpu"][0] else [])


def _randomize_bn(mod):
    bn = mod.conv1.bn
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)


def _manual(mod, x, train):
    """The module's output computed step by step from its parameters (2D or 3D)."""
    dims = x.dim() - 2
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    conv = F.conv2d if dims == 2 else F.conv3d
    src = pool(x, mod.stride, mod.stride, ceil_mode=True) if any(s > 1 for s in mod.stride) else x
    bn = mod.conv1.bn
    h = conv(src, mod.conv1.conv.weight)
    h = F.batch_norm(h, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, train, bn.momentum, bn.eps)
    w = conv(F.relu(h), mod.conv2.conv.weight, mod.conv2.conv.bias)
    w = w.view(w.shape[0], mod.groups, *mod.kernel_size, *w.shape[2:])
    return involution_loop(x, w, mod.kernel_size, mod.stride, mod.padding, mod.dilation)


def test_parameter_names_are_rednet_style():
    m = Involution2d(32, 7)
    assert set(m.state_dict()) == {
        "conv1.conv.weight", "conv1.bn.weight", "conv1.bn.bias", "conv1.bn.running_mean", "conv1.bn.running_var",
        "conv1.bn.num_batches_tracked", "conv2.conv.weight", "conv2.conv.bias"}
    assert m.conv1.conv.weight.shape == (8, 32, 1, 1) and m.conv1.conv.bias is None
    assert m.conv2.conv.weight.shape == (49 * 2, 8, 1, 1) and m.conv2.conv.bias.shape == (98,)
    assert m.groups == 2 and m.padding == (3, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_module_2d_matches_published_rednet_state_dict(backend, train):
    # A published-style module's state dict loads strictly and gives the same output (sizes
    # divisible by the stride: there the published floor-mode pooling is well defined).
    torch.manual_seed(1)
    for stride in (1, 2):
        pub = PublishedInvolution(32, 7, stride).double()
        _randomize_bn(pub)
        ours = Involution2d(32, 7, stride=stride, backend=backend).double()
        ours.load_state_dict(pub.state_dict(), strict=True)
        pub.train(train)
        ours.train(train)
        x = torch.randn(2, 32, 12, 10, dtype=torch.float64)
        torch.testing.assert_close(ours(x), pub(x), rtol=1e-10, atol=1e-10)
        # and back: our state dict loads into the published module
        pub2 = PublishedInvolution(32, 7, stride).double()
        pub2.load_state_dict(ours.state_dict(), strict=True)
        pub2.train(train)
        if not train:
            torch.testing.assert_close(pub2(x), pub(x), rtol=0, atol=0)
    if train:
        assert ours.conv1.bn.num_batches_tracked.item() == 1  # train mode updated the running stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_odd_sizes_with_stride_use_ceil_pooling(backend):
    torch.manual_seed(2)
    m = Involution2d(16, 3, stride=2, backend=backend).double()
    _randomize_bn(m)
    x = torch.randn(2, 16, 7, 9, dtype=torch.float64, requires_grad=True)
    for train in (True, False):
        m.train(train)
        y = m(x)
        assert y.shape == (2, 16, 4, 5)  # ceil(7/2), ceil(9/2): one generated kernel per output
        torch.testing.assert_close(y, _manual(m, x, train), rtol=1e-10, atol=1e-10)
        y.square().sum().backward()
        assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())
    # the last, partial pooling window averages only the input values it covers
    pooled = m.avgpool(x)
    torch.testing.assert_close(pooled[:, :, -1, -1], x[:, :, 6, 8])
    torch.testing.assert_close(pooled[:, :, 0, -1], x[:, :, 0:2, 8].mean(-1))
    # sizes smaller than the stride still work
    assert m(torch.randn(1, 16, 1, 3, dtype=torch.float64)).shape == (1, 16, 1, 2)


@pytest.mark.parametrize("train", [True, False])
def test_module_3d_train_eval_and_odd_stride(train):
    torch.manual_seed(3)
    m = Involution3d(8, 3, stride=(2, 1, 2), dilation=(1, 2, 1), group_channels=4, reduction_ratio=2).double()
    _randomize_bn(m)
    m.train(train)
    x = torch.randn(2, 8, 5, 6, 7, dtype=torch.float64)
    y = m(x)
    assert y.shape == (2, 8, 3, 6, 4)
    torch.testing.assert_close(y, _manual(m, x, train), rtol=1e-10, atol=1e-10)


def test_module_group_channels_and_channels_last():
    torch.manual_seed(4)
    # G = C (depthwise kernels) and G = 1
    for gc in (1, 8):
        m = Involution2d(8, 5, group_channels=gc, reduction_ratio=2).double().eval()
        _randomize_bn(m)
        x = torch.randn(1, 8, 9, 6, dtype=torch.float64)
        torch.testing.assert_close(m(x), _manual(m, x, False), rtol=1e-10, atol=1e-10)
        x_cl = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(m(x_cl), m(x), rtol=1e-10, atol=1e-10)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match=r"channels=8 must be a multiple of group_channels=16 .*group_channels=8 gives one group"):
        Involution2d(8, 3)
    with pytest.raises(ValueError, match="kernel_size must be odd and positive"):
        Involution2d(16, 4)
    with pytest.raises(ValueError, match="channels // reduction_ratio must be >= 1"):
        Involution2d(2, 3, group_channels=2)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        Involution3d(0, 3)
    with pytest.raises(ValueError, match="stride and dilation must be >= 1"):
        Involution2d(16, 3, stride=0)
    m = Involution2d(16, 3)
    with pytest.raises(ValueError, match="input has 8 channels, the module was built for channels=16"):
        m(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match=r"input must have 4 dims \(N, C, H, W\)"):
        m(torch.randn(16, 5, 5))
    with pytest.raises(RuntimeError, match="unknown backend|cannot run this input"):
        Involution2d(16, 3, backend="cuda")(torch.randn(1, 16, 5, 5))


@pytest.mark.skipif(not available_backends()["cpu"][0], reason="compiled CPU ops not built")
def test_module_torch_compile_fullgraph():
    torch.manual_seed(5)
    m = Involution2d(16, 3, stride=2).double()
    x = torch.randn(2, 16, 9, 8, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    y_c = cm(x)
    gx_c, = torch.autograd.grad(y_c.square().sum(), x)
    y = m(x)
    gx, = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(y_c, y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx_c, gx, rtol=1e-10, atol=1e-10)
    # the functional op alone, no graph break either
    x2 = torch.randn(1, 4, 7, 7)
    w2 = torch.randn(1, 2, 3, 3, 7, 7)
    f = torch.compile(lambda a, b: M.involution2d(a, b, 3, padding=1) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x2, w2), 2 * M.involution2d(x2, w2, 3, padding=1))
