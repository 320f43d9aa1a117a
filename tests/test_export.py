"""Export of models using the package's operators: ONNX by plain torch.onnx.export(dynamo=True) (no
wrapper: the package's layers take the reference path while exporting, and its operators decompose)
and by medconv_ext.export.onnx_export (the translations of medconv_ext.export), each run by
onnxruntime against eager PyTorch; torch.export, torch.jit.trace of the functional API, the legacy
TorchScript-based ONNX exporter, and torch.jit.script (not supported: it raises). Small sizes: every
export takes seconds."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import medconv_ext as M
from medconv_ext import available_backends, export as E
from medconv_ext import models as Z
from medconv_ext.models import medic_seg, rolling_unet, set_backend
from medconv_ext.nn import (
    Involution2d,
    Involution3d,
    RollingConv2d,
    RollingConv3d,
    RollingConvTranspose2d,
    RollingConvTranspose3d,
)
from medconv_ext.ops import rolling_conv as RC

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

HAS_EXT = available_backends()["cpu"][0]


def _has_triton():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


class RawModules(nn.Module):
    """Every module kind of the package in one graph: 2D and 3D rolling convs (strided, dilated,
    'same' with an even kernel, reflect padding), transposed convs, involutions (with stride)."""

    def __init__(self, rolling_backend, involution_backend, involution3d_backend=None):
        super().__init__()
        rb, ib = rolling_backend, involution_backend
        ib3 = ib if involution3d_backend is None else involution3d_backend
        self.c2 = RollingConv2d(4, 8, 3, stride=2, padding=1, backend=rb)
        self.c2s = RollingConv2d(8, 4, (4, 3), padding="same", padding_mode="reflect", backend=rb, bias=False)
        self.t2 = RollingConvTranspose2d(4, 8, 3, stride=2, padding=1, output_padding=1, dilation=1, backend=rb)
        self.i2 = Involution2d(8, 3, stride=2, group_channels=4, reduction_ratio=2, backend=ib)
        self.c3 = RollingConv3d(3, 6, 3, padding=2, dilation=2, backend=rb)
        self.t3 = RollingConvTranspose3d(6, 3, 2, stride=2, backend=rb)
        self.i3 = Involution3d(3, 3, group_channels=1, reduction_ratio=3, backend=ib3)
        # awkward options: partial rolls with n_base 2, per-axis stride/padding/dilation, C_in = 1,
        # a transposed conv with dilation and no bias, a dilated involution
        self.e1 = RollingConv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), backend=rb)
        self.e2 = RollingConvTranspose2d(4, 6, (2, 3), stride=(1, 2), padding=(0, 1), output_padding=(0, 1),
                                         dilation=(2, 1), bias=False, backend=rb)
        self.e3 = RollingConv2d(1, 3, 3, padding=1, backend=rb)
        self.e4 = Involution2d(4, 3, dilation=2, group_channels=2, reduction_ratio=4, backend=ib)

    def forward(self, x2, x3):
        y2 = self.i2(self.t2(self.c2s(self.c2(x2))))
        y3 = self.i3(self.t3(self.c3(x3)))
        return y2, y3, self.e1(x2), self.e2(x2), self.e3(x2[:, :1]), self.e4(x2)


SCENARIOS = {
    # rolling: the spectral path (routed through the bank while exporting); involution: pure PyTorch
    "spectral": ("spectral", "reference"),
    # the compiled ops torch.ops.medconv.rolling_conv*, involution (custom translations)
    "compiled": ("cpu", "cpu"),
    # the Triton custom ops (custom translations); eager runs in the Triton interpreter on the CPU,
    # where the 3D involution kernel is slow (~10 s): that layer stays pure PyTorch (the 2D layer
    # runs the same op, whose translation does not depend on the dimension)
    "triton": ("triton", "triton", "reference"),
    # the compiled CUDA kernels (the same operators as "compiled"), on a machine with a CUDA device
    "cuda": ("cuda", "cuda"),
}
MEDCONV_TARGETS = {
    "compiled": {"rolling_conv", "rolling_conv_transpose", "involution"},
    "cuda": {"rolling_conv", "rolling_conv_transpose", "involution"},
    "triton": {"rolling_conv_triton", "rolling_conv_transpose_triton", "involution_triton"},
}


def _ort_run(model, inputs):
    """Run an ONNX model (path or serialized bytes) in onnxruntime on the CPU."""
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


def _op_types(program):
    return {(n.domain or "", n.op_type) for n in program.model_proto.graph.node}


def _assert_standard_onnx(program):
    """Only standard ONNX operators: no custom domains, no local functions left over."""
    domains = {d for d, _ in _op_types(program)}
    assert domains <= {"", "ai.onnx"}, domains
    assert len(program.model_proto.functions) == 0


def _medconv_targets(program):
    """Names of the medconv operators in an ONNXProgram's (or an ExportedProgram's) graph."""
    ep = getattr(program, "exported_program", program)
    return {n.target._opname for n in ep.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "medconv"}


def _check_onnx_against_eager(model, example, run_inputs, path, dynamic_shapes, targets, **kw):
    """Export with onnx_export to `path`, check the graph, run it in onnxruntime on `run_inputs`
    (another batch size than `example` where the batch axis is dynamic) against eager PyTorch."""
    prog = E.onnx_export(model, example, path, dynamic_shapes=dynamic_shapes, verbose=False, **kw)
    assert _medconv_targets(prog) == targets
    _assert_standard_onnx(prog)
    ops = {t for _, t in _op_types(prog)}
    assert "Conv" in ops and not ops & {"DFT", "STFT"}
    onnx.checker.check_model(onnx.load(path))
    # (on CUDA without TF32, which would round the eager convolutions to 10-bit mantissas)
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):
        eager = model(*run_inputs)
    got = _ort_run(path, run_inputs)
    assert len(got) == len(eager)
    for g, e in zip(got, eager):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e.cpu(), rtol=1e-4, atol=1e-4)
    return prog


class _MedconvOpsRun(TorchDispatchMode):
    """Records the names of the medconv operators an eager run dispatches (cheaper than torch.export)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", None) == "medconv":
            self.seen.add(func._opname)
        return func(*args, **(kwargs or {}))


def _eager_medconv_ops(model, inputs):
    with torch.no_grad(), _MedconvOpsRun() as rec:
        model(*inputs)
    return rec.seen


def _assert_matches_eager(onnx_path, model, run_inputs):
    """onnxruntime on `run_inputs` against eager PyTorch, float32 tolerances (the models run in float32)."""
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):
        eager = model(*run_inputs)
    eager = eager if isinstance(eager, tuple) else (eager,)
    got = _ort_run(onnx_path, run_inputs)
    assert len(got) == len(eager)
    for g, e in zip(got, eager):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e.cpu(), rtol=1e-4, atol=1e-4)


def _check_plain_onnx(model, example, run_inputs, path, dynamic_shapes=None):
    """torch.onnx.export(model, example, path, dynamo=True): no wrapper, no translation table. The graph
    must hold standard ONNX operators only and reproduce eager PyTorch in onnxruntime."""
    prog = torch.onnx.export(model, example, path, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
    assert _medconv_targets(prog) == set()  # the layers took their reference path while exporting
    _assert_standard_onnx(prog)
    onnx.checker.check_model(onnx.load(path))
    _assert_matches_eager(path, model, run_inputs)
    return prog


def _scenario_device(scenario, monkeypatch):
    """The device a RawModules scenario runs on; skips where its backend is missing."""
    if scenario == "compiled" and not HAS_EXT:
        pytest.skip("compiled extension not built")
    if scenario == "cuda":
        if not available_backends()["cuda"][0]:
            pytest.skip("no CUDA kernels or no CUDA device: " + available_backends()["cuda"][1])
        return "cuda"
    if scenario == "triton":
        if not _has_triton():
            pytest.skip("triton not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


@pytest.mark.parametrize("scenario", ["compiled", "triton", "cuda"])
def test_plain_torch_onnx_export_raw_modules(scenario, monkeypatch, tmp_path):
    """torch.onnx.export(model, args, f, dynamo=True) of every module kind on every backend (the
    compiled and Triton operators included), with a dynamic batch axis."""
    device = _scenario_device(scenario, monkeypatch)
    torch.manual_seed(10)
    model = RawModules(*SCENARIOS[scenario]).eval().to(device)
    example = (torch.randn(2, 4, 9, 7, device=device), torch.randn(2, 3, 5, 4, 5, device=device))
    run = (torch.randn(3, 4, 9, 7, device=device), torch.randn(3, 3, 5, 4, 5, device=device))
    if scenario in MEDCONV_TARGETS:  # the eager model really runs the package's operators
        assert _eager_medconv_ops(model, example) == MEDCONV_TARGETS[scenario]
    batch = torch.export.Dim("batch", min=1, max=8)
    _check_plain_onnx(model, example, run, str(tmp_path / "raw.onnx"), ({0: batch}, {0: batch}))


class Zoo(nn.Module):
    """Small instances of every builder of medconv_ext.models that holds the package's layers, in one
    graph (one export covers them all), on the automatic backends: eval mode, so the U-Nets fold
    BatchNorm + ReLU into their rolling layers (the fused spectral operator where the compiled
    extension is built), the Med-IC involution takes the compiled operator. (The other builders,
    unet, depthwise_/flattened_unet, qsmnet and its depthwise/flattened variants, resnet18 and
    valid_srnet, hold torch layers only: torch's exporter handles them as any torch model.)"""

    def __init__(self):
        super().__init__()
        self.unet = Z.rolling_unet(in_channels=1, num_classes=2, features=2)
        self.qsm = Z.rolling_qsmnet(in_channels=1, out_channels=1, features=1)
        self.resnet = Z.rolling_resnet18(num_classes=3, features=2)
        self.medic_cls = Z.medic_cls(3, 4, features=2)
        self.medic_seg = Z.medic_seg(3, 2, features=2, convs_per_block=1)

    def forward(self, a2, a3, rgb32, rgb28):
        return (self.unet(a2), self.qsm(a3), self.resnet(rgb32), self.medic_cls(rgb28), self.medic_seg(rgb32))


def _zoo_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 1, 32, 16), (1, 1, 16, 16, 16), (1, 3, 32, 32), (1, 3, 28, 28)]
    return tuple(torch.randn(s, generator=g) for s in shapes)


def test_plain_torch_onnx_export_every_zoo_model(tmp_path):
    torch.manual_seed(11)
    model = Zoo().eval()
    example = _zoo_inputs(0)
    if HAS_EXT:  # the eager zoo runs the package's compiled operators (involution, fused spectral)
        held = _eager_medconv_ops(model, example)
        assert "involution" in held and any(t.startswith("rolling_conv_spectral") for t in held), held
    _check_plain_onnx(model, example, _zoo_inputs(1), str(tmp_path / "zoo.onnx"))


def test_plain_torch_onnx_export_of_an_exported_program(tmp_path):
    """An ExportedProgram that holds the package's operators (torch.export keeps them, the fused
    spectral one included) exports by plain torch.onnx.export: the registered decompositions."""
    torch.manual_seed(12)
    model = nn.Sequential(RollingConv2d(4, 8, 3, padding=1, backend="spectral"), nn.ReLU(),
                          RollingConvTranspose2d(8, 4, 2, stride=2, backend="reference"),
                          RollingConv2d(4, 4, 3, padding=1, backend="cpu" if HAS_EXT else "reference"),
                          Involution2d(4, 3, group_channels=2, reduction_ratio=2,
                                       backend="cpu" if HAS_EXT else "reference")).eval()
    x = torch.randn(2, 4, 7, 6)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    held = _medconv_targets(ep)
    if HAS_EXT:
        assert {"rolling_conv", "involution"} <= held and any(t.startswith("rolling_conv_spectral") for t in held)
    path = str(tmp_path / "ep.onnx")
    prog = torch.onnx.export(ep, (x,), path, dynamo=True, verbose=False)
    _assert_standard_onnx(prog)
    _assert_matches_eager(path, model, (torch.randn(3, 4, 7, 6),))


def test_decompositions_cover_every_forward_op():
    table = E.decompositions()
    names = {t._opname for t in table}
    assert {"rolling_conv_triton", "rolling_conv_transpose_triton", "involution_triton"} <= names
    if HAS_EXT:
        assert {"rolling_conv", "rolling_conv_transpose", "involution", "rolling_conv_spectral",
                "rolling_conv_transpose_spectral", "rolling_conv_spectral_cat"} <= names
    from torch._decomp import decomposition_table
    assert all(decomposition_table[t] is fn for t, fn in table.items())


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_decompositions_equal_the_operators():
    """Each decomposition computes what its operator computes (float64, awkward options)."""
    torch.manual_seed(13)
    d = E.decompositions()
    x, w, b = torch.randn(2, 5, 7, 6, dtype=torch.float64), torch.randn(2, 5, 3, 2, dtype=torch.float64), None
    ops = torch.ops.medconv
    args = (x, w, b, [2, 1], [1, 0], [1, 2], 3)
    torch.testing.assert_close(d[ops.rolling_conv.default](*args), ops.rolling_conv(*args))
    wt, bt = torch.randn(5, 2, 2, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    args = (x, wt, bt, [2, 1], [0, 1], [1, 0], [1, 1], 3)
    torch.testing.assert_close(d[ops.rolling_conv_transpose.default](*args), ops.rolling_conv_transpose(*args))
    scale, shift = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    ws = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    args = (x, ws, torch.randn(10, dtype=torch.float64), scale, shift, True, [1, 1], [1, 1], [1, 1], 5)
    torch.testing.assert_close(d[ops.rolling_conv_spectral.default](*args), ops.rolling_conv_spectral(*args))
    args = (x[:, :2], x[:, 2:], *args[1:])  # the channel concatenation read from two tensors
    torch.testing.assert_close(d[ops.rolling_conv_spectral_cat.default](*args), ops.rolling_conv_spectral_cat(*args))
    wi = torch.randn(2, 1, 3, 3, 4, 3, dtype=torch.float64)  # G = 1, K 3, stride 2, padding 1 on 7x6
    args = (torch.randn(2, 4, 7, 6, dtype=torch.float64), wi, [3, 3], [2, 2], [1, 1], [1, 1])
    torch.testing.assert_close(d[ops.involution.default](*args), ops.involution(*args))


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_registered_decompositions_leave_torch_export_and_compile_alone():
    """torch.export (dynamic batch) and torch.compile (dynamic shapes) keep the compiled operators."""
    torch.manual_seed(14)
    model = nn.Sequential(RollingConv2d(4, 8, 3, padding=1, backend="cpu"),
                          Involution2d(8, 3, group_channels=4, reduction_ratio=2, backend="cpu")).eval()
    x = torch.randn(2, 4, 7, 6)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    assert _medconv_targets(ep) == {"rolling_conv", "involution"}
    assert _medconv_targets(ep.run_decompositions()) == {"rolling_conv", "involution"}
    seen = set()

    def backend(gm, inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    cm = torch.compile(model, backend=backend, dynamic=True)
    y = torch.randn(3, 4, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(cm(y), model(y))
    assert any("medconv.rolling_conv" in t for t in seen) and any("medconv.involution" in t for t in seen), seen


@pytest.mark.parametrize("scenario", ["compiled", "triton", "cuda"])
def test_onnx_raw_modules_custom_ops(scenario, monkeypatch, tmp_path):
    """The compiled and the Triton custom ops through their translations."""
    device = _scenario_device(scenario, monkeypatch)
    torch.manual_seed(0)
    model = RawModules(*SCENARIOS[scenario]).eval().to(device)
    example = (torch.randn(2, 4, 9, 7, device=device), torch.randn(2, 3, 5, 4, 5, device=device))
    run = (torch.randn(1, 4, 9, 7, device=device), torch.randn(1, 3, 5, 4, 5, device=device))
    batch = torch.export.Dim("batch", min=1, max=8)
    _check_onnx_against_eager(model, example, run, str(tmp_path / "raw.onnx"), ({0: batch}, {0: batch}),
                              MEDCONV_TARGETS[scenario])


class ModelsAndSpectralPath(nn.Module):
    """In one graph, so that one export covers them: every module kind with the rolling layers on
    the spectral backend (exported through the bank), the Rolling UNet (every rolling layer on the
    spectral backend) and the Med-IC segmenter (its involution on the automatic backend: the
    compiled op where built)."""

    def __init__(self):
        super().__init__()
        self.raw = RawModules(*SCENARIOS["spectral"])
        self.unet = set_backend(rolling_unet(in_channels=1, num_classes=3, features=4), "spectral")
        self.medic = medic_seg(in_channels=3, num_classes=2, features=2, convs_per_block=1)

    def forward(self, x2, x3, a, b):
        return self.raw(x2, x3) + (self.unet(a), self.medic(b))


def test_onnx_rolling_unet_medic_segmenter_and_spectral_path(tmp_path):
    torch.manual_seed(1)
    model = ModelsAndSpectralPath().eval()
    example = (torch.randn(2, 4, 9, 7), torch.randn(2, 3, 5, 4, 5),
               torch.randn(1, 1, 32, 48), torch.randn(1, 3, 32, 32))
    run = (torch.randn(3, 4, 9, 7), torch.randn(3, 3, 5, 4, 5)) + example[2:]
    batch = torch.export.Dim("batch", min=1, max=8)
    _check_onnx_against_eager(model, example, run, str(tmp_path / "models.onnx"),
                              ({0: batch}, {0: batch}, None, None), {"involution"} if HAS_EXT else set())


def test_onnx_export_needs_dynamo():
    with pytest.raises(ValueError, match="dynamo=True"):
        E.onnx_export(RollingConv2d(3, 6, 3), (torch.randn(1, 3, 8, 8),), dynamo=False)


def test_translation_table_covers_every_forward_op():
    table = E.onnx_translation_table()
    names = {t._opname for t in table}
    assert {"rolling_conv_triton", "rolling_conv_transpose_triton", "involution_triton"} <= names
    if HAS_EXT:
        assert {"rolling_conv", "rolling_conv_transpose", "involution"} <= names
    assert all(isinstance(t, torch._ops.OpOverload) for t in table)


def test_export_mode_routes_spectral_only_while_exporting():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(2, 4, 3, 3)
    assert not E.is_exporting()
    assert RC._choose(RC.OP, x, w, "spectral", False, 4)[0] == "spectral"
    with E.exporting():
        assert E.is_exporting()
        assert RC._choose(RC.OP, x, w, "spectral", False, 4)[0] == "reference"
        assert RC._choose(RC.OP, x, w, "spectral_unfused", False, 4)[0] == "reference"
        assert RC._choose(RC.OP_T, x, w.transpose(0, 1), "spectral", True, 4)[0] == "reference"
        if HAS_EXT:  # other explicit choices are kept (they have translations)
            assert RC._choose(RC.OP, x, w, "cpu", False, 4)[0] == "cpu"
    assert not E.is_exporting()


def test_legacy_onnx_exporter_spectral_path(tmp_path):
    """The TorchScript-based exporter (dynamo=False) traces: the spectral path takes the bank."""
    model = RollingConv2d(4, 8, 3, padding=1, backend="spectral").eval()
    x = torch.randn(1, 4, 7, 7)
    path = str(tmp_path / "legacy.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_legacy_onnx_exporter_compiled_ops(tmp_path):
    """The TorchScript-based exporter has no translation of the compiled operators; while it runs the
    layers take their reference path, so a model on the compiled backends exports as well."""
    torch.manual_seed(15)
    model = nn.Sequential(RollingConv2d(8, 8, 3, padding=1, backend="cpu"),
                          Involution2d(8, 3, group_channels=4, backend="cpu")).eval()
    x = torch.randn(1, 8, 7, 7)
    path = str(tmp_path / "x.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False)
    _assert_matches_eager(path, model, (x,))


# ---------------------------------------------------------------------------------------------
# torch.export, torch.jit.trace, torch.jit.script
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_torch_export_raw_modules_compiled():
    torch.manual_seed(3)
    model = RawModules(*SCENARIOS["compiled"]).eval()
    x2, x3 = torch.randn(2, 4, 9, 7), torch.randn(2, 3, 5, 4, 5)
    ep = torch.export.export(model, (x2, x3))
    assert _medconv_targets(ep) == MEDCONV_TARGETS["compiled"]
    y2, y3 = torch.randn(2, 4, 9, 7), torch.randn(2, 3, 5, 4, 5)
    with torch.no_grad():
        for g, e in zip(ep.module()(y2, y3), model(y2, y3)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_torch_export_spectral_path_stays_spectral():
    """torch.export alone keeps the spectral algorithm (the fused spectral op on the CPU, else the
    inverse channel FFT of the composition, is in the graph); the pure-PyTorch involution exports as is."""
    torch.manual_seed(3)
    model = nn.Sequential(RollingConv2d(4, 8, 3, padding=1, backend="spectral"),
                          RollingConvTranspose2d(8, 4, 2, stride=2, backend="spectral"),
                          Involution2d(4, 3, group_channels=2, reduction_ratio=2, backend="reference")).eval()
    x = torch.randn(2, 4, 7, 6)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("rolling_conv_spectral" in t or "fft_irfft" in t for t in targets), targets
    assert not any(t.startswith("aten.index") or t.startswith("aten.roll") for t in targets), targets  # no bank
    y = torch.randn(2, 4, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(y), model(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "reference", "spectral"])
def test_jit_trace_functional_without_n_rolls(backend):
    torch.manual_seed(4)
    cases = [
        (M.rolling_conv2d, torch.randn(2, 6, 7, 5), torch.randn(2, 6, 3, 3), dict(padding=1, stride=2)),
        (M.rolling_conv3d, torch.randn(1, 3, 4, 5, 3), torch.randn(1, 3, 3, 1, 3), dict(padding=1)),
        (M.rolling_conv_transpose2d, torch.randn(2, 5, 4, 3), torch.randn(5, 2, 3, 3), dict(stride=2)),
        (M.rolling_conv_transpose3d, torch.randn(1, 4, 2, 3, 2), torch.randn(4, 1, 2, 2, 2), dict(stride=2)),
    ]
    for fn, x, w, kw in cases:
        def f(x, w):
            return fn(x, w, backend=backend, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings of the shape checks, trace deprecation
            traced = torch.jit.trace(f, (x, w))
        assert "fft" not in str(traced.graph)
        x2, w2 = torch.randn_like(x), torch.randn_like(w)
        got, ref = traced(x2, w2), f(x2, w2)
        assert got.shape == ref.shape and (got - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_jit_script_is_not_supported():
    """TorchScript scripting is not supported (Python backend dispatch): it raises, never misbehaves."""
    with pytest.raises(Exception):
        torch.jit.script(RollingConv2d(3, 6, 3))
    with pytest.raises(Exception):
        torch.jit.script(Involution2d(4, 3, group_channels=4, reduction_ratio=2))


@pytest.mark.parametrize("scenario", ["auto", "spectral", "compiled"])
def test_jit_trace_modules(scenario):
    if scenario == "compiled" and not HAS_EXT:
        pytest.skip("compiled extension not built")
    torch.manual_seed(5)
    model = RawModules(*SCENARIOS.get(scenario, ("auto", "auto"))).eval()
    x2, x3 = torch.randn(2, 4, 9, 7), torch.randn(2, 3, 5, 4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # check_trace=False: its re-trace differs from the first only in value names (c_in.5 vs c_in.3)
        traced = torch.jit.trace(model, (x2, x3), check_trace=False)
    y2, y3 = torch.randn_like(x2), torch.randn_like(x3)
    with torch.no_grad():
        for g, e in zip(traced(y2, y3), model(y2, y3)):
            # float32; the traced spectral layers are the bank: max |err| / max |ref| as the spectral tests
            assert g.shape == e.shape
            assert (g - e).abs().max() <= 2e-5 * e.abs().max()


