import os
import sys

import torch

# Triton kernels run on CPU tensors in interpreter mode when no GPU is present. triton.jit
# reads TRITON_INTERPRET when a kernel is defined, so this must happen before any test module
# imports medconv_ext.triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The published Rolling-Filters checkpoints (test data, never committed); tests skip without them.
DATA_DIR = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "rolling-filters-official"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
