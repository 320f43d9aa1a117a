"""Per-layer degeneration statistics of the CNN Filter DB method (docs/design.md §4)."""
import math
from typing import Dict, List

import numpy as np

from .filters import AnalysisError, _check_finite, conv_weights, normalize_maxabs


def _layer_kernels(w) -> np.ndarray:
    """(out, in, *k) -> (out * in, prod(k)) kernels as float64."""
    return w.detach().reshape(w.shape[0] * w.shape[1], -1).to("cpu").double().numpy()


def sparsity(kernels: np.ndarray) -> float:
    """Share of kernels whose every |w| is below max|W| / 100. An all-zero layer is fully sparse."""
    a = np.abs(kernels)
    top = a.max() if a.size else 0.0
    if top == 0:
        return 1.0
    return float((a.max(axis=1) < top / 100).mean())


def variance_entropy(kernels: np.ndarray) -> float:
    """Entropy (log10) of the normalised PCA variances of the layer's kernels; 0 log 0 = 0.
    0 for a rank-1 (or constant) layer, log10(k*k) at most. Never NaN."""
    n, dim = kernels.shape
    if n < 2:
        return 0.0
    top = np.abs(kernels).max()
    if top > 0:  # a scale-free statistic: scaled first, so that |w| ~ 1e-170 or 1e160 neither under- nor overflows
        kernels = kernels / top
    centered = kernels - kernels.mean(axis=0)
    var = np.clip(np.linalg.eigvalsh(centered.T @ centered / (n - 1)), 0, None)
    total = var.sum()
    if not total > 0:
        return 0.0  # no variance at all: a single repeated kernel
    p = var / total
    p = p[p > 0]
    return float(max(0.0, -(p * np.log10(p)).sum()))


def orthogonality(weight) -> float:
    """1 - sum_{i != j} |G_ij| / (n (n - 1)), G the Gram matrix of the L2-normalised flattened
    filters (one per output channel). 1 for orthonormal filters; a single filter counts as 1.
    All-zero filters stay zero vectors (they are orthogonal to everything)."""
    f = weight.detach().reshape(weight.shape[0], -1).to("cpu").double().numpy()
    n = f.shape[0]
    if n < 2:
        return 1.0
    f = normalize_maxabs(f)  # each filter scaled first: its norm neither under- nor overflows
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    f = np.divide(f, norms, out=np.zeros_like(f), where=norms > 0)
    g = np.abs(f @ f.T)
    off = g.sum() - np.trace(g)
    return float(max(0.0, 1.0 - off / (n * (n - 1))))


def layer_stats(model_or_state_dict, include_transposed: bool = False) -> List[Dict]:
    """One dict per convolution layer with a spatial kernel (k > 1, 2D or 3D): keys `layer`,
    `n_kernels`, `kernel`, `sparsity`, `variance_entropy` (log10), `orthogonality`.
    Rolling layers are analysed as their expanded bank."""
    rows = []
    for name, w, transposed in conv_weights(model_or_state_dict, include_transposed):
        if math.prod(w.shape[2:]) < 2:
            continue  # 1x1 convs have no spatial kernel to analyse
        _check_finite(name, w)
        w = w.transpose(0, 1) if transposed else w
        ker = _layer_kernels(w)
        rows.append({
            "layer": name,
            "kernel": "x".join(str(k) for k in w.shape[2:]),
            "n_kernels": int(ker.shape[0]),
            "sparsity": sparsity(ker),
            "variance_entropy": variance_entropy(ker),
            "orthogonality": orthogonality(w),
        })
    if not rows:
        raise AnalysisError("no convolution layer with a spatial kernel (k > 1) found")
    return rows
