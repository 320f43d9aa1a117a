"""MONAI interop (the optional `monai` extra: pip install 'medconv_ext[monai]').

* ExactTiledInferer(tile, halo=None, align=1, ...): a monai.inferers.Inferer, used where
  sliding_window_inference / SlidingWindowInferer is used today (`inferer(inputs, network)`, MONAI's
  evaluators' `inferer=`), whose result equals full-image inference (medconv_ext.tiling.predict_tiled
  in halo mode) and which never calls the network on a window larger than `tile`.
* Builders of rollified MONAI networks for `python -m medconv_ext.train seg --data DIR --model
  medconv_ext.monai:rolling_basic_unet` (and for tiling checkpoints): rolling_basic_unet,
  rolling_monai_unet. Both use BatchNorm (InstanceNorm, MONAI's default in BasicUNet, depends on the
  whole image, so no tiling can reproduce it).

MONAI is imported only when one of these is used; without it the error names the extra.
"""
import weakref
from typing import Optional, Sequence, Union

import torch
from torch import nn

_MISSING = ("medconv_ext.monai needs MONAI, which is not installed: pip install 'medconv_ext[monai]' "
            "(or pip install monai)")


def _monai():
    try:
        import monai  # noqa: F401
        import monai.inferers
        import monai.networks.nets
    except ImportError:
        raise ImportError(_MISSING) from None
    return monai


class _WithArgs(nn.Module):
    """network(x, *args, **kwargs) as a module of x only (what predict_tiled runs)."""

    def __init__(self, network, args, kwargs):
        super().__init__()
        self.network, self.args, self.kwargs = network, args, kwargs

    def forward(self, x):
        return self.network(x, *self.args, **self.kwargs)


class _TooLarge(Exception):
    pass


class _Guard(nn.Module):
    """The network, refusing windows larger than `limit` (used while probing its receptive field)."""

    def __init__(self, network, limit):
        super().__init__()
        self.network, self.limit = network, limit
        self.training = network.training  # the probe restores this mode on the network afterwards

    def forward(self, x):
        if max(x.shape[2:]) > self.limit:
            raise _TooLarge()
        return self.network(x)


def _in_channels(network):
    from .tiling.receptive import _first_in_channels
    return _first_in_channels(network)


def _make_inferer_class():
    monai = _monai()

    class ExactTiledInferer(monai.inferers.Inferer):
        """Exact tiled inference as a MONAI Inferer.

        tile: window size (int or one per spatial axis), halo included; the network never sees a
            larger window.
        halo: receptive radius to carry around every tile (int or per axis); None computes
            receptive_radius(network, dims, align=align) once per network (cached), probing on windows
            no larger than the tile. A given halo is trusted (not checked against the network, since
            that check would run it on larger windows): too small a halo gives a wrong result.
        align: the network's total down-sampling factor (16 for BasicUNet, 2**len(strides) for
            UNet, 2**(len(blocks_down) - 1) for SegResNet); tile origins follow it. Inputs whose size
            is not a multiple of `align` are zero-padded at the high end and the result is cropped
            back (what full-image inference of such a network needs too).
        batch_size, device, exact, progress: as in medconv_ext.tiling.predict_tiled.

        inferer(inputs, network, *args, **kwargs): inputs (N, C, *spatial) (2D or 3D); returns the
        network's output for the whole input, equal to network(inputs) up to float rounding
        (float64: to 1e-15). The network must be in eval mode (BatchNorm and Dropout).
        """

        def __init__(self, tile: Union[int, Sequence[int]], halo: Optional[Union[int, Sequence[int]]] = None,
                     align: Union[int, Sequence[int]] = 1, batch_size: int = 4, device=None, exact: bool = False,
                     progress: bool = False):
            super().__init__()
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError("ExactTiledInferer: batch_size must be an int >= 1, got %r" % (batch_size,))
            for name, v in (("tile", tile), ("halo", halo), ("align", align)):
                if v is None and name == "halo":
                    continue
                vals = [v] if isinstance(v, int) else list(v) if isinstance(v, (list, tuple)) else None
                if vals is None or not vals or any(isinstance(x, bool) or not isinstance(x, int) for x in vals):
                    raise TypeError("ExactTiledInferer: %s must be an int or a sequence of ints, got %r" % (name, v))
                if any(x < (0 if name == "halo" else 1) for x in vals):
                    raise ValueError("ExactTiledInferer: %s must be >= %d, got %r" % (name, 0 if name == "halo" else 1,
                                                                                     v))
            self.tile, self.halo, self.align = tile, halo, align
            self.batch_size, self.device, self.exact, self.progress = batch_size, device, exact, progress
            self._radius = weakref.WeakKeyDictionary()

        def radius(self, network: nn.Module, dims: int):
            """The halo used for `network` (given, or computed once and cached)."""
            if self.halo is not None:
                return self.halo
            if network not in self._radius:
                from .tiling import receptive_radius
                a = self.align if isinstance(self.align, int) else max(self.align)
                limit = min([self.tile] if isinstance(self.tile, int) else list(self.tile))
                top = max(a, (limit // a) * a)
                r = None
                for start in sorted({min(128 if dims == 2 else 48, top), top}):
                    try:  # the probe never exceeds the tile either
                        r = receptive_radius(_Guard(network, limit), dims, align=a, probe_size=start,
                                             in_channels=_in_channels(network))
                        break
                    except _TooLarge:
                        continue
                if r is None:
                    raise ValueError("ExactTiledInferer: the receptive field of the network needs a probe larger "
                                     "than the tile %r, so no halo fits in it; use a larger tile, or pass halo= if "
                                     "you know the receptive radius" % (self.tile,))
                self._radius[network] = tuple(r)
            return self._radius[network]

        def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
            from .tiling import predict_tiled
            op = "ExactTiledInferer"
            if not isinstance(inputs, torch.Tensor):
                raise TypeError("%s: inputs must be a torch.Tensor (N, C, *spatial), got %s"
                                % (op, type(inputs).__name__))
            if inputs.dim() not in (4, 5):
                raise ValueError("%s: inputs must be (N, C, H, W) or (N, C, D, H, W), got shape %s"
                                 % (op, tuple(inputs.shape)))
            if not isinstance(network, nn.Module):
                raise TypeError("%s: network must be a torch.nn.Module, got %s" % (op, type(network).__name__))
            dims = inputs.dim() - 2
            sizes = list(inputs.shape[2:])

            def per_axis(v, name):
                vals = [v] * dims if isinstance(v, int) else list(v)
                if len(vals) != dims:
                    raise ValueError("%s: %s %r has %d values for a %dD input" % (op, name, v, len(vals), dims))
                return vals

            tile, align = per_axis(self.tile, "tile"), per_axis(self.align, "align")
            halo = per_axis(self.radius(network, dims), "halo")
            padded = [-(-s // a) * a for s, a in zip(sizes, align)]
            x = inputs
            if padded != sizes:
                pads = []
                for s, p in reversed(list(zip(sizes, padded))):
                    pads += [0, p - s]
                x = torch.nn.functional.pad(inputs, pads)
            for ax in range(dims):  # a tile covering the image along an axis: one tile there, no halo needed
                if tile[ax] >= padded[ax]:
                    tile[ax], halo[ax] = padded[ax], 0
            net = _WithArgs(network, args, kwargs) if (args or kwargs) else network
            # The halo is the one radius() probed within the tile (or the caller's): predict_tiled's own
            # check would probe the network on windows larger than the tile, which this inferer never does.
            y = predict_tiled(net, x, tuple(tile), halo=tuple(halo), align=tuple(align), batch_size=self.batch_size,
                              device=self.device, exact=self.exact, progress=self.progress,
                              check_receptive_field=False)
            if padded != sizes:
                y = y[(slice(None), slice(None)) + tuple(slice(0, s) for s in sizes)]
            return y

    return ExactTiledInferer


_CLASSES = {}


def __getattr__(name):
    if name == "ExactTiledInferer":
        if name not in _CLASSES:
            _CLASSES[name] = _make_inferer_class()
        return _CLASSES[name]
    raise AttributeError("module 'medconv_ext.monai' has no attribute %r" % (name,))


# ------------------------------------------------------------------ rollified MONAI networks
def _spec(net, name, **kw):
    net.builder_spec = ("medconv_ext.monai:" + name, kw)
    return net


def rolling_basic_unet(spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 2, features: int = 8,
                       rolling: bool = True) -> nn.Module:
    """MONAI's BasicUNet with widths (f, f, 2f, 4f, 8f, f), BatchNorm, no dropout, transposed-conv
    up-sampling, its convolutions rollified (medconv_ext.models.rollify; the input conv and 1x1 convs
    stay dense). rolling=False: the dense network. Needs sizes that are multiples of 16."""
    _monai()
    from monai.networks.nets import BasicUNet
    from .models import rollify
    f = int(features)
    net = BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                    features=(f, f, 2 * f, 4 * f, 8 * f, f), norm=("batch", {"affine": True}), dropout=0.0,
                    upsample="deconv")
    if rolling:
        rollify(net)
    net.align = 16
    return _spec(net, "rolling_basic_unet", spatial_dims=spatial_dims, in_channels=in_channels,
                 num_classes=num_classes, features=features, rolling=rolling)


def rolling_monai_unet(spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 2, features: int = 8,
                       depth: int = 3, rolling: bool = True) -> nn.Module:
    """MONAI's UNet (strided convs, two residual units per level, BatchNorm) with channels
    (f, 2f, ..., 2**depth f) and strides 2, its convolutions rollified. Sizes: multiples of 2**depth."""
    _monai()
    from monai.networks.nets import UNet
    from .models import rollify
    f = int(features)
    net = UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
               channels=tuple(f * 2 ** i for i in range(depth + 1)), strides=(2,) * depth, num_res_units=2,
               norm="batch")
    if rolling:
        rollify(net)
    net.align = 2 ** depth
    return _spec(net, "rolling_monai_unet", spatial_dims=spatial_dims, in_channels=in_channels,
                 num_classes=num_classes, features=features, depth=depth, rolling=rolling)
