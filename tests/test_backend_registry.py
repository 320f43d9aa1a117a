"""The one backend registry: every backend's function, epilogue flag and per-device fused kernels, and the
choice between a fused kernel and the backend's own function (backends.Impl)."""
import pytest
import torch

import medconv_ext  # noqa: F401  (registers the backends)
from medconv_ext import backends
from medconv_ext.ops import rolling_conv as RC
from medconv_ext.ops import rolling_conv_spectral as RS
from medconv_ext.ops import rolling_conv_spectral_cpu as SC


@pytest.mark.parametrize("op", [RC.OP, RC.OP_T])
def test_capabilities_list_fused_devices_and_epilogue(op):
    caps = backends.capabilities(op)
    assert {"reference", "spectral", "spectral_unfused"} <= set(caps)
    assert caps["reference"] == {"epilogue": False, "fused": {}}
    assert caps["spectral_unfused"] == {"epilogue": False, "fused": {}}
    spec = caps["spectral"]
    assert spec["epilogue"] is False  # the composition: the epilogue runs as torch ops after it
    assert spec["fused"]["cuda"] == {"epilogue": True}  # the Triton kernel, registered whether or not it runs
    assert ("cpu" in spec["fused"]) == SC.available()
    if SC.available():
        assert spec["fused"]["cpu"] == {"epilogue": True}


def test_register_fused_needs_the_backend():
    with pytest.raises(ValueError, match="no 'cuda' implementation"):
        backends.register_fused("no_such_op", "cuda", "cpu", print, lambda x, w: None)


def test_impl_picks_the_fused_kernel_where_it_runs_the_input(monkeypatch):
    """A fused kernel runs the inputs its supports accepts (epilogue in it where flagged); the backend's own
    function runs the others, with the epilogue as torch ops after it."""
    calls = []

    def fused(x, weight, bias, stride, padding, dilation, n_rolls, *, scale=None, shift=None, relu=False):
        calls.append(("fused", scale is not None, relu))
        return RS.rolling_conv_spectral(x, weight, bias, stride, padding, dilation, n_rolls)

    impl = backends._IMPLS[RC.OP]["spectral"]
    monkeypatch.setitem(impl.fused, "cpu", backends.Fused(fused, lambda x, w: None if x.dtype == torch.float64
                                                           else "float64 only", epilogue=True))
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    scale = torch.randn(8, dtype=torch.float64)
    assert RS._fused_for(x, w, False) is fused and RS._fused_for(x.float(), w.float(), False) is None
    assert impl.kernel(x.float(), w.float()) == (RS.rolling_conv_spectral, False)
    y = RC.rolling_conv2d(x, w, padding=1, backend="spectral", scale=scale, relu=True)
    assert calls == [("fused", True, True)]  # the epilogue was handed to the kernel (which ignored it here)
    torch.testing.assert_close(y, RC.rolling_conv2d(x, w, padding=1, backend="reference"))
    y32 = RC.rolling_conv2d(x.float(), w.float(), padding=1, backend="spectral", scale=scale.float(), relu=True)
    assert len(calls) == 1  # float32: the composition, epilogue after it
    ref = RC.rolling_conv2d(x, w, padding=1, backend="reference", scale=scale, relu=True)
    torch.testing.assert_close(y32, ref.float(), rtol=1e-5, atol=1e-5)
