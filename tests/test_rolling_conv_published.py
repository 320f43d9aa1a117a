"""A layer of the published Rolling UNet (segment.pth) through rolling_conv2d equals the
published construction: roll the base along its channel axis, concatenate, dense conv."""

import pytest
import torch
import torch.nn.functional as F

import medconv_ext as mc
from conftest import data_file, needs_data
from _rolling_util import OP, OP_T, backend_params, skip_unsupported

SEGMENT = data_file("segment.pth")  # in MEDCONV_DATA_DIR (docs/data.md)
pytestmark = needs_data("segment.pth")


def published_bank(w, n_rolls):
    """As the published code: torch.roll(w, shifts=1, dims=1) repeatedly, torch.cat along dim 0."""
    banks, cur = [w], w
    for _ in range(n_rolls - 1):
        cur = torch.roll(cur, shifts=1, dims=1)
        banks.append(cur)
    return torch.cat(banks, dim=0)


def published_bank_transposed(w, n_rolls):
    """The published up-sampling layers roll (C_in, 1, k, k) along dim 0, concatenate along dim 1."""
    banks, cur = [w], w
    for _ in range(n_rolls - 1):
        cur = torch.roll(cur, shifts=1, dims=0)
        banks.append(cur)
    return torch.cat(banks, dim=1)


@pytest.fixture(scope="module")
def state():
    return torch.load(SEGMENT, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_weight_20_double_roll(state, device, backend, dtype):
    skip_unsupported(OP, backend, device, dtype)
    w, b = state["weight_20"], state["biases_20"]
    assert tuple(w.shape) == (2, 64, 3, 3) and tuple(b.shape) == (128,)  # a double roll: 128 outputs
    x = torch.randn(2, 64, 13, 11)
    expect = F.conv2d(x.double(), published_bank(w.double(), 64), b.double(), padding=1)
    out = mc.rolling_conv2d(x.to(device, dtype), w.to(device, dtype), b.to(device, dtype), padding=1,
                            backend=backend)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.cpu().double(), expect, rtol=tol, atol=tol * expect.abs().max().item())


@pytest.mark.parametrize("device,backend", backend_params(OP_T))
def test_up_sampling_layer_u4(state, device, backend):
    skip_unsupported(OP_T, backend, device, torch.float64)
    w, b = state["weight_u4"].double(), state["biases_u4"].double()
    c_in = w.shape[0]
    x = torch.randn(1, c_in, 5, 4, dtype=torch.float64)
    expect = F.conv_transpose2d(x, published_bank_transposed(w, c_in // 2), b, stride=2)
    out = mc.rolling_conv_transpose2d(x.to(device), w.to(device), b.to(device), stride=2, n_rolls=c_in // 2,
                                      backend=backend)
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-10, atol=1e-10 * expect.abs().max().item())
