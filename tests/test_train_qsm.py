"""QSM example: the learned correction of TKD starts exactly at TKD."""
import pytest
import torch
from torch import nn

from medconv_ext.train import SyntheticQSM, TKDResidual, tkd
from medconv_ext.train.qsm import last_conv


def _rolling_qsmnet(features=2):
    try:
        from medconv_ext.models import rolling_qsmnet
    except ImportError:
        pytest.skip("medconv_ext.models.rolling_qsmnet is not available")
    return rolling_qsmnet(features=features)


def test_residual_model_starts_exactly_at_tkd():
    torch.manual_seed(0)
    net = _rolling_qsmnet()
    assert last_conv(net) is net.out
    model = TKDResidual(net, threshold=0.19)
    assert torch.count_nonzero(net.out.weight) == 0 and torch.count_nonzero(net.out.bias) == 0
    field, _ = SyntheticQSM(16, seed=3).batch(0, 2)
    for train in (True, False):   # BatchNorm in both modes: the zero last layer makes it irrelevant
        model.train(train)
        out = model(field / 0.1)
        assert torch.equal(out, tkd(field / 0.1, 0.19))
    # and it can learn: the last layer gets a gradient at the first step
    model.train()
    ((model(field / 0.1) - 1.0) ** 2).mean().backward()
    assert net.out.weight.grad.abs().sum() > 0


def test_residual_is_linear_in_scale_and_keeps_the_other_weights():
    torch.manual_seed(0)
    net = _rolling_qsmnet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    TKDResidual(net)
    changed = [k for k in before if not torch.equal(before[k], net.state_dict()[k])]
    assert sorted(changed) == ["out.bias", "out.weight"]
    # TKD is linear: the model's scale (field / 0.1 -> chi / 0.1) and ppm agree
    f = torch.randn(1, 1, 8, 8, 8)
    torch.testing.assert_close(tkd(f / 0.1), tkd(f) / 0.1, rtol=1e-5, atol=1e-6)


def test_residual_needs_a_conv_to_zero():
    with pytest.raises(ValueError, match="no convolution"):
        TKDResidual(nn.Sequential(nn.Identity()))
