"""python -m medconv_ext.train {qsm,seg,make-demo-data} [options]  (see docs/training.md)

Under torchrun (`torchrun --nproc_per_node N -m medconv_ext.train qsm ...`) every process trains
on its own share of the samples with DistributedDataParallel."""
import argparse
import dataclasses
import sys

from ..backends import BACKENDS
from .loop import LR_SCHEDULES
from .qsm import LOSSES, RESIDUALS, QSMTrainConfig, run_qsm
from .seg import SegTrainConfig, run_seg
from . import seg_demo, seg_files

_Q = QSMTrainConfig()
_S = SegTrainConfig()


def _common(q, d, what):
    # default=None everywhere: a resumed run must know which options were given explicitly
    a = q.add_argument
    a("--model", default=None, help="builder in medconv_ext.models (or 'package.module:function'); default %s" % d.model)
    a("--features", type=int, default=None,
      help="model width (the builder's `features`); default 8 on the CPU, the builder's default on CUDA")
    a("--batch-size", type=int, default=None, help="%s per process; default %d" % (what, d.batch_size))
    a("--steps", type=int, default=None, help="total optimizer steps (a resumed run continues up to it); default %d"
      % d.steps)
    a("--lr", type=float, default=None, help="Adam learning rate; default %g" % d.lr)
    a("--lr-schedule", default=None, choices=LR_SCHEDULES,
      help="constant, or cosine decay from --lr to 0 at --steps; default %s" % d.lr_schedule)
    a("--device", default=None, help="auto, cpu, cuda, cuda:1, ...; default auto (under torchrun: one GPU per process)")
    a("--out", default=None, help="directory for checkpoint.pt, train_log.csv and metrics.json; default %s" % d.out)
    a("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
      help="continue from OUT/checkpoint.pt (or from CKPT): weights, optimizer state, step, RNG and every option "
           "of the run; only --steps, --device, --backend, --out, --ckpt-every, --log-every, --quiet may change")
    a("--seed", type=int, default=None, help="seed of the initial weights and of the training data; default %d" % d.seed)
    a("--val-size", type=int, default=None, help="number of held-out samples (another seed stream); default %d"
      % d.val_size)
    a("--backend", default=None, choices=["auto", *BACKENDS],
      help="backend of the model's rolling layers; default: the layers' own (auto)")
    a("--amp", default=None, choices=["none", "bf16"], help="autocast dtype of the model; default none")
    a("--ckpt-every", type=int, default=None, help="checkpoint every N steps (and at the end); default %d"
      % d.ckpt_every)
    a("--log-every", type=int, default=None,
      help="progress line every N steps when not on a terminal; default: at most one line every 10 s")
    a("--quiet", action="store_true", help="no progress bar")


def _parser():
    p = argparse.ArgumentParser(prog="python -m medconv_ext.train",
                                description="Training examples of medconv_ext (also under torchrun).")
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    q = sub.add_parser("qsm", help="dipole inversion (QSM) on synthetic data made on the fly",
                       description="Train a QSM network (field -> susceptibility) on synthetic phantoms made from "
                                   "physics, then compare it with TKD on a held-out synthetic set. Defaults run "
                                   "on a CPU in a few minutes.")
    _common(q, _Q, "volumes")
    a = q.add_argument
    a("--residual", default=None, choices=RESIDUALS,
      help="tkd: the network learns a correction of TKD (its last layer starts at zero, so training starts "
           "from TKD); none: field -> chi; default %s" % _Q.residual)
    a("--loss", default=None, choices=LOSSES,
      help="mse: mean squared error on chi; paper: L1 + 0.5 L1(dipole) + 0.1 L1(gradients); default %s" % _Q.loss)
    a("--patch", type=int, default=None, help="cubic patch size in voxels; default %d" % _Q.patch)
    a("--noise", type=float, default=None, help="Gaussian noise std of the field in ppm; default %g" % _Q.noise)
    a("--tkd-threshold", type=float, default=None, help="TKD threshold; default %g" % _Q.tkd_threshold)

    s = sub.add_parser("seg", help="2D segmentation of synthetic shapes",
                       description="Train a 2D segmenter (the Rolling UNet by default) to segment the ellipses of "
                                   "synthetic images (with line distractors, uneven illumination and noise), then "
                                   "compare its Dice with thresholding on a held-out set. Defaults run on a CPU "
                                   "in a few minutes.")
    _common(s, _S, "images")
    s.add_argument("--size", type=int, default=None, help="image size (multiple of 16 for the U-Nets); default %d"
                   % _S.size)
    seg_files.add_data_args(s)  # seg --data DIR: the user's own labelled scans
    seg_demo.add_parser(sub)
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.task == "make-demo-data":
        return seg_demo.main_from_args(args)
    cls, run = (QSMTrainConfig, run_qsm) if args.task == "qsm" else (SegTrainConfig, run_seg)
    if args.task == "seg":
        bad = seg_files.check_mode_args(args)
        if bad:
            print("error: %s" % bad, file=sys.stderr)
            return 2
        if args.data is not None:
            cls, run = seg_files.SegDataConfig, seg_files.run_seg_data
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None and k != "quiet"}
    cfg = dataclasses.replace(cls(), **given, quiet=args.quiet)
    try:
        run(cfg, resume=args.resume, given=set(given))
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        if isinstance(e, OSError) and e.filename and e.strerror:
            msg = "%s: %s" % (e.filename, e.strerror)  # e.g. an --out that cannot be created
        else:
            msg = " ".join(line.strip() for line in str(e).strip().splitlines()) or type(e).__name__
        print("error: %s" % msg, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
