"""`make bench`: runs every microbenchmark in turn (each writes its CSV under bench/results/)."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["bench_rolling_conv.py", "bench_involution.py", "bench_models.py", "bench_tiling.py"]


def main(argv):
    failed = []
    for name in ORDER:
        path = os.path.join(HERE, name)
        if not os.path.exists(path):
            continue
        print("=" * 100 + "\n== %s\n" % name + "=" * 100, flush=True)
        rc = subprocess.call([sys.executable, path] + argv)
        if rc != 0:
            failed.append(name)
    if failed:
        print("failed: %s" % ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
