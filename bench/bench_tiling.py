"""Exact tiled inference (medconv_ext.tiling.predict_tiled) against MONAI's sliding_window_inference.

For valid_srnet (valid convolutions, margin 16) and its padded twin (same layers, padding 1) on 2D
slices of a volume and on the 3D volume: throughput (output voxels per second), peak memory and the
maximum absolute difference to full-image inference. MONAI runs with gaussian blending, its default
overlap 0.25, the same tile (roi) size, the same tile batch size and the same network (the valid
network zero-padded by its margin inside every window, as MONAI needs a same-size predictor).
Differences are measured in float64 (ours: 0 expected); timings in float32 on a CPU, bfloat16 on a GPU.
On CUDA the valid_srnet rate (64 features, bf16, 2D slices) is extrapolated to the 2000x2000x5839
light-sheet volume of the paper.

    python bench/bench_tiling.py [--quick] [--device cuda] [--features N] [--blocks N] [--part compare|scale|all]
On a loaded CPU run it with OMP_NUM_THREADS=1: oversubscribed OpenMP barriers penalise the many
small convolution calls of any tiled inference far more than the work itself.
CSV: <results root>/<device>/tiling.csv (bench/out/ unless run_all.py --update-results; see harness.py) (harness columns + voxels_per_s, max_abs_diff, net, tile).

--part scale: file-to-file runs of `python -m medconv_ext.tile` (.npy in, .npy and Zarr out) with 1 and
2 processes under torchrun on a CPU (1 OpenMP thread each), or 1 process on a GPU: output voxels per
second of the tile loop and its read / compute / write split (seconds summed over processes), each
output checked bit-identical to the one-process .npy run. On CUDA: valid_srnet (64 features, 7 blocks,
bf16) and the extrapolated time for the 2000x2000x5839 light-sheet volume on 1 and 8 GPUs (8 GPUs:
linear scaling of the one-GPU rate, an upper bound that holds only while storage keeps up).
CSV: <results root>/<device>/tiling_scale.csv.
"""
import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from harness import Results, measure_peak_mb, time_ms  # noqa: E402

from medconv_ext.models.valid_srnet import SRNet  # noqa: E402
from medconv_ext.tiling import predict_tiled  # noqa: E402

try:
    from monai.inferers import sliding_window_inference
    MONAI_ERROR = None
except Exception as e:  # optional: the benchmark runs ours alone without it
    sliding_window_inference = None
    MONAI_ERROR = "%s: %s" % (type(e).__name__, e)

LIGHTSHEET = (5839, 2000, 2000)  # the paper's volume (planes, rows, columns)


class PadInWindow(torch.nn.Module):
    """A valid network made same-size for MONAI: zero-pad every window by the margin."""

    def __init__(self, net, margin, dims):
        super().__init__()
        self.net, self.pads = net, [margin] * (2 * dims)

    def forward(self, x):
        return self.net(F.pad(x, self.pads))


def build(kind, features, blocks, dims, dtype, device, seed=0):
    torch.manual_seed(seed)
    net = SRNet(1, features, blocks, dims, padding=0 if kind == "valid_srnet" else 1)
    return net.to(device=device, dtype=dtype).eval()


def full_image(net, x, kind):
    with torch.inference_mode():
        if kind == "valid_srnet":
            return net(F.pad(x, [net.margin] * (2 * (x.dim() - 2))))
        return net(x)


def run_ours(net, x, kind, tile, bs, device):
    halo = None if kind == "valid_srnet" else 2 * len(net.body) + 2
    return predict_tiled(net, x, tile, halo=halo, batch_size=bs, device=device, progress=False)


def run_monai(net, x, kind, tile, bs, device):
    dims = x.dim() - 2
    pred = PadInWindow(net, net.margin, dims) if kind == "valid_srnet" else net
    with torch.inference_mode():
        return sliding_window_inference(x, (tile,) * dims, bs, pred, overlap=0.25, mode="gaussian",
                                        sw_device=device, device=x.device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--features", type=int, default=None,
                   help="network width (default 64 on CUDA; 8 in 2D and 4 in 3D on a CPU, 4 with --quick)")
    p.add_argument("--blocks", type=int, default=None, help="residual blocks (default 7; 3 for 3D on a CPU)")
    p.add_argument("--part", choices=["compare", "scale", "all"], default="all",
                   help="compare: predict_tiled vs MONAI in memory; scale: file to file, 1 and 2 processes")
    args = p.parse_args(argv)
    rc = 0
    if args.part in ("compare", "all"):
        rc = compare(args)
    if args.part in ("scale", "all"):
        rc = scale(args) or rc
    return rc


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_run(nproc, ck, inp, out, tile, bs, device, stats_path, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = ["-m", "medconv_ext.tile", "--model", ck, "--input", inp, "--output", out, "--tile", str(tile),
            "--batch-size", str(bs), "--device", device, "--no-progress", "--stats", stats_path, "--overwrite",
            "--verify", "0"] + list(extra)
    if nproc == 1:
        cmd = [sys.executable, "-W", "ignore"] + base
    else:
        cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port())] + base
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("%s failed:\n%s" % (" ".join(cmd), r.stderr[-3000:]))
    with open(stats_path) as f:
        return json.load(f)


def _read_out(path):
    if path.endswith(".npy"):
        return np.load(path)
    import zarr
    return zarr.open_array(path, mode="r")[...]


def scale(args):
    """File-to-file throughput of python -m medconv_ext.tile: 1 and 2 processes (CPU), or one GPU."""
    from medconv_ext.tiling import save_tiling_checkpoint
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    try:
        import zarr  # noqa: F401
        outs = ["npy", "zarr"]
    except ImportError:
        outs = ["npy"]
    if cuda:
        shape, tile, features, blocks, dtype, bs, procs = (16, 1, 1024, 1024), 256, 64, 7, "bfloat16", 8, [1]
    elif args.quick:
        shape, tile, features, blocks, dtype, bs, procs = (4, 1, 192, 192), 96, 4, 3, "float32", 4, [1, 2]
    else:
        shape, tile, features, blocks, dtype, bs, procs = (8, 1, 512, 512), 160, 8, 7, "float32", 4, [1, 2]
    features = args.features or features
    blocks = args.blocks or blocks
    res = Results("tiling_scale", device, ["voxels_per_s", "processes", "read_s", "compute_s", "write_s", "run_s",
                                           "bit_identical", "net", "tile"])
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        net = SRNet(1, features, blocks, 2, padding=0).eval()
        ck = os.path.join(tmp, "net.pt")
        save_tiling_checkpoint(net, ck)
        inp = os.path.join(tmp, "in.npy")
        np.save(inp, np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
        n_vox = math.prod(shape)
        ref = None
        rate1 = None
        for fmt in outs:
            for nproc in procs:
                out = os.path.join(tmp, "out%d.%s" % (nproc, fmt))
                st = _cli_run(nproc, ck, inp, out, tile, bs, args.device, os.path.join(tmp, "st.json"),
                              ["--dtype", dtype])
                y = _read_out(out)
                if ref is None:
                    ref = y
                same = bool(np.array_equal(y, ref))
                rate = st["voxels_per_s"]
                if fmt == "npy" and nproc == 1:
                    rate1 = rate
                res.add(op="tiling_scale", impl="tile_cli_%s" % fmt, dtype=dtype, mode="%dproc" % nproc,
                        shape="%s tile %d f%d b%d" % ("x".join(map(str, shape)), tile, features, blocks),
                        median_ms=st["run_s"] * 1e3, peak_mem_mb=float("nan"), voxels_per_s=rate, processes=nproc,
                        read_s=st["read_s"], compute_s=st["compute_s"], write_s=st["write_s"], run_s=st["run_s"],
                        bit_identical=same, net="valid_srnet", tile=tile)
                print("    %-4s out, %d process(es): %.3g output voxels/s; read %.2f s, compute %.2f s, write %.2f s "
                      "(summed); same as the 1-process .npy run: %s"
                      % (fmt, nproc, rate, st["read_s"], st["compute_s"], st["write_s"], same), flush=True)
                del y
    res.write_csv()
    if cuda and rate1:
        n = math.prod(LIGHTSHEET)
        t1 = n / rate1
        print("valid_srnet (%d features, %d blocks, %s, tile %d, file to file) at %.3g voxels/s on one GPU: the "
              "%dx%dx%d light-sheet volume would take %.1f min on 1 GPU and %.1f min on 8 GPUs (linear scaling, "
              "storage permitting; paper: 66 h)"
              % (features, blocks, dtype, tile, rate1, LIGHTSHEET[2], LIGHTSHEET[1], LIGHTSHEET[0], t1 / 60, t1 / 480))
    else:
        print("(CPU run: the light-sheet extrapolation for 1 and 8 GPUs is printed on CUDA only)")
    return 0


def compare(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if MONAI_ERROR:
        print("MONAI is missing (%s): benchmarking predict_tiled alone" % MONAI_ERROR)
    res = Results("tiling", device, ["voxels_per_s", "max_abs_diff", "net", "tile"])
    fast_dtype = torch.bfloat16 if cuda else torch.float32
    # (layout, input shape (N, C, *spatial), tile, features, blocks): 2D slices of a volume, and 3D.
    # A valid network pays 2*margin per tile axis, so 3D tiles must be large against the margin;
    # on a CPU the 3D case uses 3 blocks (margin 8) to stay within minutes.
    if cuda:
        cases = [("2d-slices", (16, 1, 1024, 1024), 256, 64, 7), ("3d", (1, 1, 160, 256, 256), 96, 64, 7)]
    elif args.quick:
        cases = [("2d-slices", (1, 1, 384, 384), 128, 4, 7), ("3d", (1, 1, 48, 48, 48), 40, 4, 3)]
    else:
        cases = [("2d-slices", (2, 1, 768, 768), 256, 8, 7), ("3d", (1, 1, 96, 96, 96), 64, 4, 3)]
    reps = dict(warmup=1, min_reps=2 if args.quick else 3, max_reps=10, budget_s=0.5 if args.quick else 2.0)
    bs = 8 if cuda else 4
    impls = [("predict_tiled", run_ours)] + ([("monai_sliding_window", run_monai)] if sliding_window_inference else [])
    rates, feats = {}, {}
    for layout, shape, tile, features, blocks in cases:
        features = args.features or features
        blocks = args.blocks or blocks
        dims = len(shape) - 2
        for kind in ("valid_srnet", "padded_srnet"):
            # exactness in float64 (no TF32); on CUDA on a crop of one image, 2 tiles wide, to keep
            # float64 full-image inference short
            g = torch.Generator().manual_seed(1)
            x64 = torch.randn(shape, generator=g, dtype=torch.float64)
            if cuda:
                x64 = x64[(slice(0, 1), slice(None)) + tuple(slice(0, min(s, 2 * tile)) for s in shape[2:])]
            x64 = x64.to(device)
            diff_shape = tuple(x64.shape)
            net64 = build(kind, features, blocks, dims, torch.float64, device)
            ref = full_image(net64, x64, kind)
            diffs = {name: float((fn(net64, x64, kind, tile, bs, device) - ref).abs().max()) for name, fn in impls}
            del ref, net64, x64
            # throughput and memory
            net = build(kind, features, blocks, dims, fast_dtype, device)
            x = torch.randn(shape, generator=g).to(fast_dtype)
            if cuda:
                x = x.pin_memory()
            n_vox = math.prod(shape[2:]) * shape[0]
            for name, fn in impls:
                def call():
                    return fn(net, x, kind, tile, bs, device)
                ms = time_ms(call, device, **reps)
                peak = measure_peak_mb(call, device)
                rate = n_vox / (ms / 1e3)
                rates[(name, kind, layout)] = rate
                feats[layout] = features
                res.add(op="tiling", impl=name, dtype=str(fast_dtype).replace("torch.", ""), mode=layout,
                        shape="%s tile %d f%d b%d" % ("x".join(map(str, shape)), tile, features, blocks),
                        median_ms=ms, peak_mem_mb=peak, voxels_per_s=rate, max_abs_diff=diffs[name], net=kind,
                        tile=tile)
                print("    %-20s %-12s %-9s %.3g output voxels/s; max |diff| to full image (float64, %s): %.3g"
                      % (name, kind, layout, rate, "x".join(map(str, diff_shape)), diffs[name]), flush=True)
    res.write_csv()
    for layout in ("2d-slices", "3d"):
        for kind in ("valid_srnet", "padded_srnet"):
            if ("monai_sliding_window", kind, layout) in rates:
                print("  %-12s %-9s predict_tiled / MONAI throughput: %.2fx" % (
                    kind, layout, rates[("predict_tiled", kind, layout)] / rates[("monai_sliding_window", kind, layout)]))
    if cuda:
        n = math.prod(LIGHTSHEET)
        for layout in ("2d-slices", "3d"):
            r = rates[("predict_tiled", "valid_srnet", layout)]
            print("valid_srnet (%d features, %s, %s) at %.3g voxels/s: the %dx%dx%d light-sheet volume would take "
                  "%.1f min (paper: 66 h); target >= 40M voxels/s (< 10 min)"
                  % (feats[layout], fast_dtype, layout, r, LIGHTSHEET[2], LIGHTSHEET[1], LIGHTSHEET[0], n / r / 60))
    else:
        print("(CPU run: the light-sheet extrapolation is printed on CUDA only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
