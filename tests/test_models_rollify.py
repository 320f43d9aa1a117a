"""rollify: which layers it converts, its report, and the function of the converted model."""
import copy

import pytest
import torch
from torch import nn

from _models_util import assert_close
from medconv_ext.models import project_to_rolling, rollify
from medconv_ext.nn import RollingConv2d, RollingConv3d, RollingConvTranspose2d


def _small_net():
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),                       # 0 input layer: kept (keep_first)
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),            # 2 double roll
        nn.Conv2d(16, 16, 1),                                # 3 1x1: kept (min_kernel)
        nn.Conv2d(16, 12, 3, dilation=2, padding="same", bias=False),  # 4 partial roll (12 of 16)
        nn.ConvTranspose2d(12, 24, 2, stride=2),             # 5 transposed double roll
        nn.Conv2d(24, 10, 3, groups=2),                      # 6 grouped: kept
        nn.Conv2d(10, 25, 3, padding=1),                     # 7 no layout (n_base 3 does not divide 25)
        nn.Conv2d(25, 25, (1, 4), padding="same", padding_mode="circular"),  # 8 padding mode, asymmetric 'same'
        nn.Conv2d(25, 7, (3, 1), padding=(1, 0)),            # 9 non-square kernel: converted
    )


def _dense_twin(original, converted, report):
    """The original architecture with each converted layer's weight replaced by its expanded bank."""
    twin = copy.deepcopy(original)
    for row in report.converted:
        new, old = converted.get_submodule(row.layer), twin.get_submodule(row.layer)
        old.weight = nn.Parameter(new.expanded_weight().detach().clone())
        old.bias = None if new.bias is None else nn.Parameter(new.bias.detach().clone())
    return twin


def test_rollify_report_and_function():
    net = _small_net().double()
    original = copy.deepcopy(net)
    report = rollify(net)
    conv = {int(r.layer): r for r in report}
    assert len(report) == 9
    assert [i for i, r in conv.items() if r.converted] == [2, 4, 5, 8, 9]
    assert "input layer" in conv[0].note and "min_kernel" in conv[3].note and "groups=2" in conv[6].note
    assert "no rolling layout" in conv[7].note
    assert (net[8].padding, net[8].padding_mode) == ("same", "circular")
    assert isinstance(net[2], RollingConv2d) and (net[2].n_base, net[2].n_rolls) == (2, 8)
    assert (net[4].n_base, net[4].n_rolls, net[4].padding, net[4].bias) == (1, 12, "same", None)
    assert isinstance(net[5], RollingConvTranspose2d) and (net[5].n_base, net[5].n_rolls) == (2, 12)
    assert conv[2].shape_before == (16, 8, 3, 3) and conv[2].shape_after == (2, 8, 3, 3)
    assert conv[2].params_before == 16 * 8 * 9 + 16 and conv[2].params_after == 2 * 8 * 9 + 16
    assert net[2].weight.dtype == torch.float64
    # totals agree with the models' actual parameter counts
    assert report.model_params_before == sum(p.numel() for p in original.parameters())
    assert report.model_params_after == sum(p.numel() for p in net.parameters())
    assert report.model_params_before - report.model_params_after == \
        report.conv_params_before - report.conv_params_after > 0
    text = str(report)
    assert "5 of 9 conv layers converted" in text and "kept dense: input layer" in text
    assert "{:,}".format(report.model_params_after) in text
    # the converted model is the dense model whose weights are the expanded rolling weights
    x = torch.randn(2, 4, 13, 11, dtype=torch.float64)
    twin = _dense_twin(original, net, report)
    assert_close(net(x), twin(x), rtol=1e-10, atol=1e-10)


def test_rollify_options():
    net = _small_net()
    report = rollify(net, keep_first=False, min_kernel=1, bias=False)
    assert isinstance(net[0], RollingConv2d) and net[0].bias is None     # input layer converted
    assert isinstance(net[3], RollingConv2d) and net[3].kernel_size == (1, 1)
    assert all(getattr(net[int(r.layer)], "bias", None) is None for r in report.converted)
    net = _small_net()
    rollify(net, bias=True)
    assert net[4].bias is not None and net[4].bias.shape == (12,)


def test_rollify_project_recovers_rolled_dense_weights():
    # a dense conv whose weights already are a rolled bank is converted back to exactly that base
    torch.manual_seed(1)
    base = RollingConv3d(6, 12, 3, padding=1).double()
    dense = nn.Sequential(nn.Identity(), nn.Conv3d(6, 12, 3, padding=1)).double()
    with torch.no_grad():
        dense[1].weight.copy_(base.expanded_weight())
        dense[1].bias.copy_(base.bias)
    x = torch.randn(1, 6, 5, 4, 6, dtype=torch.float64)
    want = dense(x)
    rollify(dense, keep_first=False, init="project")
    assert isinstance(dense[1], RollingConv3d)
    assert_close(dense[1].weight, base.weight, rtol=0, atol=1e-14)
    assert_close(dense(x), want, rtol=1e-10, atol=1e-10)
    # a generic dense bank: the projection is the average of the rolled-back filters
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    p = project_to_rolling(w, 2, 4)
    manual = sum(torch.roll(w[2 * r:2 * r + 2], -r, dims=1) for r in range(4)) / 4
    assert_close(p, manual, rtol=1e-12, atol=1e-12)


def test_rollify_shared_module_replaced_everywhere():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    net = nn.Sequential(nn.Conv2d(4, 4, 1), shared, nn.ReLU(), shared)
    report = rollify(net)
    assert len(report) == 2 and report.converted[0].layer == "1, 3"
    assert net[1] is net[3] and isinstance(net[1], RollingConv2d)


def test_rollify_bad_arguments():
    with pytest.raises(TypeError):
        rollify("not a model")
    with pytest.raises(ValueError):
        rollify(nn.Conv2d(2, 2, 3), min_kernel=0)
    with pytest.raises(ValueError):
        rollify(nn.Conv2d(2, 2, 3), init="zeros")
    with pytest.raises(TypeError):
        rollify(nn.Conv2d(2, 2, 3), bias="yes")
