"""Cost of making the tiling ledger survive a power loss (python -m medconv_ext.tile).

Runs the tile command line from a .npy image to .npy and to Zarr with a group commit after every
batch (--sync-every 0) and times each commit (the fsync of the data written since the previous
commit, then the pwrite and fsync of the tiles' flags), with and without fsync (--no-sync). The
default, --sync-every 5, makes at most one commit every 5 seconds, so its overhead is about one
commit's time per 5 s of run.

    OMP_NUM_THREADS=1 python bench/bench_ledger_sync.py [--size 1024] [--images 4] [--folder DIR]

DIR (default: a temporary folder) should be on the file system the outputs will be written to:
fsync costs what that storage costs.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medconv_ext import tile  # noqa: E402
from medconv_ext.models.valid_srnet import valid_srnet  # noqa: E402
from medconv_ext.tiling import io as tio  # noqa: E402
from medconv_ext.tiling import save_tiling_checkpoint  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    p.add_argument("--images", type=int, default=4, help="2D images in the input (default 4)")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--folder", default=None)
    args = p.parse_args(argv)
    folder = args.folder or tempfile.mkdtemp(prefix="ledger_sync_")
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    net = os.path.join(folder, "net.pt")
    inp = os.path.join(folder, "in.npy")
    save_tiling_checkpoint(valid_srnet(features=4, blocks=2).eval(), net)
    np.save(inp, np.random.default_rng(0).random((args.images, 1, args.size, args.size), dtype=np.float32))
    times = []
    orig = tio.Ledger.commit

    def timed(self, view=None):
        t = time.perf_counter()
        orig(self, view)
        times.append(time.perf_counter() - t)

    tio.Ledger.commit = timed
    print("commit = fsync of the data written since the last commit, then pwrite + fsync of the flags; "
          "%d tiles of %d per commit" % (args.batch_size, args.tile))
    try:
        for fmt in ("npy", "zarr"):
            for extra in (["--no-sync"], []):
                times.clear()
                rc = tile.main(["--model", net, "--input", inp, "--output", os.path.join(folder, "out." + fmt),
                                "--tile", str(args.tile), "--batch-size", str(args.batch_size), "--no-progress",
                                "--verify", "0", "--overwrite", "--sync-every", "0"] + extra)
                if rc != 0:
                    return rc
                print("%-4s %-8s %3d commits: median %6.1f ms, p90 %6.1f ms, total %6.2f s"
                      % (fmt, "no-sync" if extra else "fsync", len(times), 1e3 * statistics.median(times),
                         1e3 * sorted(times)[int(0.9 * (len(times) - 1))], sum(times)))
    finally:
        tio.Ledger.commit = orig
    return 0


if __name__ == "__main__":
    sys.exit(main())
