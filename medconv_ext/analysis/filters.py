"""Filter extraction, the PCA basis and the KL shift of the CNN Filter DB method (docs/design.md §4)."""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

N_COMPONENTS = 9
EPS32 = float(np.finfo(np.float32).eps)
META_DTYPE = np.dtype([("layer", object), ("depth", np.float64), ("out", np.int64), ("in", np.int64)])


class AnalysisError(ValueError):
    """Bad input to the filter analysis (no usable layers, unknown layout, non-finite weights)."""


# --------------------------------------------------------------------------------------------
# collecting conv weights from a model or a state dict
# --------------------------------------------------------------------------------------------
def _is_published_rolling_layout(sd: Dict[str, torch.Tensor]) -> bool:
    """The flat key layout of the published Rolling-Filters checkpoints (weight_XY, biases_XY...)."""
    return any(k.startswith("weight_") for k in sd) and any(k.startswith("biases_") for k in sd)


def _positive_int(value, name: str) -> int:
    """value as an int (Python or NumPy integer, not bool) >= 1, else AnalysisError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise AnalysisError("%s must be a positive int, got %r" % (name, value))
    return int(value)


def _unwrap_state_dict(obj) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap_state_dict(obj[key])
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise AnalysisError("unknown checkpoint layout: expected a state dict (name -> tensor), or a dict holding one "
                        "under 'state_dict', 'model_state_dict' or 'model'; got %s" % type(obj).__name__)


def conv_weights(model_or_state_dict, include_transposed: bool = False) -> List[Tuple[str, torch.Tensor, bool]]:
    """[(layer name, dense weight, transposed)] in forward-definition order.

    A module: every nn.Conv{2,3}d (and ConvTranspose if asked) and every rolling layer of
    medconv_ext.nn, rolling layers expanded to their full bank (`expanded_weight()`).
    A state dict: every floating tensor named '*weight*' with 4 or 5 dims; the published
    Rolling-Filters layout is rebuilt as its model first, so its rolling bases are expanded. Other
    state dicts do not say which layers roll or are transposed: a weight is transposed when its name
    says so ('transpose', or a parent named 'up'); otherwise its bias decides (_state_dict_kind): one
    bias per weight row is a conv, and a bias count that only a rolling layer fits (n_base rows x
    n_rolls) is expanded as one, one that only a transposed conv fits is transposed; a count both fit
    raises AnalysisError (analyse the model instead). Without a bias a weight counts as a conv.
    Transposed weights are returned in (C_in, C_out, *k) layout and flagged."""
    from ..nn.rolling_conv import _RollingConvNd

    out = []
    if isinstance(model_or_state_dict, nn.Module):
        for name, m in model_or_state_dict.named_modules():
            if isinstance(m, _RollingConvNd):
                if m._transposed and not include_transposed:
                    continue
                out.append((name, m.expanded_weight().detach(), m._transposed))
            elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
                out.append((name, m.weight.detach(), False))
            elif include_transposed and isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                out.append((name, m.weight.detach(), True))
        return out
    sd = _unwrap_state_dict(model_or_state_dict)
    if _is_published_rolling_layout(sd):
        from ..models import from_published  # the model knows which layers roll and how far

        try:
            model = from_published(sd)
        except ValueError as e:
            raise AnalysisError("unknown checkpoint layout: %s" % e) from None
        return conv_weights(model, include_transposed)
    for name, t in sd.items():
        if not (t.is_floating_point() and t.dim() in (4, 5) and "weight" in name.split(".")[-1]):
            continue
        kind, n_rolls = _state_dict_kind(name, t, sd)
        if kind == "transposed" and not include_transposed:
            continue
        w = t.detach()
        if kind == "rolling":
            from ..reference.rolling_conv import expand_rolling_weight

            w = expand_rolling_weight(w, n_rolls)
        out.append((_layer_name(name), w, kind == "transposed"))
    return out


def _layer_name(weight_key: str) -> str:
    """'enc.0.conv.weight' -> 'enc.0.conv' (other keys as they are)."""
    return weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key


def _state_dict_kind(name: str, w: torch.Tensor, sd: Dict[str, torch.Tensor]) -> Tuple[str, int]:
    """("conv" | "transposed" | "rolling", n_rolls) of a state dict's weight, from its name and its bias.
    A conv has one bias per weight row (w.shape[0]); a transposed conv (C_in, C_out/groups, *k) one per
    column, times the groups; a rolling base (n_base, C_in, *k) n_base * n_rolls with 2 <= n_rolls <= C_in."""
    if "transpose" in name.lower() or name.split(".")[-2:-1] == ["up"]:
        return "transposed", 0
    bias = sd.get(name[: -len("weight")] + "bias") if name.endswith("weight") else None
    if bias is None or bias.dim() != 1 or bias.shape[0] == w.shape[0]:
        return "conv", 0
    d0, d1, nbias = w.shape[0], w.shape[1], bias.shape[0]
    rolling = nbias % d0 == 0 and 2 <= nbias // d0 <= d1  # d0 = n_base, d1 = C_in
    transposed = nbias >= d1 and nbias % d1 == 0 and d0 % (nbias // d1) == 0  # d0 = C_in, d1 = C_out / groups
    if rolling and not transposed:
        return "rolling", nbias // d0
    if transposed and not rolling:
        return "transposed", 0
    layer = _layer_name(name)
    if rolling:
        raise AnalysisError(
            "layer %r: weight %s with %d bias values fits both a rolling layer (%d base(s) x %d rolls) and a "
            "transposed conv, and a state dict does not say which. Analyse the model instead (Python: the "
            "nn.Module; command line: --model NAME --weights PATH)"
            % (layer, tuple(w.shape), nbias, d0, nbias // d0))
    raise AnalysisError(
        "layer %r: weight %s with %d bias values fits no convolution (a conv has one bias per weight row, a rolling "
        "base n_base x n_rolls, a transposed conv a multiple of the weight's second dim)"
        % (layer, tuple(w.shape), nbias))


def _check_finite(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        n_bad = int((~torch.isfinite(w)).sum())
        raise AnalysisError("layer %r has %d non-finite weights (NaN or Inf): the analysis needs finite filters"
                            % (name, n_bad))


def extract_filters(model_or_state_dict, kernel_size: int = 3, include_transposed: bool = False
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Every k x k kernel slice of every 2D conv weight (rolling layers expanded).

    Returns (filters, meta): filters is a float64 array (n, k*k); meta is a NumPy record array
    with one record per slice: `layer` (name), `depth` (normalised depth in [0, 1] of the layer
    among the conv layers that have k x k kernels: 0 first, 1 last), `out` and `in` (channels)."""
    k = kernel_size = _positive_int(kernel_size, "kernel_size")
    layers = [(n, w, t) for n, w, t in conv_weights(model_or_state_dict, include_transposed)
              if w.dim() == 4 and tuple(w.shape[-2:]) == (k, k)]
    if not layers:
        raise AnalysisError("no 2D convolution with %dx%d kernels found (%s)" % (
            k, k, "transposed convs excluded (include_transposed=True includes them)" if not include_transposed
            else "transposed convs included"))
    mats, metas = [], []
    n_layers = len(layers)
    for i, (name, w, transposed) in enumerate(layers):
        _check_finite(name, w)
        w = w.transpose(0, 1) if transposed else w  # (out, in, k, k) for both kinds
        mats.append(w.reshape(-1, k * k).to(torch.float64).cpu().numpy())
        m = np.empty(w.shape[0] * w.shape[1], dtype=META_DTYPE)
        m["layer"] = name  # one shared str object per layer: compact for millions of kernels
        m["depth"] = i / (n_layers - 1) if n_layers > 1 else 0.0
        m["out"] = np.repeat(np.arange(w.shape[0]), w.shape[1])
        m["in"] = np.tile(np.arange(w.shape[1]), w.shape[0])
        metas.append(m)
    return np.concatenate(mats, axis=0), np.concatenate(metas)


# --------------------------------------------------------------------------------------------
# PCA basis and coefficients
# --------------------------------------------------------------------------------------------
def normalize_maxabs(filters: np.ndarray) -> np.ndarray:
    """Divide each kernel by its largest absolute value; all-zero kernels stay zero."""
    f = np.asarray(filters, dtype=np.float64)
    scale = np.abs(f).max(axis=1, keepdims=True)
    return np.divide(f, scale, out=np.zeros_like(f), where=scale > 0)


def _as_filters(filters, name="filters") -> np.ndarray:
    f = np.asarray(filters, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] == 0:
        raise AnalysisError("%s must be a non-empty 2D array (n, k*k), got shape %s" % (name, f.shape))
    if not np.isfinite(f).all():
        raise AnalysisError("%s contain NaN or Inf values" % name)
    return f


class FilterBasis:
    """PCA (9 components, or k*k if fewer) of max-abs-normalised kernels."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, explained_variance: np.ndarray,
                 total_variance: Optional[float] = None):
        """total_variance: the variance of all k*k components (default: of the kept ones); the ratios are
        shares of it, so with fewer components than k*k (5x5 kernels) they sum to less than 1."""
        self.mean = mean
        self.components = components  # (n_components, k*k), rows orthonormal
        self.explained_variance = explained_variance
        total = explained_variance.sum() if total_variance is None else total_variance
        self.explained_variance_ratio = explained_variance / total if total > 0 else np.full_like(
            explained_variance, 1.0 / len(explained_variance))

    @classmethod
    def fit(cls, filters, n_components: int = N_COMPONENTS) -> "FilterBasis":
        f = normalize_maxabs(_as_filters(filters))
        return cls._fit_normalised([f], n_components)

    @classmethod
    def _fit_normalised(cls, parts: Sequence[np.ndarray], n_components: int = N_COMPONENTS) -> "FilterBasis":
        n_components = _positive_int(n_components, "n_components")
        # Mean and scatter as sums over the parts: the same bits whatever the order of the parts,
        # so that a basis fitted on (a, b) equals one fitted on (b, a) exactly.
        n = sum(p.shape[0] for p in parts)
        mean = sum(p.sum(axis=0) for p in parts) / n
        scatter = sum(p.T @ p for p in parts)
        cov = (scatter - n * np.outer(mean, mean)) / max(n - 1, 1)
        evals, evecs = np.linalg.eigh((cov + cov.T) / 2)
        order = np.argsort(evals)[::-1]
        evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
        # Deterministic signs: the largest-magnitude entry of each component is positive.
        signs = np.sign(evecs[np.abs(evecs).argmax(axis=0), np.arange(evecs.shape[1])])
        evecs = evecs * np.where(signs == 0, 1, signs)
        m = min(n_components, evecs.shape[1])
        return cls(mean, evecs[:, :m].T.copy(), evals[:m].copy(), float(evals.sum()))

    @property
    def kernel_size(self) -> int:
        return int(round(math.sqrt(self.components.shape[1])))

    def basis_images(self) -> np.ndarray:
        """(n_components, k, k) images of the principal components."""
        k = self.kernel_size
        if k * k != self.components.shape[1]:
            raise AnalysisError("the basis has %d values per kernel, not a square k x k kernel: no images"
                                % self.components.shape[1])
        return self.components.reshape(-1, k, k)

    def coefficients(self, filters) -> np.ndarray:
        """(n, n_components) PCA coefficients of the max-abs-normalised kernels."""
        f = normalize_maxabs(_as_filters(filters))
        if f.shape[1] != self.components.shape[1]:
            raise AnalysisError("filters have %d values per kernel but the basis was fitted on %d"
                                % (f.shape[1], self.components.shape[1]))
        return (f - self.mean) @ self.components.T


# --------------------------------------------------------------------------------------------
# KL shift between two filter sets
# --------------------------------------------------------------------------------------------
def _hist_density(x: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    h, _ = np.histogram(x, bins=bins, range=(lo, hi), density=True)
    h = h * ((hi - lo) / bins)  # probabilities per bin
    h = np.where(h > 0, h, EPS32)
    return h / h.sum()


def kl_shift(a, b, basis: Optional[FilterBasis] = None, bins: int = 70,
             range: Optional[Tuple[float, float]] = None, weights: Union[str, Sequence[float]] = "variance") -> float:
    """Symmetric, per-component, histogram-based KL divergence between two filter sets (n, k*k).

    Per PCA component: histograms of both sets' coefficients on a common range (`range`, or the
    joint min/max), `bins` bins, density-normalised, empty bins set to float32 eps and
    renormalised; D = KL(P||Q) + KL(Q||P) (natural log). The result is sum_i w_i * D_i with
    w = the basis' explained-variance ratios ("variance") or 1/n_components ("uniform").
    Without a basis, one is fitted on both sets together (order-independent)."""
    fa, fb = _as_filters(a, "a"), _as_filters(b, "b")
    if fa.shape[1] != fb.shape[1]:
        raise AnalysisError("a and b have different kernel sizes (%d vs %d values)" % (fa.shape[1], fb.shape[1]))
    bins = _positive_int(bins, "bins")
    if range is not None:
        try:
            lo_r, hi_r = (float(v) for v in range)
        except (TypeError, ValueError):
            raise AnalysisError("range must be two numbers (lo, hi), got %r" % (range,)) from None
        if not (math.isfinite(lo_r) and math.isfinite(hi_r) and hi_r > lo_r):
            raise AnalysisError("range must be two finite numbers lo < hi, got %r" % (range,))
    if basis is None:
        basis = FilterBasis._fit_normalised([normalize_maxabs(fa), normalize_maxabs(fb)])
    ca, cb = basis.coefficients(fa), basis.coefficients(fb)
    n_comp = ca.shape[1]
    if isinstance(weights, str):
        if weights == "variance":
            w = basis.explained_variance_ratio
        elif weights == "uniform":
            w = np.full(n_comp, 1.0 / n_comp)
        else:
            raise AnalysisError("weights must be 'variance', 'uniform' or a sequence of %d numbers, got %r"
                                % (n_comp, weights))
    else:
        try:
            w = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise AnalysisError("weights must be 'variance', 'uniform' or %d numbers, got %r" % (n_comp, weights)) \
                from None
        if w.shape != (n_comp,):
            raise AnalysisError("weights must have %d values, got %s" % (n_comp, w.shape))
        if not (np.isfinite(w).all() and (w >= 0).all()):
            raise AnalysisError("weights must be finite and non-negative, got %s" % (w,))
    total = 0.0
    for i in np.arange(n_comp):
        if range is not None:
            lo, hi = lo_r, hi_r
        else:
            lo = min(ca[:, i].min(), cb[:, i].min())
            hi = max(ca[:, i].max(), cb[:, i].max())
            # Coefficients of max-abs-normalised kernels are O(1): a spread of 1e-9 or less is rounding (equal
            # kernels, or multiples of one kernel), not a distribution; numpy cannot cut a few ulps into `bins`
            # bins either. One occupied bin in both: divergence 0.
            if not hi - lo > 1e-9:
                lo, hi = lo - 0.5 / bins, lo + 1.0 - 0.5 / bins
        p = _hist_density(ca[:, i], bins, lo, hi)
        q = _hist_density(cb[:, i], bins, lo, hi)
        # Summed as one expression of p and q: swapping a and b gives the same value exactly.
        total += w[i] * float(np.sum((p - q) * (np.log(p) - np.log(q))))
    return total

