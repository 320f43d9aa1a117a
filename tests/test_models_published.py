"""from_published: the published checkpoints load into our models and give the published logits."""

import pytest
import torch

from _models_util import RECON, SEGMENT, needs_data as _needs, count_params, load, published_forward, rel_err
from medconv_ext.models import from_published, rolling_qsmnet, rolling_unet, to_roll_loop

needs_data = _needs("segment.pth", "recon.pth")


@needs_data
def test_segment_logits_equal_published():
    model = from_published(SEGMENT)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 88_899
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("RollingConv2d") == 18 and kinds.count("RollingConvTranspose2d") == 4
    # the dense input conv and the 1x1 output (a layout-keeping nn.Conv2d subclass)
    assert kinds.count("Conv2d") == 1 and kinds.count("PointwiseConv2d") == 1
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 2
    sd = load(SEGMENT)
    x = torch.randn(2, 1, 48, 32)
    with torch.no_grad():
        got = model(x)
        want = published_forward(sd, x)
    assert got.shape == (2, 3, 48, 32)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-4


@needs_data
def test_recon_logits_equal_published():
    model = from_published(RECON)
    assert sum(p.numel() for p in model.parameters()) == 445_025
    sd = load(RECON)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        got = model(x)
        want = published_forward(sd, x)
    assert got.shape == (1, 1, 16, 16, 16)
    assert rel_err(got, want) < 1e-4


@needs_data
def test_published_keys_fill_every_parameter_and_buffer():
    # every parameter / buffer of the builders is loaded from the checkpoint (strict load, same count)
    for path, builder in ((SEGMENT, rolling_unet), (RECON, rolling_qsmnet)):
        sd = load(path)
        ref = builder()
        assert len(ref.state_dict()) == len(sd)
        model = from_published(sd)  # a state dict works too
        for k, v in model.state_dict().items():
            assert v.shape == ref.state_dict()[k].shape
        assert count_params(builder) == sum(p.numel() for p in model.parameters())


@needs_data
def test_roll_loop_path_equals_model():
    # the benchmark's published-style path (bank rebuilt with a torch.roll loop) computes the same function
    model = from_published(SEGMENT)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert rel_err(to_roll_loop(model)(x), model(x)) < 1e-5


def test_from_published_rejects_unknown_layouts(tmp_path):
    with pytest.raises(ValueError, match="missing keys"):
        from_published({"weight": torch.zeros(3)})
    p = tmp_path / "dense.pth"
    torch.save(rolling_unet(features=4).state_dict(), p)   # our own key names, not the published ones
    with pytest.raises(ValueError, match="not a published Rolling-Filters"):
        from_published(str(p))
    with pytest.raises(FileNotFoundError):
        from_published(str(tmp_path / "absent.pth"))
    with pytest.raises(TypeError):
        from_published(3)


@needs_data
def test_from_published_rejects_wrong_shapes():
    sd = dict(load(SEGMENT))
    sd["weight_21"] = torch.zeros(2, 128, 3, 3)   # a double roll where a single roll belongs
    with pytest.raises(ValueError, match="weight_21"):
        from_published(sd)
    sd = dict(load(SEGMENT))
    del sd["bnormn_31.running_var"]
    with pytest.raises(ValueError, match="unknown layout"):
        from_published(sd)


@pytest.mark.parametrize("padding,padding_mode", [("same", "zeros"), ("same", "reflect"), (1, "circular"),
                                                  ("valid", "zeros")])
def test_roll_loop_follows_module_padding(padding, padding_mode):
    from medconv_ext.nn import RollingConv2d
    torch.manual_seed(0)
    model = torch.nn.Sequential(RollingConv2d(5, 5, (3, 4), padding=padding, padding_mode=padding_mode,
                                              dtype=torch.float64))
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(to_roll_loop(model)(x), model(x)) < 1e-12
