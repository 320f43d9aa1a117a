"""The receptive field of every zoo model: the same answer on every backend, a probe that cannot be
fooled by a kernel's (or a layer's) NaN handling, and predict_tiled refusing a halo or margin below it.

Small widths keep the models fast; the U-Nets keep their published depth (their radius depends on it).
"""
import pytest
import torch
from torch import nn

from medconv_ext import backends, models
from medconv_ext.models import set_backend
from medconv_ext.tiling import predict_tiled, receptive_margin, receptive_radius
from medconv_ext.tiling import receptive as REC

from _tiling_util import integer_weights_

CPU_BACKENDS = [b for b in ("reference", "spectral", "spectral_unfused", "cpu") if backends.available_backends()[b][0]]

# (builder, kwargs, dims, align, radius) for every same-size model of the zoo. The 2D U-Nets (depth 4)
# reach 109 voxels; Med-IC's U-Net (5 pools, involution first) 316; the 3D QSMnets (5x5x5) 203.
UNETS = [
    (models.unet, {"features": 2}, 2, 16, 109),
    (models.rolling_unet, {"features": 2}, 2, 16, 109),
    (models.depthwise_unet, {"features": 2}, 2, 16, 109),
    (models.flattened_unet, {"features": 2}, 2, 16, 109),
    (models.medic_seg, {"features": 2}, 2, 32, 316),
    (models.qsmnet, {"features": 2}, 3, 16, 203),
    (models.rolling_qsmnet, {"features": 2}, 3, 16, 203),
    (models.depthwise_qsmnet, {"features": 2}, 3, 16, 203),
    (models.flattened_qsmnet, {"features": 2}, 3, 16, 203),
]
CLASSIFIERS = [(models.resnet18, {"features": 2}), (models.rolling_resnet18, {"features": 2}),
               (models.medic_cls, {"features": 2})]


def _ids(rows):
    return [r[0].__name__ for r in rows]


def _every_zoo_builder_is_listed():
    listed = {r[0] for r in UNETS} | {r[0] for r in CLASSIFIERS} | {models.valid_srnet}
    return [n for n in ("unet", "rolling_unet", "depthwise_unet", "flattened_unet", "qsmnet", "rolling_qsmnet",
                        "depthwise_qsmnet", "flattened_qsmnet", "resnet18", "rolling_resnet18", "medic_cls",
                        "medic_seg", "valid_srnet") if getattr(models, n) not in listed]


def test_every_zoo_model_is_covered():
    assert _every_zoo_builder_is_listed() == []


@pytest.mark.parametrize("builder,kw,dims,align,radius", UNETS, ids=_ids(UNETS))
def test_zoo_unet_radius_same_on_every_backend(builder, kw, dims, align, radius, monkeypatch):
    for backend in CPU_BACKENDS:
        monkeypatch.setenv("MEDCONV_BACKEND", backend)
        model = set_backend(builder(**kw).eval(), backend if backend != "reference" else "auto")
        assert receptive_radius(model, dims, align=align) == (radius,) * dims, backend


# the analytic rule of the zoo's U-Nets against the probe, on models small enough to probe quickly: the same
# layer types and forward as the zoo's, fewer levels
SMALL_UNETS = [
    ("unet-2d-depth2", lambda: models.UNet(2, 1, 2, 2, 3, kind="rolling", first_kind="dense", first_level_convs=3,
                                           depth=2), 2, 4),
    ("unet-3d-depth1", lambda: models.UNet(3, 1, 1, 2, 3, kind="rolling", first_kind="dense", depth=1), 3, 2),
    ("flattened-2d-depth2", lambda: models.UNet(2, 1, 2, 2, 3, kind="flattened", depth=2), 2, 4),
    ("medic-3-levels", lambda: models.MedICSegmenter(2, 1, 2, levels=3, convs_per_block=1), 2, 4),
]


@pytest.mark.parametrize("name,build,dims,align", SMALL_UNETS, ids=[r[0] for r in SMALL_UNETS])
def test_analytic_unet_radius_equals_the_probe(name, build, dims, align):
    model = build().eval()
    analytic = receptive_radius(model, dims, align=align, method="analytic")
    probed = receptive_radius(model, dims, align=align, method="probe", probe_size=64 if dims == 2 else 24)
    assert analytic == probed
    assert min(analytic) > 0


def test_probe_same_on_every_backend():
    model = models.UNet(2, 1, 2, 2, 3, kind="rolling", first_kind="dense", first_level_convs=3, depth=2).eval()
    expected = receptive_radius(model, 2, align=4, method="analytic")
    for backend in CPU_BACKENDS:
        set_backend(model, backend)
        REC._RADIUS_CACHE.pop(model, None)
        assert receptive_radius(model, 2, align=4, method="probe", probe_size=64) == expected, backend


def _nan_killing_fused(monkeypatch):
    """The fused spectral kernel as it was: its ReLU epilogue mapped NaN to 0."""
    def bad(fn):
        def run(*args, **kw):
            return torch.nan_to_num(fn(*args, **kw), nan=0.0)
        return run

    for op in ("rolling_conv", "rolling_conv_transpose"):
        impl = backends._IMPLS[op]["spectral"]
        entry = impl.fused.get("cpu")
        if entry is None:  # no compiled fused kernel: wrap the composition instead
            entry = backends.Fused(impl.fn, lambda x, w: None, False)
        monkeypatch.setitem(impl.fused, "cpu", backends.Fused(bad(entry.fn), entry.supports, entry.epilogue))


def test_probe_ignores_a_backend_that_loses_nan(monkeypatch):
    """A backend whose epilogue maps NaN to a number made the probe see a smaller field (0 for the published
    Rolling UNet); the probe runs every medconv_ext operator on the reference backend."""
    model = models.UNet(2, 1, 2, 2, 3, kind="rolling", first_kind="dense", first_level_convs=3, depth=2).eval()
    expected = receptive_radius(model, 2, align=4, method="analytic")
    _nan_killing_fused(monkeypatch)
    set_backend(model, "spectral")
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(model(x), torch.nan_to_num(model(x)))  # the fake kernel is used outside the probe
    assert receptive_radius(model, 2, align=4, method="probe", probe_size=64) == expected


class _Hides(nn.Module):
    """conv -> a layer that maps NaN to a number (nn.Threshold) -> conv, in a custom forward (so it is probed)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.t = nn.Threshold(0.0, 0.0)
        self.b = nn.Conv2d(2, 1, 5, padding=2)

    def forward(self, x):
        return self.b(self.t(self.a(x)))


def test_probe_sees_through_a_layer_that_hides_nan():
    assert receptive_radius(_Hides().eval(), 2, method="probe", probe_size=32) == (3, 3)


def test_radius_is_cached_per_model(monkeypatch):
    calls = []
    real = REC._probe_radius

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(REC, "_probe_radius", counting)
    net = _Hides().eval()
    assert receptive_radius(net, 2, probe_size=32) == receptive_radius(net, 2, probe_size=32) == (3, 3)
    assert len(calls) == 1
    net.b.padding = (1, 1)  # another geometry: probed again
    net.b.kernel_size = (3, 3)
    net.b.weight = nn.Parameter(net.b.weight[:, :, 1:4, 1:4].detach().clone())
    assert receptive_radius(net, 2, probe_size=32) == (2, 2)
    assert len(calls) == 2


def _image(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# predict_tiled with a halo the check accepts (the smallest one: receptive_radius's is at least as large)
# equals full-image inference (float64, two tiles along every axis), and one voxel less is refused.
# The 2D zoo models run at their published depth; the 3D QSMnets' field (203) needs tiles of over 600
# voxels per axis, so their tiling is checked on a shallower U-Net of the same kind, and the full-depth
# models only for the refusal (which needs no forward pass).
TILED = [
    ("rolling_unet", lambda: models.rolling_unet(features=2), 2, 16),
    ("unet", lambda: models.unet(features=2), 2, 16),
    ("depthwise_unet", lambda: models.depthwise_unet(features=2), 2, 16),
    ("flattened_unet", lambda: models.flattened_unet(features=2), 2, 16),
    ("medic_seg", lambda: models.medic_seg(features=2, convs_per_block=1), 2, 32),
    ("rolling-3d-depth1", lambda: models.UNet(3, 1, 1, 2, 3, kind="rolling", first_kind="dense", depth=1), 3, 2),
]


@pytest.mark.parametrize("name,build,dims,align", TILED, ids=[r[0] for r in TILED])
def test_predict_tiled_with_the_radius_equals_full_inference(name, build, dims, align):
    model = build().double().eval()
    halo = receptive_radius(model, dims, align=align)
    need = REC._min_halo(model, dims, None, align)
    assert all(0 < n <= h for n, h in zip(need, halo))
    tile = -(-(3 * max(halo) + 2 * align) // align) * align
    size = tile + 2 * align
    x = _image((REC._first_in_channels(model),) + (size,) * dims)
    with torch.no_grad():
        full = model(x[None])[0]
    y = predict_tiled(model, x, tile, halo=need, align=align, progress=False)  # the smallest accepted halo
    torch.testing.assert_close(y, full, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="halo .* is smaller than the model's receptive field.*"
                                         "check_receptive_field=False"):
        predict_tiled(model, x, tile, halo=tuple(n - 1 for n in need), align=align, progress=False)


@pytest.mark.parametrize("builder,kw,dims,align,radius", UNETS, ids=_ids(UNETS))
def test_predict_tiled_refuses_a_small_halo_for_every_zoo_unet(builder, kw, dims, align, radius):
    model = builder(**kw).eval()
    chans = model.in_channels
    tile = -(-(2 * radius + 2 * align) // align) * align
    size = tile + 2 * align  # two tiles along every axis: the halo matters
    x = torch.zeros(1).expand((chans,) + (size,) * dims)  # no memory: the check comes before any tile is read
    # the exact field (every position on the down-sampling grid) is at most the block radius
    need = REC._min_halo(model, dims, chans, align)
    assert all(0 < n <= radius for n in need)
    with pytest.raises(ValueError, match=r"halo \(%d(, %d)*\) is smaller.*at least \(%d" % (need[0] - 1, need[0] - 1,
                                                                                          need[0])):
        predict_tiled(model, x, tile, halo=need[0] - 1, align=align, progress=False)


def test_halo_check_skipped_for_one_tile_and_on_request():
    model = integer_weights_(models.unet(features=2).double().eval())
    x = _image((1, 64, 48))
    full = model(x[None])[0].detach()
    # one tile covers the image: full-image inference, whatever the halo
    torch.testing.assert_close(predict_tiled(model, x, 64, halo=0, align=16, progress=False), full)
    x = _image((1, 96, 64))
    with pytest.raises(ValueError, match="check_receptive_field=False"):
        predict_tiled(model, x, 64, halo=8, align=16, progress=False)
    y = predict_tiled(model, x, 64, halo=8, align=16, progress=False, check_receptive_field=False)
    assert not torch.equal(y, model(x[None])[0])  # a halo below the field is wrong indeed (integer arithmetic)
    with pytest.raises(TypeError, match="check_receptive_field must be a bool"):
        predict_tiled(model, x, 64, halo=8, align=16, progress=False, check_receptive_field="no")


@pytest.mark.parametrize("builder,kw", CLASSIFIERS, ids=_ids(CLASSIFIERS))
def test_classifiers_have_no_bounded_field(builder, kw, monkeypatch):
    for backend in CPU_BACKENDS:
        monkeypatch.setenv("MEDCONV_BACKEND", backend)
        model = builder(**kw).eval()
        with pytest.raises(ValueError):  # global pooling: "whole image"; medic_cls: its fixed 28x28 input
            receptive_radius(model, 2, probe_size=32)
        with pytest.raises(ValueError):
            predict_tiled(model, torch.zeros(model_in_channels(model), 64, 64), 32, halo=4, progress=False)


def model_in_channels(model):
    return REC._first_in_channels(model)


def test_valid_srnet_margin_checked():
    net = models.valid_srnet(1, features=2, blocks=2, dims=2).double().eval()
    m = receptive_margin(net, 2)
    assert m == (6, 6)
    x = _image((1, 40, 36))
    full = predict_tiled(net, x, 20, progress=False)
    torch.testing.assert_close(predict_tiled(net, x, 20, margin=m, progress=False), full)
    with pytest.raises(ValueError, match=r"margin \(5, 5\) is smaller than the model's receptive field \(6, 6\).*"
                                         "check_receptive_field=False"):
        predict_tiled(net, x, 20, margin=5, progress=False)
