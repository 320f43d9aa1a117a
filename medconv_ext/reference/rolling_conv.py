"""Pure-PyTorch reference of rolling convolution (docs/design.md §1), written for clarity.

It materializes the full filter bank from the base with one index gather and calls torch's
convolution. Tests use it in float64 as the ground truth for every backend.
"""
import torch
import torch.nn.functional as F


def roll_index(c_in: int, n_rolls: int, device=None) -> torch.Tensor:
    """(n_rolls, c_in) table of (c - r) mod c_in: the base channel read by channel c at roll r."""
    r = torch.arange(n_rolls, device=device).unsqueeze(1)
    c = torch.arange(c_in, device=device).unsqueeze(0)
    return (c - r) % c_in


def expand_rolling_weight(weight: torch.Tensor, n_rolls: int) -> torch.Tensor:
    """Base (n_base, C_in, *k) -> dense bank (n_rolls * n_base, C_in, *k) with
    W[r * n_base + b, c] = weight[b, (c - r) mod C_in]."""
    n_base, c_in = weight.shape[:2]
    bank = weight[:, roll_index(c_in, n_rolls, weight.device)]  # (n_base, n_rolls, C_in, *k)
    return bank.transpose(0, 1).reshape(n_rolls * n_base, c_in, *weight.shape[2:])


def expand_rolling_weight_transpose(weight: torch.Tensor, n_rolls: int) -> torch.Tensor:
    """Transposed base (C_in, n_base, *k) -> dense ConvTranspose bank (C_in, n_rolls * n_base, *k)
    with W_t[c, r * n_base + b] = weight[(c - r) mod C_in, b]."""
    return expand_rolling_weight(weight.transpose(0, 1), n_rolls).transpose(0, 1)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def rolling_conv(x, weight, bias, stride, padding, dilation, n_rolls):
    dims = weight.dim() - 2
    return _CONV[dims](x, expand_rolling_weight(weight, n_rolls), bias, stride, padding, dilation)


def rolling_conv_transpose(x, weight, bias, stride, padding, output_padding, dilation, n_rolls):
    dims = weight.dim() - 2
    return _CONV_T[dims](x, expand_rolling_weight_transpose(weight, n_rolls), bias, stride, padding,
                         output_padding, 1, dilation)
