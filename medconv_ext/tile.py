"""Exact tiled inference from file to file: `python -m medconv_ext.tile` (one process) or
`torchrun --nproc_per_node N -m medconv_ext.tile` (N processes splitting the tiles).

    python -m medconv_ext.tile --model CKPT --input IN --output OUT --tile 256 [--device cuda]
        [--resume | --overwrite] [--foreground-threshold T | --mask MASK] [--verify K] ...

IN/OUT: .npy, .zarr (Zarr v3 array or OME-Zarr image), .tif/.tiff, .nii/.nii.gz. See
medconv_ext/tiling/cli.py and docs/tiling.md.
"""
import sys

from .tiling.cli import build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
