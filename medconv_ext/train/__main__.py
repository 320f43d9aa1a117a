"""python -m medconv_ext.train qsm --model rolling_qsmnet [options]  (see docs/training.md)"""
import argparse
import dataclasses
import sys

from ..backends import BACKENDS
from .loop import QSMTrainConfig, run_qsm

_D = QSMTrainConfig()


def _parser():
    p = argparse.ArgumentParser(prog="python -m medconv_ext.train",
                                description="Training examples of medconv_ext.")
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    q = sub.add_parser("qsm", help="dipole inversion (QSM) on synthetic data made on the fly",
                       description="Train a QSM network (field -> susceptibility) on synthetic phantoms made from "
                                   "physics, then compare it with TKD on a held-out synthetic set. Defaults run "
                                   "on a CPU in a few minutes.")
    # default=None everywhere: a resumed run must know which options were given explicitly
    a = q.add_argument
    a("--model", default=None, help="builder in medconv_ext.models (or 'package.module:function'); default %s" % _D.model)
    a("--features", type=int, default=None,
      help="model width (the builder's `features`); default 8 on the CPU, the builder's default on CUDA")
    a("--patch", type=int, default=None, help="cubic patch size in voxels; default %d" % _D.patch)
    a("--batch-size", type=int, default=None, help="default %d" % _D.batch_size)
    a("--steps", type=int, default=None, help="total optimizer steps (a resumed run continues up to it); default %d" % _D.steps)
    a("--lr", type=float, default=None, help="Adam learning rate; default %g" % _D.lr)
    a("--device", default=None, help="auto, cpu, cuda, cuda:1, ...; default auto")
    a("--out", default=None, help="directory for checkpoint.pt, train_log.csv and metrics.json; default %s" % _D.out)
    a("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
      help="continue from OUT/checkpoint.pt (or from CKPT): weights, optimizer state, step and RNG")
    a("--seed", type=int, default=None, help="seed of the initial weights and of the training data; default %d" % _D.seed)
    a("--val-size", type=int, default=None, help="number of held-out volumes (another seed stream); default %d" % _D.val_size)
    a("--backend", default=None, choices=["auto", *BACKENDS],
      help="backend of the model's rolling layers; default: the layers' own (auto)")
    a("--amp", default=None, choices=["none", "bf16"], help="autocast dtype of the model; default none")
    a("--ckpt-every", type=int, default=None, help="checkpoint every N steps (and at the end); default %d" % _D.ckpt_every)
    a("--noise", type=float, default=None, help="Gaussian noise std of the field in ppm; default %g" % _D.noise)
    a("--tkd-threshold", type=float, default=None, help="TKD threshold; default %g" % _D.tkd_threshold)
    a("--log-every", type=int, default=None, help="progress line every N steps when not on a terminal; default ~20 lines")
    a("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.task == "qsm":
        fields = {f.name for f in dataclasses.fields(QSMTrainConfig)}
        given = {k: v for k, v in vars(args).items() if k in fields and v is not None and k != "quiet"}
        cfg = dataclasses.replace(QSMTrainConfig(), **given, quiet=args.quiet)
        try:
            run_qsm(cfg, resume=args.resume, given=set(given))
        except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as e:
            print("error: %s" % e, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
