"""Learned-filter analysis: known answers, bad input, the report CLI."""
import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from medconv_ext import analysis as A
from medconv_ext.analysis.__main__ import main as cli_main
from medconv_ext.nn import RollingConv2d, RollingConvTranspose2d


def _net(c=8):
    return nn.Sequential(nn.Conv2d(2, c, 3), nn.ReLU(), RollingConv2d(c, 2 * c, 3), nn.ReLU(),
                         nn.Conv2d(2 * c, c, 1), RollingConvTranspose2d(c, c // 2, 3))


def _conv_with(weight):
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return nn.Sequential(conv)


def test_extract_filters_layout_and_rolling_expansion():
    net = _net()
    f, meta = A.extract_filters(net)
    # conv 0: 8*2 kernels, rolling conv: 16*8 expanded; the 1x1 conv and the transposed conv are skipped
    assert f.shape == (8 * 2 + 16 * 8, 9)
    assert len(meta) == f.shape[0]
    assert set(meta["layer"]) == {"0", "2"}
    assert meta["depth"][0] == 0.0 and meta["depth"][-1] == 1.0
    expanded = net[2].expanded_weight().detach().double().reshape(-1, 9).numpy()
    np.testing.assert_array_equal(f[16:], expanded)
    o, c = meta["out"][16 + 37], meta["in"][16 + 37]
    np.testing.assert_array_equal(f[16 + 37], net[2].expanded_weight()[o, c].detach().double().reshape(-1).numpy())
    # transposed convs on request, in (out, in) order
    f2, meta2 = A.extract_filters(net, include_transposed=True)
    assert f2.shape[0] == f.shape[0] + 4 * 8
    wt = net[5].expanded_weight().detach().double().transpose(0, 1).reshape(-1, 9).numpy()
    np.testing.assert_array_equal(f2[f.shape[0]:], wt)


def test_extract_filters_from_state_dict_matches_module():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 5))
    f_mod, _ = A.extract_filters(net)
    f_sd, meta = A.extract_filters({"state_dict": net.state_dict()})
    np.testing.assert_array_equal(f_mod, f_sd)
    assert f_sd.shape == (4 + 16, 9)
    f5, _ = A.extract_filters(net, kernel_size=5)
    assert f5.shape == (8, 25)


def test_normalize_maxabs_keeps_zero_kernels():
    f = np.array([[0.0] * 9, [1, -4, 2, 0, 0, 0, 0, 0, 0]], dtype=float)
    n = A.normalize_maxabs(f)
    np.testing.assert_array_equal(n[0], 0)
    assert np.abs(n[1]).max() == 1.0 and n[1][1] == -1.0


def test_basis_is_orthonormal_and_ordered():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((3000, 9)) * np.linspace(3, 0.2, 9)
    b = A.FilterBasis.fit(f)
    np.testing.assert_allclose(b.components @ b.components.T, np.eye(9), atol=1e-10)
    assert np.all(np.diff(b.explained_variance) <= 1e-12)
    assert math.isclose(b.explained_variance_ratio.sum(), 1.0, rel_tol=1e-12)
    assert b.basis_images().shape == (9, 3, 3)
    coef = b.coefficients(f)
    assert coef.shape == (3000, 9)
    # coefficients reconstruct the normalised kernels exactly (full basis)
    np.testing.assert_allclose(coef @ b.components + b.mean, A.normalize_maxabs(f), atol=1e-10)


def test_kl_identical_sets_zero_and_symmetric():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((4000, 9))
    b = rng.standard_normal((3000, 9)) * np.array([2.0] + [1.0] * 8) + 0.3
    assert A.kl_shift(a, a) == 0.0
    assert A.kl_shift(a, a.copy(), weights="uniform") == 0.0
    ab, ba = A.kl_shift(a, b), A.kl_shift(b, a)
    assert ab > 0.01
    assert ab == ba
    basis = A.FilterBasis.fit(np.concatenate([a, b]))
    assert A.kl_shift(a, b, basis=basis, weights="uniform") == A.kl_shift(b, a, basis=basis, weights="uniform")
    # more different sets have a larger shift
    c = rng.standard_normal((3000, 9)) * np.array([4.0] + [1.0] * 8) + 0.6
    assert A.kl_shift(a, c, basis=basis) > A.kl_shift(a, b, basis=basis)


def test_kl_hand_computed_one_component():
    # Two components are enough to check the histogram recipe by hand on a fixed basis:
    # identity basis, mean zero, explicit range, 2 bins.
    basis = A.FilterBasis(np.zeros(9), np.eye(9)[:1], np.array([1.0]))
    a = np.zeros((4, 9))
    a[:, 0] = [-1, -1, -1, 1]  # normalised: unchanged (max abs 1)
    b = np.zeros((4, 9))
    b[:, 0] = [-1, 1, 1, 1]
    p = np.array([0.75, 0.25])
    q = np.array([0.25, 0.75])
    expected = np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p))
    got = A.kl_shift(a, b, basis=basis, bins=2, range=(-1.0, 1.0))
    assert math.isclose(got, expected, rel_tol=1e-12)
    # an empty bin is set to float32 eps and renormalised
    c = np.zeros((4, 9))
    c[:, 0] = [1, 1, 1, 1]
    eps = float(np.finfo(np.float32).eps)
    pc = np.array([eps, 1.0]) / (1 + eps)
    expected_c = np.sum(p * np.log(p / pc)) + np.sum(pc * np.log(pc / p))
    assert math.isclose(A.kl_shift(a, c, basis=basis, bins=2, range=(-1.0, 1.0)), expected_c, rel_tol=1e-12)


def test_layer_stats_known_answers():
    # all-zero layer: sparsity 1, entropy 0 (no variance), never NaN
    zero = _conv_with(torch.zeros(4, 3, 3, 3))
    (row,) = A.layer_stats(zero)
    assert row["sparsity"] == 1.0 and row["variance_entropy"] == 0.0 and row["n_kernels"] == 12
    assert not math.isnan(row["orthogonality"])
    # orthonormal filters: orthogonality 1
    q, _ = torch.linalg.qr(torch.randn(27, 6, dtype=torch.float64))
    (row,) = A.layer_stats(_conv_with(q.T.reshape(6, 3, 3, 3)))
    assert math.isclose(row["orthogonality"], 1.0, abs_tol=1e-12)
    # identical filters: orthogonality 0
    w = torch.randn(1, 2, 3, 3).repeat(5, 1, 1, 1)
    (row,) = A.layer_stats(_conv_with(w))
    assert math.isclose(row["orthogonality"], 0.0, abs_tol=1e-6)
    # rank-1 layer (every kernel a multiple of one kernel): finite entropy 0
    v = torch.randn(9, dtype=torch.float64)
    w = (torch.randn(8, 4, 1, dtype=torch.float64) * v).reshape(8, 4, 3, 3)
    (row,) = A.layer_stats(_conv_with(w))
    assert math.isfinite(row["variance_entropy"]) and abs(row["variance_entropy"]) < 1e-9
    # random Gaussian kernels: entropy near log10(9)
    (row,) = A.layer_stats(_conv_with(torch.randn(64, 64, 3, 3, dtype=torch.float64)))
    assert abs(row["variance_entropy"] - math.log10(9)) < 0.01
    assert row["sparsity"] == 0.0
    # half the kernels tiny (below max/100): sparsity 1/2
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    w[:2] *= 1e-4
    w[2:] = w[2:].sign() * (w[2:].abs() + 1.0)
    (row,) = A.layer_stats(_conv_with(w))
    assert row["sparsity"] == 0.5


def test_layer_stats_keys_and_rolling_layers():
    rows = A.layer_stats(_net())
    assert [r["layer"] for r in rows] == ["0", "2"]
    for r in rows:
        assert set(r) >= {"layer", "n_kernels", "sparsity", "variance_entropy", "orthogonality"}
    assert rows[1]["n_kernels"] == 16 * 8


def test_bad_input_messages():
    with pytest.raises(A.AnalysisError, match="no 2D convolution with 3x3"):
        A.extract_filters(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(4, 2)))
    with pytest.raises(A.AnalysisError, match="no convolution layer with a spatial kernel"):
        A.layer_stats(nn.Sequential(nn.Conv2d(3, 4, 1)))
    with pytest.raises(A.AnalysisError, match="unknown checkpoint layout"):
        A.extract_filters([1, 2, 3])
    w = torch.randn(4, 3, 3, 3)
    w[1, 2, 0, 0] = float("nan")
    with pytest.raises(A.AnalysisError, match="non-finite"):
        A.extract_filters(_conv_with(w))
    w[1, 2, 0, 0] = float("inf")
    with pytest.raises(A.AnalysisError, match="non-finite"):
        A.layer_stats(_conv_with(w))
    with pytest.raises(A.AnalysisError, match="NaN or Inf"):
        A.kl_shift(np.full((3, 9), np.nan), np.zeros((3, 9)))
    with pytest.raises(A.AnalysisError, match="different kernel sizes"):
        A.kl_shift(np.zeros((3, 9)), np.zeros((3, 25)))


def _save(model, path):
    torch.save(model.state_dict(), path)
    return str(path)


def test_cli_writes_every_file(tmp_path):
    torch.manual_seed(3)
    a = _save(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)), tmp_path / "a.pt")
    b = _save(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3)), tmp_path / "b.pt")
    out = tmp_path / "report"
    assert cli_main(["report", a, b, "--out", str(out)]) == 0
    names = set(os.listdir(out))
    assert names == {"ridge_a.png", "ridge_b.png", "coefficients_overlay.png", "basis.png", "kl_heatmap.png",
                     "summary.md", "summary.json"}
    for n in names:
        assert (out / n).stat().st_size > 100
        if n.endswith(".png"):
            assert (out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "summary.json").read_text())
    assert s["kl_shift"]["labels"] == ["a", "b"]
    m = np.array(s["kl_shift"]["matrix"])
    assert m[0, 0] == 0 and m[0, 1] == m[1, 0] > 0
    assert [r["layer"] for r in s["models"][1]["layers"]] == ["0", "1"]
    assert "| layer | kernel |" in (out / "summary.md").read_text()


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    good = _save(nn.Sequential(nn.Conv2d(1, 4, 3)), tmp_path / "good.pt")
    nan_model = nn.Sequential(nn.Conv2d(1, 4, 3))
    with torch.no_grad():
        nan_model[0].weight[0, 0, 0, 0] = float("nan")
    bad = _save(nan_model, tmp_path / "bad.pt")
    torch.save({"step": 3}, tmp_path / "weird.pt")
    one_by_one = _save(nn.Sequential(nn.Conv2d(1, 4, 1)), tmp_path / "pointwise.pt")
    for args, msg in [([good, bad], "non-finite"), ([good, str(tmp_path / "weird.pt")], "unknown checkpoint layout"),
                      ([good, one_by_one], "no 2D convolution"), ([str(tmp_path / "missing.pt")], "no such checkpoint"),
                      ([good, "--model", "no_such_model"], "unknown model")]:
        out = tmp_path / ("out_" + msg.replace(" ", "_"))
        assert cli_main(["report", *args, "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()


def test_published_checkpoint_expands_rolling_bases():
    from conftest import data_file, data_missing

    why = data_missing("segment.pth")
    if why:
        pytest.skip(why)
    path = data_file("segment.pth")
    from medconv_ext.models import from_published

    sd = torch.load(path, map_location="cpu", weights_only=True)
    f, meta = A.extract_filters(sd)
    model = from_published(path)
    convs = [(n, m) for n, m in model.named_modules() if (hasattr(m, "expanded_weight") and not m._transposed)
             or (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))]
    assert f.shape[0] == sum(m.out_channels * m.in_channels for _, m in convs)
    # weight_20 is a double roll of a 64-channel base: 128 x 64 kernels, each a rolled base slice
    base = sd["weight_20"].double()
    name = [n for n, m in convs if tuple(m.weight.shape) == tuple(base.shape)][0]
    rows = np.nonzero(meta["layer"] == name)[0]
    assert len(rows) == 128 * 64
    for j in (0, 1, 777, 8191):
        o, c = meta["out"][rows[j]], meta["in"][rows[j]]
        r, b = divmod(int(o), 2)
        np.testing.assert_array_equal(f[rows[j]], base[b, (c - r) % 64].reshape(-1).numpy())


def test_state_dict_layers_told_apart_by_their_bias():
    """A bare state dict does not say which layers roll or are transposed: the bias count decides where only
    one kind fits, and a count that both fit is refused with a pointer to the module path."""
    torch.manual_seed(5)
    # rolling: 3 bases x 4 rolls over C_in = 5 (a transposed conv's bias count would be a multiple of 5)
    sd = {"r.weight": torch.randn(3, 5, 3, 3), "r.bias": torch.randn(12)}
    f_sd, _ = A.extract_filters(sd)
    from medconv_ext.reference.rolling_conv import expand_rolling_weight
    want = expand_rolling_weight(sd["r.weight"], 4).double().reshape(-1, 9).numpy()
    np.testing.assert_array_equal(f_sd, want)
    # a transposed conv found by its bias (C_in 8 > C_out 4: no rolling layer has fewer outputs than bases)
    up = nn.ConvTranspose2d(8, 4, 3)
    sd = {"up_conv.weight": up.weight.detach(), "up_conv.bias": up.bias.detach(),
          "c.weight": torch.randn(4, 2, 3, 3), "c.bias": torch.randn(4)}
    assert [r["layer"] for r in A.layer_stats(sd)] == ["c"]
    assert [r["layer"] for r in A.layer_stats(sd, include_transposed=True)] == ["up_conv", "c"]
    for nbias in (7, 0):  # a bias count no convolution has
        with pytest.raises(A.AnalysisError, match="fits no convolution"):
            A.extract_filters({"a.weight": torch.randn(3, 5, 3, 3), "a.bias": torch.randn(nbias)})
    # the package's rolling model: its full-roll layers fit both kinds, so the state dict is refused
    from medconv_ext import models
    m = models.rolling_unet(features=4)
    with pytest.raises(A.AnalysisError, match="--model NAME --weights PATH"):
        A.extract_filters(m.state_dict())
    # a dense UNet's state dict: its up-sampling (transposed, bias) is no longer read as a conv
    u = models.unet(features=4)
    names_sd = [r["layer"] for r in A.layer_stats(u.state_dict())]
    names_mod = [r["layer"] for r in A.layer_stats(u)]
    assert names_sd == names_mod


def test_kl_of_coefficients_equal_up_to_rounding_is_zero():
    """Kernels that are positive multiples of one kernel normalise to the same kernel up to rounding: their
    coefficients spread over a few ulps, which numpy cannot cut into bins. KL 0, no numpy error."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=g)
    p = (u * (torch.rand(16, 1, 1, 1, dtype=torch.float64, generator=g) + 0.5)).reshape(16, 9).numpy()
    q = (u * (torch.rand(16, 1, 1, 1, dtype=torch.float64, generator=g) + 0.5)).reshape(16, 9).numpy()
    other = torch.randn(64, 9, dtype=torch.float64, generator=g).numpy()
    basis = A.FilterBasis.fit(np.concatenate([p, q, other]))
    assert A.kl_shift(p, q, basis=basis) == 0.0
    assert A.kl_shift(p, other, basis=basis) > 0


def test_layer_statistics_are_scale_free():
    """Orthogonality and variance entropy do not depend on the weights' scale, down to 1e-170 and up to 1e160."""
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ker = w.reshape(-1, 9).numpy()
    o, e = A.orthogonality(w), A.variance_entropy(ker)
    assert 0 < o < 1 and 0 < e < math.log10(9)
    for s in (1e-170, 1e160):
        assert A.orthogonality(w * s) == pytest.approx(o, rel=1e-12)
        assert A.variance_entropy(ker * s) == pytest.approx(e, rel=1e-9)


def test_argument_errors_are_clear():
    f = np.random.default_rng(0).normal(size=(20, 9))
    for bad in (0, -1, 3.5, True):
        with pytest.raises(A.AnalysisError, match="n_components must be a positive int"):
            A.FilterBasis.fit(f, n_components=bad)
    assert A.FilterBasis.fit(f, n_components=np.int64(4)).components.shape == (4, 9)
    assert A.kl_shift(f, f[::-1], bins=np.int64(70)) == 0.0
    for rng in ((1, -1), (0, float("inf")), (float("nan"), 1), (1,), "ab"):
        with pytest.raises(A.AnalysisError, match="range must be"):
            A.kl_shift(f, f[:10], range=rng)
    for w in ([-1.0] * 9, [float("nan")] * 9):
        with pytest.raises(A.AnalysisError, match="finite and non-negative"):
            A.kl_shift(f, f[:10], weights=w)
    with pytest.raises(A.AnalysisError, match="must be a positive int"):
        A.extract_filters(_conv_with(torch.randn(2, 2, 3, 3)), kernel_size=0)
    with pytest.raises(A.AnalysisError, match="not a square"):
        A.FilterBasis.fit(np.random.default_rng(1).normal(size=(30, 10))).basis_images()
    # int keys (not a torch state dict): read as names, so no layer is named '*weight*'; a clear error
    with pytest.raises(A.AnalysisError, match="no 2D convolution"):
        A.extract_filters({0: torch.randn(2, 2, 3, 3)})


def test_explained_variance_ratio_is_a_share_of_all_variance():
    """With 5x5 kernels only 9 of 25 components are kept: their ratios are shares of the whole variance."""
    f = np.random.default_rng(2).normal(size=(500, 25))
    b = A.FilterBasis.fit(f)
    assert b.components.shape == (9, 25)
    assert 0.3 < b.explained_variance_ratio.sum() < 0.8
    full = A.FilterBasis.fit(f, n_components=25)
    np.testing.assert_allclose(full.explained_variance_ratio.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(b.explained_variance_ratio, full.explained_variance_ratio[:9], rtol=1e-12)


def test_cli_refuses_colliding_labels_and_non_models(tmp_path, capsys):
    torch.manual_seed(4)
    os.makedirs(tmp_path / "d1")
    a = _save(nn.Sequential(nn.Conv2d(1, 4, 3)), tmp_path / "x y.pt")
    b = _save(nn.Sequential(nn.Conv2d(1, 4, 3)), tmp_path / "x_y.pt")
    c = _save(nn.Sequential(nn.Conv2d(1, 4, 3)), tmp_path / "d1" / "x_y.pt")
    for args, msg in [([a, b], "same figure files"), ([b, c], "same file name"),
                      ([a, "--model", "from_published"], "unknown model 'from_published'"),
                      ([a, "--model", "rollify"], "unknown model 'rollify'")]:
        out = tmp_path / "out"
        assert cli_main(["report", *args, "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()
    for opt in ("--bins", "--kernel-size"):
        with pytest.raises(SystemExit):
            cli_main(["report", a, opt, "0", "--out", str(tmp_path / "o")])
        assert "must be a positive integer" in capsys.readouterr().err


def test_density_of_one_distinct_value_is_finite():
    """A model with a single kernel (or only zero kernels) has one coefficient value per component and a
    zero-width plot range: the density is a spike, not 0 / 0."""
    from medconv_ext.analysis.report import _kde

    d = _kde(np.array([0.5, 0.5]), np.array([0.5, 0.5]))
    assert np.isfinite(d).all() and (d > 0).all()
