"""python -m medconv_ext.analysis report A.pt [B.pt ...] [--model NAME [--weights PATH]] ... --out DIR"""
import argparse
import sys

from .filters import AnalysisError
from .report import build_report, load_entry, model_entry, write_report


class _ModelAction(argparse.Action):
    def __call__(self, parser, ns, values, option_string=None):
        ns.models.append([values, None])


class _WeightsAction(argparse.Action):
    def __call__(self, parser, ns, values, option_string=None):
        if not ns.models or ns.models[-1][1] is not None:
            parser.error("--weights must follow the --model it belongs to")
        ns.models[-1][1] = values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medconv_ext.analysis",
                                description="Learned-filter analysis (CNN Filter DB method).")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="coefficient distributions, KL shift and per-layer statistics of models")
    r.add_argument("checkpoints", nargs="*", help="state-dict checkpoints (.pt/.pth), loaded with weights_only=True")
    r.add_argument("--model", action=_ModelAction, default=[], dest="models", metavar="NAME",
                   help="one of the package's models (medconv_ext.models); random init unless --weights follows")
    r.add_argument("--weights", action=_WeightsAction, metavar="PATH", help="weights for the preceding --model")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--kernel-size", type=int, default=3)
    r.add_argument("--bins", type=int, default=70)
    r.add_argument("--seed", type=int, default=0, help="seed of randomly initialised --model entries")
    args = p.parse_args(argv)
    for opt in ("kernel_size", "bins"):
        if getattr(args, opt) < 1:
            p.error("--%s must be a positive integer, got %d" % (opt.replace("_", "-"), getattr(args, opt)))
    try:
        entries = [load_entry(c) for c in args.checkpoints]
        entries += [model_entry(name, weights, args.seed) for name, weights in args.models]
        print("analysing %d model(s): %s" % (len(entries), ", ".join(e.label for e in entries)), file=sys.stderr)
        files = build_report(entries, kernel_size=args.kernel_size, bins=args.bins)
    except (AnalysisError, ImportError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    try:
        paths = write_report(files, args.out)
    except OSError as e:
        print("error: %s: %s" % (e.filename or args.out, e.strerror or e), file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
