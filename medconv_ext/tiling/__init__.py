"""Exact tiled (crop-equivariant) inference for images and volumes larger than memory.

Two modes (docs/design.md, section 3):

* valid networks (stride-1 unpadded convolutions, no resampling; `margin`): the image is padded once
  by the margin (virtually: a tile reads only what it needs, padding its border part with
  `pad_mode`), cut into tiles of `tile` with stride `tile - 2*margin`, and the tile outputs are
  placed side by side. No output voxel of a tile ever sees padding that full-image inference would
  not see, so the result equals full-image inference.
* other networks (padded stride-1 networks, U-Nets that down-sample by `align`; `halo`): every tile
  carries a halo of at least the receptive-field radius, tile origins are multiples of `align`,
  tiles at the image border are clamped to the image (not padded) so the network's own padding
  acts there exactly as in full-image inference, and the halos are cropped.

Each output voxel is written exactly once, by a tile in which it is at least margin/halo away from
any tile edge that is not an image edge. Tiles run in batches on the device and are streamed into
`out` (a tensor, a NumPy array, a numpy.memmap or an array view of `io`), so memory is bounded by
tile and batch size.

The package: `receptive` (receptive field, crop-equivariance check), `plan` (argument checks and the
tile plan), `runner` (predict_tiled, verify_tiling), `io` (.npy, Zarr / OME-Zarr, TIFF, NIfTI readers
and writers, the resume ledger), `checkpoint` (tiling checkpoints), `cli` (python -m medconv_ext.tile,
one process or many under torchrun).
"""
from .checkpoint import (CHECKPOINT_FORMAT, _builder, _plain, load_tiling_checkpoint,  # noqa: F401
                         register_tiling_builder, save_tiling_checkpoint)
from .plan import (_WIDER, TilePlan, _axis_plan, _check_inputs, _np_dtype_for, _out_torch_dtype,  # noqa: F401
                   _seq_len, _tuple_arg, make_plan)
from .receptive import (PAD_MODES, IntOrSeq, _analytic_radius, _check_model, _conv_types,  # noqa: F401
                        _known_dims, _leaf_modules, _model_dtype_device, _probe_radius,
                        check_crop_equivariance, crop_equivariance_problems, receptive_margin, receptive_radius)
from .runner import (RunStats, _exact_mode, _gather_index, _predict_tiled, _Progress, _read_tile,  # noqa: F401
                     _set_deterministic, predict_tiled, run_tiles, verify_tiling)

__all__ = ["predict_tiled", "receptive_margin", "receptive_radius", "save_tiling_checkpoint",
           "load_tiling_checkpoint", "register_tiling_builder", "verify_tiling", "check_crop_equivariance"]
