"""The filter-analysis report: figures (ridge plots, basis images, KL heat map) and a
Markdown + JSON summary. Everything is computed and rendered in memory first, then written,
so a failure never leaves a partial report behind."""
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from .._errors import FileError, check_readable, need, reading
from .filters import AnalysisError, FilterBasis, extract_filters, kl_shift, normalize_maxabs
from .stats import layer_stats


@dataclass
class ModelEntry:
    label: str
    source: str  # path or "model NAME (random init)"
    obj: object  # nn.Module or state dict


def _kde(x: np.ndarray, grid: np.ndarray, max_points: int = 20000) -> np.ndarray:
    """Gaussian kernel density estimate (Scott's bandwidth) on `grid`."""
    if x.size > max_points:  # a fixed subsample keeps big models fast and the plot reproducible
        x = x[np.linspace(0, x.size - 1, max_points).astype(np.int64)]
    sd = x.std()
    bw = 1.06 * sd * x.size ** (-1 / 5) if sd > 0 else (grid[1] - grid[0])
    if not bw > 0:  # one distinct value on a zero-width grid: a spike, not 0 / 0
        return np.ones_like(grid)
    z = (grid[:, None] - x[None, :]) / bw
    return np.exp(-0.5 * z * z).sum(axis=1) / (x.size * bw * np.sqrt(2 * np.pi))


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _ridge_png(label: str, coef: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bytes:
    import matplotlib.pyplot as plt

    n = coef.shape[1]
    fig, ax = plt.subplots(figsize=(6, 0.7 * n + 1))
    for i in range(n):
        grid = np.linspace(lo[i], hi[i], 200)
        d = _kde(coef[:, i], grid)
        d = d / d.max() if d.max() > 0 else d
        base = n - 1 - i
        xs = (grid - lo[i]) / (hi[i] - lo[i] if hi[i] > lo[i] else 1)  # each component on its own range
        ax.fill_between(xs, base, base + 0.9 * d, alpha=0.6, color=plt.cm.viridis(i / max(n - 1, 1)))
        ax.plot(xs, base + 0.9 * d, color="k", lw=0.6)
    ax.set_yticks(range(n))
    ax.set_yticklabels(["c%d" % i for i in reversed(range(n))])
    ax.set_xlabel("coefficient (each component scaled to its common range over all models)")
    ax.set_title("PCA coefficient distributions: %s" % label)
    return _png(fig)


def _overlay_png(labels: List[str], coefs: List[np.ndarray], lo, hi, evr) -> bytes:
    import matplotlib.pyplot as plt

    n = coefs[0].shape[1]
    cols = 3
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for i in range(n):
        ax = axes[i // cols][i % cols]
        grid = np.linspace(lo[i], hi[i], 200)
        for label, c in zip(labels, coefs):
            ax.plot(grid, _kde(c[:, i], grid), label=label)
        ax.set_title("component %d (%.1f%% var.)" % (i, 100 * evr[i]), fontsize=9)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Coefficient KDEs per component, all models")
    fig.tight_layout()
    return _png(fig)


def _basis_png(basis: FilterBasis) -> bytes:
    import matplotlib.pyplot as plt

    imgs = basis.basis_images()
    n = imgs.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(1.4 * n, 1.8))
    vmax = np.abs(imgs).max()
    for i, ax in enumerate(np.atleast_1d(axes)):
        ax.imshow(imgs[i], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title("%d: %.1f%%" % (i, 100 * basis.explained_variance_ratio[i]), fontsize=8)
        ax.axis("off")
    fig.suptitle("Principal components of the pooled max-abs-normalised kernels")
    return _png(fig)


def _heatmap_png(labels: List[str], kl: np.ndarray) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.0 * len(labels) + 2))
    im = ax.imshow(kl, cmap="magma_r")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, "%.3f" % kl[i, j], ha="center", va="center",
                    color="w" if kl[i, j] > kl.max() / 2 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="symmetric KL (variance-weighted)")
    ax.set_title("Filter-distribution shift between models")
    return _png(fig)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def build_report(entries: List[ModelEntry], kernel_size: int = 3, bins: int = 70) -> Dict[str, bytes]:
    """{file name: content} of the whole report; raises AnalysisError before anything is written."""
    matplotlib = need("matplotlib", "the analysis report's figures")

    matplotlib.use("Agg")
    if not entries:
        raise AnalysisError("nothing to analyse: give at least one checkpoint or --model")
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise AnalysisError("model labels must be unique, got %s (two checkpoints with the same file name: copy "
                            "or link one under another name)" % labels)
    slugs = [_slug(label) for label in labels]
    if len(set(slugs)) != len(slugs):
        raise AnalysisError("model labels %s would write the same figure files (%s); rename a checkpoint"
                            % (labels, ", ".join("ridge_%s.png" % x for x in slugs)))
    filters, stats = [], []
    for e in entries:
        try:
            f, _ = extract_filters(e.obj, kernel_size=kernel_size)
            stats.append(layer_stats(e.obj))
        except AnalysisError as err:
            raise AnalysisError("%s (%s): %s" % (e.label, e.source, err)) from None
        filters.append(f)
    basis = FilterBasis._fit_normalised([normalize_maxabs(f) for f in filters])
    coefs = [basis.coefficients(f) for f in filters]
    lo = np.min([c.min(axis=0) for c in coefs], axis=0)
    hi = np.max([c.max(axis=0) for c in coefs], axis=0)
    n = len(entries)
    kl = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            kl[i, j] = kl[j, i] = kl_shift(filters[i], filters[j], basis=basis, bins=bins)

    files: Dict[str, bytes] = {}
    for e, c in zip(entries, coefs):
        files["ridge_%s.png" % _slug(e.label)] = _ridge_png(e.label, c, lo, hi)
    files["coefficients_overlay.png"] = _overlay_png(labels, coefs, lo, hi, basis.explained_variance_ratio)
    files["basis.png"] = _basis_png(basis)
    if n > 1:
        files["kl_heatmap.png"] = _heatmap_png(labels, kl)

    summary = {
        "kernel_size": kernel_size,
        "bins": bins,
        "models": [{"label": e.label, "source": e.source, "n_filters": int(f.shape[0]), "layers": s}
                   for e, f, s in zip(entries, filters, stats)],
        "explained_variance_ratio": [float(v) for v in basis.explained_variance_ratio],
        "kl_shift": {"labels": labels, "matrix": kl.tolist()},
        "figures": sorted(files),
    }
    files["summary.json"] = json.dumps(summary, indent=2).encode()
    files["summary.md"] = _markdown(summary).encode()
    return files


def _markdown(s: Dict) -> str:
    lines = ["# Filter analysis report", "",
             "Method: CNN Filter DB (every %dx%d kernel, max-abs normalised, PCA with %d components fitted on "
             "all models together; KL shift = variance-weighted sum over components of the symmetric KL "
             "between %d-bin coefficient histograms)." % (s["kernel_size"], s["kernel_size"],
                                                          len(s["explained_variance_ratio"]), s["bins"]), "",
             "| model | source | %dx%d kernels |" % (s["kernel_size"], s["kernel_size"]), "|---|---|---:|"]
    for m in s["models"]:
        lines.append("| %s | %s | %d |" % (m["label"], m["source"], m["n_filters"]))
    lines += ["", "Explained variance ratio per component: " +
              ", ".join("%.3f" % v for v in s["explained_variance_ratio"]), ""]
    labels = s["kl_shift"]["labels"]
    if len(labels) > 1:
        lines += ["## KL shift between models", "", "| | " + " | ".join(labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        for lab, row in zip(labels, s["kl_shift"]["matrix"]):
            lines.append("| %s | %s |" % (lab, " | ".join("%.4f" % v for v in row)))
        lines += ["", "![KL heat map](kl_heatmap.png)", ""]
    lines += ["## Coefficient distributions", "", "![overlay](coefficients_overlay.png)", "",
              "![basis](basis.png)", ""]
    for m in s["models"]:
        lines += ["## Layers of %s" % m["label"], "", "![ridge](ridge_%s.png)" % _slug(m["label"]), "",
                  "| layer | kernel | kernels | sparsity | variance entropy (log10) | orthogonality |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in m["layers"]:
            lines.append("| %s | %s | %d | %.3f | %.3f | %.3f |" % (
                r["layer"], r["kernel"], r["n_kernels"], r["sparsity"], r["variance_entropy"], r["orthogonality"]))
        lines.append("")
    return "\n".join(lines)


def write_report(files: Dict[str, bytes], out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, data in files.items():
        path = os.path.join(out_dir, name)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def load_entry(path: str, label: Optional[str] = None) -> ModelEntry:
    import torch

    if not os.path.exists(path):
        raise AnalysisError("no such checkpoint: %s" % path)
    try:
        check_readable(path)
        with reading(path):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileError as e:
        raise AnalysisError(str(e)) from None
    return ModelEntry(label or os.path.splitext(os.path.basename(path))[0], path, obj)


def model_entry(name: str, weights: Optional[str] = None, seed: int = 0, label: Optional[str] = None) -> ModelEntry:
    import torch

    from .. import models

    builder = getattr(models, name, None) if name in models.BUILDERS else None
    if builder is None:
        raise AnalysisError("unknown model %r; the package's models are: %s"
                            % (name, ", ".join(sorted(models.BUILDERS))))
    torch.manual_seed(seed)
    model = builder()
    if weights:
        ck = load_entry(weights).obj
        from .filters import _unwrap_state_dict

        try:
            model.load_state_dict(_unwrap_state_dict(ck))
        except RuntimeError as e:
            raise AnalysisError("%s does not fit model %r: %s" % (weights, name, str(e).splitlines()[0])) from None
        source = "%s (model %s)" % (weights, name)
    else:
        source = "model %s, random init (seed %d)" % (name, seed)
    return ModelEntry(label or (name if weights is None else "%s:%s" % (name, os.path.basename(weights))), source, model)
