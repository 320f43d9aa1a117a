"""Exact tiled inference from .npy to .npy, memory-mapped on both sides.

    python -m medconv_ext.tile --model CKPT --input IN.npy --output OUT.npy --tile 256 [--device cuda]

CKPT is a tiling checkpoint written by medconv_ext.tiling.save_tiling_checkpoint(model, path): the
builder's name and kwargs, the state dict and the tiling parameters (margin / halo / align), read
with torch.load(weights_only=True). IN.npy is (C, *spatial) or (N, C, *spatial); OUT.npy gets the
same layout with the model's output channels. Memory stays bounded by tile and batch size.
"""
import argparse
import sys

import numpy as np
import torch

from .tiling import PAD_MODES, _np_dtype_for, _predict_tiled, load_tiling_checkpoint

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _ints(text):
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("expected an int or comma-separated ints, got %r" % text) from None
    return vals[0] if len(vals) == 1 else tuple(vals)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m medconv_ext.tile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="tiling checkpoint (save_tiling_checkpoint)")
    p.add_argument("--input", required=True, help="input .npy, (C, *spatial) or (N, C, *spatial)")
    p.add_argument("--output", required=True, help="output .npy (created, memory-mapped)")
    p.add_argument("--tile", required=True, type=_ints, help="tile size, margins/halos included (int or a,b[,c])")
    p.add_argument("--device", default="cpu", help="device for the tiles (default cpu)")
    p.add_argument("--batch-size", type=int, default=4)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--margin", type=_ints, help="valid networks: margin (default: checkpoint's, else computed)")
    g.add_argument("--halo", type=_ints, help="padded networks / U-Nets: halo (default: checkpoint's)")
    p.add_argument("--align", type=_ints, default=None, help="tile-origin alignment with --halo (default: checkpoint's)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--out-dtype", choices=["float16", "float32", "float64"],
                   help="dtype of OUT.npy (default: the model's output dtype; float32 for bfloat16)")
    p.add_argument("--pad-mode", choices=PAD_MODES, default="constant")
    p.add_argument("--exact", action="store_true", help="deterministic algorithms, no TF32")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, info = load_tiling_checkpoint(args.model)
        if args.dtype:
            model.to(_DTYPES[args.dtype])
        model.to(torch.device(args.device))
        image = np.load(args.input, mmap_mode="r")
        margin, halo = args.margin, args.halo
        align = args.align
        if margin is None and halo is None:
            margin, halo = info.get("margin"), info.get("halo")
            if align is None:
                align = info.get("align")
        align = 1 if align is None else align
        if isinstance(margin, list):
            margin = tuple(margin)
        if isinstance(halo, list):
            halo = tuple(halo)
        if isinstance(align, list):
            align = tuple(align)

        def make_out(shape, dtype):
            npdt = np.dtype(args.out_dtype) if args.out_dtype else _np_dtype_for(dtype)
            return np.lib.format.open_memmap(args.output, mode="w+", dtype=npdt, shape=shape)

        out = _predict_tiled(model, image, args.tile, margin=margin, halo=halo, align=align,
                             batch_size=args.batch_size, device=args.device, pad_mode=args.pad_mode,
                             exact=args.exact, progress=not args.no_progress,
                             out_factory=make_out)
        if isinstance(out, np.memmap):
            out.flush()
        else:  # pragma: no cover - make_out always gives a memmap
            np.save(args.output, out)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print("medconv_ext.tile: error: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
