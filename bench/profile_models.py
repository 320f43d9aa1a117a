"""Where the time of a whole model goes: torch.profiler over one Rolling UNet inference (one 512x512
slice, eval) and one Rolling QSMnet training step (width 16, batch 2 of 32^3, L1 + Adam), each in
the layout given (channels-last by default, the rolling models' faster layout), printed as a table
of time shares per layer kind / op:

  rolling conv by path and C_in   (fused kernel / composition (C_in > 256) / dense bank), epilogue
                                  noted where eval folds BatchNorm + ReLU into it
  rolling transposed up-sampling  by path and C_in
  dense convs                     first layer, 1x1 output, others; dense transposed up-sampling
  BatchNorm, ReLU, max-pool
  torch.cat                       the skip connections (aten::cat)
  layout copies                   aten::copy_ / clone / contiguous / to, with the layer they ran in
  loss, optimizer (training)

Every op's self time is charged to the innermost layer it ran in; backward ops (training) to the
layer whose forward op created their autograd node (profiler sequence numbers), marked "backward".
Shares are of the profiled wall time of the whole forward (or step).

    PYTHONPATH=. python bench/profile_models.py [--threads 2] [--quick] [--model rolling_unet ...]
        [--layout cl|nchw] [--size 512] [--adam default|foreach|fused] [--top N]

--quick profiles a 128x128 slice and width-8 QSMnet at batch 1 of 16^3 (a few seconds).
Any UNet-family builder of medconv_ext.models can be named: the dense and depthwise-separable
models give the same table for comparison.
"""
import argparse
import collections
import os
import platform
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from medconv_ext import models as M  # noqa: E402
from medconv_ext.nn import (RollingConv2d, RollingConv3d, RollingConvTranspose2d,  # noqa: E402
                            RollingConvTranspose3d)
from medconv_ext.models.unet import ConvUnit, FlattenedConv, SeparableConv  # noqa: E402
from medconv_ext.nn.fuse import can_fold  # noqa: E402

_TAG = "layer:"
_COPY_OPS = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to"}
_ROLL = (RollingConv2d, RollingConv3d)
_ROLL_T = (RollingConvTranspose2d, RollingConvTranspose3d)
_CONV = (nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm2d, nn.BatchNorm3d)
_POOL = (nn.MaxPool2d, nn.MaxPool3d)


def _layer_labels(model: nn.Module):
    """module -> label for the modules whose time the table separates (innermost wins)."""
    labels = {}
    # the convs inside a depthwise-separable / flattened conv count as that conv
    inner = {id(c) for m in model.modules() if isinstance(m, (SeparableConv, FlattenedConv)) for c in m.children()}
    first = out = None
    if isinstance(model, M.UNet):
        first = model.encoders[0][0].conv
        out = model.out
    # a hook on the rolling conv of a conv unit would make the unit call it as a module (no fused
    # BatchNorm + ReLU, no in-place concatenation): the unit's label covers it
    inner |= {id(u.conv) for u in model.modules() if isinstance(u, ConvUnit) and isinstance(u.conv, _ROLL)}
    for m in model.modules():
        if id(m) in inner:
            continue
        if isinstance(m, _ROLL):
            labels[m] = "rolling conv C_in=%d" % m.in_channels
        elif isinstance(m, _ROLL_T):
            labels[m] = "rolling transposed up-sampling C_in=%d" % m.in_channels
        elif isinstance(m, (SeparableConv, FlattenedConv)):
            labels[m] = "%s conv" % ("depthwise-separable" if isinstance(m, SeparableConv) else "flattened")
        elif isinstance(m, _CONV_T):
            labels[m] = "dense transposed up-sampling"
        elif isinstance(m, _CONV):
            labels[m] = ("dense first conv" if m is first else "dense 1x1 output conv" if m is out
                         else "dense conv C_in=%d" % m.in_channels)
        elif isinstance(m, _BN):
            labels[m] = "BatchNorm"
        elif isinstance(m, nn.ReLU):
            labels[m] = "ReLU"
        elif isinstance(m, _POOL):
            labels[m] = "max-pool"
        elif isinstance(m, ConvUnit) and isinstance(m.conv, _ROLL):
            # the unit's rolling conv (in eval one fused call with BN + ReLU, nn/fuse.py); BN and ReLU
            # modules, when called, label themselves (innermost wins)
            labels[m] = "rolling conv C_in=%d" % m.conv.in_channels
    return labels


def _attach(model: nn.Module):
    """Forward hooks that open a profiler range named after the layer; returns the hook handles."""
    handles = []
    for m, label in _layer_labels(model).items():
        def pre(mod, args, label=label):
            if isinstance(mod, ConvUnit) and not mod.training and can_fold(mod.conv, mod.bn):
                label = label + " [BN+ReLU fused]"
            rf = torch.profiler.record_function(_TAG + label)
            rf.__enter__()
            mod._prof_rf = rf

        def post(mod, args, out):
            rf = getattr(mod, "_prof_rf", None)
            if rf is not None:
                rf.__exit__(None, None, None)
                mod._prof_rf = None
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
        if isinstance(m, ConvUnit) and hasattr(m, "forward_cat"):
            # the decoder's first unit is called as unit.forward_cat(up, skip) (no module hooks): in eval
            # its rolling conv reads the pair in place
            def forward_cat(a, b, mod=m, orig=m.forward_cat, label=label):
                fused = not mod.training and can_fold(mod.conv, mod.bn)
                with torch.profiler.record_function(
                        _TAG + label + (" [BN+ReLU fused, cat in place]" if fused else " [cat in place]")):
                    return orig(a, b)
            m.forward_cat = forward_cat
    return handles


def _path(names):
    """Which implementation ran inside a rolling layer, from the op names under it."""
    if any(n.startswith("medconv::rolling_conv") and "spectral" in n for n in names):
        return "fused kernel"
    if any("fft" in n for n in names):
        return "composition (rFFT)"
    if any(n.startswith("medconv::") for n in names):
        return "compiled kernel"
    return "dense bank"


def _parents(e):
    p = e.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def _classify(prof, outer: str):
    """{row: [self_us, count]} and the total wall time (us) of the outer range."""
    events = prof.events()
    total_us = sum(e.time_range.elapsed_us() for e in events if e.name == outer)
    # forward scope of each event: the innermost layer range among its parents
    scope_of = {}

    def scope(e):
        key = id(e)
        if key in scope_of:
            return scope_of[key]
        p, s = e.cpu_parent, None
        while p is not None:
            if p.name.startswith(_TAG):
                s = p
                break
            p = p.cpu_parent
        scope_of[key] = s
        return s

    # the implementation each layer range ran (children's op names)
    names_under = collections.defaultdict(set)
    for e in events:
        s = scope(e)
        if s is not None:
            names_under[id(s)].add(e.name)

    def scope_label(s):
        lab = s.name[len(_TAG):]
        if lab.startswith("rolling"):
            base, _, c = lab.partition(" C_in=")
            c, _, extra = c.partition(" ")
            lab = "%s, %s, C_in=%s %s" % (base, _path(names_under[id(s)]), c, extra)
        return lab.strip()

    # forward layer of each autograd node (sequence number of the op that recorded it)
    seq_label = {}
    for e in events:
        if getattr(e, "sequence_nr", -1) >= 0 and not e.name.startswith("autograd::"):
            s = scope(e)
            if s is not None and e.sequence_nr not in seq_label:
                seq_label[e.sequence_nr] = scope_label(s)

    rows = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.name.startswith(_TAG) or e.name in ("model", "step") or e.name.startswith("mc:"):
            continue
        # enclosing named ranges
        p, in_opt, in_loss, bwd = e, False, False, None
        while p is not None:
            if p.name == "mc:optimizer":
                in_opt = True
            elif p.name == "mc:loss":
                in_loss = True
            elif p.name.startswith("autograd::engine::evaluate_function") and bwd is None:
                bwd = p
            p = p.cpu_parent
        if in_opt:
            row = "optimizer (Adam step, zero_grad)"
        elif bwd is not None:
            lab = seq_label.get(bwd.sequence_nr)
            node = bwd.name.split(": ", 1)[-1]
            if e.name in _COPY_OPS:
                row = "layout copies, backward"
            elif lab is None:
                row = "backward: %s" % ("torch.cat (CatBackward)" if node.startswith("Cat") else
                                        "loss" if node in ("AbsBackward0", "MeanBackward0", "SubBackward0")
                                        else "other (%s)" % node.split("::")[-1])
            else:
                row = "backward: " + lab
        elif in_loss:
            row = "loss (L1)"
        elif e.name == "aten::cat":
            s = scope(e)
            row = "torch.cat (in %s)" % scope_label(s) if s is not None else "torch.cat (skip connections)"
        elif e.name in _COPY_OPS:
            s = scope(e)
            row = "layout copies (in %s)" % (scope_label(s) if s is not None else "model body")
        else:
            s = scope(e)
            row = scope_label(s) if s is not None else "other (%s)" % e.name
        rows[row][0] += e.self_cpu_time_total
        # calls: op rows count their data-moving ops (aten::cat, aten::copy_), backward rows their autograd
        # nodes, layer rows their layer calls (below), the optimizer its steps
        if e.name in ("aten::cat", "aten::copy_") and not in_opt and bwd is None:
            rows[row][1] += 1
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function"):
            lab = seq_label.get(e.sequence_nr)
            row = ("backward: " + lab) if lab is not None else None
            if row in rows:
                rows[row][1] += 1
        elif e.name == "aten::copy_" and any(p.name.startswith("autograd::engine") for p in _parents(e)):
            if "layout copies, backward" in rows:
                rows["layout copies, backward"][1] += 1
        elif e.name.startswith(_TAG) and scope_label(e) in rows:
            rows[scope_label(e)][1] += 1
        elif e.name == "Optimizer.step#Adam.step" and "optimizer (Adam step, zero_grad)" in rows:
            rows["optimizer (Adam step, zero_grad)"][1] += 1
    return rows, total_us


def _print_table(title, rows, total_us, top):
    print(title)
    print("  %-84s %9s %7s %6s" % ("layer kind / op", "ms", "share", "calls"))
    acc = sum(v[0] for v in rows.values())
    items = sorted(rows.items(), key=lambda kv: -kv[1][0])
    shown = items if top is None else items[:top]
    for row, (us, n) in shown:
        print("  %-84s %9.2f %6.1f%% %6d" % (row[:84], us / 1e3, 100 * us / total_us, n))
    rest = items[len(shown):]
    if rest:
        us = sum(v[0] for _, v in rest)
        print("  %-84s %9.2f %6.1f%% %6s" % ("(%d more rows)" % len(rest), us / 1e3, 100 * us / total_us, ""))
    print("  %-84s %9.2f %6.1f%%" % ("profiled ops, sum of self times", acc / 1e3, 100 * acc / total_us))
    print("  %-84s %9.2f" % ("wall time of the whole %s (profiled)" % title.split(":")[0], total_us / 1e3))


def _fmt(dims, layout):
    if layout == "nchw":
        return torch.contiguous_format
    return torch.channels_last if dims == 2 else torch.channels_last_3d


def profile_infer(name, size, layout, top, reps=1):
    torch.manual_seed(0)
    model = getattr(M, name)().eval().to(memory_format=_fmt(2, layout))
    x = torch.randn(1, 1, size, size).contiguous(memory_format=_fmt(2, layout))
    _attach(model)
    with torch.inference_mode():
        model(x)  # warm-up
        t = time.perf_counter()
        model(x)
        plain = time.perf_counter() - t
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with torch.profiler.record_function("model"):
                model(x)
    rows, total = _classify(prof, "model")
    _print_table("%s inference: one %dx%d slice, eval, %s input (unprofiled run %.1f ms)"
                 % (name, size, size, "channels-last" if layout == "cl" else "NCHW", plain * 1e3), rows, total, top)


def make_step(model, x, y, adam):
    kw = {} if adam == "default" else {adam: True}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **kw)

    def step():
        with torch.profiler.record_function("mc:optimizer"):
            opt.zero_grad(set_to_none=True)
        out = model(x)
        with torch.profiler.record_function("mc:loss"):
            loss = (out - y).abs().mean()
        loss.backward()
        with torch.profiler.record_function("mc:optimizer"):
            opt.step()
    return step


def profile_train(name, features, batch, size, layout, adam, top):
    torch.manual_seed(0)
    model = getattr(M, name)(features=features).train().to(memory_format=_fmt(3, layout))
    x = torch.randn(batch, 1, size, size, size).contiguous(memory_format=_fmt(3, layout))
    y = torch.randn(batch, 1, size, size, size)
    _attach(model)
    step = make_step(model, x, y, adam)
    step()
    t = time.perf_counter()
    step()
    plain = time.perf_counter() - t
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("step"):
            step()
    rows, total = _classify(prof, "step")
    _print_table("%s training step: width %d, batch %d of %d^3, L1 + Adam (%s), %s input (unprofiled step %.1f ms)"
                 % (name, features, batch, size, adam, "channels-last" if layout == "cl" else "NCDHW",
                    plain * 1e3), rows, total, top)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes: runs in seconds")
    ap.add_argument("--model", action="append", help="builder name (repeatable); default: rolling_unet and "
                    "rolling_qsmnet")
    ap.add_argument("--layout", choices=("cl", "nchw"), default="cl")
    ap.add_argument("--size", type=int, default=None, help="2D slice size (default 512, --quick 128)")
    ap.add_argument("--adam", choices=("default", "foreach", "fused"), default="fused",
                    help="torch.optim.Adam implementation of the training step (default: fused)")
    ap.add_argument("--top", type=int, default=None, help="show only the N largest rows")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from medconv_ext.ops import rolling_conv_spectral_cpu as SC
    print("%s, %d threads, torch %s, fused kernel ISA %s, load average %.2f"
          % (platform.processor() or platform.machine(), a.threads, torch.__version__,
             SC.isa() if SC.available() else "n/a", os.getloadavg()[0]))
    size = a.size or (128 if a.quick else 512)
    feat, batch, vol = (8, 2, 16) if a.quick else (16, 2, 32)
    for name in a.model or ["rolling_unet", "rolling_qsmnet"]:
        if "qsmnet" in name:
            profile_train(name, feat, batch, vol, a.layout, a.adam, a.top)
        else:
            profile_infer(name, size, a.layout, a.top)
        print()
    print("load average after: %.2f" % os.getloadavg()[0])


if __name__ == "__main__":
    main()
