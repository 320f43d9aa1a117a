"""Pure-PyTorch reference of involution (docs/design.md §2), written for clarity, never for speed.

    out[n, c, p] = sum_t weight[n, g(c), t, p] * x[n, c, p*s + t*d - pad],  g(c) = c // (C // G)

It materializes every sliding window (an N * C * K^d * L buffer, L = number of output
positions), exactly like the published unfold-based implementation; it is the "reference"
backend and the `unfold` baseline of bench/bench_involution.py. Tests use it in float64 as the
ground truth for every backend.
"""
import math
from typing import Sequence

import torch
import torch.nn.functional as F


def unfold_windows(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """(N, C, *S) -> (N, C, prod(K), prod(S_out)): every input value each output position reads.
    2D uses F.unfold (as published); 3D the same windows built with Tensor.unfold."""
    n, c = x.shape[:2]
    dims = x.dim() - 2
    taps = math.prod(kernel_size)
    if dims == 2:
        cols = F.unfold(x, tuple(kernel_size), tuple(dilation), tuple(padding), tuple(stride))
        return cols.view(n, c, taps, cols.shape[-1])  # sizes named: an empty batch has no -1 to infer
    pad = []
    for p in reversed(padding):
        pad += [p, p]
    xp = F.pad(x, pad)
    for i, (k, s, d) in enumerate(zip(kernel_size, stride, dilation)):
        # windows of extent d*(k-1)+1 every s steps, then keep every d-th tap: (..., S_out_i, ..., k)
        xp = xp.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    # xp: (N, C, Do, Ho, Wo, kD, kH, kW) -> (N, C, kD*kH*kW, Do*Ho*Wo)
    out_sizes = xp.shape[2:2 + dims]
    xp = xp.permute(0, 1, 5, 6, 7, 2, 3, 4)
    return xp.reshape(n, c, taps, int(torch.Size(out_sizes).numel()))


def involution(x: torch.Tensor, weight: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """x (N, C, *S), weight (N, G, *K, *S_out) -> (N, C, *S_out)."""
    dims = x.dim() - 2
    n, c = x.shape[:2]
    g = weight.shape[1]
    out_sizes = weight.shape[2 + dims:]
    taps = math.prod(kernel_size)
    cols = unfold_windows(x, kernel_size, stride, padding, dilation)          # (N, C, T, L)
    L = cols.shape[-1]  # named, not -1: an empty batch has nothing to infer it from
    cols = cols.reshape(n, g, c // g, taps, L)                                # (N, G, C/G, T, L)
    w = weight.reshape(n, g, 1, taps, L)                                      # (N, G, 1, T, L)
    return (w * cols).sum(dim=3).reshape(n, c, *out_sizes)
