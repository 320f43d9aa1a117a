"""Learned-filter analysis (CNN Filter DB method, docs/design.md §4): filter extraction, the PCA
basis of 3x3 kernels, coefficient distributions, the KL shift between models and per-layer
degeneration statistics. `python -m medconv_ext.analysis report ...` writes a report."""
from .filters import AnalysisError, FilterBasis, extract_filters, kl_shift, normalize_maxabs  # noqa: F401
from .stats import layer_stats, orthogonality, sparsity, variance_entropy  # noqa: F401
