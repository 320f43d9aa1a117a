"""Exact tiled inference from file to file, in one process or many (torchrun).

    python -m medconv_ext.tile --model CKPT --input IN --output OUT --tile 256 [--device cuda]
    torchrun --nproc_per_node 8 -m medconv_ext.tile --model CKPT --input IN --output OUT --tile 256 --device cuda

IN and OUT are chosen by their ending: .npy (memory-mapped), .zarr (Zarr v3 array or OME-Zarr image),
.tif/.tiff (TIFF stack), .nii/.nii.gz (NIfTI; OUT keeps IN's affine and header). CKPT is a tiling
checkpoint written by medconv_ext.tiling.save_tiling_checkpoint(model, path). OUT gets IN's layout
with the model's output channels, written tile by tile; beside it, OUT.ledger records the finished
tiles, so that --resume after a crash recomputes only the missing ones.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

from .._errors import FileError, check_readable, problem_of
from . import io as tio
from .checkpoint import load_tiling_checkpoint
from .normalize import crop_region, label_dtype, label_source, prepare_input
from .plan import _check_inputs, _np_dtype_for, make_plan
from .receptive import PAD_MODES
from .runner import (RunStats, _check_model_for_tiling, _exact_mode, _Progress, _resolve_device, _Skip,
                     _write_block, output_spec, run_tiles, verify_tiling)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
KILL_ENV = "MEDCONV_TILING_TEST_KILL"  # tests only: "K" or "K:data" (SIGKILL after K tiles of this process)


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
    p.add_argument("--input", required=True, help="input image: .npy, .zarr, .tif/.tiff, .nii/.nii.gz")
    p.add_argument("--output", required=True, help="output image (same formats; created, written tile by tile)")
    p.add_argument("--tile", required=True, type=_ints, help="tile size, margins/halos included (int or a,b[,c])")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (default cpu); under torchrun with cuda, rank r uses GPU LOCAL_RANK")
    p.add_argument("--batch-size", type=int, default=4)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--margin", type=_ints, help="valid networks: margin (default: checkpoint's, else computed)")
    g.add_argument("--halo", type=_ints, help="padded networks / U-Nets: halo (default: checkpoint's)")
    p.add_argument("--align", type=_ints, default=None, help="tile-origin alignment with --halo (default: checkpoint's)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--out-dtype", choices=["float16", "float32", "float64"],
                   help="output dtype (default: the model's output dtype; float32 for bfloat16)")
    p.add_argument("--pad-mode", choices=PAD_MODES, default="constant")
    p.add_argument("--exact", action="store_true", help="deterministic algorithms, no TF32")
    p.add_argument("--verify", type=int, default=2, metavar="K",
                   help="before the run, check on K tiles that tiled and larger-window results agree (0: off)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--resume", action="store_true", help="continue an interrupted run: compute only missing tiles")
    w.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--foreground-threshold", type=float, default=None,
                   help="skip tiles whose input has no voxel above this value (off by default)")
    p.add_argument("--mask", default=None,
                   help="skip tiles where this mask (image's spatial shape or coarser; .npy/.zarr/.tif/.nii) is 0")
    p.add_argument("--background", type=float, default=0.0, help="output value of skipped tiles (default 0)")
    p.add_argument("--stats", default=None, help="write run statistics (JSON) to this file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--sync-every", type=float, default=5.0, metavar="S",
                   help="make written tiles durable (fsync data, then their ledger flags) at most every S seconds "
                        "(default 5; 0: after every batch); tiles written since the last sync are recomputed by "
                        "--resume after a power loss")
    p.add_argument("--no-sync", action="store_true",
                   help="no fsync: the ledger survives a killed process but not a power loss (slightly faster)")
    p.add_argument("--argmax", action="store_true",
                   help="write the label map (argmax over the model's output channels; uint8, uint16 above 256 "
                        "classes) instead of the class scores")
    p.add_argument("--no-normalize", action="store_true",
                   help="do not apply the intensity normalisation stored in the checkpoint")
    return p


class _Dist:
    """torch.distributed when started by torchrun (WORLD_SIZE > 1), else a one-process stand-in."""

    def __init__(self, device_arg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.pg = None
        if self.world > 1:
            import torch.distributed as dist
            self.dist = dist
            if not dist.is_initialized():
                dist.init_process_group("gloo")  # barriers and small reductions only: gloo on CPUs and GPUs
                self.owned = True
            else:
                self.owned = False

    def device(self, arg):
        d = torch.device(arg)
        if d.type == "cuda" and d.index is None and self.world > 1:
            d = torch.device("cuda", self.local_rank)
        if d.type == "cuda":
            torch.cuda.set_device(d)
        return d

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            self.dist.barrier()

    def allreduce_async(self, values):
        t = torch.tensor(values, dtype=torch.float64)
        if self.world == 1:
            return t, None
        return t, self.dist.all_reduce(t, async_op=True)

    def close(self):
        if self.world > 1 and self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _fingerprint(args, src, plan, c_out, out_dtype, model):
    return {"input": src.describe(), "plan": plan.describe(), "c_out": c_out, "out_dtype": np.dtype(out_dtype).str,
            "output_format": tio.detect_format(args.output), "model": tio.model_digest(model),
            "foreground_threshold": args.foreground_threshold,
            "mask": os.path.abspath(args.mask) if args.mask else None, "background": args.background}


def _prepare(args, src, plan, model, device, mdtype, fingerprint, c_out, out_dtype, ledger):
    """Rank 0: check the existing output against --resume/--overwrite, verify, create. Returns a
    message for the user, or raises. Nothing on disk changes before every check has passed."""
    exists = os.path.exists(args.output) or ledger.exists() or os.path.exists(ledger.dir)
    if exists and not (args.resume or args.overwrite):
        raise FileExistsError("the output %s exists%s: pass --resume to continue an interrupted run or --overwrite to "
                              "replace it (nothing was changed)" % (args.output, " (with a ledger of a run)"
                                                                    if ledger.exists() else ""))
    if args.resume and exists:
        if not ledger.exists():
            raise ValueError("--resume: %s has no ledger (%s), so which tiles are finished is unknown; pass --overwrite "
                             "to recompute it (nothing was changed)" % (args.output, ledger.meta_path))
        diff = ledger.mismatch(fingerprint)
        if diff:
            raise ValueError("--resume: the ledger of %s records another run (differs in: %s); pass --overwrite to "
                             "start again (nothing was changed)" % (args.output, ", ".join(diff)))
        if ledger.read_meta().get("complete"):
            return "complete"
        return "resume"
    if args.verify > 0:
        res = verify_tiling(model, src.view, plan.tile, margin=plan.margin if any(plan.margin) else None,
                            halo=None if any(plan.margin) else plan.halo, align=plan.align,
                            pad_mode=plan.pad_mode, n_tiles=args.verify, device=device)
        if not args.no_progress:
            print("verify: %d tiles agree with larger-window inference (%s)"
                  % (len(res["tiles"]), "bit-identical" if res["bit_identical"] else
                     "max |diff| %.3g, within rounding" % res["max_abs_diff"]), file=sys.stderr)
    if exists:  # --overwrite
        tio.remove_output(args.output, ledger.dir)
    try:
        os.makedirs(ledger.dir, exist_ok=True)
        tio.create_output(args.output, src, c_out, out_dtype, plan.dims, plan.chunk, ledger.dir)
        if ledger.sync:  # the empty output (its header, its Zarr metadata) is on the disk before its ledger
            tio.sync_output(args.output, ledger.dir, None)
        ledger.create(fingerprint, len(plan))  # after the output: a ledger always has its output
    except BaseException:
        tio.remove_output(args.output, ledger.dir)  # no half-created output (full disk, no permission, ...)
        raise
    return "new"


def _one_line(e) -> str:
    if isinstance(e, OSError) and not isinstance(e, FileError) and e.filename and e.strerror:
        return "%s: %s" % (e.filename, e.strerror)
    return " ".join(line.strip() for line in str(e).strip().splitlines()) or type(e).__name__


def _load_checkpoint(path):
    """load_tiling_checkpoint, with a file that cannot be read reported as one line naming it."""
    check_readable(path, "checkpoint")
    try:
        return load_tiling_checkpoint(path)
    except (ValueError, TypeError) as e:
        if str(path) in str(e):
            raise
        raise FileError(path, problem_of(e)) from e
    except Exception as e:  # torch.load: truncated zip, pickle errors, a text file, ...
        raise FileError(path, problem_of(e)) from e


def _kill_hook():
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None, False
    k, _, where = spec.partition(":")
    return int(k), where == "data"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dist = None
    try:
        dist = _Dist(args.device)
        rc = _run(args, dist)
    except (ValueError, TypeError, RuntimeError, OSError, ImportError) as e:
        print("medconv_ext.tile: error%s: %s" % (" (rank %d)" % dist.rank if dist and dist.world > 1 else "",
                                                 _one_line(e)), file=sys.stderr)
        rc = 2
    finally:
        if dist is not None:
            dist.close()
    return rc


def _run(args, dist) -> int:
    t_start = time.perf_counter()
    if not (args.sync_every >= 0 and args.sync_every < float("inf")):
        raise ValueError("--sync-every must be a number of seconds >= 0, got %r" % args.sync_every)
    model, info = _load_checkpoint(args.model)
    if args.dtype:
        model.to(_DTYPES[args.dtype])
    device = dist.device(args.device)
    model.to(device)
    margin, halo, align = args.margin, args.halo, args.align
    if margin is None and halo is None:
        margin, halo = info.get("margin"), info.get("halo")
    if align is None and margin is None:  # halo mode: the model's down-sampling grid, also with --halo
        align = info.get("align")
    align = 1 if align is None else align
    margin, halo, align = [tuple(v) if isinstance(v, list) else v for v in (margin, halo, align)]
    dims = len(args.tile) if isinstance(args.tile, tuple) else None
    if dims is None:
        from .receptive import _known_dims
        kd = _known_dims(model)
        dims = next(iter(kd)) if len(kd) == 1 else None
    if dims is None:
        raise ValueError("cannot tell whether the model is 2D or 3D; pass --tile a,b or a,b,c")
    src = tio.open_image(args.input, dims)
    image = src.view
    dims, tile, align = _check_inputs(model, image, args.tile, margin, halo, align, args.batch_size, None,
                                      args.pad_mode)
    _check_model_for_tiling(model, "medconv_ext.tile")
    # stored normalisation, zero padding to a multiple of align, one tile where the tile covers the image
    image, own_sizes, tile, halo = prepare_input(image, info, dims, tile, align, margin, halo, not args.no_normalize,
                                                 args.argmax, lambda s: print(s, file=sys.stderr))
    src.view = image
    plan = make_plan(model, tuple(image.shape), dims, tile, align, margin, halo, args.pad_mode, "medconv_ext.tile")
    mask = None
    if args.mask:
        mask = tio.open_image(args.mask, dims).view  # ((N,) 1, *spatial), as the image's layout
    skip = _Skip(plan, args.foreground_threshold, mask, "medconv_ext.tile")
    device, mdtype = _resolve_device(model, image, device)
    ledger = tio.Ledger(args.output, sync=not args.no_sync)
    with _exact_mode(args.exact), torch.inference_mode():
        c_out, ydt = output_spec(model, plan, device, mdtype)
        out_dtype = np.dtype(args.out_dtype) if args.out_dtype else _np_dtype_for(ydt)
        if args.argmax:
            if args.out_dtype:
                raise ValueError("--argmax writes integer labels; --out-dtype applies to class scores")
            c_out, out_dtype = 1, label_dtype(c_out)
        fingerprint = _fingerprint(args, src, plan, c_out, out_dtype, model)
        if info.get("normalization") is not None and not args.no_normalize:
            fingerprint["normalization"] = info["normalization"]  # a resumed run must normalise the same way
        state = None
        if dist.rank == 0:
            try:
                state = _prepare(args, label_source(src) if args.argmax else src, plan, model, device, mdtype,
                                 fingerprint, c_out, out_dtype, ledger)
            except (ValueError, TypeError, RuntimeError, OSError, ImportError) as e:
                state = "error: %s" % e
        state = dist.broadcast(state)
        if state.startswith("error: "):
            if dist.rank == 0:
                raise ValueError(state[len("error: "):])
            return 2  # rank 0 reports it
        if state == "complete":
            if dist.rank == 0:
                print("%s is complete (its ledger has every tile); nothing to do" % args.output, file=sys.stderr)
            return 0
        out = tio.open_output(args.output, dims, ledger.dir)
        want = plan.out_shape(c_out)[:-dims] + tuple(own_sizes)
        if out.shape != want:
            raise ValueError("the output %s has shape %s, expected %s" % (args.output, out.shape, want))
        ledger.open()
        todo = np.flatnonzero(~ledger.done()).tolist()
        dist.barrier()  # every process has read the same ledger before any tile is marked
        lo, hi = len(todo) * dist.rank // dist.world, len(todo) * (dist.rank + 1) // dist.world
        mine = todo[lo:hi]  # contiguous runs of tiles: neighbouring reads share input chunks
        kill_k, kill_before_flag = _kill_hook()
        n_done = [0]

        def sink(i, block):
            if i is not None:
                dst, block = crop_region(plan.dst(i), block.argmax(0, keepdim=True) if args.argmax else block,
                                         own_sizes, dims)  # padding dropped
                if dst is not None:
                    _write_block(out, dst, block)

        def on_done(ids):
            if kill_k is not None and kill_before_flag and n_done[0] + len(ids) >= kill_k:
                os.kill(os.getpid(), 9)  # data written, flags not yet
            ledger.mark(ids)  # flagged, after the data are durable, at the next group commit
            if kill_k is not None or ledger.due(args.sync_every):
                ledger.commit(out)
            n_done[0] += len(ids)
            if kill_k is not None and n_done[0] >= kill_k:
                os.kill(os.getpid(), 9)

        total = len(plan)
        base = total - len(todo)
        bar = _Progress(total, dist.rank == 0 and not args.no_progress, label="medconv_ext.tile", start=base)
        last = [0.0]

        def progress(k):  # rank 0 shows the ledger's count: every rank's finished tiles
            if dist.rank != 0 or not bar.enabled:
                return
            now = time.perf_counter()
            if now - last[0] >= 0.5:
                last[0] = now
                bar.update(int(ledger.done().sum()) + len(ledger.pending) if dist.world > 1 else base + n_done[0])

        stats = RunStats()
        failed = 0.0
        discard = False  # a new output whose input turned out unreadable is removed again
        t_loop = time.perf_counter()
        try:
            run_tiles(model, image, plan, mine, device=device, mdtype=mdtype, batch_size=args.batch_size, sink=sink,
                      on_done=on_done, skip=skip if skip.active else None, background=args.background, stats=stats,
                      progress=progress, op="medconv_ext.tile")
        except BaseException as e:
            failed = 1.0
            discard = isinstance(e, FileError) and state == "new" and dist.world == 1
            raise
        finally:
            try:
                if discard:
                    ledger.close()
                    tio.remove_output(args.output, ledger.dir)
                else:
                    ledger.commit(out)  # the tiles written so far: data durable, then their flags
                    if not ledger.sync and hasattr(out.arr, "flush"):
                        out.arr.flush()  # --no-sync: hand the mapped pages to the system (msync), no fsync
            except OSError:
                if not failed:
                    raise
            red, work = dist.allreduce_async(stats.as_list() + [failed])
            if work is not None:
                while not work.is_completed():
                    progress(0)
                    time.sleep(0.05)
                work.wait()
            run_s = time.perf_counter() - t_loop
            if not discard:
                bar.update(int(ledger.done().sum()))
            bar.close()
            ledger.close()
        if red[-1] > 0:
            if dist.rank == 0:
                raise RuntimeError("%d process(es) failed; the finished tiles are in the ledger: rerun with --resume"
                                   % int(red[-1]))
            return 2
        if dist.rank == 0:
            missing = int((~ledger.done()).sum())
            if missing:
                raise RuntimeError("%d tiles are missing from the ledger after the run; rerun with --resume" % missing)
            tio.finalize_output(args.output, ledger.dir)
            ledger.set_complete()
            tot = RunStats.from_list(red.tolist())
            wall = time.perf_counter() - t_start
            vox = float(np.prod(plan.sizes)) * plan.n_img
            report = {"processes": dist.world, "tiles": total, "tiles_run": tot.tiles_run,
                      "tiles_skipped": tot.tiles_skipped, "tiles_before": base, "read_s": tot.read_s,
                      "compute_s": tot.compute_s, "write_s": tot.write_s, "wall_s": wall, "run_s": run_s,
                      "voxels": vox, "voxels_per_s": vox * (len(todo) / max(total, 1)) / max(run_s, 1e-9)}
            if args.stats:
                import json
                with open(args.stats, "w") as f:
                    json.dump(report, f, indent=1)
            if not args.no_progress:
                print("%d tiles (%d run, %d skipped as empty, %d already done) by %d process(es) in %.1f s; read %.1f s, "
                      "compute %.1f s, write %.1f s (summed over processes)"
                      % (total, tot.tiles_run, tot.tiles_skipped, base, dist.world, wall, tot.read_s, tot.compute_s,
                         tot.write_s), file=sys.stderr)
    return 0
